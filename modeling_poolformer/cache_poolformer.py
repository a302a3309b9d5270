"""The Poolformer cache: the recurrent and pooling state that `generate` carries, laid out by the config's one table,
`config.block_stacks`, which the modules read their positions from too (`PoolformerResidualStack.stack_idx`,
`PoolformerRGLRU.layer_idx`, `PoolformerSkipBlock.level`)."""

from typing import Optional

import torch
from transformers.cache_utils import Cache

from .configuration_poolformer import PoolformerConfig

__all__ = ["PoolformerCache", "PoolformerResidualStackState"]


def _write_state(states: list, index: int, value: torch.Tensor):
    """A module's new state: copied into its preallocated tensor (no gradients: fixed addresses for compiled and
    CUDA-graph steps), or replacing it (gradients on) by a copy, so that the state holds no view into a whole
    chunk's activations."""
    if torch.is_grad_enabled():
        states[index] = value.clone()
    else:
        states[index].copy_(value)


class PoolformerResidualStackState:
    """The cached state of one residual stack: `recurrent_states[i]` is its i-th RG-LRU's h_{t-1}, fp32
    (B, units, 2) as (real, imaginary) or (B, units) for a real RG-LRU; `conv_states[i]` that RG-LRU's last
    `conv1d_width - 1` conv inputs (B, k - 1, D), when it has a temporal conv. It is the argument of the compiled
    decoding step, which is why a stack's states travel together."""

    write = staticmethod(_write_state)

    def __init__(self, recurrent_states: list, conv_states: list):
        self.recurrent_states, self.conv_states = recurrent_states, conv_states


