"""Poolformer (arXiv 2510.02206): RG-LRU recurrences nested in pooling SkipBlocks, for raw audio.

The file reads top to bottom: the audio codec, value embedding, the linear-recurrence scan, the RG-LRU, residual
blocks, pooling, the SkipBlock, the model, the LM head (with generation), and the recurrent + pooling cache that
generation carries.

Every module runs in "streaming" form: it takes a chunk of new time steps and a dict of states (RG-LRU states,
DownPool buffers, queues of UpPool outputs) that it reads and updates. A full forward is one chunk with an empty
dict, prefill is a chunk with the cache's dict, and a generation step is a chunk of one token, so all three share
one code path and agree to float tolerance.
"""

import contextlib
import copy
import functools
import itertools
import math
import os
import queue
import time
import warnings
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import CompileConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation.streamers import BaseStreamer
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
        self._tables = {}  # sinusoidal: device -> (vocab_size, D) table; not a buffer, so not in the checkpoint
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
        # a fixed table of the vocab_size values (made once per device), then a lookup
        table = self._tables.get(input_ids.device)
        if table is None:
            half = self.hidden_size // 2
            freqs = torch.pow(10000.0, -torch.arange(half, device=input_ids.device, dtype=torch.float32) / half)
            angles = torch.arange(self.vocab_size, device=input_ids.device, dtype=torch.float32).unsqueeze(-1) * freqs
            table = self._tables[input_ids.device] = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return F.embedding(input_ids, table).to(dtype)


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
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
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


SCAN_IMPLEMENTATIONS = ("auto", "numba", "loop", "chunked", "triton")


def _triton_scan():
    """The Triton scan (GPUs; CPU tensors under TRITON_INTERPRET=1), or None without Triton."""
    try:  # a relative import in this form is what save_pretrained follows to ship triton_scan.py with the model
        from .triton_scan import available, triton_scan
    except ImportError:  # this file loaded on its own (not as part of a package)
        return None
    return triton_scan if available() else None


@torch.compiler.assume_constant_result  # a compiled graph bakes the choice in instead of tracing numba's import
def _resolve_scan(implementation: str, device_type: str) -> str:
    if implementation == "auto":
        if device_type == "cuda":
            return "triton" if _triton_scan() is not None else "chunked"
        if device_type != "cpu":
            return "chunked"
        return "numba" if _numba_kernels() is not None else "loop"
    if implementation == "numba" and (device_type != "cpu" or _numba_kernels() is None):
        raise RuntimeError("scan_implementation='numba' needs numba installed and tensors on the CPU")
    if implementation == "triton":
        if _triton_scan() is None:
            raise RuntimeError("scan_implementation='triton' needs the triton package")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("scan_implementation='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones)")
    return implementation


def _numpy(x: torch.Tensor):
    return x.detach().contiguous().numpy()


def _scan(a, u, h0, implementation, chunk):
    if implementation == "numba":
        forward, _, block_size = _numba_kernels()
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        forward(_numpy(a), _numpy(u), _numpy(h0), out.numpy(), block_size(u.shape[0], u.shape[2]))
        return out
    if implementation == "triton":
        return _triton_scan()(a, u, h0)[0]
    if implementation == "loop":
        return _loop_scan(a, u, h0)
    # contiguous, like every other implementation's output: the custom op's fake kernel promises it to the compiler
    return _chunked_scan(a, u, h0, chunk if chunk > 0 else max(8, int(math.sqrt(u.shape[1])))).contiguous()


def _scan_backward(a, h, h0, grad_h, implementation, chunk):
    """The scan's gradients: the same recurrence run backwards in time with conjugated decays,
    `g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}`, then `dL/du_t = g_t`, `dL/da_t = g_t conj(h_{t-1})`,
    `dL/dh0 = conj(a_0) g_0`."""
    if implementation == "numba":
        _, backward, block_size = _numba_kernels()
        grad_a, grad_u, grad_h0 = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h0)
        backward(_numpy(a), _numpy(h), _numpy(h0), _numpy(grad_h), grad_a.numpy(), grad_u.numpy(),
                 grad_h0.numpy(), block_size(h.shape[0], h.shape[2]))
        return grad_a, grad_u, grad_h0
    if implementation == "triton":  # reads a_{t+1} and walks backwards itself: no shifted or flipped copies
        g = _triton_scan()(a, grad_h, torch.zeros_like(h0), reverse=True, shift_conj=True)[0]
    else:  # step s of the reversed scan multiplies by conj(a_{T-s}); its first one is unused
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1).conj().flip(1)
        g = _scan(a_next, grad_h.flip(1), torch.zeros_like(h0), implementation, chunk).flip(1)
    h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
    return g * h_prev.conj(), g, a[:, 0].conj() * g[:, 0]


# The scan as a torch custom operator with autograd, on real tensors (complex values as (re, im) pairs in a last dim
# of 2): under torch.compile it is one opaque call (numba, Triton and numpy are not traced), and a compiled graph
# around it holds no complex tensors, which inductor cannot generate code for.


def _pairs_to_complex(*tensors):
    return [torch.view_as_complex(t.contiguous()) for t in tensors]


