"""Evaluate a Poolformer: test NLL in bits per sample and, for SC09, sample quality (FID, IS, mIS, AM).

    python training/evaluate.py --model DIR_OR_REPO --dataset krandiash/sc09 --split test
    python training/evaluate.py --model DIR_OR_REPO --dataset krandiash/sc09 --no_nll \\
        --quality --classifier sc09_classifier.safetensors --num_generate 10240 --trim

NLL uses the training convention: total NLL over every unmasked predicted sample divided by their count (a
per-sample average over the split, independent of the batch size), with the model's EMA weights as exported.
Beside it: FLAC's bits/sample on the same clips (each coded alone at FLAC's highest level, audio frames only: the
stream header is excluded, frame headers are included) and the ratio model / FLAC. A model's NLL in bits is the
size a lossless coder driven by it would reach, so below 1 the model compresses the clips better than FLAC. For a
16-bit model both code the 16-bit samples; for an 8-bit one, FLAC codes its 8-bit tokens.
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
from training.metrics import DigitClassifier, flac_bits, nll_bits, sample_quality
from training.utils import at_least, check_file, check_flags, check_local_or_hub, parse_arguments, positive


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "a saved model folder or a Hub repo id"})
    split: Literal["train", "validation", "test"] = "test"
    batch_size: int = 8
    max_batches: Optional[int] = field(default=None, metadata={"help": "evaluate only the first batches (an estimate)"})
    no_nll: bool = field(default=False, metadata={"help": "skip the NLL"})
    no_flac: bool = field(default=False, metadata={"help": "skip FLAC's bits/sample on the same clips"})
    quality: bool = field(default=False, metadata={"help": "SC09 sample quality: FID, IS, mIS, AM"})
    classifier: Optional[str] = field(default=None, metadata={
        "help": "digit classifier checkpoint (.safetensors, or a torch state dict)"})
    num_generate: int = field(default=256, metadata={"help": "generated clips (the thesis protocol uses 10240)"})
    seconds: float = field(default=1.0, metadata={"help": "length of generated clips"})
    generate_batch_size: int = 64
    num_reference: int = field(default=2048, metadata={"help": "training clips for the reference statistics"})
    trim: bool = field(default=False, metadata={"help": "SaShiMi's likelihood trimming: keep NLL ranks 40%%-95%%"})
    sample_dir: Optional[str] = field(default=None, metadata={
        "help": "score these WAVs (a folder) instead of generating clips"})
    threshold: bool = field(default=False, metadata={
        "help": "also SaShiMi's IS-tuned lower/upper cut of the samples (its evaluator's --threshold)"})
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = "eval_results.json"

    def __post_init__(self):
        if self.quality and not self.classifier:
            raise ValueError("--quality needs --classifier: SaShiMi's resnext.pth (krandiash/sashimi-release), or one "
                             "trained with training/train_classifier.py (not comparable with published numbers)")
        if self.sample_dir and not Path(self.sample_dir).is_dir():
            raise ValueError(f"--sample_dir {self.sample_dir}: no such folder")
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
        nll.append(model(seq, labels=seq).sample_nll[:, :-1].mean(1))
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


def sample_quality_of(model, args, datasets, spec) -> dict:
    """SaShiMi's evaluator when --classifier is its ResNeXt (`resnext.pth`, a pickled module): the numbers the thesis
    reports; else this project's small classifier (a .safetensors or state dict), whose numbers are not comparable
    with published ones."""
    from training.sashimi_eval import load_resnext, sashimi_quality

    if args.sample_dir:
        clips, gen_nll, protocol = None, None, f"the WAVs in {args.sample_dir}"
    else:
        clips, gen_nll, protocol = generate_clips(model, args)
    try:
        load_resnext(args.classifier)
    except ValueError as not_resnext:
        if args.threshold:
            raise SystemExit(f"evaluate.py: error: --threshold needs SaShiMi's classifier ({not_resnext})")
        return small_classifier_quality(model, args, datasets, spec, clips, gen_nll, protocol)
    if "test" not in datasets:
        raise SystemExit("evaluate.py: error: SaShiMi's evaluator scores the test split against the train split; the "
                         f"dataset has {sorted(datasets)}")
    splits = {split: sashimi_items(datasets[split].data) for split in ("train", "test")}
    samples = args.sample_dir or [c.numpy() for c in clips]
    quality = sashimi_quality(args.classifier, splits["train"], splits["test"], samples, threshold=args.threshold)
    quality.update(evaluator="SaShiMi's test_speech_commands.py (ResNeXt classifier): comparable with published "
                             "SC09 numbers", generation=protocol)
    if gen_nll is not None:
        quality["generated_nll_bits_per_sample"] = gen_nll.mean().item()
    shown = quality.get("samples_tuned", quality["samples"])
    print("quality (SaShiMi's evaluator): " + ", ".join(f"{k} {shown[k]:.3f}" for k in ("fid", "is", "mis", "am"))
          + f"; classifier accuracy on test {quality['test_accuracy']:.3f}")
    print(f"  reference: test set FID {quality['test_set']['fid']:.3f}, IS {quality['test_set']['is']:.3f} ({protocol})")
    return quality


def sashimi_items(data) -> list:
    """A split's clips for SaShiMi's evaluator: their files, or (`<digit>/<file>`, the encoded bytes) when the audio
    lives in the dataset (SC09 out of google/speech_commands)."""
    import io

    if "path" not in data.column_names:
        raise SystemExit("evaluate.py: error: SaShiMi's evaluator needs SC09 clips labelled by digit (an SC09 folder, "
                         "krandiash/sc09, or --protocol sc09 on a Speech Commands dataset)")
    items = []
    for name, audio in zip(data["path"], data["audio"]):
        if audio.get("bytes"):
            items.append((name, io.BytesIO(audio["bytes"])))
        else:
            items.append(audio.get("path") or name)
    return items


def small_classifier_quality(model, args, datasets, spec, clips, gen_nll, protocol) -> dict:
    """FID/IS/mIS/AM with this project's small digit classifier: for users without SaShiMi's ResNeXt; not
    comparable with published numbers."""
    from modeling_poolformer.audio import load_audio
    from training.sashimi_eval import sample_files
    from training.train_classifier import DigitClips

    classifier = DigitClassifier.load(args.classifier)
    if clips is None:
        waves = [torch.from_numpy(load_audio(f, model.config.sample_rate)) for f in sample_files(args.sample_dir)]
        clips = torch.zeros(len(waves), model.config.sample_rate)
        for i, w in enumerate(waves):
            clips[i, : min(len(w), clips.shape[1])] = w[: clips.shape[1]]
    reference_set = DigitClips(datasets["train"].data, spec.quantization, model.config.sample_rate)
    picks = torch.randperm(len(reference_set), generator=torch.Generator().manual_seed(args.seed))
    reference = torch.stack([reference_set[int(i)][0] for i in picks[: args.num_reference]])
    quality = sample_quality(classifier, clips, reference, seed=args.seed)
    quality.update(evaluator="this project's small digit classifier: NOT comparable with published SC09 numbers",
                   generation=protocol, reference=f"{len(reference)} training clips")
    if gen_nll is not None:
        quality["generated_nll_bits_per_sample"] = gen_nll.mean().item()
    print("quality (small classifier, not comparable with published numbers): "
          + ", ".join(f"{k} {quality[k]:.3f}" for k in ("fid", "is", "mis", "am")))
    print(f"  ({protocol})")
    return quality


def main(argv=None):
    args, data_args = parse_arguments((EvaluateArguments, DataArguments), argv, __doc__)
    torch.manual_seed(args.seed)
    if data_args.streaming and (args.max_batches is None or args.quality):  # a stream has no length, nor an index
        raise SystemExit("evaluate.py: error: --streaming scores the first --max_batches batches of the split's stream "
                         "(pass --max_batches), without --quality (its reference clips need the indexed training "
                         "split); for the whole split, leave --streaming out")
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
        if data_args.streaming:  # the first --max_batches batches of the stream, held as a list
            from training.data import held_out_items

            datasets[args.split] = held_out_items(datasets[args.split], args.max_batches * args.batch_size)
        loader = torch.utils.data.DataLoader(datasets[args.split], batch_size=args.batch_size)
        start = time.perf_counter()
        bits, nats, count = nll_bits(model, loader, max_batches=args.max_batches, progress=True)
        result.update(split=args.split, nll_bits_per_sample=bits, nll_nats_total=nats, predicted_samples=count,
                      items=len(datasets[args.split]) if args.max_batches is None else min(
                          len(datasets[args.split]), args.max_batches * args.batch_size),
                      nll_convention="total NLL over unmasked predicted samples / their count (bits)",
                      nll_seconds=time.perf_counter() - start)
        print(f"{args.split}: {bits:.4f} bits/sample over {count} samples")
        if not args.no_flac and config.vocab_size in (256, 65536):
            # the items the NLL was taken on, their tokens as PCM (16-bit samples, or 8-bit codes)
            split = datasets[args.split]
            result.update(flac_bits((split[i] for i in range(result["items"])), config.vocab_size, config.sample_rate))
            result["model_to_flac_ratio"] = bits / result["flac_bits_per_sample"]
            print(f"{args.split}: FLAC {result['flac_bits_per_sample']:.4f} bits/sample on the same clips; model / FLAC "
                  f"= {result['model_to_flac_ratio']:.4f} (< 1: the model codes them in fewer bits)")

    if args.quality:
        result["quality"] = sample_quality_of(model, args, datasets, spec)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
