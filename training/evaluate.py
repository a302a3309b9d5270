"""Evaluate a Poolformer: test NLL in bits per sample and, for SC09, sample quality (FID, IS, mIS, AM).

    python training/evaluate.py --model DIR_OR_REPO --dataset krandiash/sc09 --split test
    python training/evaluate.py --model DIR_OR_REPO --dataset krandiash/sc09 --no_nll \\
        --quality --classifier sc09_classifier.safetensors --num_generate 10240 --trim

NLL uses the training convention: total NLL over every unmasked predicted sample divided by their count (a
per-sample average over the split, independent of the batch size), with the model's EMA weights as exported.
Beside it: FLAC's bits/sample on the same clips (each coded alone at FLAC's highest level, audio frames only: the
stream header is excluded, frame headers are included) and the ratio model / FLAC. A model's NLL in bits is the
size a lossless coder driven by it would reach, so below 1 the model compresses the clips better than FLAC. For a
16-bit model both code the 16-bit samples; for an 8-bit one, FLAC codes its 8-bit tokens. A byte model
(`quantization="bytes"`) reports bits per byte beside gzip -9, bz2 -9 and xz -9e on the same bytes, each on the
whole split and on every window alone (the fair comparison: the model sees each window alone;
`training/compressors.py`).
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

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from modeling_poolformer import decode_audio, nats_to_bits
from training.audio_files import resample
from training.data import DataArguments, build_datasets
from training.metrics import DigitClassifier, flac_bits, nll_bits, sample_quality
from training.utils import (
    UsageError,
    at_least,
    check_file,
    check_flags,
    check_local_or_hub,
    check_writable_folder,
    parse_arguments,
    positive,
    usage_exit,
)

SASHIMI_RATE = 16000  # SaShiMi's evaluator loads every clip with librosa at 16 kHz


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "a saved model folder or a Hub repo id"})
    split: Literal["train", "validation", "test"] = "test"
    batch_size: int = 8
    max_batches: Optional[int] = field(default=None, metadata={"help": "evaluate only the first batches (an estimate)"})
    no_nll: bool = field(default=False, metadata={"help": "skip the NLL"})
    no_flac: bool = field(default=False, metadata={
        "help": "skip FLAC's bits/sample on the same clips (byte models: gzip/bz2/xz's bits/byte)"})
    quality: bool = field(default=False, metadata={"help": "SC09 sample quality: FID, IS, mIS, AM"})
    classifier: Optional[str] = field(default=None, metadata={
        "help": "digit classifier checkpoint: SaShiMi's resnext.pth, or train_classifier.py's (.safetensors, or a torch "
                "state dict with --evaluator small)"})
    evaluator: Optional[Literal["sashimi", "small"]] = field(default=None, metadata={
        "help": "what scores --quality: sashimi (SaShiMi's ResNeXt and evaluator: comparable with published numbers) "
                "or small (train_classifier.py's DigitClassifier); default: small for a .safetensors --classifier, "
                "else sashimi"})
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
    out: str = field(default="eval_results.json", metadata={"help": "the JSON results (default: in the current folder)"})

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
        if Path(self.out).is_dir():
            raise ValueError(f"--out {self.out}: a folder; expected the path of the JSON file to write")
        check_writable_folder(str(Path(self.out).parent), "--out")
        self.classifier_rate = None
        if self.quality:  # every input of the quality scores, before the NLL, FLAC and generation run
            check_file(self.classifier, "--classifier")
            if self.evaluator is None:
                self.evaluator = "small" if Path(self.classifier).suffix == ".safetensors" else "sashimi"
            self.classifier_rate = classifier_rate(self.classifier, self.evaluator)
            if self.threshold and self.evaluator != "sashimi":
                raise ValueError(f"--threshold needs SaShiMi's ResNeXt classifier; --classifier {self.classifier} is "
                                 "this project's small digit classifier")
            if self.sample_dir:
                from training.sashimi_eval import sample_files

                clips, source = len(sample_files(self.sample_dir)), f"--sample_dir {self.sample_dir} holds {{}} WAV file(s)"
            else:
                clips, source = self.num_generate, "--num_generate {}"
            scored = scored_clips(clips, self.trim and not self.sample_dir, self.threshold)
            if scored < 2:
                cut = " after --trim" if self.trim and not self.sample_dir else ""
                cut += " after --threshold's cut" if self.threshold else ""
                raise ValueError(f"{source.format(clips)}: {scored} clip(s) would be scored{cut}; the quality scores "
                                 f"need at least 2 (FID's covariance of one clip is undefined)")


def classifier_rate(path, evaluator: str) -> int:
    """The sample rate of the classifier that `--evaluator` names, loaded from `path` (checked before any compute):
    16 kHz for SaShiMi's ResNeXt, its own for a DigitClassifier of train_classifier.py; a ValueError naming the file
    when it is not that kind of checkpoint."""
    try:
        if evaluator == "sashimi":
            from training.sashimi_eval import load_resnext

            load_resnext(path)
            return SASHIMI_RATE
        return int(DigitClassifier.load(path).config["sample_rate"])
    except Exception as e:  # noqa: BLE001 - the unpickler, safetensors, torch and json each raise their own
        expected = ("SaShiMi's ResNeXt (resnext.pth; --evaluator small for a DigitClassifier state dict)"
                    if evaluator == "sashimi" else "a DigitClassifier of train_classifier.py (a .safetensors file or "
                    "a torch state dict)")
        raise ValueError(f"--classifier {path}: not a classifier checkpoint: expected {expected} ({type(e).__name__}: "
                         f"{e})") from None


def scored_clips(count: int, trim: bool, threshold: bool) -> int:
    """How many of `count` clips reach the scores: after --trim's NLL ranks 40%-95%, then, with --threshold, the
    fewest that SaShiMi's tuned cut can keep of the held-out half (the cut is chosen from the data)."""
    if trim:
        count = int(0.95 * count) - int(0.40 * count)
    if threshold:  # the pairs tuned_threshold_scores visits, cut out of the held-out half of n = count // 2 each
        n = count // 2
        count = min(int(hi * n) - int(lo * n) for lo in np.arange(0.0, 0.5, 0.1) for hi in np.arange(0.6, 1.0, 0.05))
    return count


