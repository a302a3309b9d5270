"""Text around a byte model (`quantization="bytes"`): token ids are the bytes themselves (0..255), so text in is its
UTF-8 encoding and text out is the bytes decoded as UTF-8, with invalid sequences replaced by U+FFFD (a sampled
byte stream is not guaranteed to be valid UTF-8, and a half-written character must not stop a decode). A streamer
prints (or writes, or hands to another thread) the text while `generate` samples it, holding back the bytes of a
character that is not complete yet.

The modeling file imports this module, so it travels with every saved model: a byte model loaded with remote code
decodes its own samples.
"""

import codecs
import queue
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO, Union

import torch
from transformers.generation.streamers import BaseStreamer

from .audio import _checked_tokens

if TYPE_CHECKING:
    from .configuration_poolformer import PoolformerConfig

__all__ = ["PoolformerTextMixin", "PoolformerTextStreamer", "decode_text", "encode_text"]

BYTE_VALUES = 256


def encode_text(text: Union[str, bytes], bos_token_id: Optional[int] = 0) -> torch.LongTensor:
    """A prompt for a byte model: `(1, 1 + n)` ids, the start byte then the n bytes of `text` (UTF-8 when it is a
    str); `bos_token_id=None` leaves the start byte out."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"text must be a str or bytes, got {type(text).__name__}")
    ids = list(text) if bos_token_id is None else [bos_token_id, *text]
    return torch.tensor([ids], dtype=torch.long)


def _row_text(row: torch.Tensor, drop_bos: Optional[int], errors: str) -> str:
    values = row.tolist()
    if drop_bos is not None and values and values[0] == drop_bos:
        values = values[1:]
    return bytes(values).decode("utf-8", errors=errors)


def decode_text(tokens, bos_token_id: Optional[int] = 0, errors: str = "replace") -> Union[str, list]:
    """Byte ids -> text: `(T,)` gives a str, `(B, T)` a list of B str. Each row's leading start byte
    (`bos_token_id`; None keeps every byte) is dropped and the rest decoded as UTF-8; bytes that are not valid
    UTF-8 become U+FFFD (`errors="replace"`, Python's codec rule: one per maximal invalid subsequence), never an
    exception. Ids outside [0, 256) or of a non-integer dtype raise a ValueError."""
    tokens = _checked_tokens(tokens, BYTE_VALUES).cpu()
    if tokens.dim() == 1:
        return _row_text(tokens, bos_token_id, errors)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (T,) or (B, T) byte ids, got shape {tuple(tokens.shape)}")
    return [_row_text(row, bos_token_id, errors) for row in tokens]


class PoolformerTextStreamer(BaseStreamer):
    """Text while `generate` samples it (transformers' streamer interface, as `TextStreamer` and
    `TextIteratorStreamer`): prints it, writes it to files and/or hands it to another thread, decoding each row's
    bytes as UTF-8 incrementally (a character's bytes are held back until it is complete; invalid bytes become
    U+FFFD).

        streamer = model.text_streamer()                          # prints the continuation as it comes
        model.generate(model.encode_text("The "), max_new_tokens=200, streamer=streamer)

        streamer = model.text_streamer(print_to=None)             # or consume the text while it runs:
        threading.Thread(target=model.generate, kwargs=dict(max_new_tokens=200, streamer=streamer)).start()
        for pieces in streamer:                                   # one str per batch row
            ...

    Args:
        config: the model's config (its start byte); None takes 0.
        skip_prompt: leave the prompt out (default); the start byte is never text.
        print_to: a text stream to print to (default `sys.stdout`; one row only, as transformers' `TextStreamer`),
            or None.
        path: a text file to write (UTF-8; per row `<stem>_<i><suffix>` for a batch), a list of paths, or None.
        yield_text: queue the text for iteration (default: when nothing is printed or written).
        timeout: seconds the iterator waits for the next piece before `queue.Empty`.
    """

    def __init__(self, config: Optional["PoolformerConfig"] = None, skip_prompt: bool = True,
                 print_to: Optional[TextIO] = sys.stdout, path: Union[str, Path, list, None] = None,
                 yield_text: Optional[bool] = None, timeout: Optional[float] = None):
        self.bos = config.bos_token_id if config is not None else 0
        self.skip_prompt, self.print_to, self.path, self.timeout = skip_prompt, print_to, path, timeout
        self.yield_text = (print_to is None and path is None) if yield_text is None else yield_text
        self.queue, self.decoders, self.files, self.texts, self.started = queue.Queue(), [], [], [], False

    def put(self, value: torch.Tensor):
        value = value.detach().cpu()
        if not self.started:  # transformers first puts the prompt, (batch, T)
            self.started = True
            value = value.view(-1, value.shape[-1]) if value.dim() > 1 else value.view(1, -1)
            self._open(value.shape[0])
            if not self.skip_prompt:
                first = value[:, :1]
                self._emit(value[:, 1:] if bool((first == self.bos).all()) else value)
            return
        self._emit(value.view(len(self.decoders), -1))

    def _open(self, rows: int):
        if self.print_to is not None and rows != 1:
            raise ValueError(f"the text streamer prints one row (as transformers' TextStreamer), got a batch of {rows}; "
                             "pass print_to=None and a path per row, or iterate over the streamer")
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(rows)]
        self.texts = [""] * rows
        if isinstance(self.path, (list, tuple)):
            if len(self.path) != rows:
                raise ValueError(f"{len(self.path)} text paths for a batch of {rows}")
            paths = [Path(p) for p in self.path]
        elif self.path is not None:
            path = Path(self.path)
            paths = [path] if rows == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix or '.txt'}")
                                               for i in range(rows)]
        else:
            paths = []
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        self.files = [open(p, "w", encoding="utf-8") for p in paths]

    def _emit(self, ids: torch.Tensor, final: bool = False):
        pieces = [decoder.decode(bytes(row.tolist()), final=final) for decoder, row in zip(self.decoders, ids)]
        self._write(pieces)

    def _write(self, pieces: list):
        if not any(pieces):
            return
        for i, piece in enumerate(pieces):
            self.texts[i] += piece
        if self.print_to is not None:
            self.print_to.write(pieces[0])
            self.print_to.flush()
        for handle, piece in zip(self.files, pieces):
            handle.write(piece)
            handle.flush()  # readable by others while generation goes on
        if self.yield_text:
            self.queue.put(pieces)

    def end(self):
        if self.decoders:  # bytes of an unfinished character: one U+FFFD
            self._write([decoder.decode(b"", final=True) for decoder in self.decoders])
        if self.print_to is not None:
            self.print_to.write("\n")
            self.print_to.flush()
        for handle in self.files:
            handle.close()
        if self.yield_text:
            self.queue.put(None)

    def __iter__(self):
        return self

    def __next__(self):
        pieces = self.queue.get(timeout=self.timeout)
        if pieces is None:
            raise StopIteration
        return pieces


class PoolformerTextMixin:
    """Text in and out for `PoolformerForCausalLM` when it models bytes (`config.quantization == "bytes"`)."""

    def _check_text_model(self, what: str):
        if self.config.quantization != "bytes":
            raise ValueError(f"{what} is for byte models (quantization='bytes'); this model's tokens are "
                             f"{self.config.quantization} audio: use tokens_to_waveform / save_wav")

    def encode_text(self, text: Union[str, bytes]) -> torch.LongTensor:
        """A prompt for `generate`: `(1, 1 + n)` ids, the start byte then the UTF-8 bytes of `text`."""
        self._check_text_model("encode_text")
        return encode_text(text, self.config.bos_token_id)

    def decode_text(self, tokens, drop_bos: bool = True) -> Union[str, list]:
        """Generated (or any) byte ids -> text, `(T,)` -> str and `(B, T)` -> list of str; invalid UTF-8 is replaced
        by U+FFFD, not raised. A row's leading start byte is dropped when `drop_bos`. `decode_text` of this module
        with the model's start byte."""
        self._check_text_model("decode_text")
        return decode_text(tokens, self.config.bos_token_id if drop_bos else None)

    def text_streamer(self, **kwargs) -> PoolformerTextStreamer:
        """A streamer for `generate(..., streamer=...)` that prints (or writes, or yields) the text as it is sampled:
        `PoolformerTextStreamer(self.config, **kwargs)`."""
        self._check_text_model("text_streamer")
        return PoolformerTextStreamer(self.config, **kwargs)