class PoolformerCache(Cache):
    """Recurrent + pooling state of a Poolformer, carried by `generate` as `cache` (`past_key_values` before
    transformers 5.24).

    Typed lists of preallocated tensors of fixed shape, first dim the batch, laid out by one table,
    `config.block_stacks`, which the modules read their positions from too:
    - `stacks[s]` (`PoolformerResidualStackState`): residual stack s's RG-LRU and conv states
      (`PoolformerResidualStack.stack_idx`, then `PoolformerRGLRU.layer_idx` within the stack);
    - `pool_windows[l]`: the last p inputs of level l's DownPool (B, p, D) (`PoolformerSkipBlock.level`);
    - `up_queues[l]`: level l's UpPool outputs not yet consumed, next first, padded to p (B, p, D).
    All start as zeros, which is the empty state; modules write them in place, or, when gradients are on, replace
    them with new tensors. `seen_tokens` counts the samples processed so far: it is the pooling phase of every level.

    transformers' linear-attention accessors work as on its own caches, a cache "layer" being a residual stack and
    its "states" the stack's RG-LRUs: `get_recurrent_state(layer_idx, state_idx)`, `update_recurrent_state(...)`,
    `get_conv_state` / `update_conv_state`; `get_pool_state(level)` gives a level's (window, queue). So do
    `reorder_cache` (beam search), `batch_repeat_interleave`, `batch_select_indices`, `reset`, `get_seq_length`; a
    recurrence cannot forget steps, so `crop` raises and `is_croppable` is False.

    The tensors are allocated on first use (for the batch size, dtype and device of the first forward) or right
    away when `batch_size` is given. `is_compileable` is False because transformers' own compilation of `forward`
    would specialise on `seen_tokens` (a Python int): `generate` compiles the residual stacks' step itself and
    hands it to the cache it decodes with (`step_function`), with the whole step on static buffers (`static_step`,
    CUDA graphs on a GPU), whose tensors the lists hold while it decodes (`static_binding`).
    """

    is_compileable = False

    def __init__(self, config: Optional[PoolformerConfig] = None, batch_size: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device=None, **kwargs):
        super().__init__(layers=[])
        self.config = config
        self.seen_tokens = 0
        self.step_function = None
        self.static_step = None  # generate's decoding step on static buffers (`static_step.PoolformerStaticStep`)
        self.static_binding = None  # the static buffers whose tensors the lists hold while generate decodes
        self.stacks: list[PoolformerResidualStackState] = []
        self.pool_windows: list[torch.Tensor] = []
        self.up_queues: list[torch.Tensor] = []
        if batch_size is not None:
            self.prepare(batch_size, dtype or torch.float32, device)

    write = staticmethod(_write_state)

    def _build(self, make):
        """Fills the lists from `config.block_stacks` and the pooling factors, taking every tensor from
        `make(shape, dtype_kind)` in the order of `states()`: the one place the layout is spelled out."""
        c = self.config
        unit_shape = (c.num_recurrent_units, 2) if c.complex_recurrence else (c.num_recurrent_units,)
        for _, _, pairs in c.block_stacks:
            recurrent = [make(unit_shape, "recurrent") for _ in range(pairs)]
            conv = [make((c.conv1d_width - 1, c.hidden_size), "hidden") for _ in range(pairs)] if c.conv1d_width else []
            self.stacks.append(PoolformerResidualStackState(recurrent, conv))
        self.pool_windows = [make((p, c.hidden_size), "hidden") for p in c.pooling_factors]
        self.up_queues = [make((p, c.hidden_size), "hidden") for p in c.pooling_factors]

    def states(self) -> list:
        """Every state tensor, in a fixed order: per stack its recurrent then its conv states, the pool windows, the
        UpPool queues."""
        per_stack = [t for stack in self.stacks for t in (*stack.recurrent_states, *stack.conv_states)]
        return per_stack + self.pool_windows + self.up_queues

    @classmethod
    def from_states(cls, config: PoolformerConfig, tensors, seen_tokens: int = 0) -> "PoolformerCache":
        """A cache holding `tensors`, in the order of `states()`."""
        cache, tensors = cls(config), iter(tensors)

        def take(shape, kind):
            tensor = next(tensors)
            if tuple(tensor.shape[1:]) != tuple(shape):
                raise ValueError(f"PoolformerCache.from_states: a state of shape (B, {shape}) was expected, got "
                                 f"{tuple(tensor.shape)}")
            return tensor

        cache._build(take)
        if next(tensors, None) is not None:
            raise ValueError("PoolformerCache.from_states: more tensors than the config's layout holds")
        cache.seen_tokens = seen_tokens
        return cache

    def prepare(self, batch_size: int, dtype: torch.dtype, device):
        """Allocates zero states for a batch (once), or checks that the batch fits the allocated ones."""
        if self.stacks:
            held = self.batch_size
            if held != batch_size:
                raise ValueError(f"The cache holds a batch of {held}, the input has {batch_size}.")
            return
        if self.config is None:
            raise ValueError("PoolformerCache needs the model's config: PoolformerCache(model.config).")
        # the recurrence stays fp32 (or fp64) under half precision: decays near 1 need it
        state_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self._build(lambda shape, kind: torch.zeros(batch_size, *shape, device=device,
                                                    dtype=state_dtype if kind == "recurrent" else dtype))
        if torch.device(device or "cpu").type == "cuda" and not torch.compiler.is_compiling():
            import torch._dynamo as dynamo

            for tensor in self.states():  # CUDA graphs may then update them in place without copies
                dynamo.mark_static_address(tensor)

    @property
    def batch_size(self) -> Optional[int]:
        states = self.states()
        return states[0].shape[0] if states else None

    def level_phases(self) -> tuple:
        """For each pooling level, how many steps of its current group it has seen (its step count mod p)."""
        phases, count = [], self.seen_tokens
        for p in self.config.pooling_factors:
            phases.append(count % p)
            count //= p
        return tuple(phases)

    def step_phases(self) -> tuple:
        """The phases of the next one-sample step in canonical form: p - 1 on the levels whose group it completes
        (they run their pooled sub-network), 0 elsewhere (where a one-step chunk does not depend on the phase)."""
        phases, count = [], self.seen_tokens + 1
        for p in self.config.pooling_factors:
            if count % p:
                break
            phases.append(p - 1)
            count //= p
        return tuple(phases + [0] * (len(self.config.pooling_factors) - len(phases)))

    # transformers' linear-attention accessors: layer = residual stack, state = its RG-LRUs

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> Optional[torch.Tensor]:
        return self.stacks[layer_idx].recurrent_states[state_idx] if self.stacks else None

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        self.write(self.stacks[layer_idx].recurrent_states, state_idx, recurrent_states)
        return self.stacks[layer_idx].recurrent_states[state_idx]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> Optional[torch.Tensor]:
        return self.stacks[layer_idx].conv_states[state_idx] if self.stacks and self.config.conv1d_width else None

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          **kwargs) -> torch.Tensor:
        self.write(self.stacks[layer_idx].conv_states, state_idx, conv_states)
        return self.stacks[layer_idx].conv_states[state_idx]

    def get_pool_state(self, level: int) -> Optional[tuple]:
        """Level `level`'s (last p DownPool inputs, UpPool outputs not yet consumed), each (B, p, D)."""
        return (self.pool_windows[level], self.up_queues[level]) if self.pool_windows else None

    def __repr__(self):
        return (f"PoolformerCache(seen_tokens={self.seen_tokens}, batch={self.batch_size}, {len(self.stacks)} residual "
                f"stacks, {len(self.pool_windows)} pooling levels)")

    def __len__(self):
        return 0  # no attention layers

    @property
    def is_croppable(self):
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def assign_states(self, tensors):
        """Points the lists at `tensors`, in the order of `states()` (the same shapes)."""
        tensors = iter(tensors)
        self._map(lambda v: next(tensors), release=False)

    def _map(self, fn, release=True):
        if release and self.static_binding is not None:  # back to its own tensors before they are replaced
            self.static_binding.release()
        per_stack = [states for stack in self.stacks for states in (stack.recurrent_states, stack.conv_states)]
        for states in [*per_stack, self.pool_windows, self.up_queues]:
            states[:] = [fn(v) for v in states]
        return self

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the new cache is row beam_idx[i] of the old one. In place (without gradients), so
        the tensors keep the addresses that compiled steps and CUDA graphs read."""
        if torch.is_grad_enabled() or len(beam_idx) != self.batch_size:
            return self._map(lambda v: v.index_select(0, beam_idx.to(v.device)))
        for v in self.states():
            v.copy_(v.index_select(0, beam_idx.to(v.device)))
        return self

    def batch_repeat_interleave(self, repeats: int):
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        return self._map(lambda v: v[indices])

    def to(self, *args, **kwargs):
        """Moves (or casts) every state like `Tensor.to`; the RG-LRU states keep their fp32 (or fp64) precision."""
        self._map(lambda v: v.to(*args, **kwargs))
        for stack in self.stacks:
            stack.recurrent_states[:] = [v if v.dtype in (torch.float32, torch.float64) else v.float()
                                         for v in stack.recurrent_states]
        return self

    def reset(self):
        for tensor in self.states():
            tensor.zero_()
        self.seen_tokens = 0

    def crop(self, max_length: int):
        raise NotImplementedError("PoolformerCache cannot be cropped: a recurrent state cannot forget steps.")
