"""Model outputs and the cache's name across transformers releases, and the one NLL-to-bits conversion.

transformers 5.24 renamed the cache from `past_key_values` to `cache` in outputs, forward arguments and `generate`.
Outputs here carry it under the installed release's name (`CACHE_FIELD`, which is what that release's `generate`
reads) and read as both; forwards and `generate` accept both names.
"""

import dataclasses
import math
from typing import Optional

from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput

__all__ = ["CACHE_FIELD", "PoolformerCausalLMOutput", "PoolformerModelOutput", "cache_argument", "nats_to_bits"]

CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def cache_argument(cache, past_key_values):
    """`cache=` (transformers >= 5.24) or its old name `past_key_values=`: the one given, or None."""
    if past_key_values is not None:
        if cache is not None and cache is not past_key_values:
            raise ValueError("Pass the cache once: `cache=` (or its old name `past_key_values=`), not both.")
        cache = past_key_values
    return cache


def _output_class(name: str, doc: str, fields: list) -> type:
    """A `ModelOutput` dataclass whose cache field has the installed transformers' name (`CACHE_FIELD`) and reads as
    both `.cache` and `.past_key_values` (transformers >= 5.24 provides the second itself)."""
    namespace = {"__doc__": doc, "__module__": __name__}
    if CACHE_FIELD != "cache":
        namespace["cache"] = property(lambda self: self.past_key_values)
    fields = [(CACHE_FIELD if f == "cache" else f, Optional[object], dataclasses.field(default=None)) for f in fields]
    return dataclasses.make_dataclass(name, fields, bases=(ModelOutput,), namespace=namespace)


PoolformerModelOutput = _output_class(
    "PoolformerModelOutput",
    "`last_hidden_state` (B, T, D) after the final norm; `cache`: the `PoolformerCache`, when used; `hidden_states`: "
    "(embeddings, last hidden state) when asked for.",
    ["last_hidden_state", "cache", "hidden_states"],
)
PoolformerCausalLMOutput = _output_class(
    "PoolformerCausalLMOutput",
    "`loss`: mean NLL in nats per predicted sample over the unmasked positions; `bits_per_sample`: the same in bits "
    "(8 or 16 for a uniform model); `logits` (B, T, vocab) (the dual-softmax head's are log-probabilities); `cache`: "
    "the `PoolformerCache`, when used; `hidden_states` as in `PoolformerModelOutput`; `sample_nll` (B, T), with "
    "labels: the NLL in nats of the sample each position predicts (0 where none is).",
    ["loss", "logits", "cache", "hidden_states", "bits_per_sample", "sample_nll"],
)


def nats_to_bits(nats):
    """A negative log-likelihood in nats (float or tensor) in bits: nats / ln 2. The one conversion every report
    uses (the loss, training logs, evaluation, benchmarks)."""
    return nats / math.log(2.0)
