"""The GELU gate of a residual block, p = b * GELU(g), and its backward as one elementwise pass each:

    forward:   p = b * act(g)
    backward:  (p, dL/db, dL/dg) = (b * act(g), dL/dp * act(g), dL/dp * b * act'(g))

with act(g) = g/2 (1 + tanh(k0 (g + k1 g^3))), k0 = sqrt(2/pi), k1 = 0.044715 (`approximate="tanh"`), or
g/2 (1 + erf(g / sqrt 2)) (`"none"`), act' its derivative. In torch ops the backward is five passes that write
act(g), the product, dL/db, dL/dp * b and dL/dg; here act(g) stays in registers and the backward writes three
tensors (the product is the output projection's weight-gradient input). `fused_block.gated_output` calls them.

Two operators (`poolformer::gelu_gate`, `poolformer::gelu_gate_backward`, not differentiable: they are the insides of
`gated_output`'s autograd function) with numba kernels on CPU, Triton kernels on CUDA (or in Triton's interpreter on
CPU tensors with TRITON_INTERPRET=1) and torch ops as the fallback ("torch"). Arithmetic in fp32 for fp32/bf16/fp16
tensors (fp64 stays fp64), results in the inputs' dtype.
"""

import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from . import rglru

__all__ = ["gelu_gate", "gelu_gate_backward", "gate_implementation"]

_K0, _K1 = math.sqrt(2.0 / math.pi), 0.044715  # the tanh approximation's constants, as torch's
_RSQRT2, _RSQRT2PI = 1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0 * math.pi)
_vexp = None  # float32 exp over flat arrays for the numba kernels: `rglru._vexp`, compiled by `numba_gate_kernels`


# ---------------------------------------------------------------------------------------------------------------------
# numba kernels (CPU) over flat arrays; bf16 crosses as int16 bit patterns, as in `rglru.py`
# ---------------------------------------------------------------------------------------------------------------------


def _exp_2z(g, two_k0, c1):
    """exp(2z) of the tanh GELU, z = k0 (g + k1 g^3), over a flat float32 array (a new array)."""
    z2, e, bits = np.empty(g.size, np.float32), np.empty(g.size, np.float32), np.empty(g.size, np.int32)
    for k in range(g.size):
        gk = g[k]
        z2[k] = two_k0 * (gk + c1 * gk * gk * gk)
    _vexp(z2, e, bits)
    return e


