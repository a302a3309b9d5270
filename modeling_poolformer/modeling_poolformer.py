"""Poolformer (arXiv 2510.02206): RG-LRU recurrences nested in pooling SkipBlocks, for raw audio.

The file reads top to bottom: the audio codec, value embedding, the linear-recurrence scan, the RG-LRU, residual
blocks, pooling, the SkipBlock, the model, the LM head (with generation), and the recurrent + pooling cache that
generation carries.

Every module runs in "streaming" form: it takes a chunk of new time steps and a dict of states (RG-LRU states,
DownPool buffers, queues of UpPool outputs) that it reads and updates. A full forward is one chunk with an empty
dict, prefill is a chunk with the cache's dict, and a generation step is a chunk of one token, so all three share
one code path and agree to float tolerance.
"""

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput

from .configuration_poolformer import PoolformerConfig


# ---------------------------------------------------------------------------------------------------------------------
# Audio codec: waveforms in [-1, 1] <-> 8-bit tokens (mu-law or linear), as in SaShiMi
# ---------------------------------------------------------------------------------------------------------------------


def encode_audio(waveform: torch.Tensor, quantization: str = "mu-law", levels: int = 256) -> torch.Tensor:
    """Float waveform in [-1, 1] -> token ids in [0, levels). mu-law: `F = sgn(x) ln(1 + mu|x|) / ln(1 + mu)`,
    mu = levels - 1; linear: `F = x`. Then `q = floor((levels - 0.01) * (F + 1) / 2 + 0.005)`."""
    x = waveform.double().clamp(-1.0, 1.0)
    if quantization == "mu-law":
        mu = levels - 1
        x = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    elif quantization != "linear":
        raise ValueError(f"quantization must be 'mu-law' or 'linear', got {quantization!r}")
    return torch.floor((levels - 0.01) * (x + 1) / 2 + 0.005).long().clamp(0, levels - 1)


def decode_audio(tokens: torch.Tensor, quantization: str = "mu-law", levels: int = 256) -> torch.Tensor:
    """Token ids -> float32 waveform in [-1, 1]: `y = q / (levels / 2) - 1`, then the inverse mu-law."""
    y = tokens.double() / (levels / 2) - 1
    if quantization == "mu-law":
        mu = levels - 1
        y = torch.sign(y) * (torch.pow(1.0 + mu, y.abs()) - 1) / mu
    elif quantization != "linear":
        raise ValueError(f"quantization must be 'mu-law' or 'linear', got {quantization!r}")
    return y.float()


