"""Poolformer (arXiv 2510.02206): RG-LRU recurrences nested in pooling SkipBlocks, for raw audio.

The file reads like the thesis' figure, top to bottom: the value embedding, the RG-LRU, residual blocks and their
stacks, pooling, the SkipBlock, the model and the LM head (with generation). The cache that generation carries lives
in `cache_poolformer.py`, the scan kernels in `scan.py`, the audio codec and WAV output in `audio.py`, text in and out
of byte models in `text.py`.

Every module runs in "streaming" form: it takes a chunk of new time steps and reads and updates its state in the
cache (RG-LRU states, DownPool buffers, queues of UpPool outputs), or starts from zeros without one. A full forward
is one chunk without a cache, prefill is a chunk with the cache, and a generation step is a chunk of one sample, so
all three share one code path and agree to float tolerance.
"""

import contextlib
import functools
import math
import os
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .audio import PoolformerAudioMixin
from .cache_poolformer import PoolformerCache, PoolformerResidualStackState
from .configuration_poolformer import PoolformerConfig
from .fused_block import GELU_APPROXIMATIONS, gated_output, recomputed_in_backward
from .gelu_gate import gate_implementation
from .generation import PoolformerGenerationMixin, eager_steps
from .outputs import CACHE_FIELD, PoolformerCausalLMOutput, PoolformerModelOutput, cache_argument, nats_to_bits
from .rglru import fused_rglru, fused_rglru_available
from .scan import resolve_scan_implementation, scan_op
from .static_step import StaticStepStore
from .text import PoolformerTextMixin

# ---------------------------------------------------------------------------------------------------------------------
# Token embedding
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerValueProjection(nn.Linear):
    """The "mlp" embedding's Linear(1 -> D) of the scaled value (its own type for the author's bias init)."""