@functools.lru_cache(maxsize=None)
def numba_gate_kernels():
    """(forward, backward) compiled CPU kernels (cached on disk), or None without numba. Arrays come in pairs
    (floats, int16 bits), the unused one empty; a parallel job handles `_CHUNK` consecutive elements.

    A job's loops are arithmetic over contiguous arrays, which LLVM vectorises where a libm call would keep them
    scalar (ten times slower than torch's vectorised ops): bf16 rows are widened into and rounded out of float32
    scratch in loops of their own, and the tanh GELU takes its exponential in float32 from the fused RG-LRU's
    vectorised exp (`rglru._vexp`, a polynomial and exponent bits, within 1e-7 relative):

        act(g) = g s,  act'(g) = s + 2 g s (1 - s) k0 (1 + 3 k1 g^2),  s = (1 + tanh z) / 2 = e / (1 + e),  e = exp(2z)

    (1 + tanh z and 1 - tanh z without cancellation, so the negative tail is as exact as the rest). Float64 arrays
    (gradcheck) take libm's tanh, and `approximate="none"` libm's erf."""
    global _vexp, _exp_2z
    try:
        import numba
    except ImportError:
        return None
    if rglru.numba_rglru_kernels() is None:
        return None
    # a module global, as rglru's helpers are: numba's disk cache keys a kernel on its closure cells, which a
    # compiled function would change in every process
    _vexp = rglru._vexp
    _exp_2z = numba.njit(cache=True)(_exp_2z)

    chunk, k0, k1, rsqrt2, rsqrt2pi = 4096, _K0, _K1, _RSQRT2, _RSQRT2PI
    f32 = np.float32
    two_k0, c1, c3 = f32(2 * k0), f32(k1), f32(3 * k1)
    one = f32(1.0)

    @numba.njit(parallel=True, cache=True)
    def forward(b, b16, g, g16, out, out16, tanh):
        bf16, exact = b16.size > 0, b.itemsize == 8
        n = b16.size if bf16 else b.size
        for job in numba.prange((n + chunk - 1) // chunk):
            lo = job * chunk
            m = min(n, lo + chunk) - lo
            if bf16:  # widen the bit patterns into float32 scratch (b's dtype is float32 then), a loop per array
                # over slices: indexing the whole arrays from lo left LLVM's overlap checks failing, the loops scalar
                bits, gbits = np.empty(m, np.int32), np.empty(m, np.int32)
                b_in, g_in = b16[lo : lo + m], g16[lo : lo + m]
                for k in range(m):
                    bits[k] = np.int32(b_in[k]) << 16
                for k in range(m):
                    gbits[k] = np.int32(g_in[k]) << 16
                bv, gv, ov = bits.view(b.dtype), gbits.view(b.dtype), np.empty(m, b.dtype)
            else:
                bv, gv, ov = b[lo : lo + m], g[lo : lo + m], out[lo : lo + m]
            if tanh and not exact:  # e = exp(2z), clamped to +-87 (where s is 0 or 1 in float32) inside _vexp
                e = _exp_2z(gv, two_k0, c1)
                for k in range(m):
                    ov[k] = bv[k] * (gv[k] * (e[k] / (one + e[k])))
            else:
                for k in range(m):
                    gk = gv[k]
                    if tanh:
                        act = 0.5 * gk * (1.0 + math.tanh(k0 * (gk + k1 * gk * gk * gk)))
                    else:
                        act = 0.5 * gk * (1.0 + math.erf(gk * rsqrt2))
                    ov[k] = bv[k] * act
            if bf16:  # round to nearest even on the float32 bits, as torch does
                w, o16 = ov.view(np.int32), out16[lo : lo + m]
                for k in range(m):
                    o16[k] = np.int16((w[k] + 0x7FFF + ((w[k] >> 16) & 1)) >> 16)

    @numba.njit(parallel=True, cache=True)
    def backward(gp, gp16, b, b16, g, g16, out, out16, gb, gb16, gg, gg16, tanh):
        bf16, exact = b16.size > 0, b.itemsize == 8
        n = b16.size if bf16 else b.size
        for job in numba.prange((n + chunk - 1) // chunk):
            lo = job * chunk
            m = min(n, lo + chunk) - lo
            if bf16:
                dbits, bits, gbits = np.empty(m, np.int32), np.empty(m, np.int32), np.empty(m, np.int32)
                d_in, b_in, g_in = gp16[lo : lo + m], b16[lo : lo + m], g16[lo : lo + m]
                for k in range(m):
                    dbits[k] = np.int32(d_in[k]) << 16
                for k in range(m):
                    bits[k] = np.int32(b_in[k]) << 16
                for k in range(m):
                    gbits[k] = np.int32(g_in[k]) << 16
                dv, bv, gv = dbits.view(b.dtype), bits.view(b.dtype), gbits.view(b.dtype)
                ov, gbv, ggv = np.empty(m, b.dtype), np.empty(m, b.dtype), np.empty(m, b.dtype)
            else:
                dv, bv, gv = gp[lo : lo + m], b[lo : lo + m], g[lo : lo + m]
                ov, gbv, ggv = out[lo : lo + m], gb[lo : lo + m], gg[lo : lo + m]
            if tanh and not exact:  # as the forward's
                e = _exp_2z(gv, two_k0, c1)
                for k in range(m):
                    gk, bk, dk = gv[k], bv[k], dv[k]
                    rest = one / (one + e[k])  # 1 - s
                    s = e[k] * rest
                    act = gk * s
                    d_act = s + two_k0 * gk * s * rest * (one + c3 * gk * gk)
                    ov[k], gbv[k], ggv[k] = bk * act, dk * act, dk * bk * d_act
            else:
                for k in range(m):
                    gk, bk, dk = gv[k], bv[k], dv[k]
                    if tanh:
                        t = math.tanh(k0 * (gk + k1 * gk * gk * gk))
                        act = 0.5 * gk * (1.0 + t)
                        d_act = 0.5 * (1.0 + t) + 0.5 * gk * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * gk * gk)
                    else:
                        e = math.erf(gk * rsqrt2)
                        act = 0.5 * gk * (1.0 + e)
                        d_act = 0.5 * (1.0 + e) + gk * math.exp(-0.5 * gk * gk) * rsqrt2pi
                    ov[k], gbv[k], ggv[k] = bk * act, dk * act, dk * bk * d_act
            if bf16:
                for w, o16 in ((ov.view(np.int32), out16[lo : lo + m]), (gbv.view(np.int32), gb16[lo : lo + m]),
                               (ggv.view(np.int32), gg16[lo : lo + m])):
                    for k in range(m):
                        o16[k] = np.int16((w[k] + 0x7FFF + ((w[k] >> 16) & 1)) >> 16)

    return forward, backward


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels (GPUs; TRITON_INTERPRET=1 runs them on CPU tensors): one program per BLOCK elements, masked
# ---------------------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _gelu_and_derivative(g, TANH: tl.constexpr):
        if TANH:
            # tanh(z) = 1 - 2 / (exp(2z) + 1), z clamped to +-20 where tanh is +-1 to fp64 precision (no overflow)
            inner = tl.minimum(tl.maximum(0.7978845608028654 * (g + 0.044715 * g * g * g), -20.0), 20.0)
            t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
            act = 0.5 * g * (1.0 + t)
            d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        else:
            e = tl.erf(g * 0.7071067811865476)
            act = 0.5 * g * (1.0 + e)
            d_act = 0.5 * (1.0 + e) + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        return act, d_act

    @triton.jit
    def _gelu_gate_fwd_kernel(b_ptr, g_ptr, out_ptr, N, TANH: tl.constexpr, FP64: tl.constexpr,
                              BLOCK: tl.constexpr):
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        act, _ = _gelu_and_derivative(g, TANH)
        tl.store(out_ptr + offs, (b * act).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_gate_bwd_kernel(gp_ptr, b_ptr, g_ptr, out_ptr, gb_ptr, gg_ptr, N, TANH: tl.constexpr,
                              FP64: tl.constexpr, BLOCK: tl.constexpr):
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        d = tl.load(gp_ptr + offs, mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        act, d_act = _gelu_and_derivative(g, TANH)
        tl.store(out_ptr + offs, (b * act).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(gb_ptr + offs, (d * act).to(gb_ptr.dtype.element_ty), mask=mask)
        tl.store(gg_ptr + offs, (d * b * d_act).to(gg_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch and the operators
# ---------------------------------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result  # a compiled graph bakes the choice in instead of tracing numba's import
def gate_implementation(scan_implementation: str, device_type: str) -> str:
    """The gate kernels of a resolved scan implementation's family: "numba" on CPU, "triton" on CUDA (or in the
    interpreter); torch ops otherwise (the torch scans, or the package missing)."""
    if scan_implementation == "numba" and device_type == "cpu" and numba_gate_kernels() is not None:
        return "numba"
    if scan_implementation == "triton" and triton is not None and (
            device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return "triton"
    return "torch"


def _pair(t: torch.Tensor) -> tuple:
    """(float array, int16 array) of a flat contiguous tensor for a numba kernel, the unused one empty; both share the
    tensor's memory, so a kernel writes outputs through them."""
    empty_f, empty_i = torch.empty(0, dtype=torch.float32).numpy(), torch.empty(0, dtype=torch.int16).numpy()
    if t.dtype == torch.bfloat16:
        return empty_f, t.view(torch.int16).numpy()
    return t.numpy(), empty_i


def _check(name: str, tensors: dict, approximate: str, implementation: str):
    shapes, dtypes = {tuple(t.shape) for t in tensors.values()}, {t.dtype for t in tensors.values()}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise ValueError(f"{name}: {', '.join(tensors)} must share one shape and dtype, got "
                         f"{[(tuple(t.shape), t.dtype) for t in tensors.values()]}")
    if approximate not in ("tanh", "none"):
        raise ValueError(f"{name}: approximate must be 'tanh' or 'none', got {approximate!r}")
    if implementation not in ("numba", "triton", "torch"):
        raise ValueError(f"{name}: implementation must be 'numba', 'triton' or 'torch', got {implementation!r}")


def _gate_forward(b, g, approximate, implementation):
    _check("gelu_gate", {"b": b, "g": g}, approximate, implementation)
    if implementation == "torch" or b.numel() == 0 or (implementation == "numba" and b.dtype == torch.float16):
        return b * F.gelu(g, approximate=approximate)
    b, g = b.contiguous(), g.contiguous()
    out = torch.empty_like(b)
    if implementation == "numba":
        forward, _ = numba_gate_kernels()
        forward(*_pair(b.view(-1)), *_pair(g.view(-1)), *_pair(out.view(-1)), approximate == "tanh")
    else:
        _gelu_gate_fwd_kernel[(triton.cdiv(b.numel(), _BLOCK),)](
            b, g, out, b.numel(), TANH=approximate == "tanh", FP64=b.dtype == torch.float64, BLOCK=_BLOCK)
    return out


def _gate_backward(grad, b, g, approximate, implementation):
    _check("gelu_gate_backward", {"grad": grad, "b": b, "g": g}, approximate, implementation)
    if implementation == "torch" or b.numel() == 0 or (implementation == "numba" and b.dtype == torch.float16):
        act = F.gelu(g, approximate=approximate)
        return b * act, grad * act, torch.ops.aten.gelu_backward(grad * b, g, approximate=approximate)
    grad, b, g = grad.contiguous(), b.contiguous(), g.contiguous()
    out, grad_b, grad_g = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
    if implementation == "numba":
        _, backward = numba_gate_kernels()
        backward(*(array for t in (grad, b, g, out, grad_b, grad_g) for array in _pair(t.view(-1))),
                 approximate == "tanh")
    else:
        _gelu_gate_bwd_kernel[(triton.cdiv(b.numel(), _BLOCK),)](
            grad, b, g, out, grad_b, grad_g, b.numel(), TANH=approximate == "tanh", FP64=b.dtype == torch.float64,
            BLOCK=_BLOCK)
    return out, grad_b, grad_g


def _define_gate_ops():
    @torch.library.custom_op("poolformer::gelu_gate", mutates_args=())
    def gate_op(b: torch.Tensor, g: torch.Tensor, approximate: str, implementation: str) -> torch.Tensor:
        return _gate_forward(b, g, approximate, implementation)

    @torch.library.custom_op("poolformer::gelu_gate_backward", mutates_args=())
    def gate_backward_op(grad: torch.Tensor, b: torch.Tensor, g: torch.Tensor, approximate: str,
                         implementation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _gate_backward(grad, b, g, approximate, implementation)

    @gate_op.register_fake
    def _(b, g, approximate, implementation):
        return torch.empty_like(b)

    @gate_backward_op.register_fake
    def _(grad, b, g, approximate, implementation):
        return torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)

    return torch.ops.poolformer.gelu_gate, torch.ops.poolformer.gelu_gate_backward


try:  # another copy of this file (the package, or a Hub folder's) may have defined them already in this process
    gate_op, gate_backward_op = torch.ops.poolformer.gelu_gate, torch.ops.poolformer.gelu_gate_backward
except AttributeError:
    gate_op, gate_backward_op = _define_gate_ops()


def gelu_gate(b: torch.Tensor, g: torch.Tensor, approximate: str = "tanh", implementation: str = "torch") -> torch.Tensor:
    """b * GELU(g) (torch's `approximate`) in one pass; not differentiable (see `fused_block.gated_output`)."""
    return gate_op(b, g, approximate, implementation)


def gelu_gate_backward(grad: torch.Tensor, b: torch.Tensor, g: torch.Tensor, approximate: str = "tanh",
                       implementation: str = "torch") -> tuple:
    """(b * GELU(g), grad * GELU(g), grad * b * GELU'(g)) in one pass: the product recomputed, and the gradients of
    b and g for the product's gradient `grad`."""
    return gate_backward_op(grad, b, g, approximate, implementation)
