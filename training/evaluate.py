"""Evaluate a Poolformer: test NLL in bits per sample and, for SC09, sample quality (FID, IS, mIS, AM).

    python training/evaluate.py --model DIR_OR_REPO --dataset krandiash/sc09 --split test
    python training/evaluate.py --model DIR_OR_REPO --dataset krandiash/sc09 --no_nll \\
        --quality --classifier sc09_classifier.safetensors --num_generate 10240 --trim

NLL uses the training convention: total NLL over every unmasked predicted sample divided by their count (a
per-sample average over the split, independent of the batch size), with the model's EMA weights as exported.
Quality follows SaShiMi: N unconditional clips at temperature 1 from the zero token, optionally trimmed to the
clips whose NLL under the model ranks between 40% and 95% (`--trim`); features and class probabilities from
the digit classifier of `train_classifier.py`; reference statistics from the training split. The JSON result
states the protocol used.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import AutoModelForCausalLM

from modeling_poolformer import decode_audio, nats_to_bits
from training.data import DataArguments, build_datasets
from training.metrics import DigitClassifier, nll_bits, sample_quality
from training.utils import at_least, check_file, check_flags, check_local_or_hub, parse_arguments, positive


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "a saved model folder or a Hub repo id"})
    split: Literal["train", "validation", "test"] = "test"
    batch_size: int = 8
    max_batches: Optional[int] = field(default=None, metadata={"help": "evaluate only the first batches (an estimate)"})
    no_nll: bool = field(default=False, metadata={"help": "skip the NLL"})
    quality: bool = field(default=False, metadata={"help": "SC09 sample quality: FID, IS, mIS, AM"})
    classifier: Optional[str] = field(default=None, metadata={
        "help": "digit classifier checkpoint (.safetensors, or a torch state dict)"})
    num_generate: int = field(default=256, metadata={"help": "generated clips (the thesis protocol uses 10240)"})
    seconds: float = field(default=1.0, metadata={"help": "length of generated clips"})
    generate_batch_size: int = 64
    num_reference: int = field(default=2048, metadata={"help": "training clips for the reference statistics"})
    trim: bool = field(default=False, metadata={"help": "SaShiMi's likelihood trimming: keep NLL ranks 40%%-95%%"})
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = "eval_results.json"

    def __post_init__(self):
        if self.quality and not self.classifier:
            raise ValueError("--quality needs --classifier (train one with training/train_classifier.py)")
        check_flags(self, [("batch_size", at_least(1), "an int >= 1"), ("generate_batch_size", at_least(1), "an int >= 1"),
                           ("max_batches", at_least(1), "an int >= 1 (leave it out for the whole split)"),
                           ("num_generate", at_least(2), "an int >= 2"), ("num_reference", at_least(2), "an int >= 2"),
                           ("seconds", positive, "a number > 0")])
        check_local_or_hub(self.model, "--model")
        if self.classifier:
            check_file(self.classifier, "--classifier")


@torch.no_grad()
def generate_clips(model, args):
    """(waveforms (N, rate) padded/cut to 1 s for the classifier, per-clip NLL in bits, protocol text)."""
    rate = model.config.sample_rate
    new_tokens = max(1, int(round(args.seconds * rate)))
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    tokens, nll = [], []
    for start in range(0, args.num_generate, args.generate_batch_size):
        count = min(args.generate_batch_size, args.num_generate - start)
        seq = model.generate(max_new_tokens=new_tokens, num_return_sequences=count, do_sample=True,
                             temperature=1.0, top_k=0, generator=generator, progress=True)
        logits = model(seq).logits[:, :-1].float()
        nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none").mean(1))
        tokens.append(seq[:, 1:].cpu())
    tokens, nll = torch.cat(tokens), nats_to_bits(torch.cat(nll).cpu())
    protocol = (f"{args.num_generate} unconditional clips of {args.seconds} s, temperature 1, from token "
                f"{model.config.bos_token_id}, seed {args.seed}")
    if args.trim:
        order = nll.argsort()  # ranks by NLL, lowest first
        keep = order[int(0.40 * len(order)) : int(0.95 * len(order))]
        tokens, nll = tokens[keep], nll[keep]
        protocol += f"; likelihood trimming: kept NLL ranks 40%-95% ({len(keep)} clips)"
    else:
        protocol += "; no trimming"
    waves = decode_audio(tokens, model.config.quantization, model.config.vocab_size)
    clip = torch.zeros(len(waves), rate)
    clip[:, : min(rate, waves.shape[1])] = waves[:, :rate]
    return clip, nll, protocol


def main(argv=None):
    args, data_args = parse_arguments((EvaluateArguments, DataArguments), argv, __doc__)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(args.device).eval()
    config = model.config
    protocol, spec, datasets = build_datasets(data_args, config)
    if spec.quantization != config.quantization:
        raise SystemExit(f"evaluate.py: error: protocol {protocol} quantises with {spec.quantization}, the model with "
                         f"{config.quantization}: its NLL would not be comparable (--protocol generic uses the "
                         "model's)")
    result = {"model": args.model, "dataset": data_args.dataset or "built-in spoken digits", "protocol": protocol,
              "quantization": spec.quantization, "minmax": spec.minmax, "seq_len": spec.seq_len, "mode": spec.mode}

    if not args.no_nll:
        if args.split not in datasets:
            raise SystemExit(f"the dataset has no {args.split!r} split; it has {sorted(datasets)}")
        loader = torch.utils.data.DataLoader(datasets[args.split], batch_size=args.batch_size)
        start = time.perf_counter()
        bits, nats, count = nll_bits(model, loader, max_batches=args.max_batches, progress=True)
        result.update(split=args.split, nll_bits_per_sample=bits, nll_nats_total=nats, predicted_samples=count,
                      items=len(datasets[args.split]) if args.max_batches is None else min(
                          len(datasets[args.split]), args.max_batches * args.batch_size),
                      nll_convention="total NLL over unmasked predicted samples / their count (bits)",
                      nll_seconds=time.perf_counter() - start)
        print(f"{args.split}: {bits:.4f} bits/sample over {count} samples")

    if args.quality:
        from training.train_classifier import DigitClips

        classifier = DigitClassifier.load(args.classifier)
        generated, gen_nll, gen_protocol = generate_clips(model, args)
        reference_set = DigitClips(datasets["train"].data, spec.quantization, config.sample_rate)
        picks = torch.randperm(len(reference_set), generator=torch.Generator().manual_seed(args.seed))
        reference = torch.stack([reference_set[int(i)][0] for i in picks[: args.num_reference]])
        quality = sample_quality(classifier, generated, reference, seed=args.seed)
        quality.update(generation=gen_protocol, reference=f"{len(reference)} training clips",
                       generated_nll_bits_per_sample=gen_nll.mean().item())
        result["quality"] = quality
        print("quality: " + ", ".join(f"{k} {quality[k]:.3f}" for k in ("fid", "is", "mis", "am")))
        print(f"  ({gen_protocol})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
