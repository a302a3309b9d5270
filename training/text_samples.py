"""Samples and model-card lines of byte models (`quantization="bytes"`), for train.py: the text counterparts of its
WAVs, spectrograms and audio data lines."""

import logging
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def write_text_samples(model, num_samples: int, new_bytes: int, folder, seed: int, prompt: Optional[str] = None) -> list:
    """`num_samples` continuations of `new_bytes` bytes each at temperature 1, from the start byte (or after `prompt`),
    decoded as UTF-8 (invalid bytes replaced) into `sample_<i>.txt`; returns the paths."""
    model.eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ids = model.encode_text(prompt or "").to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    tokens = model.generate(ids, max_new_tokens=new_bytes, num_return_sequences=num_samples, do_sample=True,
                            temperature=1.0, top_k=0, generator=generator)
    paths = []
    for i, text in enumerate(model.decode_text(tokens)):
        path = folder / f"sample_{i}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    logger.info("wrote %d text samples of %d bytes in %.1f s", len(paths), new_bytes, time.perf_counter() - start)
    return paths


def data_card_line(spec) -> str:
    """The model card's description of byte items."""
    separator = "nothing" if spec.separator is None else f"the byte {spec.separator}"
    return (f"raw bytes (UTF-8 text), documents joined by {separator}, windows of {spec.seq_len} bytes, each after "
            f"the start byte {spec.bos}")
