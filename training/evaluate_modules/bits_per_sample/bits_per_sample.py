"""Bits per sample, the NLL convention of this project's training and evaluation, as an `evaluate` module:

    metric = evaluate.load("training/evaluate_modules/bits_per_sample")
    metric.add_batch(predictions=logits, references=labels)       # (B, T, vocab) logits, (B, T) labels
    metric.compute()   # {"bits_per_sample": ..., "nll_nats": ..., "predicted_samples": ...}

logits[:, t] predict labels[:, t + 1] (as a transformers causal LM's); labels of -100 are not predicted. The result
is the total NLL over every predicted sample divided by their count, in bits: it does not depend on the batching.
A thin wrapper over `training.metrics.nll_per_item`.
"""


import datasets
import evaluate
import torch

from modeling_poolformer import nats_to_bits
from training.metrics import nll_per_item

_KWARGS = """
Args:
    predictions: logits, one (T, vocab) array per sequence.
    references: labels, one (T,) int sequence per sequence, -100 where nothing is predicted.
Returns:
    bits_per_sample, nll_nats (total), predicted_samples.
"""


class BitsPerSample(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Poolformer, arXiv 2510.02206",
            inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                "references": datasets.Sequence(datasets.Value("int64")),
            }),
        )

    def _compute(self, predictions, references):
        total, count = 0.0, 0.0
        for logits, labels in zip(predictions, references):
            nll, n = nll_per_item(torch.as_tensor(logits).unsqueeze(0), torch.as_tensor(labels).unsqueeze(0))
            total, count = total + nll.item(), count + n.item()
        if count == 0:
            raise ValueError("bits_per_sample: no predicted sample (every label -100): there is no NLL to report")
        return {"bits_per_sample": nats_to_bits(total / count), "nll_nats": total,
                "predicted_samples": int(count)}
