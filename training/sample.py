"""Generate audio with a Poolformer model: WAV files plus one spectrogram PNG of the batch.

    python training/sample.py --model DIR_OR_REPO --num-samples 4 --seconds 1 --out samples/
    python training/sample.py --model DIR_OR_REPO --prompt speech.wav --prompt-seconds 0.25 --seconds 1 --out samples/
    python training/sample.py --model DIR_OR_REPO --num-samples 1 --seconds 10 --stream --out samples/

With --stream every WAV is written while it is generated (a valid file at any moment; the bar shows the real-time
factor).

Unconditional samples start from the zero token (128); a prompt WAV is resampled to the model's rate, quantised with
the model's codec and continued.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling_poolformer.audio import encode_audio, load_audio, save_spectrogram, write_wav  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved model folder or a Hub repo id")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seconds", type=float, default=1.0, help="length of each generated clip (after any prompt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prompt", help="a WAV (or FLAC, ...) file to continue")
    p.add_argument("--prompt-seconds", type=float, default=0.5, help="how much of the prompt file to use")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--batch-size", type=int, default=16, help="clips generated together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stream", action="store_true", help="write the WAVs while generating")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seconds <= 0 or args.prompt_seconds <= 0:
        p.error("--seconds and --prompt-seconds must be > 0")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (use --greedy for argmax decoding)")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(args.device).eval()
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
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    waves, paths, start = [], [], time.perf_counter()
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
                write_wav(path, row, rate)
            paths.append(path)
            waves.append(row)
    elapsed = time.perf_counter() - start
    png = save_spectrogram(waves[:8], rate, out / "spectrograms.png", titles=[p.name for p in paths[:8]])
    info = {
        "model": args.model, "num_samples": len(paths), "seconds": args.seconds, "prompt": args.prompt,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "greedy": args.greedy,
        "seed": args.seed, "samples_per_second": len(paths) * new_tokens / elapsed,
    }
    (out / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {len(paths)} WAVs and {png.name} to {out} ({info['samples_per_second']:.0f} samples/s)")


if __name__ == "__main__":
    main()
