"""Generate audio with a Poolformer model: WAV files plus one spectrogram PNG of the batch.

    python training/sample.py --model DIR_OR_REPO --num_samples 4 --seconds 1 --out samples/
    python training/sample.py --model DIR_OR_REPO --prompt PROMPT.wav --prompt_seconds 0.25 --seconds 1 --out samples/
    python training/sample.py --model DIR_OR_REPO --num_samples 1 --seconds 10 --stream --out samples/

Unconditional samples start from the zero token (128); a prompt WAV is resampled to the model's rate, quantised with
the model's codec and continued. With --stream every WAV is written while it is generated (a valid file at any
moment; the bar shows the real-time factor). A byte model (`quantization="bytes"`) takes `--prompt "text"` and
writes text (`training/sample_text.py`):

    python training/sample.py --model DIR_OR_REPO --prompt "The history of " --num_bytes 400 --out samples/
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import soundfile
import torch
from transformers import AutoModelForCausalLM

from modeling_poolformer.audio import encode_audio
from training.audio_files import load_audio, save_spectrogram, write_wav
from training.utils import check_file, check_flags, check_local_or_hub, check_writable_folder, parse_arguments, positive


@dataclass
class SampleArguments:
    model: str = field(metadata={"help": "a saved model folder or a Hub repo id"})
    out: str = field(metadata={"help": "output folder"})
    num_samples: int = 4
    seconds: float = field(default=1.0, metadata={"help": "length of each generated clip (after any prompt)"})
    prompt: Optional[str] = field(default=None, metadata={
        "help": "a WAV (or FLAC, ...) file to continue; for a byte model, the text to continue"})
    num_bytes: Optional[int] = field(default=None, metadata={
        "help": "byte models: bytes generated per sample (default: the model's generation config, 512)"})
    prompt_seconds: float = field(default=0.5, metadata={"help": "how much of the prompt file to use"})
    temperature: float = 1.0
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "1.0 = off"})
    greedy: bool = field(default=False, metadata={"help": "argmax decoding instead of sampling"})
    batch_size: int = field(default=16, metadata={"help": "clips generated together"})
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    stream: bool = field(default=False, metadata={"help": "write the WAVs while generating"})
    no_progress: bool = False

    def __post_init__(self):
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1")
        check_flags(self, [("seconds", positive, "a finite number > 0"), ("prompt_seconds", positive, "a finite number > 0")])
        check_flags(self, [("temperature", positive, "a finite number > 0 (use --greedy for argmax decoding)")])
        if not 0 < self.top_p <= 1:
            raise ValueError("--top_p must be in (0, 1]")
        check_local_or_hub(self.model, "--model")
        check_writable_folder(self.out, "--out")  # before a batch is generated
        if self.num_bytes is not None and self.num_bytes < 1:
            raise ValueError("--num_bytes must be >= 1")
        from training.sample_text import model_quantization

        self.text = model_quantization(self.model) == "bytes"  # a byte model: --prompt is text
        if self.prompt is not None and not self.text:  # before the model is loaded
            check_file(self.prompt, "--prompt")
            try:
                soundfile.info(self.prompt)
            except Exception as e:  # noqa: BLE001 - soundfile raises several kinds
                raise ValueError(f"--prompt {self.prompt}: not a readable audio file ({e})") from None


def generate(model, args, prompt, new_tokens: int, out: Path) -> tuple:
    """(paths, waveforms) of --num_samples clips generated --batch_size at a time, their WAVs written (while
    generating with --stream)."""
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    waves, paths = [], []
    for first in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - first)
        batch_paths = [out / f"sample_{first + i:04d}.wav" for i in range(count)]
        streamer = None
        if args.stream:  # the prompt's audio too, as in the files written after generation
            streamer = model.audio_streamer(batch_paths, skip_prompt=False, progress=not args.no_progress,
                                            total=new_tokens)
        sequences = model.generate(
            prompt.to(args.device).expand(count, -1),
            max_new_tokens=new_tokens,
            do_sample=not args.greedy,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p if args.top_p < 1 else None,
            generator=generator,
            progress=not args.no_progress and not args.stream,
            streamer=streamer,
        )
        for path, row in zip(batch_paths, model.tokens_to_waveform(sequences)):
            if not args.stream:
                write_wav(path, row, model.config.sample_rate)
            paths.append(path)
            waves.append(row)
    return paths, waves


def main(argv=None):
    (args,) = parse_arguments(SampleArguments, argv, __doc__)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(args.device).eval()
    if args.text:
        from training.sample_text import sample_text

        return sample_text(args, model)
    config = model.config
    rate = config.sample_rate
    new_tokens = max(1, int(round(args.seconds * rate)))

    prompt = torch.full((1, 1), config.bos_token_id, dtype=torch.long)
    if args.prompt:
        wave = load_audio(args.prompt, rate, max_seconds=args.prompt_seconds)
        tokens = encode_audio(torch.from_numpy(wave), config.quantization, config.vocab_size)
        prompt = torch.cat([prompt, tokens[None]], dim=1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths, waves = generate(model, args, prompt, new_tokens, out)
    elapsed = time.perf_counter() - start
    png = save_spectrogram(waves[:8], rate, out / "spectrograms.png", titles=[p.name for p in paths[:8]])
    info = {
        "model": args.model, "num_samples": len(paths), "seconds": args.seconds, "prompt": args.prompt,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "greedy": args.greedy,
        "seed": args.seed, "samples_per_second": len(paths) * new_tokens / elapsed,
        # what the progress bar counts: samples of each clip (a batch's clips grow together)
        "samples_per_second_per_clip": new_tokens * len(range(0, args.num_samples, args.batch_size)) / elapsed,
    }
    (out / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {len(paths)} WAV{'s' if len(paths) != 1 else ''} and {png.name} to {out} "
          f"({info['samples_per_second_per_clip']:.0f} samples/s per clip, as on the bar; "
          f"{info['samples_per_second']:.0f} samples/s over all {len(paths)} clips)")


if __name__ == "__main__":
    main()