class PoolformerEmbedding(nn.Module):
    """Maps sample values to vectors. The thesis default is a fixed Fourier embedding *of the value* (no weights);
    `"learned"` is a lookup table and `"mlp"` a Linear(1 -> D) of the value scaled to `2 v / vocab_size - 1`."""

    def __init__(self, config: PoolformerConfig):
        super().__init__()
        self.kind = config.embedding
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self._tables = {}  # sinusoidal: device -> (vocab_size, D) table; not a buffer, so not in the checkpoint
        if self.kind == "learned":
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        elif self.kind == "mlp":
            self.value_proj = PoolformerValueProjection(1, config.hidden_size)
        # the fixed embedding has no weights whose dtype it could follow: this empty buffer takes the model's
        # (`model.to(dtype)`, `from_pretrained(dtype=...)`); not in the checkpoint
        self.register_buffer("dtype_anchor", torch.empty(0), persistent=False)

    def forward(self, input_ids: torch.LongTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(B, T) sample values -> (B, T, D) embeddings in `dtype` (by default the model's)."""
        dtype = dtype or self.dtype_anchor.dtype
        if input_ids.dtype != torch.long:  # uint8 samples, int32 ids...: lookups take int64
            input_ids = input_ids.long()
        if self.kind == "learned":
            return self.embed(input_ids).to(dtype)
        if self.kind == "mlp":
            return self.value_proj(input_ids.to(dtype).unsqueeze(-1) * (2.0 / self.vocab_size) - 1.0)
        if self.vocab_size > self.TABLE_LIMIT:  # 16-bit values: the features of each id, computed (same numbers)
            return self._fourier(input_ids).to(dtype)
        # a fixed table of the vocab_size values (made once per device), then a lookup
        table = self._tables.get(input_ids.device)
        if table is None:
            table = self._tables[input_ids.device] = self._fourier(torch.arange(self.vocab_size, device=input_ids.device))
        return F.embedding(input_ids, table).to(dtype)

    TABLE_LIMIT = 4096  # largest vocabulary whose sinusoidal features are kept as a table

    def _fourier(self, values: torch.Tensor) -> torch.Tensor:
        """[cos(v * w_k), sin(v * w_k)], w_k = 10000^(-k / (D/2)), in fp32."""
        half = self.hidden_size // 2
        freqs = torch.pow(10000.0, -torch.arange(half, device=values.device, dtype=torch.float32) / half)
        angles = values.to(torch.float32).unsqueeze(-1) * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# RG-LRU (Real-Gated Linear Recurrent Unit, Griffin), complex by default
# ---------------------------------------------------------------------------------------------------------------------


class _SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(x) whose gradient is capped at `max_grad` (it is infinite at x = 0, i.e. at |a| = 1)."""

    @staticmethod
    def forward(ctx, x, max_grad):
        ctx.save_for_backward(x)
        ctx.max_grad = max_grad
        return x.sqrt()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / (4 * x).sqrt().clamp_min(1.0 / ctx.max_grad), None  # d sqrt(x) = 1 / sqrt(4x)


class PoolformerBlockDiagonalLinear(nn.Module):
    """Linear map with `num_blocks` independent diagonal blocks (the RG-LRU gate projections)."""

    def __init__(self, in_features: int, out_features: int, num_blocks: int):
        super().__init__()
        self.num_blocks = num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, in_features // num_blocks, out_features // num_blocks))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (self.num_blocks, -1))
        y = torch.einsum("...hi,hij->...hj", x, self.weight.to(x.dtype))  # fp32 inside a bf16/fp16 model
        return y.flatten(-2) + self.bias.to(x.dtype)


class PoolformerRGLRU(nn.Module):
    """x = Linear(h) (D -> W); i_t, r_t = sigmoid(BD(x_t)), one of each per recurrent unit;
    log|a_t| = -c r_t softplus(Lambda), arg a_t = r_t theta; h_t = a_t h_{t-1} + sqrt(1 - |a_t|^2) (i_t x_t);
    output Linear(W -> D) of the real and imaginary parts of h, concatenated. A complex unit k takes features k
    (real part) and k + W/2 (imaginary part) of x, and both parts share its gates.

    With `conv1d_width`, a causal Conv1d + LayerNorm runs on h first (the author's temporal CNN).

    State (in its residual stack's `PoolformerResidualStackState`, at `layer_idx`, its place among the stack's
    RG-LRUs): h_{t-1} as (re, im) pairs, and the conv's last inputs."""

    def __init__(self, config: PoolformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_complex = config.complex_recurrence
        self.units = config.num_recurrent_units
        self.scale = config.recurrence_scale
        self.max_grad = config.sqrt_max_gradient
        self.chunk = config.scan_chunk_size
        self.scan_implementation = config.scan_implementation
        self.fused = config.fused_rglru
        self.conv_width = config.conv1d_width
        d, width = config.hidden_size, config.lru_width
        if self.conv_width:
            self.conv1d = nn.Conv1d(d, d, self.conv_width, groups=config.conv1d_groups)
            self.conv_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.input_proj = nn.Linear(d, width)
        self.input_gate = PoolformerBlockDiagonalLinear(width, self.units, config.num_gate_blocks)
        self.recurrence_gate = PoolformerBlockDiagonalLinear(width, self.units, config.num_gate_blocks)
        self.recurrence_param = nn.Parameter(torch.empty(self.units))  # Lambda
        if self.is_complex:
            self.phase_param = nn.Parameter(torch.empty(self.units))  # theta
        self.out_proj = nn.Linear(width, d)

    def forward(self, h: torch.Tensor, state: Optional["PoolformerResidualStackState"] = None) -> torch.Tensor:
        if self.conv_width:  # causal conv over [its last inputs, h]
            past = state.conv_states[self.layer_idx] if state is not None else None
            if past is None:
                past = h.new_zeros(h.shape[0], self.conv_width - 1, h.shape[2])
            h = torch.cat([past.to(h.dtype), h], dim=1)
            if state is not None:
                state.write(state.conv_states, self.layer_idx, h[:, h.shape[1] - (self.conv_width - 1) :])
            h = self.conv_norm(self.conv1d(h.transpose(1, 2)).transpose(1, 2))
        return self.recurrence(self.input_proj(h), state, h.dtype)

    def recurrence(self, x: torch.Tensor, state: Optional["PoolformerResidualStackState"] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """From the input projection's output x to the output projection's: the recurrence over x, then Linear(W -> D).
        `dtype`: the block's normalised input's dtype, which the composite's features take before the projection."""
        dtype = dtype or x.dtype
        h_prev = state.recurrent_states[self.layer_idx] if state is not None else None
        decoding = h_prev is not None and x.shape[1] == 1 and not torch.is_grad_enabled()
        implementation = resolve_scan_implementation(self.scan_implementation, x.device.type)
        fused = self.fused is not False  # None: wherever fused kernels exist
        if fused and not decoding and fused_rglru_available(implementation, x.device.type):
            # the output in the dtype the output projection computes in (autocast's), as the composite's cast gives
            out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else dtype
            features, last = self._fused(x, h_prev, out_dtype, implementation)
            if state is not None:
                state.write(state.recurrent_states, self.layer_idx, last)
            return self.out_proj(features)
        # the recurrence runs in fp32 (or fp64) even under autocast: decays near 1 need the precision
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            gate_x = torch.sigmoid(self.input_gate(x))
            gate_r = torch.sigmoid(self.recurrence_gate(x))
            log_a = -self.scale * gate_r * F.softplus(self.recurrence_param.to(x.dtype))
            scale = _SqrtBoundedGrad.apply(-torch.expm1(2 * log_a), self.max_grad) * gate_x
            theta = gate_r * self.phase_param.to(x.dtype) if self.is_complex else None
            if decoding:
                features, last = self._step(log_a, theta, scale, x, h_prev)
            else:
                features, last = self._scan(log_a, theta, scale, x, h_prev)
            if state is not None:
                state.write(state.recurrent_states, self.layer_idx, last)
        return self.out_proj(features.to(dtype))

    def _fused(self, x, state, out_dtype, implementation):
        """The whole recurrence as one fused operator (`rglru.fused_rglru`): x in its own dtype (bf16 under
        autocast; fp32 arithmetic inside), features in `out_dtype`, the last state as (re, im) pairs."""
        if state is not None and self.is_complex:  # (B, U, 2) pairs <-> the op's (B, 2U) [re, im] halves
            state = state.transpose(1, 2).flatten(1)
        features, last = fused_rglru(
            x, self.input_gate.weight, self.input_gate.bias, self.recurrence_gate.weight, self.recurrence_gate.bias,
            self.recurrence_param, self.phase_param if self.is_complex else None, state, self.scale, self.max_grad,
            out_dtype, implementation)
        if self.is_complex:
            last = last.unflatten(1, (2, self.units)).transpose(1, 2).contiguous()
        return features, last

    def _scan(self, log_a, theta, scale, x, state):
        """The recurrence over a chunk with the parallel scan -> (real and imaginary parts of h concatenated,
        the last h as (re, im) pairs). Complex values travel as real (re, im) pairs (see `scan.scan_op`)."""
        magnitude = torch.exp(log_a)
        implementation = resolve_scan_implementation(self.scan_implementation, x.device.type)
        if not self.is_complex:
            h0 = torch.zeros_like(x[:, 0]) if state is None else state.to(x.dtype)
            h = scan_op(magnitude, scale * x, h0, False, implementation, self.chunk)
            return h, h[:, -1]
        a = torch.stack([magnitude * torch.cos(theta), magnitude * torch.sin(theta)], dim=-1)
        u = torch.stack([scale * x[..., : self.units], scale * x[..., self.units :]], dim=-1)
        h0 = a.new_zeros(a.shape[0], self.units, 2) if state is None else state.to(x.dtype)
        h = scan_op(a, u, h0, True, implementation, self.chunk)
        return torch.cat([h[..., 0], h[..., 1]], dim=-1), h[:, -1]

    def _step(self, log_a, theta, scale, x, state):
        """One time step in real arithmetic (compilers generate no code for complex tensors): h = a h_prev + u with
        a = |a| e^{i theta}, on (re, im) pairs. Same outputs as `_scan`."""
        magnitude, scale, x = torch.exp(log_a[:, 0]), scale[:, 0], x[:, 0]
        if not self.is_complex:
            h = magnitude * state.to(x.dtype) + scale * x
            return h.unsqueeze(1), h
        a_re, a_im = magnitude * torch.cos(theta[:, 0]), magnitude * torch.sin(theta[:, 0])
        h_re, h_im = state[..., 0].to(x.dtype), state[..., 1].to(x.dtype)
        new_re = a_re * h_re - a_im * h_im + scale * x[:, : self.units]
        new_im = a_re * h_im + a_im * h_re + scale * x[:, self.units :]
        return torch.cat([new_re, new_im], dim=-1).unsqueeze(1), torch.stack([new_re, new_im], dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Residual blocks (pre-norm, temporal-mixing RG-LRU or MLP, gated) and their stacks
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerOutputProjection(nn.Linear):
    """Linear_out of a residual block, or the linear UpPool: initialised normal with variance 1 / (num_blocks *
    fan_in), num_blocks = `config.output_init_blocks(role, level)` of the stack (or UpPool) it belongs to."""

    def __init__(self, in_features: int, out_features: int, role: str, level: int):
        super().__init__(in_features, out_features)
        self.role, self.level = role, level


def _make_norm(config: PoolformerConfig) -> nn.Module:
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    if config.norm == "rms":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.Identity()


class PoolformerResidualBlock(GradientCheckpointingLayer):
    """h = Norm(x); b = Layer(h); b = b * act(Linear(h)) (or act(b) ungated); x + Dropout(Linear_out(b)).
    Layer is the RG-LRU (temporal mixing, D -> D) or Linear(D -> expansion * D) (MLP); the gate has Layer's width.

    Activation checkpointing is transformers' (`model.gradient_checkpointing_enable(gradient_checkpointing_kwargs)`,
    `activation_checkpointing_enable` on newer releases, or `config.activation_checkpointing`, which checkpoints
    without reentrancy). It applies to blocks that carry no state: a block that reads and writes a cache's state
    would read, when recomputed in the backward pass, the state it wrote, so such a call (the time chunks of
    `checkpoint_chunk_size`, a cache used with gradients) runs without checkpointing and keeps its cache, where
    transformers' layers would drop the cache instead."""

    def __init__(self, config: PoolformerConfig, role: str, level: int, layer_idx: Optional[int] = None):
        super().__init__()
        temporal = layer_idx is not None
        width = config.hidden_size if temporal else config.mlp_expansion * config.hidden_size
        self.norm = _make_norm(config)
        self.layer = PoolformerRGLRU(config, layer_idx) if temporal else nn.Linear(config.hidden_size, width)
        self.gate_proj = nn.Linear(config.hidden_size, width) if config.gated else None
        self.act = ACT2FN[config.hidden_act]
        self.out_proj = PoolformerOutputProjection(width, config.hidden_size, role, level)
        self.dropout = nn.Dropout(config.dropout)
        self.hidden_act, self.fused = config.hidden_act, config.fused_rglru
        self.scan_implementation = config.scan_implementation
        # the fused ends (`fused_block`) cover a LayerNorm, a GELU gate, and an RG-LRU without the temporal CNN
        self.fusable = (config.norm == "layer" and config.gated and config.hidden_act in GELU_APPROXIMATIONS
                        and not (temporal and config.conv1d_width))
        self.gradient_checkpointing = config.activation_checkpointing
        self._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def __call__(self, x: torch.Tensor, state: Optional["PoolformerResidualStackState"] = None) -> torch.Tensor:
        if state is not None and self.gradient_checkpointing:  # carried state: never recomputed (see the class doc)
            self.gradient_checkpointing = False
            try:
                return super().__call__(x, state)
            finally:
                self.gradient_checkpointing = True
        return super().__call__(x, state)

    def forward(self, x: torch.Tensor, state: Optional["PoolformerResidualStackState"] = None) -> torch.Tensor:
        fused = self.fused is not False  # None: wherever fused kernels exist
        if fused and self.fusable and torch.is_grad_enabled():  # without gradients nothing is saved: no gain
            return x + self.dropout(self._fused_forward(x, state))
        h = self.norm(x)
        b = self.layer(h, state) if isinstance(self.layer, PoolformerRGLRU) else self.layer(h)
        b = b * self.act(self.gate_proj(h)) if self.gate_proj is not None else self.act(b)
        return x + self.dropout(self.out_proj(b))

    def _fused_forward(self, x: torch.Tensor, state) -> torch.Tensor:
        """`Linear_out(b * act(g))` of `forward`, saving less for the backward pass: h is cast once to the linears'
        compute dtype (autocast would cast it once per linear), the gated output (`fused_block.gated_output`) keeps
        only b and h (only h in an MLP block, whose b it computes), recomputing the rest in the backward, and h is
        not kept either: the backward recomputes it from x, which the norm keeps (`recomputed_in_backward`). A
        checkpointed block keeps nothing to begin with, and a compiled graph chooses what it keeps itself."""
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

        def normalised(x):
            h = self.norm(x)
            return h if cast is None else h.to(cast)

        h = normalised(x)
        kernels = gate_implementation(resolve_scan_implementation(self.scan_implementation, device), device)
        keep_h = (self.gradient_checkpointing and self.training) or torch.compiler.is_compiling()
        recipe = recomputed_in_backward(h, normalised, (x,), tuple(self.norm.parameters()))
        with contextlib.nullcontext() if keep_h else recipe:
            if isinstance(self.layer, PoolformerRGLRU):
                b = self.layer.recurrence(self.layer.input_proj(h), state, x.dtype)
                return gated_output(b, h, self.gate_proj, self.out_proj, self.hidden_act, implementation=kernels)
            return gated_output(None, h, self.gate_proj, self.out_proj, self.hidden_act, self.layer, kernels)


def run_blocks(stack: "PoolformerResidualStack", x: torch.Tensor, state, inputs_out=None, skips_in=None):
    """The blocks of `stack` in order. `inputs_out` collects every block's input, `skips_in` is added (last first)
    after every block: the long skips of a U-Net. Decoding compiles this function once for all stacks of the same
    shape: nothing in it depends on which stack it runs (the state is an argument)."""
    for block in stack:
        if inputs_out is not None:
            inputs_out.append(x)
        x = block(x, state)
        if skips_in is not None:
            x = x + skips_in.pop()
    return x


class PoolformerResidualStack(nn.Module):
    """A stack of residual blocks: `pairs` x (RG-LRU block, MLP block), run in order. It is one row of
    `config.block_stacks` (its `role`, `level` and `pairs`), and its position there, `stack_idx`, is where its state
    lives in the cache; each RG-LRU's `layer_idx` is its position among the stack's RG-LRUs.

    The blocks are its children "0", "1", ... and it indexes and iterates like a list, but it is not an
    `nn.ModuleList`: tools that take a ModuleList for a plain container of repeated layers (accelerate's regional
    compilation) would replace it by one and lose this forward."""

    def __init__(self, config: PoolformerConfig, role: str, level: int):
        super().__init__()
        self.stack_idx = config.block_stack_index(role, level)
        _, _, pairs = config.block_stacks[self.stack_idx]
        for i in range(pairs):
            self.add_module(str(2 * i), PoolformerResidualBlock(config, role, level, layer_idx=i))
            self.add_module(str(2 * i + 1), PoolformerResidualBlock(config, role, level))
        self.role, self.level = role, level

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        return list(self._modules.values())[idx]

    def forward(self, x: torch.Tensor, cache: Optional["PoolformerCache"] = None, inputs_out=None, skips_in=None):
        if cache is None:
            return run_blocks(self, x, None, inputs_out, skips_in)
        state = cache.stacks[self.stack_idx]
        if cache.step_function is not None and x.shape[1] == 1 and not torch.is_grad_enabled():
            # canonical strides: a graph is specialised on them, even on the length-1 time dim
            return cache.step_function(self, x.clone(memory_format=torch.contiguous_format), state, inputs_out,
                                       skips_in)
        return run_blocks(self, x, state, inputs_out, skips_in)


# ---------------------------------------------------------------------------------------------------------------------
# Pooling: strided (grouped) conv, or reshape + linear
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerDownPool(nn.Module):
    """(B, m * p, D) -> (B, m, D): a Conv1d with kernel = stride = p (weights in `proj`, a `nn.Conv1d`), or a
    reshape to (B, m, p * D) and a Linear. With kernel = stride the conv is a contraction over each group of p steps,
    computed as such (for depthwise pooling a multiply-add: ~5x faster than the conv kernel for training, and
    without its per-call overhead in decoding)."""

    def __init__(self, config: PoolformerConfig, level: int):
        super().__init__()
        factor, self.kind, d = config.pooling_factors[level], config.pooling, config.hidden_size
        self.level, self.factor = level, factor
        self.groups = config.pooling_groups
        if self.kind == "conv":
            self.proj = nn.Conv1d(d, d, factor, stride=factor, groups=self.groups)
        else:
            self.proj = nn.Linear(factor * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, d = x.shape
        if self.kind != "conv":
            return self.proj(x.reshape(batch, steps // self.factor, -1))
        x = x.reshape(batch, steps // self.factor, self.factor, d)
        weight = self.proj.weight  # (D_out, D_in / G, p)
        if self.groups == d:  # depthwise: out[.., c] = sum_k x[.., k, c] w[c, k]
            return (x * weight[:, 0].t()).sum(dim=2) + self.proj.bias
        g = self.groups
        out = torch.einsum("bmkgi,goik->bmgo", x.unflatten(-1, (g, -1)), weight.unflatten(0, (g, -1)))
        return out.flatten(-2) + self.proj.bias


class PoolformerUpPoolConv(nn.ConvTranspose1d):
    """The UpPool's transposed conv, initialised like an output projection (`PoolformerOutputProjection`)."""

    def __init__(self, *args, level: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.role, self.level = "up", level


class PoolformerUpPool(nn.Module):
    """(B, m, D) -> (B, m * p, D): coarse step j produces fine steps j*p .. j*p+p-1 (before the causal shift). A
    ConvTranspose1d with kernel = stride = p (weights in `proj`), computed as a product per coarse step, or a Linear
    and a reshape."""

    def __init__(self, config: PoolformerConfig, level: int):
        super().__init__()
        factor, self.kind, d = config.pooling_factors[level], config.pooling, config.hidden_size
        self.level, self.factor = level, factor
        self.groups = config.pooling_groups
        if self.kind == "conv":
            self.proj = PoolformerUpPoolConv(d, d, factor, stride=factor, groups=self.groups, level=level)
        else:
            self.proj = PoolformerOutputProjection(d, factor * d, "up", level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, d = x.shape
        if self.kind != "conv":
            return self.proj(x).reshape(batch, steps * self.factor, -1)
        weight = self.proj.weight  # (D_in, D_out / G, p)
        if self.groups == d:  # depthwise: out[.., k, c] = x[.., c] w[c, k]
            out = x.unsqueeze(2) * weight[:, 0].t()
        else:
            g = self.groups
            out = torch.einsum("bmgi,giok->bmkgo", x.unflatten(-1, (g, -1)), weight.unflatten(0, (g, -1))).flatten(-2)
        return (out + self.proj.bias).reshape(batch, steps * self.factor, d)


# ---------------------------------------------------------------------------------------------------------------------
# SkipBlock: down blocks, x + UpPool(Inner(DownPool(x))), up blocks; Inner is the next SkipBlock or a plain stack
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerInnerLevel(nn.Module):
    """The innermost level (or the whole model without pooling): one stack of residual blocks."""

    def __init__(self, config: PoolformerConfig):
        super().__init__()
        self.blocks = PoolformerResidualStack(config, "inner", len(config.pooling_factors))

    def forward(self, x: torch.Tensor, cache: Optional["PoolformerCache"] = None, phases: tuple = ()) -> torch.Tensor:
        return self.blocks(x, cache)


class PoolformerSkipBlock(nn.Module):
    """One pooling level: down blocks, x + UpPool(Inner(DownPool(x))), up blocks. The pooled sub-network (the next
    SkipBlock, or the inner level) sees one step per `factor` steps of this level.

    Causality: coarse step j is made from this level's steps j*p .. j*p+p-1, so its output may only reach steps
    >= j*p+p-1. The up-pooled sequence is therefore delayed by `shift` = p - 1 steps ("fine") or p ("coarse"):
    the skip input of step t is UpPool output t - shift (zero before the first).

    Streaming: a chunk of T steps starts `phase` steps into the current pooling group (the cache's step count at
    this level, mod p). The level keeps, at `level`, its last p DownPool inputs (`pool_windows`; the unfinished
    group is their last `phase`) and its `shift - phase` UpPool outputs not yet consumed (`up_queues`, next first,
    padded to p). Both have fixed shapes, and a one-step chunk depends on `phase` only through whether it
    completes a group.
    """

    def __init__(self, config: PoolformerConfig, level: int):
        super().__init__()
        self.level = level
        self.factor = config.pooling_factors[level]
        self.shift = self.factor - 1 if config.causal_shift == "fine" else self.factor
        self.long_skips = config.skip == "long"
        self.down = PoolformerResidualStack(config, "down", level)
        self.down_pool = PoolformerDownPool(config, level)
        if level + 1 < len(config.pooling_factors):
            self.inner = PoolformerSkipBlock(config, level + 1)
        else:
            self.inner = PoolformerInnerLevel(config)
        self.up_pool = PoolformerUpPool(config, level)
        self.up = PoolformerResidualStack(config, "up", level)

    def forward(self, x: torch.Tensor, cache: Optional["PoolformerCache"] = None, phases: tuple = ()) -> torch.Tensor:
        skips = [] if self.long_skips else None
        x = self.down(x, cache, inputs_out=skips)

        p, steps = self.factor, x.shape[1]
        phase = phases[self.level] if phases else 0
        if cache is None:  # a forward from the start, without carried state
            pool_in, queue = x, x.new_zeros(x.shape[0], p, x.shape[2])
        else:
            pool_in = torch.cat([cache.pool_windows[self.level].to(x.dtype), x], dim=1)
            queue = cache.up_queues[self.level].to(x.dtype)
        start = pool_in.shape[1] - steps - phase  # where the unfinished group begins in pool_in
        groups = (phase + steps) // p  # groups this chunk completes: the pooled sub-network runs on them only
        if groups:
            coarse = self.down_pool(pool_in[:, start : start + groups * p])
            queue = torch.cat([queue[:, : self.shift - phase], self.up_pool(self.inner(coarse, cache, phases))], dim=1)
        x = x + queue[:, :steps]
        if cache is not None:
            rest = queue[:, steps : steps + p]
            cache.write(cache.pool_windows, self.level, pool_in[:, pool_in.shape[1] - p :])
            cache.write(cache.up_queues, self.level, F.pad(rest, (0, 0, 0, p - rest.shape[1])))
        return self.up(x, cache, skips_in=skips)


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained model base, init
# ---------------------------------------------------------------------------------------------------------------------


def _lecun_normal_(tensor: torch.Tensor, fan_in: int):
    """flax's default kernel init: a normal truncated at two standard deviations, variance 1 / fan_in after the
    truncation (which shrinks it by 0.8796^2)."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _fan_in(module: nn.Module) -> int:
    """What flax counts: a Linear's inputs, a conv kernel's width times its inputs per group (the UpPool is a flax conv
    with input dilation, so its width counts too)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels // module.groups * module.kernel_size[0]


def _raise_for_unreadable_checkpoint(error: Exception, source, kwargs: dict):
    """An error of safetensors while loading (a truncated or garbled file: "header too large", "incomplete metadata")
    becomes an `OSError` naming the file that fails to open and saying what to do; other errors pass through."""
    if type(error).__name__ != "SafetensorError":
        return
    from safetensors import safe_open

    subfolder = kwargs.get("subfolder") or ""
    folder = os.path.join(str(source), subfolder)
    if os.path.isdir(folder):
        candidates = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors"))
    else:  # a Hub repo: the files already in the local cache
        from transformers.utils import cached_file

        candidates = []
        for name in ("model.safetensors", "model.safetensors.index.json"):
            try:
                found = cached_file(str(source), name, subfolder=subfolder, cache_dir=kwargs.get("cache_dir"),
                                    revision=kwargs.get("revision"), local_files_only=True,
                                    _raise_exceptions_for_missing_entries=False,
                                    _raise_exceptions_for_connection_errors=False)
            except Exception:  # nothing to name: the message below names the repo
                found = None
            if found and name.endswith(".json"):
                shard_folder = os.path.dirname(found)
                candidates += sorted(os.path.join(shard_folder, n) for n in os.listdir(shard_folder)
                                     if n.endswith(".safetensors") and n != "model.safetensors")
            elif found:
                candidates.append(found)
    for path in candidates:
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as bad:
            raise OSError(f"{path} is not a readable safetensors file ({bad}): it is truncated or corrupt, e.g. an "
                          "interrupted download or copy. Delete it and download it again (for a Hub repo: "
                          "from_pretrained(..., force_download=True)) or save the model again.") from error
    raise OSError(f"{source}: a safetensors file of this checkpoint is truncated or corrupt ({error}). Delete the "
                  "model's files and download them again (for a Hub repo: from_pretrained(..., force_download=True)) "
                  "or save the model again.") from error


class PoolformerPreTrainedModel(PreTrainedModel):
    config_class = PoolformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["PoolformerResidualBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True  # the cache cannot be cropped, so assisted decoding is refused

    def __init__(self, config: PoolformerConfig, *args, **kwargs):
        config.validate_poolformer()  # fields set after the config was made (config.x = ...) get checked here
        super().__init__(config, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward (or generate) builds a PoolformerCache

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """transformers' `from_pretrained`, stricter about what a checkpoint lacks. The weights of a head over the
        body (the LM head of `PoolformerForCausalLM` loaded from a `PoolformerModel` checkpoint) are initialised,
        with a warning, and listed in the loading info's `missing_keys`, as transformers does; a checkpoint lacking
        weights of the body itself is an incomplete model folder and an error (transformers would start them random
        and only print a report), unless `allow_missing_weights=True` initialises them on purpose. A truncated or
        corrupt safetensors file is an `OSError` naming the file."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as error:
            _raise_for_unreadable_checkpoint(error, args[0] if args else kwargs.get("pretrained_model_name_or_path"),
                                             kwargs)
            raise
        missing = sorted(info["missing_keys"])
        prefix = cls.base_model_prefix + "."
        head = [key for key in missing if cls is not PoolformerModel and not key.startswith(prefix)]
        body = [key for key in missing if key not in head]
        if body and not allow_missing_weights:
            raise ValueError(f"{args[0] if args else kwargs.get('pretrained_model_name_or_path')}: the checkpoint lacks "
                             f"{len(body)} weights of {cls.__name__}'s body ({', '.join(body[:4])}"
                             f"{', ...' if len(body) > 4 else ''}): an incomplete model folder. Pass "
                             "allow_missing_weights=True to initialise them randomly on purpose.")
        if head:
            warnings.warn(f"{cls.__name__}: the checkpoint has no {', '.join(head)} (a checkpoint of the body alone, "
                          "e.g. a PoolformerModel): they are newly initialised, train them before use.", UserWarning,
                          stacklevel=2)
        return (model, info) if want_info else model

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # releases before the rename

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
            """Recompute each residual block in the backward pass (transformers' `gradient_checkpointing_enable`)."""
            self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

        def activation_checkpointing_disable(self):
            self.gradient_checkpointing_disable()

    @torch.no_grad()
    def _init_weights(self, module):
        """The author's init (flax defaults), by module type: truncated LeCun-normal kernels and zero biases; the
        output projection of every residual block and every UpPool plain normal with variance
        1 / (num_blocks * fan_in), num_blocks from the config (`output_init_blocks`); block-diagonal gate biases
        truncated LeCun-normal over the number of blocks; RG-LRU decays with |a| = r0^c at r = 1 and small-ring
        phases; the value MLP's bias normal with std 0.5. The layers whose init differs have their own types."""
        cfg = self.config
        if isinstance(module, (PoolformerOutputProjection, PoolformerUpPoolConv)):
            num_blocks = cfg.output_init_blocks(module.role, module.level)
            init.normal_(module.weight, mean=0.0, std=math.sqrt(1.0 / (num_blocks * _fan_in(module))))
            init.zeros_(module.bias)
        elif isinstance(module, PoolformerValueProjection):
            _lecun_normal_(module.weight, _fan_in(module))
            init.normal_(module.bias, mean=0.0, std=0.5)  # the author's bias init for this layer
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
            _lecun_normal_(module.weight, _fan_in(module))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, PoolformerBlockDiagonalLinear):
            _lecun_normal_(module.weight, module.weight.shape[0] * module.weight.shape[1])
            _lecun_normal_(module.bias, module.num_blocks)
        elif isinstance(module, PoolformerRGLRU):
            # r0 = sqrt(U[r_min^2, r_max^2]); softplus(Lambda) = -log r0, so |a| = r0^c when r_t = 1
            r0 = torch.empty_like(module.recurrence_param).uniform_(cfg.r_min**2, cfg.r_max**2).sqrt()
            target = -torch.log(r0)
            init.copy_(module.recurrence_param, target + torch.log(-torch.expm1(-target)))  # softplus^-1
            if module.is_complex:
                init.uniform_(module.phase_param, 0.0, cfg.max_phase * math.pi)
        elif isinstance(module, nn.Embedding):  # flax's nn.Embed: normal, variance 1 / features
            init.normal_(module.weight, mean=0.0, std=math.sqrt(1.0 / module.embedding_dim))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _can_read(tensor: torch.Tensor) -> bool:
    """Whether a value check may read `tensor`: on the CPU (no device to wait for), outside a compiled graph."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerModel(PoolformerPreTrainedModel):
    """Embedding, the nested SkipBlocks (or a flat stack without pooling), final norm."""

    def __init__(self, config: PoolformerConfig):
        super().__init__(config)
        self.embed_tokens = PoolformerEmbedding(config)
        self.body = PoolformerSkipBlock(config, 0) if config.pooling_factors else PoolformerInnerLevel(config)
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)  # whatever `norm` says, as the author
        self.post_init()

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_seen) -> tuple:
        """Shapes and types of the inputs -> (batch, steps). Checks of values (the ids' range, right padding) read
        the data, which stalls an accelerator until it catches up: they run on CPU tensors only, where they cost no
        such wait; on a GPU the data layer (`training/data.py`) guarantees them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids (B, T) or inputs_embeds (B, T, hidden_size).")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or not _is_integer(input_ids.dtype):
                got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
                raise ValueError(f"input_ids must be an integer tensor of token ids (sample values), got {got}.")
            if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
                raise ValueError(f"input_ids must have shape (batch >= 1, length >= 1), got {tuple(input_ids.shape)}.")
            if _can_read(input_ids):
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= self.config.vocab_size:
                    raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (sample values), got values "
                                     f"in [{lo}, {hi}].")
            batch, steps = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size or not len(inputs_embeds):
                raise ValueError(f"inputs_embeds must have shape (batch >= 1, length, {self.config.hidden_size}), got "
                                 f"{tuple(inputs_embeds.shape)}.")
            batch, steps = inputs_embeds.shape[:2]
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) not in ((batch, steps), (batch, past_seen + steps)):
                raise ValueError(
                    f"attention_mask must have shape ({batch}, {steps}) or ({batch}, {past_seen + steps}) with the "
                    f"cache, got {tuple(attention_mask.shape)}."
                )
            mask = attention_mask.bool()
            if _can_read(mask) and (mask[:, 1:] & ~mask[:, :-1]).any():
                raise ValueError("attention_mask must be right-padded (ones, then zeros): a recurrence cannot skip left "
                                 "padding. Pad batches of different lengths on the right.")
        return batch, steps

    def _checkpointed_in_time(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """The body over `x` in time chunks, each recomputed in backward from the state that entered it (only that
        small state and the chunk's output outlive the chunk). The streaming state makes chunking exact, and
        gradients reach earlier chunks through it."""

        def run(x_chunk, seen, *carried):
            cache = PoolformerCache.from_states(self.config, carried, seen)  # the same state in the recomputation
            out = self.body(x_chunk, cache, cache.level_phases())
            return (out, *cache.states())

        # one buffer for the output: a list of chunk outputs and their concatenation would hold it twice
        hidden = torch.empty_like(x)
        carried = PoolformerCache(self.config, x.shape[0], x.dtype, x.device).states()
        for start in range(0, x.shape[1], chunk):
            hidden[:, start : start + chunk], *carried = torch.utils.checkpoint.checkpoint(
                run, x[:, start : start + chunk], start, *carried, use_reentrant=False
            )
        return hidden

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional["PoolformerCache"] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional["PoolformerCache"] = None,
        **kwargs,
    ) -> Union[tuple, "PoolformerModelOutput"]:
        """One chunk of samples: the whole sequence (no cache), a prompt (a fresh or given cache) or a decoding step
        (one sample with the cache). `past_key_values` is the old name of `cache`. `use_cache`,
        `output_hidden_states` and `return_dict` default to the config's (`use_cache` to False in training mode, and
        to True when a cache is given). `hidden_states`: the embeddings and the output of every residual block that
        runs at full length, the last after the final norm (`config.num_hidden_layers + 1` tensors); with gradients
        on, the embeddings require them (their `.grad` after backward is the input gradient)."""
        _reject_unknown_arguments(self, kwargs)
        cache = cache_argument(cache, past_key_values)
        if cache is not None and not isinstance(cache, PoolformerCache):
            raise ValueError(f"cache must be a PoolformerCache (or None), got {type(cache).__name__}.")
        if use_cache is None:
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        past_seen = cache.get_seq_length() if cache is not None else 0
        batch, steps = self._check_inputs(input_ids, inputs_embeds, attention_mask, past_seen)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if output_hidden_states and torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()  # the first hidden state keeps its gradient, as with learned embeddings
        if not use_cache:
            cache = None
        elif cache is None:
            cache = PoolformerCache(self.config)
        if cache is not None:
            cache.prepare(batch, x.dtype, x.device)

        chunk = self.config.checkpoint_chunk_size
        # the blocks' outputs are taken from their calls, which the compiled decoding step would not make
        eager = eager_steps(cache) if output_hidden_states else contextlib.nullcontext()
        with self._block_outputs(output_hidden_states) as block_outputs, eager:
            if chunk and cache is None and self.training and torch.is_grad_enabled() and steps > chunk:
                hidden = self._checkpointed_in_time(x, chunk)
            elif cache is None:
                hidden = self.body(x)
            elif steps == 1 and cache.static_step is not None and not torch.is_grad_enabled():
                hidden = cache.static_step(self.body, x, cache)  # on static buffers (CUDA graphs on a GPU)
            else:  # a one-sample step takes the canonical phases, so a compiled step sees one of few shapes
                hidden = self.body(x, cache, cache.step_phases() if steps == 1 else cache.level_phases())
        if cache is not None:
            cache.seen_tokens += steps
        hidden = self.norm_f(hidden)

        hidden_states = None
        if output_hidden_states:  # a block called once per time chunk gave one output per chunk
            outputs = [pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1) for pieces in block_outputs[:-1]]
            hidden_states = (x, *outputs, hidden)
        out = PoolformerModelOutput(last_hidden_state=hidden, **{CACHE_FIELD: cache}, hidden_states=hidden_states)
        return out if return_dict else out.to_tuple()

    def full_length_blocks(self) -> list:
        """The residual blocks that run at full length, in order: the outer level's down and up blocks, or the whole
        stack without pooling. Their outputs are the model's `hidden_states`."""
        if isinstance(self.body, PoolformerSkipBlock):
            return [*self.body.down, *self.body.up]
        return list(self.body.blocks)

    @contextlib.contextmanager
    def _block_outputs(self, enabled: bool):
        """Collects the outputs of `full_length_blocks()` (one list per block) while inside, when `enabled`."""
        if not enabled:
            yield None
            return
        blocks = self.full_length_blocks()
        outputs = [[] for _ in blocks]
        handles = [block.register_forward_hook(lambda module, args, out, i=i: outputs[i].append(out))
                   for i, block in enumerate(blocks)]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()


# arguments transformers passes to a forward that a recurrence without positions has no use for: the cache position
# (generate on earlier 5.x releases) and position ids; `output_attentions` is accepted as False (there is no attention)
_IGNORED_ARGUMENTS = ("cache_position", "position_ids")


def _reject_unknown_arguments(module: nn.Module, kwargs: dict):
    """A keyword `forward` does not take is an error (a misspelt `lables=` would otherwise pass silently)."""
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True: Poolformer has no attention layers, so no attention weights.")
    unknown = sorted(k for k in kwargs if k not in _IGNORED_ARGUMENTS and k != "output_attentions")
    if unknown:
        raise TypeError(f"{type(module).__name__}.forward() got unexpected keyword argument"
                        f"{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")


# ---------------------------------------------------------------------------------------------------------------------
# LM head
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerDualSoftmaxHead(nn.Module):
    """WaveRNN's dual softmax (arXiv 1802.08435) over vocab_size = n^2 values, `config.output_head="dual-softmax"`.
    A token v is a coarse part c = v // n and a fine part f = v % n (the high and low byte of a 16-bit sample):

        log p(v | h) = log softmax(W_c h)[c] + log softmax(W_f act(W_h h + E[c]))[f]

    The fine softmax sees the coarse part of its own sample (`coarse_embed`, E) and, through h, only the samples
    before it; both factors are normalised, so the n^2 probabilities sum to 1 exactly. Training needs one coarse
    and one fine softmax per sample (`nll`); `log_probs` spells out all n^2 values (n fine softmaxes), which
    generation does for one step at a time."""

    def __init__(self, config: PoolformerConfig):
        super().__init__()
        n, d = config.coarse_size, config.hidden_size
        self.coarse_size = n
        self.coarse_proj = nn.Linear(d, n)  # W_c
        self.fine_in = nn.Linear(d, d)  # W_h
        self.coarse_embed = nn.Embedding(n, d)  # E
        self.fine_proj = nn.Linear(d, n)  # W_f
        self.act = ACT2FN[config.hidden_act]

    def fine_logits(self, hidden: torch.Tensor, coarse: torch.LongTensor) -> torch.Tensor:
        """(..., D) hidden states and (...) coarse parts -> (..., n) logits of the fine part."""
        return self.fine_proj(self.act(self.fine_in(hidden) + self.coarse_embed(coarse)))

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., n^2) log-probabilities of every value, fp32: log p(c) + log p(f | c) at index n c + f."""
        coarse = F.log_softmax(self.coarse_proj(hidden).float(), dim=-1)
        every_coarse = torch.arange(self.coarse_size, device=hidden.device)
        fine = self.fine_logits(hidden.unsqueeze(-2), every_coarse)  # (..., n, n): row c = the fine logits given c
        return (coarse.unsqueeze(-1) + F.log_softmax(fine.float(), dim=-1)).flatten(-2)

    def nll(self, hidden: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
        """(B, T, D) and (B, T) target values (-100: ignored) -> (B, T) NLL in nats, -log p(c) - log p(f | c)
        (0 where ignored). The fine factor is conditioned on the target's own coarse part (teacher forcing)."""
        n, valid = self.coarse_size, targets != -100
        value = targets.clamp_min(0)
        coarse_t = (value // n).masked_fill(~valid, -100)
        fine_t = (value % n).masked_fill(~valid, -100)
        coarse = F.cross_entropy(self.coarse_proj(hidden).float().flatten(0, -2), coarse_t.flatten(), reduction="none")
        fine_logits = self.fine_logits(hidden, value // n).float()
        fine = F.cross_entropy(fine_logits.flatten(0, -2), fine_t.flatten(), reduction="none")
        return (coarse + fine).view(targets.shape)


class PoolformerForCausalLM(PoolformerPreTrainedModel, PoolformerGenerationMixin, GenerationMixin, PoolformerAudioMixin,
                            PoolformerTextMixin):
    """Poolformer with a LayerNorm'd Linear(D -> vocab) head, or the dual softmax of `PoolformerDualSoftmaxHead`
    (`config.output_head`, 16-bit PCM). logits[:, t] predicts input_ids[:, t + 1]; sequences start with the zero
    token (`config.bos_token_id`, 128 at 8 bits, 32768 at 16). `generate` (`generation.PoolformerGenerationMixin`) is
    transformers' with a compiled decoding step around it; `save_wav`, `tokens_to_waveform` and `audio_streamer`
    come from `audio.PoolformerAudioMixin`, and for byte models (`quantization="bytes"`) `encode_text`,
    `decode_text` and `text_streamer` from `text.PoolformerTextMixin`."""

    stack_step = staticmethod(run_blocks)  # what `generate` compiles: one residual stack's step (any stack)

    def __init__(self, config: PoolformerConfig):
        super().__init__(config)
        self.model = PoolformerModel(config)
        if config.output_head == "dual-softmax":
            self.lm_head = PoolformerDualSoftmaxHead(config)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        # what `generate` keeps across calls: the compiled stack step per set of compile options, and the static
        # buffers (CUDA graphs on a GPU) per batch size, dtype and device, which a copy of the model starts without
        self._compiled_steps: dict = {}
        self._static_steps = StaticStepStore()
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional["PoolformerCache"] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional["PoolformerCache"] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
        **kwargs,
    ) -> Union[tuple, "PoolformerCausalLMOutput"]:
        """`labels` (B, T) are shifted inside (`-100` and masked positions are ignored); `shift_labels` (B, T) are
        labels already shifted (position t predicts shift_labels[:, t], as transformers' causal LMs take them) and
        replace `labels`; `num_items_in_batch` (transformers' Trainer) divides the summed NLL instead of the number of
        predicted samples. `past_key_values` is the old name of `cache`. With labels, `sample_nll` holds each
        predicted sample's NLL (position t: of labels[t + 1]). The dual-softmax head's `logits` are the
        log-probabilities of all vocab_size values (256 KB per position at 16 bits): a forward with labels returns
        them only when `logits_to_keep` asks for positions. Other keywords raise a `TypeError`."""
        _reject_unknown_arguments(self, kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        dual = isinstance(self.lm_head, PoolformerDualSoftmaxHead)
        all_positions = isinstance(logits_to_keep, int) and logits_to_keep == 0
        with_labels = labels is not None or shift_labels is not None
        logits = None
        if not dual:
            logits = self.lm_head(hidden[:, keep])
        elif not with_labels or not all_positions:
            logits = self.lm_head.log_probs(hidden[:, keep])

        loss = bits = nll = None
        if with_labels:
            targets = self._targets(labels, shift_labels, attention_mask, hidden)
            if dual:
                nll = self.lm_head.nll(hidden, targets)
            else:
                all_logits = logits if logits.shape[1] == hidden.shape[1] else self.lm_head(hidden)
                nll = F.cross_entropy(all_logits.float().reshape(-1, self.config.vocab_size), targets.reshape(-1),
                                      ignore_index=-100, reduction="none").view(targets.shape)
            count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = nll.sum() / (count.to(nll.device) if torch.is_tensor(count) else count)  # NaN over nothing
            if _can_read(targets) and bool((targets == -100).all()):
                warnings.warn("Poolformer: no label left to predict (all -100 or masked, or sequences of one "
                              "sample): the loss is NaN.", RuntimeWarning, stacklevel=2)
            bits = nats_to_bits(loss)

        out = PoolformerCausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                       bits_per_sample=bits, sample_nll=nll, **{CACHE_FIELD: outputs.cache})
        return out if return_dict else out.to_tuple()

    def _targets(self, labels, shift_labels, attention_mask, hidden) -> torch.LongTensor:
        """(B, T) targets, -100 where none: position t predicts labels[t + 1], or shift_labels[t]. A target is
        ignored where the sample it predicts is padding."""
        for name, value in (("labels", labels), ("shift_labels", shift_labels)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or not _is_integer(value.dtype):
                raise ValueError(f"{name} must be an integer tensor (sample values, -100 to ignore), got "
                                 f"{getattr(value, 'dtype', type(value).__name__)}.")
            if value.shape != hidden.shape[:2]:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(hidden.shape[:2])}, got "
                                 f"{tuple(value.shape)}.")
            if _can_read(value):
                bad = value[(value != -100) & ((value < 0) | (value >= self.config.vocab_size))]
                if len(bad):
                    raise ValueError(f"{name} must lie in [0, {self.config.vocab_size}) or be -100 (ignored), got "
                                     f"{bad[0].item()}.")
        mask = attention_mask[:, -hidden.shape[1] :].to(hidden.device) if attention_mask is not None else None
        if shift_labels is not None:
            targets = shift_labels.to(hidden.device).long()
            if mask is not None:  # position t predicts sample t + 1; the last one, its own row's next sample
                targets = targets.masked_fill(torch.cat([mask[:, 1:], mask[:, -1:]], dim=1) == 0, -100)
            return targets
        labels = labels.to(hidden.device).long()
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
        # shift the labels, not the logits: slicing (B, T, vocab) logits would copy them
        return F.pad(labels[:, 1:], (0, 1), value=-100)


__all__ = [
    "CACHE_FIELD",
    "PoolformerCache",
    "PoolformerCausalLMOutput",
    "PoolformerDualSoftmaxHead",
    "PoolformerForCausalLM",
    "PoolformerModel",
    "PoolformerModelOutput",
    "PoolformerPreTrainedModel",
    "PoolformerResidualStackState",
    "nats_to_bits",
]