def _define_scan_ops():
    @torch.library.custom_op("poolformer::linear_scan", mutates_args=())
    def scan_op(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, is_complex: bool, implementation: str,
                chunk: int) -> torch.Tensor:
        if not is_complex:
            return _scan(a, u, h0, implementation, chunk)
        return torch.view_as_real(_scan(*_pairs_to_complex(a, u, h0), implementation, chunk))

    @torch.library.custom_op("poolformer::linear_scan_backward", mutates_args=())
    def backward_op(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor, grad_h: torch.Tensor, is_complex: bool,
                    implementation: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not is_complex:
            return _scan_backward(a, h, h0, grad_h, implementation, chunk)
        grads = _scan_backward(*_pairs_to_complex(a, h, h0, grad_h), implementation, chunk)
        return tuple(torch.view_as_real(g) for g in grads)

    @scan_op.register_fake
    def _(a, u, h0, is_complex, implementation, chunk):
        return u.new_empty(u.shape)

    @backward_op.register_fake
    def _(a, h, h0, grad_h, is_complex, implementation, chunk):
        return a.new_empty(a.shape), h.new_empty(h.shape), h0.new_empty(h0.shape)

    def setup_context(ctx, inputs, output):
        a, _, h0, ctx.is_complex, ctx.implementation, ctx.chunk = inputs
        ctx.save_for_backward(a, output, h0)

    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        grads = backward_op(a, h, h0, grad_h.contiguous(), ctx.is_complex, ctx.implementation, ctx.chunk)
        return *grads, None, None, None

    scan_op.register_autograd(backward, setup_context=setup_context)
    return torch.ops.poolformer.linear_scan


try:  # another copy of this file (the package, or a Hub folder's) may have defined them already in this process
    _scan_op = torch.ops.poolformer.linear_scan
except AttributeError:
    _scan_op = _define_scan_ops()


def linear_scan(
    a: torch.Tensor, u: torch.Tensor, h0: Optional[torch.Tensor] = None, implementation: str = "auto", chunk: int = 0
) -> torch.Tensor:
    """`h_t = a_t * h_{t-1} + u_t` over dim 1 for (B, T, N) real or complex tensors, differentiable.

    `implementation`: "numba" (compiled CPU kernels), "loop" (one fused torch op per step), "chunked" (a chunked
    parallel scan, chunks of `chunk` steps or ~sqrt(T)), "triton" (GPU kernels), or "auto": numba on CPU when
    installed, else the loop; Triton on CUDA when installed, else chunked. All agree with `sequential_scan` to float
    tolerance."""
    if a.shape != u.shape or a.dim() != 3:
        raise ValueError(f"linear_scan: a and u must both be (B, T, N); got {tuple(a.shape)} and {tuple(u.shape)}")
    if implementation not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"linear_scan: implementation must be one of {SCAN_IMPLEMENTATIONS}, got {implementation!r}")
    if h0 is None:
        h0 = torch.zeros_like(u[:, 0])
    if u.shape[1] == 1 and not torch.is_grad_enabled():  # a generation step
        return (a[:, 0] * h0 + u[:, 0]).unsqueeze(1)
    implementation, chunk = _resolve_scan(implementation, a.device.type), max(chunk, 0)
    if not u.is_complex():
        return _scan_op(a, u, h0, False, implementation, chunk)
    pairs = [torch.view_as_real(t) for t in (a, u, h0)]
    return torch.view_as_complex(_scan_op(*pairs, True, implementation, chunk))


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

    State (its block stack's `PoolformerStackState`, at `layer_idx`): h_{t-1} as (re, im) pairs, and the conv's
    last inputs."""

    def __init__(self, config: PoolformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
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

    def forward(self, h: torch.Tensor, state: Optional["PoolformerStackState"] = None) -> torch.Tensor:
        if self.conv_width:  # causal conv over [its last inputs, h]
            past = state.conv_states[self.layer_idx] if state is not None else None
            if past is None:
                past = h.new_zeros(h.shape[0], self.conv_width - 1, h.shape[2])
            h = torch.cat([past.to(h.dtype), h], dim=1)
            if state is not None:
                state.write(state.conv_states, self.layer_idx, h[:, h.shape[1] - (self.conv_width - 1) :])
            h = self.conv_norm(self.conv1d(h.transpose(1, 2)).transpose(1, 2))
        x = self.input_proj(h)
        # the recurrence runs in fp32 (or fp64) even under autocast: decays near 1 need the precision
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            gate_x = torch.sigmoid(self.input_gate(x))
            gate_r = torch.sigmoid(self.recurrence_gate(x))
            log_a = -self.scale * gate_r * F.softplus(self.recurrence_param.to(x.dtype))
            scale = _SqrtBoundedGrad.apply(-torch.expm1(2 * log_a), self.max_grad) * gate_x
            theta = gate_r * self.phase_param.to(x.dtype) if self.is_complex else None
            h_prev = state.recurrent_states[self.layer_idx] if state is not None else None
            if h_prev is not None and x.shape[1] == 1 and not torch.is_grad_enabled():
                features, last = self._step(log_a, theta, scale, x, h_prev)
            else:
                features, last = self._scan(log_a, theta, scale, x, h_prev)
            if state is not None:
                state.write(state.recurrent_states, self.layer_idx, last)
        return self.out_proj(features.to(h.dtype))

    def _scan(self, log_a, theta, scale, x, state):
        """The recurrence over a chunk with the parallel scan -> (real and imaginary parts of h concatenated,
        the last h as (re, im) pairs). Complex values travel as real (re, im) pairs (see `_scan_op`)."""
        magnitude = torch.exp(log_a)
        implementation = _resolve_scan(self.scan_implementation, x.device.type)
        if not self.is_complex:
            h0 = torch.zeros_like(x[:, 0]) if state is None else state.to(x.dtype)
            h = _scan_op(magnitude, scale * x, h0, False, implementation, self.chunk)
            return h, h[:, -1]
        a = torch.stack([magnitude * torch.cos(theta), magnitude * torch.sin(theta)], dim=-1)
        u = torch.stack([scale * x[..., : self.units], scale * x[..., self.units :]], dim=-1)
        h0 = a.new_zeros(a.shape[0], self.units, 2) if state is None else state.to(x.dtype)
        h = _scan_op(a, u, h0, True, implementation, self.chunk)
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
# Residual blocks: pre-norm, temporal-mixing (RG-LRU) or MLP, gated
# ---------------------------------------------------------------------------------------------------------------------


def _make_norm(config: PoolformerConfig) -> nn.Module:
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    if config.norm == "rms":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.Identity()


class PoolformerResidualBlock(nn.Module):
    """h = Norm(x); b = Layer(h); b = b * act(Linear(h)) (or act(b) ungated); x + Dropout(Linear_out(b)).
    Layer is the RG-LRU (temporal mixing, D -> D) or Linear(D -> expansion * D) (MLP); the gate has Layer's width.

    Activation checkpointing (`config.activation_checkpointing` or `model.gradient_checkpointing_enable()`) applies to
    forwards without a cache only: a block that reads and writes carried state could not be recomputed from the same
    state in the backward pass (which is why this is not transformers' `GradientCheckpointingLayer`, which would drop
    the cache instead)."""

    def __init__(self, config: PoolformerConfig, num_blocks: int, layer_idx: Optional[int] = None):
        super().__init__()
        temporal = layer_idx is not None
        width = config.hidden_size if temporal else config.mlp_expansion * config.hidden_size
        self.norm = _make_norm(config)
        self.layer = PoolformerRGLRU(config, layer_idx) if temporal else nn.Linear(config.hidden_size, width)
        self.gate_proj = nn.Linear(config.hidden_size, width) if config.gated else None
        self.act = ACT2FN[config.hidden_act]
        self.out_proj = nn.Linear(width, config.hidden_size)
        self.out_proj.init_num_blocks = num_blocks  # thesis init: variance 1 / (num_blocks * fan_in)
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = config.activation_checkpointing

    def forward(self, x: torch.Tensor, state: Optional["PoolformerStackState"] = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and state is None:
            run = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False
            )
            return run(self._forward, x)
        return self._forward(x, state)

    def _forward(self, x: torch.Tensor, state: Optional["PoolformerStackState"] = None) -> torch.Tensor:
        h = self.norm(x)
        b = self.layer(h, state) if isinstance(self.layer, PoolformerRGLRU) else self.layer(h)
        b = b * self.act(self.gate_proj(h)) if self.gate_proj is not None else self.act(b)
        return x + self.dropout(self.out_proj(b))


def _run_blocks(stack: "PoolformerBlockStack", x: torch.Tensor, state, inputs_out=None, skips_in=None):
    """The blocks of `stack` in order. `inputs_out` collects every block's input, `skips_in` is added (last first)
    after every block: the long skips of a U-Net. Decoding compiles this function once for all stacks of the same
    shape: nothing in it depends on which stack it runs."""
    for block in stack:
        if inputs_out is not None:
            inputs_out.append(x)
        x = block(x, state)
        if skips_in is not None:
            x = x + skips_in.pop()
    return x


class PoolformerBlockStack(nn.ModuleList):
    """`pairs` x (RG-LRU block, MLP block), run in order. Its state lives in the cache at `stack_idx` (one
    `PoolformerStackState`); each RG-LRU's `layer_idx` is its position among the stack's RG-LRUs."""

    def __init__(self, config: PoolformerConfig, pairs: int, num_blocks: int, stack_idx: int):
        blocks = []
        for i in range(pairs):
            blocks.append(PoolformerResidualBlock(config, num_blocks, layer_idx=i))
            blocks.append(PoolformerResidualBlock(config, num_blocks))
        super().__init__(blocks)
        self.stack_idx = stack_idx
        self.compiled_step = None  # set while `generate` decodes with a compiled step

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a plain list of blocks (ModuleList would call this class's constructor)
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def forward(self, x: torch.Tensor, cache: Optional["PoolformerCache"] = None, inputs_out=None, skips_in=None):
        state = cache.stacks[self.stack_idx] if cache is not None else None
        if self.compiled_step is not None and state is not None and x.shape[1] == 1 and not torch.is_grad_enabled():
            # canonical strides: a graph is specialised on them, even on the length-1 time dim
            return self.compiled_step(self, x.clone(memory_format=torch.contiguous_format), state, inputs_out, skips_in)
        return _run_blocks(self, x, state, inputs_out, skips_in)


# ---------------------------------------------------------------------------------------------------------------------
# Pooling: strided (grouped) conv, or reshape + linear
# ---------------------------------------------------------------------------------------------------------------------


class PoolformerDownPool(nn.Module):
    """(B, m * p, D) -> (B, m, D): a Conv1d with kernel = stride = p (weights in `proj`, a `nn.Conv1d`), or a
    reshape to (B, m, p * D) and a Linear. With kernel = stride the conv is a contraction over each group of p steps,
    computed as such (for depthwise pooling a multiply-add: ~5x faster than the conv kernel for training, and
    without its per-call overhead in decoding)."""

    def __init__(self, config: PoolformerConfig, factor: int):
        super().__init__()
        self.factor, self.kind, d = factor, config.pooling, config.hidden_size
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


class PoolformerUpPool(nn.Module):
    """(B, m, D) -> (B, m * p, D): coarse step j produces fine steps j*p .. j*p+p-1 (before the causal shift). A
    ConvTranspose1d with kernel = stride = p (weights in `proj`), computed as a product per coarse step, or a Linear
    and a reshape."""

    def __init__(self, config: PoolformerConfig, factor: int, num_blocks: int):
        super().__init__()
        self.factor, self.kind, d = factor, config.pooling, config.hidden_size
        self.groups = config.pooling_groups
        if self.kind == "conv":
            self.proj = nn.ConvTranspose1d(d, d, factor, stride=factor, groups=self.groups)
        else:
            self.proj = nn.Linear(d, factor * d)
        self.proj.init_num_blocks = num_blocks

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


class PoolformerStack(nn.Module):
    """The innermost level (or the whole model without pooling): a plain stack of residual blocks."""

    def __init__(self, config: PoolformerConfig, pairs: int, stack_ids):
        super().__init__()
        self.blocks = PoolformerBlockStack(config, pairs, 2 * pairs, next(stack_ids))

    def forward(self, x: torch.Tensor, cache: Optional["PoolformerCache"] = None, phases: tuple = ()) -> torch.Tensor:
        return self.blocks(x, cache)


class PoolformerSkipBlock(nn.Module):
    """One pooling level. The pooled sub-network sees one step per `factor` steps of this level.

    Causality: coarse step j is made from this level's steps j*p .. j*p+p-1, so its output may only reach steps
    >= j*p+p-1. The up-pooled sequence is therefore delayed by `shift` = p - 1 steps ("fine") or p ("coarse"):
    the skip input of step t is UpPool output t - shift (zero before the first).

    Streaming: a chunk of T steps starts `phase` steps into the current pooling group (the cache's step count at
    this level, mod p). The level keeps, at `level`, its last p DownPool inputs (`pool_windows`; the unfinished
    group is their last `phase`) and its `shift - phase` UpPool outputs not yet consumed (`up_queues`, next first,
    padded to p). Both have fixed shapes, and a one-step chunk depends on `phase` only through whether it
    completes a group.
    """

    def __init__(self, config: PoolformerConfig, level: int, stack_ids):
        super().__init__()
        factors, layers = config.pooling_factors, config.level_layers
        self.level = level
        self.factor = factors[level]
        self.shift = self.factor - 1 if config.causal_shift == "fine" else self.factor
        self.long_skips = config.skip == "long"
        pairs = layers[level]
        num_blocks = 2 * pairs + 2 * pairs + 1  # thesis: 2*len(down) + 2*len(up) + 1 for the output-scale init
        self.down = PoolformerBlockStack(config, pairs, num_blocks, next(stack_ids))
        self.down_pool = PoolformerDownPool(config, self.factor)
        if level + 1 < len(factors):
            self.inner = PoolformerSkipBlock(config, level + 1, stack_ids)
        else:
            self.inner = PoolformerStack(config, layers[-1], stack_ids)
        self.up_pool = PoolformerUpPool(config, self.factor, num_blocks)
        self.up = PoolformerBlockStack(config, pairs, num_blocks, next(stack_ids))

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


class PoolformerModel(PoolformerPreTrainedModel):
    """Embedding, the nested SkipBlocks (or a flat stack without pooling), final norm."""

    def __init__(self, config: PoolformerConfig):
        super().__init__(config)
        self.embed_tokens = PoolformerEmbedding(config)
        stack_ids = itertools.count()  # each block stack's index in the cache, in construction order
        if config.pooling_factors:
            self.body = PoolformerSkipBlock(config, 0, stack_ids)
        else:
            self.body = PoolformerStack(config, config.level_layers[0], stack_ids)
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)  # whatever `norm` says, as the author
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
            # value checks read the data: not inside a compiled graph (they would break it)
            lo, hi = (0, 0) if torch.compiler.is_compiling() else (int(input_ids.min()), int(input_ids.max()))
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
            if not torch.compiler.is_compiling() and (mask[:, 1:] & ~mask[:, :-1]).any():
                raise ValueError(
                    "attention_mask must be right-padded (ones, then zeros): a recurrence cannot skip left padding. "
                    "Pad batches of different lengths on the right."
                )

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
        x = self.embed_tokens(input_ids, self.dtype) if inputs_embeds is None else inputs_embeds
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else PoolformerCache(self.config)
            cache.prepare(x.shape[0], x.dtype, x.device)

        chunk = self.config.checkpoint_chunk_size
        if chunk and cache is None and self.training and torch.is_grad_enabled() and x.shape[1] > chunk:
            hidden = self._checkpointed_in_time(x, chunk)
        else:
            hidden = self.body(x, cache, cache.level_phases() if cache is not None else ())
        hidden = self.norm_f(hidden)
        if cache is not None:
            cache.seen_tokens += x.shape[1]

        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=(x, hidden) if output_hidden_states else None,
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
        if (
            isinstance(past_key_values, PoolformerCache) and past_key_values.stacks
            and input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1
            and labels is None and not output_hidden_states and use_cache is not False and not torch.is_grad_enabled()
        ):  # a decoding step
            self.model._check_inputs(input_ids, None, attention_mask, past_key_values.seen_tokens)
            logits = self._decode(input_ids, past_key_values, past_key_values.step_phases())
            past_key_values.seen_tokens += 1
            out = PoolformerCausalLMOutput(logits=logits, past_key_values=past_key_values)
            return out if return_dict is not False else out.to_tuple()

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
            if not torch.compiler.is_compiling() and bool((targets == -100).all()):
                warnings.warn("Poolformer: no label left to predict (all -100 or masked, or sequences of one "
                              "sample): the loss is NaN.", RuntimeWarning, stacklevel=2)
            bits = loss / math.log(2.0)

        out = PoolformerCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            bits_per_sample=bits,
        )
        return out if return_dict is not False else out.to_tuple()

    def _decode(self, input_ids: torch.LongTensor, cache: "PoolformerCache", phases: tuple) -> torch.Tensor:
        """One sample for every row, (B, 1) ids -> (B, 1, vocab) logits, through the same modules as `forward`
        (with the canonical step phases; the block stacks run compiled while `generate` compiles)."""
        x = self.model.embed_tokens(input_ids, self.dtype)
        return self.lm_head(self.model.norm_f(self.model.body(x, cache, phases)))

    # -----------------------------------------------------------------------------------------------------------------
    # Generation: transformers' generate, driving a compiled decoding step
    # -----------------------------------------------------------------------------------------------------------------

    def generate(self, inputs=None, generation_config=None, streamer=None, progress=False, generator=None,
                 num_threads=None, **kwargs):
        """transformers' `generate` (every decoding strategy, logits processor and output option), with:

        - a compiled decoding step: every block stack runs one sample through `torch.compile` (inductor on CPU, CUDA
          graphs on GPU), one graph for all stacks of the same shape. It is used when `max_new_tokens` >= 4000 or a
          `compile_config` is given, and not with `disable_compile=True`; the first call of a process compiles
          (~20 s on 2 CPU cores; inductor's disk cache makes later processes faster). Without a C++ compiler
          (inductor needs one on CPU) it decodes eagerly, with one warning;
        - `num_threads`: intra-op threads while generating (default: 1 for a batch of 1, where threads only add
          synchronisation to the tiny per-sample ops, else torch's setting);
        - `generator`: a `torch.Generator` that seeds sampling without touching the global RNG;
        - `progress=True`: a tqdm bar with the real-time factor (also `PoolformerAudioStreamer(progress=True)`);
        - right-padded batches: rows of different lengths (an `attention_mask` of ones then zeros) each continue
          their own prompt exactly as alone; the output keeps transformers' layout (new tokens after the padded
          prompt, at positions T .. T + n - 1 of every row);
        - `inputs=None` starts from the zero token (`bos_token_id`, 128).
        """
        config, _ = self._prepare_generation_config(generation_config, **kwargs)  # the merged settings, to read
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            bos = config.bos_token_id if config.bos_token_id is not None else self.config.bos_token_id
            inputs = torch.full((1, 1), bos, dtype=torch.long, device=self.device)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return self._generate_right_padded(inputs, generation_config, config, streamer, progress, generator,
                                               num_threads, kwargs)
        if progress:
            streamer = _ProgressStreamer(self.config.sample_rate, _new_tokens(config, inputs.shape[1]), streamer)
        # compilation is ours (transformers' own would compile all of forward, and only on accelerators)
        kwargs.pop("compile_config", None)
        kwargs.pop("disable_compile", None)
        if generation_config is not None and (generation_config.compile_config or generation_config.disable_compile):
            generation_config = copy.deepcopy(generation_config)
            generation_config.compile_config, generation_config.disable_compile = None, False
        batch = inputs.shape[0] * (config.num_return_sequences or 1) * (config.num_beams or 1)
        threads = num_threads or (1 if batch == 1 else torch.get_num_threads())
        with _intra_op_threads(threads), _sampling_rng(generator), self._compiled_decoding(config, inputs.shape[1]):
            return super().generate(inputs, generation_config=generation_config, streamer=streamer, **kwargs)

    @contextlib.contextmanager
    def _compiled_decoding(self, config: GenerationConfig, prompt_length: int):
        """While `generate` runs, one-sample steps of every block stack go through one compiled function, shared by
        all stacks of the same shape (the state is an argument, not a constant): it compiles once, in seconds
        rather than minutes per graph of a whole step, and it is as fast. Only when it pays off (see `generate`)."""
        wanted = config.compile_config is not None or _new_tokens(config, prompt_length) >= 4000
        if config.disable_compile or not wanted or not _can_compile(self.device):
            yield
            return
        compile_config = config.compile_config or CompileConfig()
        options = dict(fullgraph=True, dynamic=False, backend=compile_config.backend, options=compile_config.options)
        if self.device.type == "cuda":
            options["mode"] = compile_config.mode  # "reduce-overhead": CUDA graphs
        elif compile_config.options is None:
            options["options"] = {"cpp_wrapper": True}  # C++ calls between kernels: ~15% faster steps on CPU
        key = repr(sorted(options.items()))
        if key not in _COMPILED_STEPS:
            _COMPILED_STEPS[key] = torch.compile(_run_blocks, **options)
        stacks = [m for m in self.modules() if isinstance(m, PoolformerBlockStack)]
        for stack in stacks:
            stack.compiled_step = _COMPILED_STEPS[key]
        try:
            yield
        finally:
            for stack in stacks:
                stack.compiled_step = None

    def _generate_right_padded(self, inputs, generation_config, config, streamer, progress, generator, num_threads,
                               kwargs):
        """Rows of each prompt length are generated together, without their padding (a recurrence cannot run over
        it, and each length has its own pooling phase); the outputs come back in the input order and transformers'
        right-padded layout."""
        mask = kwargs.pop("attention_mask").bool()
        if mask.shape != inputs.shape or (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("attention_mask must have the shape of the inputs and be right-padded (ones, then zeros): "
                             "a recurrence cannot skip left padding. Pad batches of different lengths on the right.")
        lengths = mask.sum(dim=1).cpu()
        if int(lengths.min()) == 0:
            raise ValueError("attention_mask has a row of zeros: every prompt needs at least one sample.")
        if streamer is not None:
            raise ValueError("A streamer follows one batch: generate prompts of different lengths in separate calls.")
        repeats = config.num_return_sequences or 1
        pad = config.pad_token_id if config.pad_token_id is not None else self.config.bos_token_id
        groups = []
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().squeeze(1)
            out = self.generate(inputs[rows.to(inputs.device), :length], generation_config=generation_config,
                                progress=progress, generator=generator, num_threads=num_threads, **kwargs)
            groups.append((rows, length, out))
        # transformers puts the k-th sequence of input row r at r * repeats + k
        order = torch.cat([(rows[:, None] * repeats + torch.arange(repeats)).flatten() for rows, _, _ in groups])
        inverse = torch.argsort(order).to(inputs.device)
        outputs = [out if config.return_dict_in_generate else None for _, _, out in groups]
        new_tokens = [(out.sequences if config.return_dict_in_generate else out)[:, length:] for _, length, out in groups]
        steps = max(t.shape[1] for t in new_tokens)
        sequences = torch.cat([
            torch.cat([inputs[rows.to(inputs.device)].repeat_interleave(repeats, 0), F.pad(t, (0, steps - t.shape[1]), value=pad)], 1)
            for (rows, _, _), t in zip(groups, new_tokens)
        ])[inverse]
        if not config.return_dict_in_generate:
            return sequences
        fields = {"sequences": sequences}
        for name, value in outputs[0].items():
            if name in ("sequences", "past_key_values"):  # one cache cannot hold rows at different phases
                continue
            values = [getattr(out, name) for out in outputs]
            if isinstance(value, tuple):  # one entry per step
                if len({len(v) for v in values}) > 1:
                    raise ValueError(f"{name}: the prompt lengths stopped after different numbers of steps; generate "
                                     "them in separate calls to get per-step outputs.")
                fields[name] = tuple(torch.cat(step)[inverse] for step in zip(*values))
            elif torch.is_tensor(value):
                fields[name] = torch.cat(values)[inverse]
        return type(outputs[0])(**fields)

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
        waves = self.tokens_to_waveform(tokens, drop_bos)
        waves = waves.unsqueeze(0) if waves.dim() == 1 else waves
        paths = _wav_paths(path, len(waves))
        for wave_, target in zip(waves, paths):
            with _WavWriter(target, self.config.sample_rate) as writer:
                writer.write(wave_)
        return paths

    def audio_streamer(self, path: Union[str, Path, None] = None, **kwargs) -> "PoolformerAudioStreamer":
        """A streamer for `generate(..., streamer=...)` that writes WAVs while sampling (and/or yields float chunks):
        `PoolformerAudioStreamer(self.config, path, **kwargs)`."""
        return PoolformerAudioStreamer(self.config, path, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Generation helpers and audio streaming
# ---------------------------------------------------------------------------------------------------------------------


_COMPILED_STEPS = {}  # torch.compile(_run_blocks) per set of compile options, shared by every model


def _new_tokens(config: GenerationConfig, prompt_length: int) -> int:
    return config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20) - prompt_length


@functools.lru_cache(maxsize=None)
def _can_compile(device: torch.device) -> bool:
    """CUDA compiles with Triton; inductor on CPU needs a C++ compiler at run time (warned about once)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # inductor raises its own error types here
        warnings.warn(f"No C++ compiler for torch.compile ({type(e).__name__}: {e}); Poolformer decodes eagerly. "
                      "Install one (e.g. apt-get install g++) for a compiled decoding step.", stacklevel=3)
        return False
    return True


@contextlib.contextmanager
def _intra_op_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _sampling_rng(generator: Optional[torch.Generator]):
    """Sampling inside draws from `generator` (then advanced as if it had drawn itself); the global RNG is left as
    it was."""
    if generator is None:
        yield
        return
    device = generator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())


class _RealTimeBar:
    """tqdm over generated samples, with the real-time factor: compute seconds per second of audio (< 1 is faster
    than real time)."""

    def __init__(self, sample_rate: int, total: Optional[int]):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="sample", desc="generating", unit_scale=True)
        self.sample_rate, self.start = sample_rate, time.perf_counter()

    def update(self, samples: int):
        self.bar.update(samples)
        if self.bar.n % 400 < samples or self.bar.n == self.bar.total:
            seconds = (time.perf_counter() - self.start) / (self.bar.n / self.sample_rate)
            self.bar.set_postfix_str(f"RTF {seconds:.2f}", refresh=False)

    def close(self):
        self.bar.close()


