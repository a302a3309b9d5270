"""SaShiMi's SC09 sample-quality metrics (FID, IS, mIS, AM) as an `evaluate` module:

    metric = evaluate.load("training/evaluate_modules/sc09_quality")
    metric.compute(predictions=generated, reference_waveforms=training_clips, classifier="sc09_classifier.safetensors")

`predictions` are generated waveforms and `reference_waveforms` real (training) ones (the two sets may differ in
size, so the reference is an argument, not per-prediction references), float in [-1, 1] at 16 kHz, padded or cut
to 1 s; `classifier` is a digit classifier written by `training/train_classifier.py`. A thin wrapper
over `training.metrics.sample_quality` (torchmetrics' FID and IS with that classifier, plus mIS and AM).
"""

import datasets
import evaluate
import torch

from training.metrics import DigitClassifier, sample_quality

_KWARGS = """
Args:
    predictions: generated waveforms, one float sequence each.
    reference_waveforms: real waveforms (the FID reference and the AM's class prior), one float sequence each.
    classifier: path of the digit classifier (.safetensors or a torch state dict).
    seed: seed of IS's shuffle and mIS's pairs (default 0).
Returns:
    fid, is, mis, am, class_histogram.
"""


def _clips(waves, rate):
    out = torch.zeros(len(waves), rate)
    for i, wave in enumerate(waves):
        wave = torch.as_tensor(wave, dtype=torch.float32)[:rate]
        out[i, : len(wave)] = wave
    return out


class SC09Quality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="SaShiMi, arXiv 2202.09729; Poolformer, arXiv 2510.02206",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, reference_waveforms=None, classifier=None, seed=0):
        if classifier is None or reference_waveforms is None:
            raise ValueError("sc09_quality needs reference_waveforms=<real clips> and classifier=<path of a digit "
                             "classifier> (train_classifier.py)")
        model = DigitClassifier.load(classifier)
        rate = model.config["sample_rate"]
        return sample_quality(model, _clips(predictions, rate), _clips(reference_waveforms, rate), seed=seed)