def to_classifier_rate(waves: torch.Tensor, rate: int, target_rate: int) -> torch.Tensor:
    """(N, T) waveforms at `rate` -> (N, target_rate): resampled (soxr) when the rates differ, then padded or cut to
    1 s, as the classifiers take them."""
    if rate != target_rate:
        waves = torch.from_numpy(np.stack([resample(w.numpy(), rate, target_rate) for w in waves]))
    clip = torch.zeros(len(waves), target_rate)
    clip[:, : min(target_rate, waves.shape[1])] = waves[:, :target_rate]
    return clip


@torch.no_grad()
def generate_clips(model, args, target_rate: int = SASHIMI_RATE):
    """(waveforms (N, target_rate): 1 s at the classifier's rate, resampled from the model's when they differ, per-clip
    NLL in bits, protocol text)."""
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
    if rate != target_rate:
        protocol += f"; resampled from the model's {rate} Hz to the classifier's {target_rate} Hz (soxr)"
        print(f"the clips are resampled from the model's {rate} Hz to the classifier's {target_rate} Hz (soxr)")
    return to_classifier_rate(waves, rate, target_rate), nll, protocol


def quality_references(args, datasets) -> dict:
    """What the quality scores compare against, checked before any compute: SaShiMi's evaluator takes the train and
    test splits' clips (their files or bytes), the small classifier the train split."""
    needed = ("train", "test") if args.evaluator == "sashimi" else ("train",)
    missing = [split for split in needed if split not in datasets]
    if missing:
        raise UsageError(f"--quality with --classifier {args.classifier} needs the dataset's {' and '.join(needed)} "
                         f"split(s); it has {sorted(datasets)}")
    if args.evaluator == "sashimi":
        return {split: sashimi_items(datasets[split].data) for split in needed}
    return {}


def sample_quality_of(model, args, datasets, spec, splits) -> dict:
    """SaShiMi's evaluator when --classifier is its ResNeXt (`resnext.pth`, a pickled module): the numbers the thesis
    reports; else this project's small classifier (a .safetensors or state dict), whose numbers are not comparable
    with published ones. Generated clips reach the classifier at its rate (16 kHz for SaShiMi's)."""
    from training.sashimi_eval import sashimi_quality

    if args.sample_dir:
        clips, gen_nll, protocol = None, None, f"the WAVs in {args.sample_dir}"
    else:
        clips, gen_nll, protocol = generate_clips(model, args, args.classifier_rate)
    if args.evaluator == "small":
        return small_classifier_quality(model, args, datasets, spec, clips, gen_nll, protocol)
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
        raise UsageError("SaShiMi's evaluator needs SC09 clips labelled by digit (an SC09 folder, krandiash/sc09, or "
                         "--protocol sc09 on a Speech Commands dataset)")
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
    from training.audio_files import load_audio
    from training.sashimi_eval import sample_files
    from training.train_classifier import DigitClips

    classifier = DigitClassifier.load(args.classifier)
    rate = args.classifier_rate  # the sample dir's files, and the reference clips, are read at the classifier's rate
    if clips is None:
        waves = [torch.from_numpy(load_audio(f, rate)) for f in sample_files(args.sample_dir)]
        clips = torch.zeros(len(waves), rate)
        for i, w in enumerate(waves):
            clips[i, : min(len(w), clips.shape[1])] = w[: clips.shape[1]]
    reference_set = DigitClips(datasets["train"].data, spec.quantization, rate)
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
    try:
        return evaluate(args, data_args)
    except UsageError as e:
        usage_exit(e, "evaluate.py")