# ---------------------------------------------------------------------------------------------------------------------
# Token embedding
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerEmbedding(nn.Module):
    """Maps sample values to vectors. The thesis default is a fixed Fourier embedding *of the value* (no weights);
    `"learned"` is a lookup table and `"mlp"` a Linear(1 -> D) of the value scaled to `2 v / vocab_size - 1`."""

    def __init__(self, config: PoolformerConfig):
        super().__init__()
        self.kind = config.embedding
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        if self.kind == "learned":
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        elif self.kind == "mlp":
            self.value_proj = nn.Linear(1, config.hidden_size)
            self.value_proj.init_bias_std = 0.5  # the author's bias init for this layer

    def forward(self, input_ids: torch.LongTensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "learned":
            return self.embed(input_ids).to(dtype)
        if self.kind == "mlp":
            return self.value_proj(input_ids.to(dtype).unsqueeze(-1) * (2.0 / self.vocab_size) - 1.0)
        half = self.hidden_size // 2
        freqs = torch.pow(10000.0, -torch.arange(half, device=input_ids.device, dtype=torch.float32) / half)
        angles = input_ids.unsqueeze(-1).float() * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Linear recurrence h_t = a_t * h_{t-1} + u_t: chunked parallel scan with a reverse-time scan as its backward
# ---------------------------------------------------------------------------------------------------------------------


def sequential_scan(a: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain reference: `h_t = a_t * h_{t-1} + u_t` over dim 1 of (B, T, N) tensors, `h_{-1} = h0` (default 0)."""
    h = torch.zeros_like(u[:, 0]) if h0 is None else h0
    out = []
    for a_t, u_t in zip(a.unbind(1), u.unbind(1)):
        h = a_t * h + u_t
        out.append(h)
    return torch.stack(out, dim=1)


def _loop_scan(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """One fused multiply-add per step into a preallocated output: on CPU, where per-op overhead rather than
    parallelism bounds pure-torch code, this beats the chunked scan below."""
    out = torch.empty_like(u)
    h = h0
    for t, (a_t, u_t) in enumerate(zip(a.unbind(1), u.unbind(1))):
        h = torch.addcmul(u_t, a_t, h, out=out[:, t])
    return out


def _chunked_scan(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, chunk: int) -> torch.Tensor:
    """`sequential_scan` in O(chunk + T/chunk) Python steps: every chunk is scanned from zero at once (vectorised
    over chunks), then the chunk carries are scanned, then each chunk adds its carry times the running product of
    its decays. Only products of decays appear (no divisions), so it is as stable as the sequential loop."""
    batch, length, units = u.shape
    if length == 1:
        return (a[:, 0] * h0 + u[:, 0]).unsqueeze(1)
    chunk = max(1, min(chunk, length))
    pad = (-length) % chunk
    if pad:  # padding goes after the end, so it never reaches a real step
        a = torch.cat([a, a.new_zeros(batch, pad, units)], dim=1)
        u = torch.cat([u, u.new_zeros(batch, pad, units)], dim=1)
    num_chunks = (length + pad) // chunk
    # (chunk, B, num_chunks, N): each in-chunk step reads and writes one contiguous slab
    a = a.view(batch, num_chunks, chunk, units).permute(2, 0, 1, 3).contiguous()
    u = u.view(batch, num_chunks, chunk, units).permute(2, 0, 1, 3)
    h = torch.empty(a.shape, dtype=u.dtype, device=u.device)
    h[0] = u[0]
    for c in range(1, chunk):
        torch.add(u[c], a[c] * h[c - 1], out=h[c])
    decay = torch.cumprod(a, dim=0)  # decay[c] = a_0 * ... * a_c within each chunk
    carry, carries = h0, []
    for m in range(num_chunks):
        carries.append(carry)
        carry = decay[-1, :, m] * carry + h[-1, :, m]
    h += decay * torch.stack(carries, dim=1)
    return h.permute(1, 2, 0, 3).reshape(batch, num_chunks * chunk, units)[:, :length]


@functools.lru_cache(maxsize=None)
def _numba_kernels():
    """Compiled CPU kernels (numba, built on first use and cached on disk), or None when numba is missing. Each
    parallel job scans a block of units of one batch row through time, a whole time row at a time: every byte is
    touched once per pass and the inner loop runs over contiguous memory."""
    try:
        import numba
        import numpy as np
    except ImportError:
        return None

    @numba.njit(parallel=True, cache=True)
    def forward(a, u, h0, out, block):
        batch, steps, units = u.shape
        blocks = (units + block - 1) // block
        for job in numba.prange(batch * blocks):
            b, lo = job // blocks, (job % blocks) * block
            hi = min(units, lo + block)
            h = h0[b, lo:hi].copy()
            for t in range(steps):
                a_t, u_t, out_t = a[b, t, lo:hi], u[b, t, lo:hi], out[b, t, lo:hi]
                for n in range(hi - lo):
                    h[n] = a_t[n] * h[n] + u_t[n]
                    out_t[n] = h[n]

    @numba.njit(parallel=True, cache=True)
    def backward(a, h, h0, grad_h, grad_a, grad_u, grad_h0, block):
        batch, steps, units = grad_h.shape
        blocks = (units + block - 1) // block
        for job in numba.prange(batch * blocks):
            b, lo = job // blocks, (job % blocks) * block
            hi = min(units, lo + block)
            g = np.zeros(hi - lo, dtype=grad_h.dtype)
            for t in range(steps - 1, -1, -1):
                gh_t, gu_t, ga_t = grad_h[b, t, lo:hi], grad_u[b, t, lo:hi], grad_a[b, t, lo:hi]
                h_prev = h[b, t - 1, lo:hi] if t > 0 else h0[b, lo:hi]
                if t + 1 < steps:
                    a_next = a[b, t + 1, lo:hi]
                    for n in range(hi - lo):
                        g[n] = gh_t[n] + np.conj(a_next[n]) * g[n]
                else:
                    for n in range(hi - lo):
                        g[n] = gh_t[n]
                for n in range(hi - lo):
                    gu_t[n] = g[n]
                    ga_t[n] = g[n] * np.conj(h_prev[n])
            for n in range(hi - lo):
                grad_h0[b, lo + n] = np.conj(a[b, 0, lo + n]) * g[n]

    def block_size(batch, units):
        """Whole rows when the batch alone keeps every thread busy, else split rows across the idle threads."""
        per_row = max(1, numba.get_num_threads() // batch)
        return max(16, -(-units // per_row))

    return forward, backward, block_size


SCAN_IMPLEMENTATIONS = ("auto", "numba", "loop", "chunked")


def _resolve_scan(implementation: str, a: torch.Tensor) -> str:
    if implementation == "auto":
        if a.device.type != "cpu":
            return "chunked"
        return "numba" if _numba_kernels() is not None else "loop"
    if implementation == "numba" and (a.device.type != "cpu" or _numba_kernels() is None):
        raise RuntimeError("scan_implementation='numba' needs numba installed and tensors on the CPU")
    return implementation


def _numpy(x: torch.Tensor):
    return x.detach().contiguous().numpy()


def _scan(a, u, h0, implementation, chunk):
    if implementation == "numba":
        forward, _, block_size = _numba_kernels()
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        forward(_numpy(a), _numpy(u), _numpy(h0), out.numpy(), block_size(u.shape[0], u.shape[2]))
        return out
    if implementation == "loop":
        return _loop_scan(a, u, h0)
    return _chunked_scan(a, u, h0, chunk if chunk > 0 else max(8, int(math.sqrt(u.shape[1]))))


class _LinearScan(torch.autograd.Function):
    """Autograd for the scan. Backward is the same recurrence run backwards in time with conjugated decays:
    `g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}`, then `dL/du_t = g_t`, `dL/da_t = g_t conj(h_{t-1})`."""

    @staticmethod
    def forward(ctx, a, u, h0, implementation, chunk):
        h = _scan(a, u, h0, implementation, chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.implementation, ctx.chunk = implementation, chunk
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        if ctx.implementation == "numba":
            _, backward, block_size = _numba_kernels()
            grad_a, grad_u, grad_h0 = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h0)
            backward(_numpy(a), _numpy(h), _numpy(h0), _numpy(grad_h), grad_a.numpy(), grad_u.numpy(),
                     grad_h0.numpy(), block_size(h.shape[0], h.shape[2]))
            return grad_a, grad_u, grad_h0, None, None
        # reverse-time coefficients: step s of the reversed scan multiplies by conj(a_{T-s}); its first one is unused
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1).conj().flip(1)
        g = _scan(a_next, grad_h.flip(1), torch.zeros_like(h0), ctx.implementation, ctx.chunk).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        grad_a = g * h_prev.conj()
        grad_h0 = a[:, 0].conj() * g[:, 0]
        return grad_a, g, grad_h0, None, None


def linear_scan(
    a: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor] = None, implementation: str = "auto", chunk: int = 0
) -> torch.Tensor:
    """`h_t = a_t * h_{t-1} + u_t` over dim 1 for (B, T, N) real or complex tensors, differentiable.

    `implementation`: "numba" (compiled CPU kernels), "loop" (one fused torch op per step), "chunked" (a chunked
    parallel scan, chunks of `chunk` steps or ~sqrt(T)), or "auto": numba on CPU when installed, else the loop;
    chunked on accelerators. All agree with `sequential_scan` to float tolerance."""
    if a.shape != u.shape or a.dim() != 3:
        raise ValueError(f"linear_scan: a and u must both be (B, T, N); got {tuple(a.shape)} and {tuple(u.shape)}")
    if implementation not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"linear_scan: implementation must be one of {SCAN_IMPLEMENTATIONS}, got {implementation!r}")
    if h0 is None:
        h0 = torch.zeros_like(u[:, 0])
    if u.shape[1] == 1 and not torch.is_grad_enabled():  # a generation step
        return (a[:, 0] * h0 + u[:, 0]).unsqueeze(1)
    return _LinearScan.apply(a, u, h0, _resolve_scan(implementation, a), max(chunk, 0))


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
        y = torch.einsum("...hi,hij->...hj", x, self.weight)
        return y.flatten(-2) + self.bias


class PoolformerRGLRU(nn.Module):
    """x = Linear(h) (D -> W); i_t, r_t = sigmoid(BD(x_t)), one of each per recurrent unit;
    log|a_t| = -c r_t softplus(Lambda), arg a_t = r_t theta; h_t = a_t h_{t-1} + sqrt(1 - |a_t|^2) (i_t x_t);
    output Linear(W -> D) of the real and imaginary parts of h, concatenated. A complex unit k takes features k
    (real part) and k + W/2 (imaginary part) of x, and both parts share its gates.

    With `conv1d_width`, a causal Conv1d + LayerNorm runs on h first (the author's temporal CNN)."""

    def __init__(self, config: PoolformerConfig):
        super().__init__()
        self.is_complex = config.complex_recurrence
        self.units = config.num_recurrent_units
        self.scale = config.recurrence_scale
        self.max_grad = config.sqrt_max_gradient
        self.chunk = config.scan_chunk_size
        self.scan_implementation = config.scan_implementation
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
        self.state_key = None  # set by PoolformerModel: where this block's state lives in the state dict

    def forward(self, h: torch.Tensor, state: dict) -> torch.Tensor:
        if self.conv_width:  # causal conv; its last inputs are state for the next chunk
            key = self.state_key + ".conv"
            past = state.get(key)
            if past is None:
                past = h.new_zeros(h.shape[0], self.conv_width - 1, h.shape[2])
            h = torch.cat([past.to(h.dtype), h], dim=1)
            state[key] = h[:, h.shape[1] - (self.conv_width - 1):]
            h = self.conv_norm(self.conv1d(h.transpose(1, 2)).transpose(1, 2))
        x = self.input_proj(h)
        # the recurrence runs in fp32 (or fp64) even under autocast: decays near 1 need the precision
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            gate_x = torch.sigmoid(self.input_gate(x))
            gate_r = torch.sigmoid(self.recurrence_gate(x))
            log_a = -self.scale * gate_r * F.softplus(self.recurrence_param.to(x.dtype))
            multiplier = _SqrtBoundedGrad.apply(-torch.expm1(2 * log_a), self.max_grad)
            if self.is_complex:
                a = torch.polar(torch.exp(log_a), gate_r * self.phase_param.to(x.dtype))
                u = (multiplier * gate_x) * torch.complex(x[..., : self.units], x[..., self.units :])
            else:
                a, u = torch.exp(log_a), multiplier * gate_x * x
            key = self.state_key + ".h"
            h_last = state.get(key)
            h0 = None if h_last is None else h_last.to(u.dtype)
            h_all = linear_scan(a, u, h0, self.scan_implementation, self.chunk)
            state[key] = h_all[:, -1]
            out = torch.cat([h_all.real, h_all.imag], dim=-1) if self.is_complex else h_all
        return self.out_proj(out.to(h.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Residual blocks: pre-norm, temporal-mixing (RG-LRU) or MLP, gated
# ---------------------------------------------------------------------------------------------------------------------


_TRANSIENT = "_transient"  # marks the state dict of a forward without cache: nothing reads it afterwards


def _make_norm(config: PoolformerConfig) -> nn.Module:
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    if config.norm == "rms":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.Identity()


class PoolformerResidualBlock(nn.Module):
    """h = Norm(x); b = Layer(h); b = b * act(Linear(h)) (or act(b) ungated); x + Dropout(Linear_out(b)).
    Layer is the RG-LRU (temporal mixing, D -> D) or Linear(D -> expansion * D) (MLP); the gate has Layer's width."""

    def __init__(self, config: PoolformerConfig, temporal: bool, num_blocks: int):
        super().__init__()
        width = config.hidden_size if temporal else config.mlp_expansion * config.hidden_size
        self.norm = _make_norm(config)
        self.layer = PoolformerRGLRU(config) if temporal else nn.Linear(config.hidden_size, width)
        self.gate_proj = nn.Linear(config.hidden_size, width) if config.gated else None
        self.act = ACT2FN[config.hidden_act]
        self.out_proj = nn.Linear(width, config.hidden_size)
        self.out_proj.init_num_blocks = num_blocks  # thesis init: variance 1 / (num_blocks * fan_in)
        self.dropout = nn.Dropout(config.dropout)
        # activation checkpointing (config.activation_checkpointing or model.activation_checkpointing_enable())
        self.gradient_checkpointing = config.activation_checkpointing

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and _TRANSIENT in state:
            # the recomputation must start from the same (empty) state as the first pass, so the block gets a
            # private dict; a full forward without cache never reads a block's state back
            run = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False
            )
            return run(lambda inputs: self._forward(inputs, {}), x)
        return self._forward(x, state)

    def _forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        h = self.norm(x)
        b = self.layer(h, state) if isinstance(self.layer, PoolformerRGLRU) else self.layer(h)
        b = b * self.act(self.gate_proj(h)) if self.gate_proj is not None else self.act(b)
        return x + self.dropout(self.out_proj(b))


def _block_pairs(config: PoolformerConfig, pairs: int, num_blocks: int) -> nn.ModuleList:
    """`pairs` x (RG-LRU block, MLP block)."""
    return nn.ModuleList(
        PoolformerResidualBlock(config, temporal=(i % 2 == 0), num_blocks=num_blocks) for i in range(2 * pairs)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pooling: strided (grouped) conv, or reshape + linear
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerDownPool(nn.Module):
    """(B, m * p, D) -> (B, m, D)."""

    def __init__(self, config: PoolformerConfig, factor: int):
        super().__init__()
        self.factor, self.kind, d = factor, config.pooling, config.hidden_size
        if self.kind == "conv":
            self.proj = nn.Conv1d(d, d, factor, stride=factor, groups=config.pooling_groups)
        else:
            self.proj = nn.Linear(factor * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return self.proj(x.transpose(1, 2)).transpose(1, 2)
        return self.proj(x.reshape(x.shape[0], x.shape[1] // self.factor, -1))


class PoolformerUpPool(nn.Module):
    """(B, m, D) -> (B, m * p, D): coarse step j produces fine steps j*p .. j*p+p-1 (before the causal shift)."""

    def __init__(self, config: PoolformerConfig, factor: int, num_blocks: int):
        super().__init__()
        self.factor, self.kind, d = factor, config.pooling, config.hidden_size
        if self.kind == "conv":
            self.proj = nn.ConvTranspose1d(d, d, factor, stride=factor, groups=config.pooling_groups)
        else:
            self.proj = nn.Linear(d, factor * d)
        self.proj.init_num_blocks = num_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return self.proj(x.transpose(1, 2)).transpose(1, 2)
        return self.proj(x).reshape(x.shape[0], x.shape[1] * self.factor, -1)


# ---------------------------------------------------------------------------------------------------------------------
# SkipBlock: down blocks, x + UpPool(Inner(DownPool(x))), up blocks; Inner is the next SkipBlock or a plain stack
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerStack(nn.Module):
    """The innermost level (or the whole model without pooling): a plain stack of residual blocks."""

    def __init__(self, config: PoolformerConfig, pairs: int):
        super().__init__()
        self.blocks = _block_pairs(config, pairs, num_blocks=2 * pairs)

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, state)
        return x


class PoolformerSkipBlock(nn.Module):
    """One pooling level. The pooled sub-network sees one step per `factor` steps of this level.

    Causality: coarse step j is made from this level's steps j*p .. j*p+p-1, so its output may only reach steps
    >= j*p+p-1. The up-pooled sequence is therefore delayed by `p - 1` steps ("fine") or `p` steps ("coarse").
    In streaming form the level keeps the DownPool inputs of an unfinished group (`.pool_buffer`) and the up-pooled
    outputs not yet consumed (`.up_queue`, which starts as `shift` zeros): the queue always holds enough entries
    for the current chunk, because every step's skip input comes from a group that is complete by then.
    """

    def __init__(self, config: PoolformerConfig, level: int):
        super().__init__()
        factors, layers = config.pooling_factors, config.level_layers
        self.factor = factors[level]
        self.shift = self.factor - 1 if config.causal_shift == "fine" else self.factor
        self.long_skips = config.skip == "long"
        pairs = layers[level]
        num_blocks = 2 * pairs + 2 * pairs + 1  # thesis: 2*len(down) + 2*len(up) + 1 for the output-scale init
        self.down = _block_pairs(config, pairs, num_blocks)
        self.down_pool = PoolformerDownPool(config, self.factor)
        if level + 1 < len(factors):
            self.inner = PoolformerSkipBlock(config, level + 1)
        else:
            self.inner = PoolformerStack(config, layers[-1])
        self.up_pool = PoolformerUpPool(config, self.factor, num_blocks)
        self.up = _block_pairs(config, pairs, num_blocks)
        self.state_key = None

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        skips = []
        for block in self.down:
            if self.long_skips:
                skips.append(x)
            x = block(x, state)

        buffer_key, queue_key = self.state_key + ".pool_buffer", self.state_key + ".up_queue"
        buffer, queue = state.get(buffer_key), state.get(queue_key)
        pool_in = x if buffer is None else torch.cat([buffer.to(x.dtype), x], dim=1)
        if queue is None:
            queue = x.new_zeros(x.shape[0], self.shift, x.shape[2])
        groups = pool_in.shape[1] // self.factor
        if groups:  # the pooled sub-network only runs when a group of `factor` steps is complete
            inner = self.inner(self.down_pool(pool_in[:, : groups * self.factor]), state)
            queue = torch.cat([queue.to(x.dtype), self.up_pool(inner)], dim=1)
        state[buffer_key] = pool_in[:, groups * self.factor :]
        steps = x.shape[1]
        x = x + queue[:, :steps]
        state[queue_key] = queue[:, steps:]

        for block in self.up:
            x = block(x, state)
            if self.long_skips:
                x = x + skips.pop()
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained model base, init
# ---------------------------------------------------------------------------------------------------------------------


def _lecun_normal_(tensor: torch.Tensor, fan_in: int):
    """flax's default kernel init: a normal truncated at two standard deviations, variance 1 / fan_in after the
    truncation (which shrinks it by 0.8796^2)."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


class PoolformerPreTrainedModel(PreTrainedModel):
    config_class = PoolformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["PoolformerResidualBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True  # the cache cannot be cropped, so assisted decoding is refused

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds its own PoolformerCache

    @torch.no_grad()
    def _init_weights(self, module):
        """The author's init (flax defaults): truncated LeCun-normal kernels and zero biases; the output projection
        of every residual block and the UpPool plain normal with variance 1 / (num_blocks * fan_in); block-diagonal
        gate biases truncated LeCun-normal over the number of blocks; RG-LRU decays with |a| = r0^c at r = 1 and
        small-ring phases. Fan-in counts what flax counts: a conv kernel's width times its inputs per group (the
        UpPool is a flax conv with input dilation, so its width counts too)."""
        cfg = self.config
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
            if isinstance(module, nn.Linear):
                fan_in = module.in_features
            else:
                fan_in = module.in_channels // module.groups * module.kernel_size[0]
            num_blocks = getattr(module, "init_num_blocks", None)
            if num_blocks is None:
                _lecun_normal_(module.weight, fan_in)
            else:
                init.normal_(module.weight, mean=0.0, std=math.sqrt(1.0 / (num_blocks * fan_in)))
            if module.bias is not None and hasattr(module, "init_bias_std"):
                init.normal_(module.bias, mean=0.0, std=module.init_bias_std)
            elif module.bias is not None:
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


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def _compact(state: dict) -> dict:
    """The state with copies of the tensors that are views into whole-sequence activations (the last step of a
    scan, the tail of a pooling group), so holding the state does not keep those activations alive."""
    return {
        k: v.clone() if torch.is_tensor(v) and v.untyped_storage().nbytes() > v.numel() * v.element_size() else v
        for k, v in state.items()
    }


class PoolformerModel(PoolformerPreTrainedModel):
    """Embedding, the nested SkipBlocks (or a flat stack without pooling), final norm."""

    def __init__(self, config: PoolformerConfig):
        super().__init__(config)
        self.embed_tokens = PoolformerEmbedding(config)
        if config.pooling_factors:
            self.body = PoolformerSkipBlock(config, level=0)
        else:
            self.body = PoolformerStack(config, config.level_layers[0])
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)  # whatever `norm` says, as the author
        for name, module in self.named_modules():  # stable keys for the per-module states in the cache
            if isinstance(module, (PoolformerRGLRU, PoolformerSkipBlock)):
                module.state_key = name
        self.post_init()

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_seen):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids (B, T) or inputs_embeds (B, T, hidden_size).")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.is_complex():
                got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
                raise ValueError(f"input_ids must be an integer tensor of token ids (sample values), got {got}.")
            if input_ids.dim() != 2 or input_ids.shape[1] < 1:
                raise ValueError(f"input_ids must have shape (batch, length >= 1), got {tuple(input_ids.shape)}.")
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, {self.config.vocab_size}) (8-bit sample values), got values in [{lo}, {hi}]."
                )
            batch, steps = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, length, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}."
                )
            batch, steps = inputs_embeds.shape[:2]
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (
                steps,
                past_seen + steps,
            ):
                raise ValueError(
                    f"attention_mask must have shape ({batch}, {steps}) or ({batch}, {past_seen + steps}) with the cache, "
                    f"got {tuple(attention_mask.shape)}."
                )
            mask = attention_mask.bool()
            if (mask[:, 1:] & ~mask[:, :-1]).any():
                raise ValueError(
                    "attention_mask must be right-padded (ones, then zeros): a recurrence cannot skip left padding. "
                    "Pad batches of different lengths on the right."
                )

    def _checkpointed_in_time(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """The body over `x` in time chunks, each recomputed in backward from the state that entered it (only that
        small state and the chunk's output outlive the chunk). The streaming state makes chunking exact, and
        gradients reach earlier chunks through it."""

        def run(x_chunk, carried):
            state = dict(carried)  # the recomputation must start from the same state as the first pass
            return self.body(x_chunk, state), _compact(state)

        # one buffer for the output: a list of chunk outputs and their concatenation would hold it twice
        hidden, state = torch.empty_like(x), {}
        for start in range(0, x.shape[1], chunk):
            hidden[:, start : start + chunk], state = torch.utils.checkpoint.checkpoint(
                run, x[:, start : start + chunk], state, use_reentrant=False
            )
        return hidden

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional["PoolformerCache"] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, BaseModelOutputWithPast]:
        use_cache = use_cache if use_cache is not None else (past_key_values is not None)
        if past_key_values is not None and not isinstance(past_key_values, PoolformerCache):
            raise ValueError(
                f"past_key_values must be a PoolformerCache (or None), got {type(past_key_values).__name__}."
            )
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_seen)
        if use_cache and past_key_values is None:
            past_key_values = PoolformerCache(self.config)
        state = past_key_values.states if use_cache else {_TRANSIENT: True}

        x = self.embed_tokens(input_ids, self.dtype) if inputs_embeds is None else inputs_embeds
        embeddings = x
        chunk = self.config.checkpoint_chunk_size
        if chunk and not use_cache and self.training and torch.is_grad_enabled() and x.shape[1] > chunk:
            x = self._checkpointed_in_time(x, chunk)
        else:
            x = self.body(x, state)
        hidden = self.norm_f(x)
        if use_cache:
            if x.shape[1] > 1:
                state.update(_compact(state))
            past_key_values.seen_tokens += x.shape[1]

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=(embeddings, hidden) if output_hidden_states else None,
        )
        return out if return_dict is not False else out.to_tuple()


# ---------------------------------------------------------------------------------------------------------------------
# LM head
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PoolformerCausalLMOutput(ModelOutput):
    """`loss`: mean NLL in nats over the unmasked predicted positions; `bits_per_sample`: the same in bits."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    past_key_values: Optional["PoolformerCache"] = None
    hidden_states: Optional[tuple] = None
    bits_per_sample: Optional[torch.FloatTensor] = None


class PoolformerForCausalLM(PoolformerPreTrainedModel, GenerationMixin):
    """Poolformer with a LayerNorm'd Linear(D -> vocab) head. logits[:, t] predicts input_ids[:, t + 1]; sequences
    start with the zero token (`config.bos_token_id`, 128)."""

    def __init__(self, config: PoolformerConfig):
        super().__init__(config)
        self.model = PoolformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()
        # audio defaults: sample at temperature 1 from the full distribution, one second per call;
        # a generation_config.json saved with the model replaces them on load
        self.generation_config.do_sample = True
        self.generation_config.temperature = 1.0
        self.generation_config.top_k = 0  # transformers would otherwise default to top-k 50
        self.generation_config.max_new_tokens = config.sample_rate
        self.generation_config._from_model_config = False

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional["PoolformerCache"] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ) -> Union[tuple, PoolformerCausalLMOutput]:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])

        loss = bits = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(f"labels must have the shape of input_ids {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}.")
            all_logits = logits if logits.shape[1] == hidden.shape[1] else self.lm_head(hidden)
            labels = labels.to(all_logits.device)
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask[:, -labels.shape[1] :] == 0, -100)
            # shift the labels, not the logits: slicing (B, T, vocab) logits would copy them
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(
                all_logits.float().reshape(-1, self.config.vocab_size), targets.reshape(-1), ignore_index=-100
            )
            bits = loss / math.log(2.0)

        out = PoolformerCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            bits_per_sample=bits,
        )
        return out if return_dict is not False else out.to_tuple()

    # -----------------------------------------------------------------------------------------------------------------
    # Generation: a fast loop for plain sampling / greedy decoding, transformers' generate for everything else
    # -----------------------------------------------------------------------------------------------------------------

    # generation-config fields the fast loop implements; any other non-default field falls back to transformers
    _FAST_GENERATION_FIELDS = {
        "do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "min_new_tokens", "max_length",
        "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits", "bos_token_id",
        "pad_token_id", "num_beams", "use_cache", "transformers_version", "_from_model_config",
    }

    def generate(self, inputs=None, generation_config=None, streamer=None, progress=False, generator=None, **kwargs):
        """transformers' `generate`, with a fast path for sampling and greedy decoding.

        The fast path (taken when no option beyond sampling/greedy, temperature, top-k, top-p, lengths,
        `num_return_sequences`, scores/logits outputs and a streamer is asked for) prefills the prompt with the
        parallel scan, then runs one step per sample straight through the model's streaming modules into a
        preallocated output, without transformers' per-step bookkeeping. It draws samples exactly as transformers
        does (same warpers, `torch.multinomial` on the same probabilities), so for the same seed both paths give
        the same tokens. Everything else (beam search, repetition penalties, custom processors, ...) goes to
        `GenerationMixin.generate`.

        Extra arguments: `progress=True` shows a tqdm bar; `generator` (a `torch.Generator`) seeds the fast path
        without touching the global RNG. `inputs=None` starts from the zero token (`bos_token_id`, 128).
        """
        # the same merge as transformers (call arguments > model's generation config > library defaults)
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if not self._can_use_fast_generate(config, model_kwargs):
            if generator is not None:
                raise ValueError(
                    "generate(generator=...) is only supported by the fast sampling path; these options need "
                    "transformers' generic generate: seed it with torch.manual_seed instead."
                )
            return super().generate(inputs, generation_config=config, streamer=streamer, **model_kwargs)
        return self._fast_generate(inputs, config, model_kwargs.get("attention_mask"), streamer, progress, generator)

    def _can_use_fast_generate(self, config: GenerationConfig, model_kwargs: dict) -> bool:
        extra = {k for k, v in model_kwargs.items() if k != "attention_mask" and v is not None and v is not False}
        mask = model_kwargs.get("attention_mask")
        defaults = GenerationConfig()
        defaults.update(**self.generation_config._get_default_generation_params(), defaults_only=True)
        defaults = defaults.to_dict()
        unset = (None, False, 0)  # "off" values: output_attentions=False is as unset as None
        changed = {
            k for k, v in config.to_dict().items()
            if v is not None and v != defaults.get(k, v) and not (v in unset and defaults.get(k) in unset)
        }
        return (
            not extra
            and (mask is None or bool(mask.all()))
            and (config.num_beams or 1) == 1
            and config.eos_token_id is None
            and not changed - self._FAST_GENERATION_FIELDS
        )

    @torch.no_grad()
    def _fast_generate(self, input_ids, config, attention_mask, streamer, progress, generator):
        if input_ids is None:
            bos = config.bos_token_id if config.bos_token_id is not None else self.config.bos_token_id
            input_ids = torch.full((1, 1), bos, dtype=torch.long, device=self.device)
        input_ids = input_ids.to(self.device)
        if (config.num_return_sequences or 1) > 1:
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        batch, prompt_len = input_ids.shape
        new_tokens = config.max_new_tokens
        if new_tokens is None:
            new_tokens = (config.max_length or 20) - prompt_len
        if new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {new_tokens}; max_length={config.max_length}).")

        warpers = []
        if config.do_sample:
            if config.temperature is not None and config.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(config.top_p))

        sequences = torch.empty(batch, prompt_len + new_tokens, dtype=torch.long, device=self.device)
        sequences[:, :prompt_len] = input_ids
        scores, raw_logits = [], []
        if streamer is not None:
            streamer.put(input_ids.cpu())

        cache = PoolformerCache(self.config)
        logits = self(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        steps = range(new_tokens)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="generating", unit="sample", total=new_tokens)
        for i in steps:
            position = prompt_len + i
            if config.output_logits:
                raw_logits.append(logits.clone())
            for warp in warpers:
                logits = warp(sequences[:, :position], logits)
            if config.output_scores:
                scores.append(logits)
            if config.do_sample:
                probs = torch.softmax(logits, dim=-1)
                token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            sequences[:, position] = token
            if streamer is not None:
                streamer.put(token.cpu())
            if i + 1 < new_tokens:
                logits = self._decode_step(token, cache)
        if streamer is not None:
            streamer.end()
        if not config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(raw_logits) if config.output_logits else None,
            past_key_values=cache,
        )

    def _decode_step(self, token: torch.LongTensor, cache: "PoolformerCache") -> torch.Tensor:
        """One sample through the streaming modules (no input checks): (B,) ids -> (B, vocab) float32 logits."""
        model = self.model
        x = model.embed_tokens(token.unsqueeze(1), self.dtype)
        x = model.norm_f(model.body(x, cache.states))
        cache.seen_tokens += 1
        return self.lm_head(x[:, -1]).float()

    # -----------------------------------------------------------------------------------------------------------------
    # Audio out
    # -----------------------------------------------------------------------------------------------------------------

    def tokens_to_waveform(self, tokens: torch.Tensor, drop_bos: bool = True) -> torch.Tensor:
        """(B, T) or (T,) token ids -> float32 waveforms in [-1, 1] with this model's quantisation. The leading zero
        token that `generate` starts from is dropped when `drop_bos`."""
        if drop_bos and tokens.shape[-1] > 1:
            tokens = tokens[..., 1:]
        return decode_audio(tokens.cpu(), self.config.quantization, self.config.vocab_size)

    def save_wav(self, tokens: torch.Tensor, path: Union[str, Path], drop_bos: bool = True) -> list:
        """Writes generated tokens as 16-bit WAV at `config.sample_rate`: one file for (T,) tokens or a (1, T)
        batch, `path` stem + `_{i}.wav` per row otherwise. Returns the written paths."""
        import soundfile

        waves = self.tokens_to_waveform(tokens, drop_bos)
        waves = waves.unsqueeze(0) if waves.dim() == 1 else waves
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(waves) == 1:
            paths = [path]
        else:
            paths = [path.with_name(f"{path.stem}_{i}{path.suffix or '.wav'}") for i in range(len(waves))]
        for wave, target in zip(waves, paths):
            soundfile.write(str(target), wave.numpy(), self.config.sample_rate, subtype="PCM_16")
        return paths


