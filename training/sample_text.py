"""`training/sample.py` for byte models (`quantization="bytes"`): `--prompt` is text, continued `--num_bytes` bytes at
a time, printed and written as UTF-8 text files (invalid bytes replaced by U+FFFD).

    python training/sample.py --model runs/enwik8/model --prompt "The history of " --num_bytes 400 --out samples/
    python training/sample.py --model runs/enwik8/model --prompt "The " --num_samples 1 --stream --out samples/
"""

import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_NUM_BYTES = 512


def model_quantization(model: str) -> str:
    """The `quantization` of a saved model folder or Hub repo's config, read without loading the model; None when the
    config cannot be read here (loading the model then says why)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model)
    except (OSError, ValueError):
        return None
    return config.get("quantization", "mu-law")


def sample_text(args, model) -> dict:
    """Generates `args.num_samples` continuations of `args.prompt` (empty: from the start byte), writes
    `sample_<i>.txt` (the prompt, then the continuation) and `generation.json` into `args.out`, and prints them."""
    new_bytes = args.num_bytes or model.generation_config.max_new_tokens or DEFAULT_NUM_BYTES
    prompt_text = args.prompt or ""
    prompt = model.encode_text(prompt_text).to(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    paths, start = [], time.perf_counter()
    for first in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - first)
        batch_paths = [out / f"sample_{first + i:04d}.txt" for i in range(count)]
        streamer = None
        if args.stream:  # written while sampled (and printed, for one row); the prompt too, as in the files
            streamer = model.text_streamer(skip_prompt=False, path=batch_paths,
                                           print_to=sys.stdout if count == 1 else None)
        sequences = model.generate(
            prompt.expand(count, -1),
            max_new_tokens=new_bytes,
            do_sample=not args.greedy,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p if args.top_p < 1 else None,
            generator=generator,
            streamer=streamer,
        )
        for path, text in zip(batch_paths, model.decode_text(sequences)):
            if not args.stream:
                path.write_text(text, encoding="utf-8")
                print(f"--- {path.name}\n{text}")
            paths.append(path)
    elapsed = time.perf_counter() - start
    info = {"model": args.model, "num_samples": len(paths), "num_bytes": new_bytes, "prompt": prompt_text,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "greedy": args.greedy,
            "seed": args.seed, "bytes_per_second": len(paths) * new_bytes / elapsed}
    (out / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {len(paths)} text sample{'s' if len(paths) != 1 else ''} to {out} "
          f"({info['bytes_per_second']:.0f} bytes/s over all of them)")
    return info