def evaluate(args: EvaluateArguments, data_args: DataArguments) -> dict:
    """The NLL (and FLAC beside it) and the quality scores the flags ask for, written to --out."""
    out = Path(args.out).resolve()
    print(f"evaluate.py: the results go to {out}")
    torch.manual_seed(args.seed)
    if data_args.streaming and (args.max_batches is None or args.quality):  # a stream has no length, nor an index
        raise UsageError("--streaming scores the first --max_batches batches of the split's stream (pass "
                         "--max_batches), without --quality (its reference clips need the indexed training split); for "
                         "the whole split, leave --streaming out")
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(args.device).eval()
    config = model.config
    protocol, spec, datasets = build_datasets(data_args, config)
    if spec.quantization != config.quantization:
        raise UsageError(f"protocol {protocol} quantises with {spec.quantization}, the model with "
                         f"{config.quantization}: its NLL would not be comparable (--protocol generic uses the model's)")
    result = {"model": args.model, "dataset": data_args.dataset or "built-in spoken digits", "protocol": protocol,
              "quantization": spec.quantization, "minmax": spec.minmax, "seq_len": spec.seq_len, "mode": spec.mode}
    references = quality_references(args, datasets) if args.quality else {}
    if not args.no_nll:
        result.update(split_nll(model, args, data_args, datasets))
    if args.quality:
        result["quality"] = sample_quality_of(model, args, datasets, spec, references)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def byte_baselines(split, items: int, model_bits: float) -> dict:
    """gzip -9, bz2 -9, xz -9e on the items the NLL was taken on: the whole as one stream and each window alone (the
    fair comparison: the model sees each window alone), beside the model's bits/byte (`training/compressors.py`)."""
    from training.compressors import LABELS, compressor_bits, item_bytes

    report = compressor_bits([item_bytes(split[i]) for i in range(items)])
    print(f"compressors on the same {report['bytes']} bytes, bits/byte (container headers excluded; per window = each "
          "window coded alone, as the model sees it: the fair comparison)")
    for name, label in LABELS.items():
        r = report[name]
        print(f"  {label:8s} per window {r['per_window']:.4f}  whole split {r['whole']:.4f}  (file {r['file']:.4f})  "
              f"model / per window = {model_bits / r['per_window']:.4f}")
    return {"nll_bits_per_byte": model_bits, "compressors": report,
            "compressors_fair_comparison": "per_window: each window coded alone, as the model scores it",
            "model_to_xz_per_window_ratio": model_bits / report["xz"]["per_window"]}


def split_nll(model, args, data_args, datasets) -> dict:
    """The split's NLL in bits per sample and, for 8- and 16-bit models, FLAC's bits on the same items."""
    config = model.config
    if args.split not in datasets:
        raise UsageError(f"--split {args.split}: the dataset has no such split; it has {sorted(datasets)}")
    if data_args.streaming:  # the first --max_batches batches of the stream, held as a list
        from training.stream import held_out_items

        datasets[args.split] = held_out_items(datasets[args.split], args.max_batches * args.batch_size)
    loader = torch.utils.data.DataLoader(datasets[args.split], batch_size=args.batch_size)
    start = time.perf_counter()
    bits, nats, count = nll_bits(model, loader, max_batches=args.max_batches, progress=True)
    result = dict(split=args.split, nll_bits_per_sample=bits, nll_nats_total=nats, predicted_samples=count,
                  items=len(datasets[args.split]) if args.max_batches is None else min(
                      len(datasets[args.split]), args.max_batches * args.batch_size),
                  nll_convention="total NLL over unmasked predicted samples / their count (bits)",
                  nll_seconds=time.perf_counter() - start)
    unit = "byte" if config.quantization == "bytes" else "sample"
    print(f"{args.split}: {bits:.4f} bits/{unit} over {count} {unit}s")
    if config.quantization == "bytes":  # a byte model: the standard library's compressors on the same bytes
        if not args.no_flac:
            result.update(byte_baselines(datasets[args.split], result["items"], bits))
    elif not args.no_flac and config.vocab_size in (256, 65536):
        # the items the NLL was taken on, their tokens as PCM (16-bit samples, or 8-bit codes)
        split = datasets[args.split]
        result.update(flac_bits((split[i] for i in range(result["items"])), config.vocab_size, config.sample_rate))
        result["model_to_flac_ratio"] = bits / result["flac_bits_per_sample"]
        print(f"{args.split}: FLAC {result['flac_bits_per_sample']:.4f} bits/sample on the same clips; model / FLAC "
              f"= {result['model_to_flac_ratio']:.4f} (< 1: the model codes them in fewer bits)")
    return result


if __name__ == "__main__":
    main()