# ---------------------------------------------------------------------------------------------------------------------
# Cache: RG-LRU states, DownPool buffers and UpPool queues of every level, carried as past_key_values
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerCache(Cache):
    """Recurrent + pooling state of a Poolformer, carried by `generate` as `past_key_values`.

    `states` maps a module path to a tensor whose first dim is the batch:
    `<block>.h` (RG-LRU state, complex), `<block>.conv` (last temporal-conv inputs), `<level>.pool_buffer` (DownPool
    inputs of an unfinished group, < p steps) and `<level>.up_queue` (UpPool outputs not yet consumed).
    `seen_tokens` counts the steps processed so far; it is also the pooling phase of every level.
    """

    is_compileable = False

    def __init__(self, config: Optional[PoolformerConfig] = None, **kwargs):
        super().__init__(layers=[])
        self.config = config
        self.states: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0

    def __repr__(self):
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.states.items())[:4])
        more = f", ... ({len(self.states)} tensors)" if len(self.states) > 4 else ""
        return f"PoolformerCache(seen_tokens={self.seen_tokens}, {shapes}{more})"

    def __len__(self):
        return 0  # no attention layers

    @property
    def is_croppable(self):
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def _map(self, fn):
        self.states = {k: fn(v) for k, v in self.states.items()}
        return self

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the new cache is row beam_idx[i] of the old one."""
        return self._map(lambda v: v.index_select(0, beam_idx.to(v.device)))

    def batch_repeat_interleave(self, repeats: int):
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        return self._map(lambda v: v[indices])

    def to(self, *args, **kwargs):
        """Moves every state like `Tensor.to` (complex states keep a complex dtype)."""
        def move(v):
            moved = v.to(*args, **kwargs)
            if v.is_complex() and not moved.is_complex():
                raise ValueError("PoolformerCache.to: RG-LRU states are complex; pass a device, not a real dtype.")
            return moved

        return self._map(move)

    def reset(self):
        self.states.clear()
        self.seen_tokens = 0

    def crop(self, max_length: int):
        raise NotImplementedError("PoolformerCache cannot be cropped: a recurrent state cannot forget steps.")


__all__ = [
    "PoolformerPreTrainedModel",
    "PoolformerModel",
    "PoolformerForCausalLM",
    "PoolformerCache",
    "encode_audio",
    "decode_audio",
    "linear_scan",
    "sequential_scan",
]