class _ProgressStreamer(BaseStreamer):
    """`generate(progress=True)`: the bar, forwarding to the user's streamer if any."""

    def __init__(self, sample_rate: int, total: int, inner: Optional[BaseStreamer] = None):
        self.inner, self.sample_rate, self.total, self.bar = inner, sample_rate, total, None

    def put(self, value):
        if self.inner is not None:
            self.inner.put(value)
        if self.bar is None:  # the first call carries the prompt
            self.bar = _RealTimeBar(self.sample_rate, self.total)
        else:
            self.bar.update(1)

    def end(self):
        if self.inner is not None:
            self.inner.end()
        if self.bar is not None:
            self.bar.close()


def _wav_paths(path: Union[str, Path], count: int) -> list:
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.wav'}") for i in range(count)]


class _WavWriter:
    """16-bit mono PCM WAV written piece by piece with the standard library's `wave` (its header is updated on
    every write, so the file is a valid WAV at any time)."""

    def __init__(self, path: Union[str, Path], sample_rate: int):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "wb")
        self.file = wave.open(self.handle, "wb")
        self.file.setnchannels(1)
        self.file.setsampwidth(2)
        self.file.setframerate(sample_rate)

    def write(self, waveform: torch.Tensor):
        pcm = (waveform.float() * 32768.0).round().clamp(-32768, 32767).to(torch.int16)  # as libsndfile scales
        self.file.writeframes(pcm.numpy().astype("<i2").tobytes())
        self.handle.flush()  # readable by others while generation goes on

    def close(self):
        self.file.close()
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PoolformerAudioStreamer(BaseStreamer):
    """Audio while `generate` samples it (transformers' streamer interface): writes 16-bit WAVs as samples come and/or
    hands float32 chunks in [-1, 1] to another thread.

        streamer = model.audio_streamer("out.wav", progress=True)   # out.wav, or out_0.wav, out_1.wav... per row
        model.generate(max_new_tokens=16000, streamer=streamer)

        streamer = model.audio_streamer(chunk_size=1600)             # or consume chunks while it runs:
        threading.Thread(target=model.generate, kwargs=dict(max_new_tokens=16000, streamer=streamer)).start()
        for chunk in streamer:                                       # (batch, <= chunk_size) numpy arrays
            ...

    Args:
        config: the model's config (sample rate, quantisation).
        path: WAV file to write (one per batch row, `<stem>_<i>.wav`, for a batch), a list of paths (one per row),
            or None.
        chunk_size: samples per write / yielded chunk.
        skip_prompt: leave the prompt out (default); the zero token that sequences start with is never audio.
        progress: show a tqdm bar with the real-time factor (`total` samples, if known).
        yield_chunks: queue chunks for iteration (default: when no `path` is given).
        timeout: seconds the iterator waits for the next chunk before `queue.Empty`.
    """

    def __init__(self, config: PoolformerConfig, path: Union[str, Path, list, None] = None, chunk_size: int = 1600,
                 skip_prompt: bool = True, progress: bool = False, total: Optional[int] = None,
                 yield_chunks: Optional[bool] = None, timeout: Optional[float] = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.config, self.path, self.chunk_size, self.skip_prompt = config, path, chunk_size, skip_prompt
        self.yield_chunks = path is None if yield_chunks is None else yield_chunks
        self.progress, self.total, self.timeout = progress, total, timeout
        self.queue, self.pending, self.writers, self.bar, self.started = queue.Queue(), [], [], None, False
        self.paths = []

    def put(self, value: torch.Tensor):
        value = value.detach().cpu()
        if not self.started:  # transformers first puts the prompt, (batch, T)
            self.started = True
            value = value.view(-1, value.shape[-1]) if value.dim() > 1 else value.view(1, -1)
            if isinstance(self.path, (list, tuple)):
                if len(self.path) != value.shape[0]:
                    raise ValueError(f"{len(self.path)} WAV paths for a batch of {value.shape[0]}")
                self.paths = [Path(p) for p in self.path]
            elif self.path is not None:
                self.paths = _wav_paths(self.path, value.shape[0])
            if self.paths:
                self.writers = [_WavWriter(p, self.config.sample_rate) for p in self.paths]
            if self.progress:
                self.bar = _RealTimeBar(self.config.sample_rate, self.total)
            if not self.skip_prompt and value.shape[1] > 1:
                self.pending.append(value[:, 1:])
            return
        self.pending.append(value.view(-1, 1))
        if self.bar is not None:
            self.bar.update(1)
        if sum(t.shape[1] for t in self.pending) >= self.chunk_size:
            self._flush()

    def _flush(self):
        if not self.pending:
            return
        tokens, self.pending = torch.cat(self.pending, dim=1), []
        waves = decode_audio(tokens, self.config.quantization, self.config.vocab_size)
        for writer, row in zip(self.writers, waves):
            writer.write(row)
        if self.yield_chunks:
            self.queue.put(waves.numpy())

    def end(self):
        self._flush()
        for writer in self.writers:
            writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.yield_chunks:
            self.queue.put(None)

    def __iter__(self):
        return self

    def __next__(self):
        chunk = self.queue.get(timeout=self.timeout)
        if chunk is None:
            raise StopIteration
        return chunk


# ---------------------------------------------------------------------------------------------------------------------
# Cache: RG-LRU states, DownPool buffers and UpPool queues of every level, carried as past_key_values
# ---------------------------------------------------------------------------------------------------------------------


def _write_state(states: list, index: int, value: torch.Tensor):
    """A module's new state: copied into its preallocated tensor (no gradients: fixed addresses for compiled and
    CUDA-graph steps), or replacing it (gradients on) by a copy, so that the state holds no view into a whole
    chunk's activations."""
    if torch.is_grad_enabled():
        states[index] = value.clone()
    else:
        states[index].copy_(value)


class PoolformerStackState:
    """The state of one block stack: `recurrent_states[i]` is its i-th RG-LRU's h_{t-1}, fp32 (B, units, 2) as
    (real, imaginary) or (B, units) for a real RG-LRU; `conv_states[i]` that RG-LRU's last `conv1d_width - 1`
    conv inputs (B, k - 1, D), when it has a temporal conv."""

    write = staticmethod(_write_state)

    def __init__(self, recurrent_states: list, conv_states: list):
        self.recurrent_states, self.conv_states = recurrent_states, conv_states


class PoolformerCache(Cache):
    """Recurrent + pooling state of a Poolformer, carried by `generate` as `past_key_values`.

    Typed lists of preallocated tensors of fixed shape, first dim the batch, indexed by the positions the modules
    were given at construction:
    - `stacks[s]` (`PoolformerStackState`): block stack s's RG-LRU states (`PoolformerBlockStack.stack_idx`, then
      `PoolformerRGLRU.layer_idx` within the stack);
    - `pool_windows[l]`: the last p inputs of level l's DownPool (B, p, D) (`PoolformerSkipBlock.level`);
    - `up_queues[l]`: level l's UpPool outputs not yet consumed, next first, padded to p (B, p, D).
    All start as zeros, which is the empty state; modules write them in place, or, when gradients are on, replace
    them with new tensors. `seen_tokens` counts the steps processed so far: it is the pooling phase of every level.

    The tensors are allocated on first use (for the batch size, dtype and device of the first forward) or right
    away when `batch_size` is given. `is_compileable` is False because transformers' own compilation of `forward`
    would specialise on `seen_tokens` (a Python int): the model compiles its block stacks itself for decoding (see
    `PoolformerForCausalLM.generate`).
    """

    is_compileable = False

    def __init__(self, config: Optional[PoolformerConfig] = None, batch_size: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device=None, **kwargs):
        super().__init__(layers=[])
        self.config = config
        self.seen_tokens = 0
        self.stacks: list[PoolformerStackState] = []
        self.pool_windows: list[torch.Tensor] = []
        self.up_queues: list[torch.Tensor] = []
        if batch_size is not None:
            self.prepare(batch_size, dtype or torch.float32, device)

    write = staticmethod(_write_state)

    def states(self) -> list:
        """Every state tensor, in a fixed order."""
        per_stack = [t for stack in self.stacks for t in (*stack.recurrent_states, *stack.conv_states)]
        return per_stack + self.pool_windows + self.up_queues

    @classmethod
    def from_states(cls, config: PoolformerConfig, tensors, seen_tokens: int = 0) -> "PoolformerCache":
        """A cache holding `tensors`, in the order of `states()`."""
        cache, tensors = cls(config), list(tensors)
        conv = 1 if config.conv1d_width else 0
        for pairs in config.stack_pairs:
            taken, tensors = tensors[: pairs * (1 + conv)], tensors[pairs * (1 + conv) :]
            cache.stacks.append(PoolformerStackState(taken[:pairs], taken[pairs:]))
        levels = len(config.pooling_factors)
        cache.pool_windows, cache.up_queues = tensors[:levels], tensors[levels:]
        cache.seen_tokens = seen_tokens
        return cache

    def prepare(self, batch_size: int, dtype: torch.dtype, device):
        """Allocates zero states for a batch (once), or checks that the batch fits the allocated ones."""
        if self.stacks:
            held = self.stacks[0].recurrent_states[0].shape[0]
            if held != batch_size:
                raise ValueError(f"past_key_values holds a batch of {held}, the input has {batch_size}.")
            return
        if self.config is None:
            raise ValueError("PoolformerCache needs the model's config: PoolformerCache(model.config).")
        c = self.config
        state_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        unit_shape = (c.num_recurrent_units, 2) if c.complex_recurrence else (c.num_recurrent_units,)

        def zeros(*shape, dtype=dtype):
            return torch.zeros(batch_size, *shape, dtype=dtype, device=device)

        for pairs in c.stack_pairs:
            conv = [zeros(c.conv1d_width - 1, c.hidden_size) for _ in range(pairs)] if c.conv1d_width else []
            self.stacks.append(PoolformerStackState([zeros(*unit_shape, dtype=state_dtype) for _ in range(pairs)], conv))
        self.pool_windows = [zeros(p, c.hidden_size) for p in c.pooling_factors]
        self.up_queues = [zeros(p, c.hidden_size) for p in c.pooling_factors]
        if torch.device(device or "cpu").type == "cuda" and not torch.compiler.is_compiling():
            import torch._dynamo as dynamo

            for tensor in self.states():  # CUDA graphs may then update them in place without copies
                dynamo.mark_static_address(tensor)

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

    def __repr__(self):
        batch = self.stacks[0].recurrent_states[0].shape[0] if self.stacks else None
        return (f"PoolformerCache(seen_tokens={self.seen_tokens}, batch={batch}, {len(self.stacks)} block stacks, "
                f"{len(self.pool_windows)} pooling levels)")

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
        for states in [*(stack.recurrent_states for stack in self.stacks), *(stack.conv_states for stack in self.stacks),
                       self.pool_windows, self.up_queues]:
            states[:] = [fn(v) for v in states]
        return self

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the new cache is row beam_idx[i] of the old one."""
        return self._map(lambda v: v.index_select(0, beam_idx.to(v.device)))

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


__all__ = [
    "PoolformerAudioStreamer",
    "PoolformerStackState",
    "PoolformerPreTrainedModel",
    "PoolformerModel",
    "PoolformerForCausalLM",
    "PoolformerCache",
    "encode_audio",
    "decode_audio",
    "linear_scan",
    "sequential_scan",
]
