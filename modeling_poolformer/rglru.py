"""The fused RG-LRU: from the input projection's output x to the recurrence's output features in one custom operator
with its own backward, instead of ~20 elementwise torch ops whose outputs autograd keeps.

For each unit n and step t (c = `recurrence_scale`, W_i, W_r block-diagonal with biases b_i, b_r):

    i_t = sigmoid(W_i x_t + b_i)_n,   r_t = sigmoid(W_r x_t + b_r)_n
    log|a_t| = -c r_t softplus(Lambda_n),   arg a_t = r_t theta_n (complex units only)
    u_t = sqrt(1 - |a_t|^2) i_t x_t         (sqrt's gradient capped at `max_grad`; x_t = x[n] + i x[n + U] if complex)
    h_t = a_t h_{t-1} + u_t,   h_{-1} = h0
    out_t = [Re h_t, Im h_t]                (the real and imaginary halves: the layout the output projection reads)

Forward: one kernel pass over x computes the gates (the block-diagonal products are dot products of
`lru_width / num_gate_blocks` inputs, done inline), the decays, the inputs and the scan, and writes only the output,
the last state and the state at every `CHECKPOINT`-th step (B x T/64 x 2U floats: 1/64 of one activation).

Backward: nothing of the elementwise chain is saved. Chunk by chunk from the end, the kernel re-runs the forward from
that chunk's checkpoint (gates, decays and states, in a chunk-sized scratch buffer that stays in cache), then runs the
gradient recurrence g_t = dL/dh_t + conj(a_{t+1}) g_{t+1} backwards through it and applies the chain rule to every
step's gate pre-activations, x, Lambda and theta. The pre-activation gradients leave the kernel (B x T x 2U) and
block-diagonal torch matmuls turn them into x's gradient and the gate weights' (both gates in one einsum each).

Why the gates are inside the kernel but their backward matmuls are not: in the forward, inline dot products spare
writing (and saving, or recomputing with a second pass) the (B, T, 2U) fp32 pre-activations, 1 KB per token per
layer. In the backward, a gate input feeds units that other programs own, so the kernel could only add x's gate
gradient with atomics or a serialised pass, and the weights' gradients are a reduction over batch and time: work a
matmul does well, for one extra (B, T, 2U) write.

So autograd keeps only x (in its own dtype, bf16 under autocast), the parameters and the checkpoints. The op is the
same on every device (numba kernels on CPU, Triton kernels on CUDA, or in Triton's interpreter on CPU tensors), so
the saved and written bytes are the same, and `torch.compile` sees one opaque call. Arithmetic is fp32 for
fp32/bf16/fp16 x (fp64 stays fp64); the output is written in the dtype asked for (the output projection's autocast
dtype). The composite in `PoolformerRGLRU` (with `scan.py`'s scans) remains the reference and the fallback.
"""

import functools
import os
from typing import Optional

import numpy as np
import torch

from .scan import _multiprocessors, define_autograd_op

__all__ = ["CHECKPOINT", "fused_rglru", "fused_rglru_available", "numba_rglru_kernels", "rglru_op"]

CHECKPOINT = 64  # steps between the states kept for the backward's re-scan


# ---------------------------------------------------------------------------------------------------------------------
# numba kernels (CPU)
# ---------------------------------------------------------------------------------------------------------------------


# The elementwise chain of a chunk, shared by both kernels: plain arithmetic over contiguous (units, steps) scratch,
# which LLVM vectorises over the steps, where a libm call per element (exp, expm1, cos, sin) keeps a loop scalar (the
# kernels took three times as long). In float32: exp as Cephes' expf (a polynomial times 2^j made from exponent bits,
# within 1e-7 relative), expm1 from the same reduction without the cancellation at 0, cos and sin as Cephes' cosf and
# sinf after a reduction by pi/2 in three parts (within 1e-7 for phases up to 1e4). Float64 (gradcheck) calls libm.
# The helpers are compiled by `numba_rglru_kernels`.
_EXP_BOUND, _LOG2E, _LN2_HI, _LN2_LO = 87.0, 1.44269504088896341, 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_TWO_OVER_PI, _PIO2 = 0.63661977236758134, (1.5703125, 4.837512969970703125e-4, 7.54978995489188216e-8)
_SIN_POLY, _COS_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1), (
    2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)


def _exp_reduce(x, poly, bits, minus_one):
    """poly = exp(r) (or exp(r) - 1 with `minus_one`), bits = 2^j's float32 bits, x = j ln 2 + r, |r| <= ln(2) / 2."""
    f32 = np.float32
    e0, e1, e2, e3, e4, e5 = f32(_EXP_POLY[0]), f32(_EXP_POLY[1]), f32(_EXP_POLY[2]), f32(_EXP_POLY[3]), f32(
        _EXP_POLY[4]), f32(_EXP_POLY[5])
    bound, log2e, hi, lo, half = f32(_EXP_BOUND), f32(_LOG2E), f32(_LN2_HI), f32(_LN2_LO), f32(0.5)
    one = f32(0.0) if minus_one else f32(1.0)
    for k in range(x.size):
        v = min(max(x[k], -bound), bound)
        j = np.floor(v * log2e + half)
        r = v - j * hi - j * lo
        poly[k] = (((((e0 * r + e1) * r + e2) * r + e3) * r + e4) * r + e5) * (r * r) + r + one
        bits[k] = (np.int32(j) + 127) << 23


def _vexp(x, out, bits):
    """out = exp(x) over flat arrays; bits: int32 scratch of their size. out must not be x: where arrays may overlap
    LLVM keeps the loop scalar."""
    if x.itemsize == 8:
        for k in range(x.size):
            out[k] = np.exp(x[k])
        return
    _exp_reduce(x, out, bits, False)
    scale = bits.view(np.float32)
    for k in range(x.size):
        out[k] *= scale[k]


def _vexpm1(x, out, bits):
    """out = exp(x) - 1 over flat arrays: 2^j (exp(r) - 1) + 2^j - 1, exactly exp(r) - 1 where j = 0."""
    if x.itemsize == 8:
        for k in range(x.size):
            out[k] = np.expm1(x[k])
        return
    _exp_reduce(x, out, bits, True)
    scale = bits.view(np.float32)
    for k in range(x.size):
        out[k] = out[k] * scale[k] + (scale[k] - np.float32(1.0))


def _vsincos(x, sin, cos):
    """sin(x), cos(x) over flat arrays (none the same): x = q pi/2 + r, |r| <= pi/4, the quadrant q mod 4 choosing
    which polynomial and sign each takes."""
    if x.itemsize == 8:
        for k in range(x.size):
            v = x[k]
            sin[k], cos[k] = np.sin(v), np.cos(v)
        return
    f32 = np.float32
    s0, s1, s2 = f32(_SIN_POLY[0]), f32(_SIN_POLY[1]), f32(_SIN_POLY[2])
    c0, c1, c2 = f32(_COS_POLY[0]), f32(_COS_POLY[1]), f32(_COS_POLY[2])
    p1, p2, p3 = f32(_PIO2[0]), f32(_PIO2[1]), f32(_PIO2[2])
    two_over_pi, half, one, two, three, four = f32(_TWO_OVER_PI), f32(0.5), f32(1.0), f32(2.0), f32(3.0), f32(4.0)
    for k in range(x.size):
        v = x[k]
        q = np.floor(v * two_over_pi + half)
        r = ((v - q * p1) - q * p2) - q * p3
        z = r * r
        ps = ((s0 * z + s1) * z + s2) * z * r + r
        pc = ((c0 * z + c1) * z + c2) * z * z - half * z + one
        quadrant = q - four * np.floor(q / four)  # 0, 1, 2, 3
        odd = (quadrant == one) | (quadrant == three)
        sv = pc if odd else ps
        cv = ps if odd else pc
        sin[k] = -sv if quadrant >= two else sv
        cos[k] = -cv if (quadrant == one) | (quadrant == two) else cv


def _load_chunk(x, x16, b, start, stop, xt, bits):
    """xt[:, k] = x[b, start + k] at the arithmetic's precision (bf16 widened from its bits); steps past `stop`
    zero, so that the chain's unused columns stay finite."""
    for k in range(xt.shape[1]):
        t = start + k
        if t >= stop:
            for i in range(xt.shape[0]):
                xt[i, k] = 0.0
        elif x16.size > 0:
            for i in range(xt.shape[0]):
                bits[i] = np.int32(x16[b, t, i]) << 16
            row = bits.view(np.float32)
            for i in range(xt.shape[0]):
                xt[i, k] = row[i]
        else:
            for i in range(xt.shape[0]):
                xt[i, k] = x[b, t, i]


def _chunk_chain(xt, wi, bi, wr, br, sp, theta, lo, c, is_complex, gi, gr, q, ar, ai, tmp, bits):
    """The gates, decays and input scales of units lo.. over a chunk, as (unit, step) arrays: gi, gr the gates,
    q = sqrt(1 - |a|^2), ar + i ai = a (ai zero for a real recurrence); tmp (2, units, steps) and bits scratch. No
    helper writes over its input: LLVM then cannot rule out an overlap and runs the loop scalar."""
    size, steps = gi.shape
    _, per_in, per_out = wi.shape
    one = sp.dtype.type(1.0)
    pre_i, pre_r = tmp[0], tmp[1]
    for m in range(size):  # the negated pre-activations, each a dot product of per_in inputs over the steps
        n = lo + m
        j, o = n // per_out, n % per_out
        row_i, row_r, b_i, b_r = pre_i[m], pre_r[m], -bi[n], -br[n]
        for k in range(steps):
            row_i[k], row_r[k] = b_i, b_r
        for i in range(per_in):
            vi, vr, xi = wi[j, i, o], wr[j, i, o], xt[j * per_in + i]
            for k in range(steps):
                row_i[k] -= vi * xi[k]
                row_r[k] -= vr * xi[k]
    total = size * steps
    flat_i, flat_r, flat_q, flat_a, flat_b = (gi.reshape(total), gr.reshape(total), q.reshape(total),
                                              ar.reshape(total), ai.reshape(total))
    flat_0, flat_1 = pre_i.reshape(total), pre_r.reshape(total)
    _vexp(flat_0, flat_i, bits)
    _vexp(flat_1, flat_r, bits)
    for k in range(total):
        flat_i[k] = one / (one + flat_i[k])
        flat_r[k] = one / (one + flat_r[k])
    for m in range(size):
        d = sp.dtype.type(-c * sp[lo + m])
        for k in range(steps):
            pre_i[m, k] = d * gr[m, k]  # log|a|
            pre_r[m, k] = pre_i[m, k] + pre_i[m, k]
    _vexp(flat_0, flat_a, bits)
    _vexpm1(flat_1, flat_q, bits)
    for k in range(total):
        flat_q[k] = np.sqrt(-flat_q[k])
    if is_complex:
        for m in range(size):
            th = theta[lo + m]
            for k in range(steps):
                pre_i[m, k] = gr[m, k] * th
        _vsincos(flat_0, flat_b, flat_1)
        for k in range(total):
            flat_b[k] *= flat_a[k]
            flat_a[k] *= flat_1[k]


@functools.lru_cache(maxsize=None)
def numba_rglru_kernels():
    """(forward, backward, block_size) compiled CPU kernels (cached on disk), or None without numba. A parallel job
    runs a block of units of one batch row through time, a chunk of `CHECKPOINT` steps at a time: the chunk's x
    transposed into scratch, its elementwise chain for all the block's units at once (`_chunk_chain`, vectorised over
    the steps), then the recurrence step by step."""
    global _exp_reduce, _vexp, _vexpm1, _vsincos, _load_chunk, _chunk_chain
    try:
        import numba
    except ImportError:
        return None
    # the helpers compiled as module globals, which the kernels call: numba's disk cache keys a function on its
    # closure cells, which a compiled function would change in every process
    jit = numba.njit(cache=True)
    _exp_reduce, _vexp, _vexpm1, _vsincos = (jit(f) for f in (_exp_reduce, _vexp, _vexpm1, _vsincos))
    _load_chunk, _chunk_chain = jit(_load_chunk), jit(_chunk_chain)

    # bf16 tensors cross as their int16 bit patterns (numba has no bf16): a bf16 is the upper half of a float32, so
    # a row is widened with a shift, and a result is rounded to nearest even on its float32 bits, as torch does

    @numba.njit(parallel=True, cache=True)
    def forward(x, x16, wi, bi, wr, br, sp, theta, h0, out, out16, last, ckpt, c, is_complex, block):
        bf16_in, bf16_out = x16.size > 0, out16.size > 0
        batch, steps, width = x16.shape if bf16_in else x.shape
        units = sp.shape[0]
        blocks = (units + block - 1) // block
        chunks = ckpt.shape[1]
        for job in numba.prange(batch * blocks):
            b, lo = job // blocks, (job % blocks) * block
            hi = min(units, lo + block)
            size = hi - lo
            hr = h0[b, lo:hi].copy()
            him = h0[b, units + lo : units + hi].copy() if is_complex else hr.copy()
            xt, bits = np.empty((width, 64), sp.dtype), np.empty(width, np.int32)
            gi, gr, q = np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype)
            ar, ai, tmp = np.empty((size, 64), sp.dtype), np.zeros((size, 64), sp.dtype), np.empty((2, size, 64), sp.dtype)
            scratch = np.empty(size * 64, np.int32)
            f32 = np.empty(1, np.float32)
            i32 = f32.view(np.int32)
            for chunk in range(chunks):
                start = chunk * 64
                stop = min(steps, start + 64)
                ckpt[b, chunk, lo:hi] = hr
                if is_complex:
                    ckpt[b, chunk, units + lo : units + hi] = him
                _load_chunk(x, x16, b, start, stop, xt, bits)
                _chunk_chain(xt, wi, bi, wr, br, sp, theta, lo, c, is_complex, gi, gr, q, ar, ai, tmp, scratch)
                for t in range(start, stop):
                    k = t - start
                    for n in range(lo, hi):
                        m = n - lo
                        s = q[m, k] * gi[m, k]
                        if is_complex:
                            nr = ar[m, k] * hr[m] - ai[m, k] * him[m] + s * xt[n, k]
                            ni = ar[m, k] * him[m] + ai[m, k] * hr[m] + s * xt[units + n, k]
                            hr[m], him[m] = nr, ni
                        else:
                            hr[m] = ar[m, k] * hr[m] + s * xt[n, k]
                        if bf16_out:
                            f32[0] = hr[m]
                            w = i32[0]
                            out16[b, t, n] = np.int16((w + 0x7FFF + ((w >> 16) & 1)) >> 16)
                            if is_complex:
                                f32[0] = him[m]
                                w = i32[0]
                                out16[b, t, units + n] = np.int16((w + 0x7FFF + ((w >> 16) & 1)) >> 16)
                        else:
                            out[b, t, n] = hr[m]
                            if is_complex:
                                out[b, t, units + n] = him[m]
            last[b, lo:hi] = hr
            if is_complex:
                last[b, units + lo : units + hi] = him

    @numba.njit(parallel=True, cache=True)
    def backward(x, x16, wi, bi, wr, br, sp, theta, ckpt, grad_out, grad_out16, grad_last, c, max_grad, is_complex,
                 block, grad_x, grad_pre, grad_sp, grad_theta, grad_h0):
        batch, steps, width = grad_x.shape
        units = sp.shape[0]
        blocks = (units + block - 1) // block
        chunks = ckpt.shape[1]
        one = sp.dtype.type(1.0)
        floor = one / max_grad
        zero, two, c_ = sp.dtype.type(0.0), sp.dtype.type(2.0), sp.dtype.type(c)
        for job in numba.prange(batch * blocks):
            b, lo = job // blocks, (job % blocks) * block
            hi = min(units, lo + block)
            size = hi - lo
            # (unit, step) scratch of a chunk: `_chunk_chain`'s gates, q and decay, the previous state h_{t-1},
            # the gradient g_t, and the results before they are scattered to (step, unit) rows
            xt, gt, bits = np.empty((width, 64), sp.dtype), np.empty((width, 64), sp.dtype), np.empty(width, np.int32)
            g_i, g_r, sq = np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype)
            a_r, a_i, tmp = np.empty((size, 64), sp.dtype), np.zeros((size, 64), sp.dtype), np.empty((2, size, 64), sp.dtype)
            scratch = np.empty(size * 64, np.int32)
            hp_r, hp_i = np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype)
            gg_r, gg_i = np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype)
            zeros = np.zeros(64, sp.dtype)  # the imaginary parts of x and dL/dh in a real recurrence
            gx_r, gx_i = np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype)
            gp_i, gp_r = np.empty((size, 64), sp.dtype), np.empty((size, 64), sp.dtype)
            # the gradient carry g_{t+1} and the decay a_{t+1}: at the last step, dL/dh_last and 1
            gc_r = grad_last[b, lo:hi].copy()
            gc_i = grad_last[b, units + lo : units + hi].copy() if is_complex else np.zeros(size, sp.dtype)
            an_r, an_i = np.ones(size, sp.dtype), np.zeros(size, sp.dtype)
            d_sp, d_th = np.zeros(size, sp.dtype), np.zeros(size, sp.dtype)
            for chunk in range(chunks - 1, -1, -1):
                start = chunk * 64
                stop = min(steps, start + 64)
                steps_in = stop - start
                _load_chunk(grad_out, grad_out16, b, start, stop, gt, bits)
                # re-run the forward over the chunk from its checkpoint
                _load_chunk(x, x16, b, start, stop, xt, bits)
                _chunk_chain(xt, wi, bi, wr, br, sp, theta, lo, c, is_complex, g_i, g_r, sq, a_r, a_i, tmp, scratch)
                for m in range(size):  # per unit (a real one with zero imaginary parts and phases)
                    n = lo + m
                    x_r, x_i = xt[n], xt[units + n] if is_complex else zeros
                    d_r, d_i = gt[n], gt[units + n] if is_complex else zeros
                    hr = ckpt[b, chunk, n]
                    him = ckpt[b, chunk, units + n] if is_complex else zero
                    for k in range(steps_in):
                        hp_r[m, k], hp_i[m, k] = hr, him
                        s = sq[m, k] * g_i[m, k]
                        ar, ai = a_r[m, k], a_i[m, k]
                        hr, him = ar * hr - ai * him + s * x_r[k], ar * him + ai * hr + s * x_i[k]
                    # then the gradient back through it: g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}
                    cr, ci, nr, ni = gc_r[m], gc_i[m], an_r[m], an_i[m]
                    for k in range(steps_in - 1, -1, -1):
                        cr, ci = d_r[k] + nr * cr + ni * ci, d_i[k] + nr * ci - ni * cr
                        gg_r[m, k], gg_i[m, k] = cr, ci
                        nr, ni = a_r[m, k], a_i[m, k]
                    gc_r[m], gc_i[m], an_r[m], an_i[m] = cr, ci, nr, ni
                # the chain rule at every step, vectorised over the steps
                for m in range(size):
                    n = lo + m
                    d_sp_n, d_th_n = -c_ * sp[n], theta[n]
                    acc_sp, acc_th = tmp[0, m], tmp[1, m]
                    xr, xi = xt[n], xt[units + n] if is_complex else zeros
                    for k in range(steps_in):
                        gre, gim = gg_r[m, k], gg_i[m, k]
                        ar, ai, gi, gr, q = a_r[m, k], a_i[m, k], g_i[m, k], g_r[m, k], sq[m, k]
                        # dL/da_t = g_t conj(h_{t-1}); |a| and arg a through a = |a| e^{i arg a}
                        ga_r = gre * hp_r[m, k] + gim * hp_i[m, k]
                        ga_i = gim * hp_r[m, k] - gre * hp_i[m, k]
                        d_log = ga_r * ar + ga_i * ai
                        d_arg = ga_i * ar - ga_r * ai
                        d_scale = gre * xr[k] + gim * xi[k]
                        gx_r[m, k], gx_i[m, k] = q * gi * gre, q * gi * gim
                        # q = sqrt(1 - |a|^2) with d q / d(1 - |a|^2) capped; d(1 - |a|^2) / d log|a| = -2 |a|^2
                        d_q = d_scale * gi / max(two * q, floor)  # the composite's sqrt(4 q^2).clamp_min(1 / max_grad)
                        d_log -= two * d_q * (ar * ar + ai * ai)
                        acc_sp[k] = d_log * gr
                        acc_th[k] = d_arg * gr
                        d_gr = d_log * d_sp_n + d_arg * d_th_n
                        gp_i[m, k] = d_scale * q * gi * (one - gi)
                        gp_r[m, k] = d_gr * gr * (one - gr)
                    for k in range(steps_in):
                        d_sp[m] += acc_sp[k]
                        d_th[m] += acc_th[k]
                for k in range(steps_in):  # scattered to the rows
                    t = start + k
                    for m in range(size):
                        n = lo + m
                        grad_x[b, t, n], grad_pre[b, t, n], grad_pre[b, t, units + n] = gx_r[m, k], gp_i[m, k], gp_r[m, k]
                        if is_complex:
                            grad_x[b, t, units + n] = gx_i[m, k]
            d_sp *= -c_
            grad_sp[b, lo:hi] = d_sp
            grad_theta[b, lo:hi] = d_th
            # dL/dh0 = conj(a_0) g_0
            grad_h0[b, lo:hi] = an_r * gc_r + an_i * gc_i if is_complex else an_r * gc_r
            if is_complex:
                grad_h0[b, units + lo : units + hi] = an_r * gc_i - an_i * gc_r

    def block_size(batch, units):
        """Whole rows when the batch alone keeps every thread busy, else rows split across the idle threads."""
        per_row = max(1, numba.get_num_threads() // batch)
        return max(16, -(-units // per_row))

    return forward, backward, block_size


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels (GPUs; TRITON_INTERPRET=1 runs them on CPU tensors): one program runs BLOCK_N units of one batch row
# through time in tiles of CHECKPOINT steps, each tile combined with `tl.associative_scan` and joined to the previous
# one through its carry. The backward walks the tiles from the end; per tile it recomputes the step chain at t (the
# chain rule's factors), at t - 1 (scanned from the tile's checkpoint: the states h_{t-1}) and at t + 1 (the decays
# a_{t+1} of the gradient recurrence, a reverse scan): recomputation in registers instead of reads of saved tensors.
# ---------------------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from .scan import _combine, _combine_complex

    # float32 exp - 1, sin and cos from the numba kernels' polynomials (`_vexpm1`, `_vsincos`; constants below): the
    # same numbers on both devices, within 1e-7 of float64's (phases up to 1e4; tested), and a few multiply-adds
    # where libdevice's logf (Kahan's expm1), sinf and cosf bring a reduction for any argument with a local-memory
    # table: the forward kernel holds 35-76 fewer registers (152 instead of 205 on sm_90 with Triton 3.9), so 12
    # warps fit per multiprocessor instead of 8. Float64 (gradcheck) keeps libdevice.
    _E0, _E1, _E2, _E3, _E4, _E5 = (tl.constexpr(v) for v in _EXP_POLY)
    _LOG2E_C, _LN2_HI_C, _LN2_LO_C, _EXP_BOUND_C = (tl.constexpr(v) for v in (_LOG2E, _LN2_HI, _LN2_LO, _EXP_BOUND))
    _P1, _P2, _P3 = (tl.constexpr(v) for v in _PIO2)
    _S0, _S1, _S2 = (tl.constexpr(v) for v in _SIN_POLY)
    _C0, _C1, _C2 = (tl.constexpr(v) for v in _COS_POLY)
    _TWO_OVER_PI_C = tl.constexpr(_TWO_OVER_PI)

    @triton.jit
    def _expm1_f32(z):
        """exp(z) - 1: z = j ln 2 + r, 2^j (exp(r) - 1) + 2^j - 1 with 2^j from exponent bits; exactly the
        polynomial's exp(r) - 1 (no cancellation) where j = 0."""
        v = tl.minimum(tl.maximum(z, -_EXP_BOUND_C), _EXP_BOUND_C)
        j = tl.floor(v * _LOG2E_C + 0.5)
        r = v - j * _LN2_HI_C - j * _LN2_LO_C
        p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * (r * r) + r
        scale = ((j.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
        return p * scale + (scale - 1.0)

    @triton.jit
    def _sincos_f32(x):
        """sin(x), cos(x): x = q pi/2 + r (pi/2 in three parts), |r| <= pi/4, the quadrant q mod 4 choosing which
        polynomial and sign each takes."""
        q = tl.floor(x * _TWO_OVER_PI_C + 0.5)
        r = ((x - q * _P1) - q * _P2) - q * _P3
        z = r * r
        ps = ((_S0 * z + _S1) * z + _S2) * z * r + r
        pc = ((_C0 * z + _C1) * z + _C2) * z * z - 0.5 * z + 1.0
        quadrant = q - 4.0 * tl.floor(q * 0.25)  # 0, 1, 2, 3
        odd = (quadrant == 1.0) | (quadrant == 3.0)
        sv = tl.where(odd, pc, ps)
        cv = tl.where(odd, ps, pc)
        return tl.where(quadrant >= 2.0, -sv, sv), tl.where((quadrant == 1.0) | (quadrant == 2.0), -cv, cv)

    @triton.jit
    def _expm1_f64(z):
        """exp(z) - 1 without the cancellation near 0 (Kahan): (e - 1) z / log(e), e = exp(z)."""
        e = tl.exp(z)
        ratio = z / tl.log(tl.where(e == 1.0, 2.0, e))
        return tl.where(e == 1.0, z, tl.where(e - 1.0 == -1.0, -1.0, (e - 1.0) * ratio))

    @triton.jit
    def _step_chain(x_ptr, wi_ptr, wr_ptr, bi, br, sp, th, t, n, valid, T, U, W, c,
                    COMPLEX: tl.constexpr, PER_IN: tl.constexpr, PER_OUT: tl.constexpr, ACC: tl.constexpr):
        """Per (t, n) tile: the gates i, r, q = sqrt(1 - |a|^2), the decay a = (ar, ai) and x's parts (xr, xi);
        outside `valid` the decay is 1 and x is 0 (the identity step)."""
        j, o = n // PER_OUT, n % PER_OUT
        row = x_ptr + t[:, None] * W
        pi = tl.zeros_like(valid.to(ACC)) + bi[None, :]
        pr = tl.zeros_like(pi) + br[None, :]
        for k in tl.static_range(PER_IN):
            col = j * PER_IN + k
            v = tl.load(row + col[None, :], mask=valid, other=0.0).to(ACC)
            n_ok = n < U
            pi += v * tl.load(wi_ptr + col * PER_OUT + o, mask=n_ok, other=0.0).to(ACC)[None, :]
            pr += v * tl.load(wr_ptr + col * PER_OUT + o, mask=n_ok, other=0.0).to(ACC)[None, :]
        gi = 1.0 / (1.0 + tl.exp(-pi))
        gr = 1.0 / (1.0 + tl.exp(-pr))
        log_a = -c * gr * sp[None, :]
        mag = tl.exp(log_a)
        if ACC == tl.float64:
            q = tl.sqrt(-_expm1_f64(2.0 * log_a))
        else:
            q = tl.sqrt(-_expm1_f32(2.0 * log_a))
        xr = tl.load(row + n[None, :], mask=valid, other=0.0).to(ACC)
        if COMPLEX:
            ang = gr * th[None, :]
            if ACC == tl.float64:
                sin, cos = tl.sin(ang), tl.cos(ang)
            else:
                sin, cos = _sincos_f32(ang)
            ar = tl.where(valid, mag * cos, 1.0)
            ai = tl.where(valid, mag * sin, 0.0)
            xi = tl.load(row + U + n[None, :], mask=valid, other=0.0).to(ACC)
        else:
            ar = tl.where(valid, mag, 1.0)
            ai = tl.zeros_like(ar)
            xi = tl.zeros_like(xr)
        return gi, gr, q, ar, ai, xr, xi

    @triton.jit
    def _unit_params(bi_ptr, br_ptr, sp_ptr, th_ptr, n, n_ok, COMPLEX: tl.constexpr, ACC: tl.constexpr):
        """Units n's gate biases, softplus(Lambda) and theta (softplus(Lambda) again for a real recurrence)."""
        bi = tl.load(bi_ptr + n, mask=n_ok, other=0.0).to(ACC)
        br = tl.load(br_ptr + n, mask=n_ok, other=0.0).to(ACC)
        sp = tl.load(sp_ptr + n, mask=n_ok, other=0.0).to(ACC)
        th = sp
        if COMPLEX:
            th = tl.load(th_ptr + n, mask=n_ok, other=0.0).to(ACC)
        return bi, br, sp, th

    @triton.jit
    def _load_state(ptr, n, n_ok, U, COMPLEX: tl.constexpr, ACC: tl.constexpr):
        """Units n of a state row at `ptr` as (re, im) (re twice for a real recurrence)."""
        re = tl.load(ptr + n, mask=n_ok, other=0.0).to(ACC)
        im = re
        if COMPLEX:
            im = tl.load(ptr + U + n, mask=n_ok, other=0.0).to(ACC)
        return re, im

    @triton.jit
    def _store_state(ptr, re, im, n, n_ok, U, COMPLEX: tl.constexpr):
        """`_load_state`'s inverse, in the row's dtype."""
        tl.store(ptr + n, re.to(ptr.dtype.element_ty), mask=n_ok)
        if COMPLEX:
            tl.store(ptr + U + n, im.to(ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _rglru_fwd_kernel(x_ptr, wi_ptr, bi_ptr, wr_ptr, br_ptr, sp_ptr, th_ptr, h0_ptr, out_ptr, last_ptr, ckpt_ptr,
                          T, U, W, CHUNKS, c,
                          COMPLEX: tl.constexpr, PER_IN: tl.constexpr, PER_OUT: tl.constexpr, FP64: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """x, out: (B, T, W); h0, last: (B, S); ckpt: (B, CHUNKS, S); S = 2U (re, im halves) or U; contiguous."""
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        b = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < U
        S = 2 * U if COMPLEX else U
        bi, br, sp, th = _unit_params(bi_ptr, br_ptr, sp_ptr, th_ptr, n, n_ok, COMPLEX, ACC)
        carry_r, carry_i = _load_state(h0_ptr + b * S, n, n_ok, U, COMPLEX, ACC)
        last_row = tl.arange(0, BLOCK_T)[:, None] == BLOCK_T - 1
        x_row, o_row = x_ptr + b * T * W, out_ptr + b * T * W
        for chunk in range(0, CHUNKS):
            _store_state(ckpt_ptr + (b * CHUNKS + chunk) * S, carry_r, carry_i, n, n_ok, U, COMPLEX)
            t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
            valid = (t < T)[:, None] & n_ok[None, :]
            gi, gr, q, ar, ai, xr, xi = _step_chain(x_row, wi_ptr, wr_ptr, bi, br, sp, th, t, n, valid, T, U, W, c,
                                                    COMPLEX, PER_IN, PER_OUT, ACC)
            ur, ui = q * gi * xr, q * gi * xi
            if COMPLEX:
                ar, ai, ur, ui = tl.associative_scan((ar, ai, ur, ui), 0, _combine_complex)
                h_r = ar * carry_r[None, :] - ai * carry_i[None, :] + ur
                h_i = ar * carry_i[None, :] + ai * carry_r[None, :] + ui
                tl.store(o_row + t[:, None] * W + U + n[None, :], h_i.to(out_ptr.dtype.element_ty), mask=valid)
                carry_i = tl.sum(tl.where(last_row, h_i, 0.0), axis=0)
            else:
                ar, ur = tl.associative_scan((ar, ur), 0, _combine)
                h_r = ar * carry_r[None, :] + ur
            tl.store(o_row + t[:, None] * W + n[None, :], h_r.to(out_ptr.dtype.element_ty), mask=valid)
            carry_r = tl.sum(tl.where(last_row, h_r, 0.0), axis=0)
        _store_state(last_ptr + b * S, carry_r, carry_i, n, n_ok, U, COMPLEX)

    @triton.jit
    def _rglru_bwd_kernel(x_ptr, wi_ptr, bi_ptr, wr_ptr, br_ptr, sp_ptr, th_ptr, ckpt_ptr, gout_ptr, glast_ptr,
                          gx_ptr, gpre_ptr, gsp_ptr, gth_ptr, gh0_ptr, T, U, W, CHUNKS, c, floor,
                          COMPLEX: tl.constexpr, PER_IN: tl.constexpr, PER_OUT: tl.constexpr, FP64: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """gout, gx: (B, T, W); gpre: (B, T, 2U) (input gate, then recurrence gate); glast, gh0: (B, S);
        gsp, gth: (B, U), this batch row's sums over time."""
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        b = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < U
        S = 2 * U if COMPLEX else U
        bi, br, sp, th = _unit_params(bi_ptr, br_ptr, sp_ptr, th_ptr, n, n_ok, COMPLEX, ACC)
        # the gradient carry g_{t+1}: at the last step dL/dh_last (the decay a_T does not exist: 1)
        gc_r, gc_i = _load_state(glast_ptr + b * S, n, n_ok, U, COMPLEX, ACC)
        d_sp = tl.zeros_like(sp)
        d_th = tl.zeros_like(sp)
        a0_r = tl.zeros_like(sp)
        a0_i = tl.zeros_like(sp)
        first_row = tl.arange(0, BLOCK_T)[:, None] == 0
        x_row, go_row = x_ptr + b * T * W, gout_ptr + b * T * W
        gx_row, gp_row = gx_ptr + b * T * W, gpre_ptr + b * T * 2 * U
        for back in range(0, CHUNKS):
            chunk = CHUNKS - 1 - back
            t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
            valid = (t < T)[:, None] & n_ok[None, :]
            go_off = t[:, None] * W + n[None, :]
            # three stages, each scan leaving only its result live (the kernel is at the register file's limit):
            # 1. g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}, a reverse scan joined to the next tile's g through the carry,
            #    with a_{t+1} the gradient recurrence's decay (1 after the last step)
            nxt = (t + 1 < T)[:, None] & n_ok[None, :]
            _, _, _, nar, nai, _, _ = _step_chain(x_row, wi_ptr, wr_ptr, bi, br, sp, th, t + 1, n, nxt, T, U, W, c,
                                                  COMPLEX, PER_IN, PER_OUT, ACC)
            gor = tl.load(go_row + go_off, mask=valid, other=0.0).to(ACC)
            if COMPLEX:
                goi = tl.load(go_row + go_off + U, mask=valid, other=0.0).to(ACC)
                br_, bi_, gr_, gi_ = tl.associative_scan((nar, -nai, gor, goi), 0, _combine_complex, reverse=True)
                g_r = gr_ + br_ * gc_r[None, :] - bi_ * gc_i[None, :]
                g_i = gi_ + br_ * gc_i[None, :] + bi_ * gc_r[None, :]
                gc_i = tl.sum(tl.where(first_row, g_i, 0.0), axis=0)
            else:
                br_, gr_ = tl.associative_scan((nar, gor), 0, _combine, reverse=True)
                g_r = gr_ + br_ * gc_r[None, :]
            gc_r = tl.sum(tl.where(first_row, g_r, 0.0), axis=0)
            # a barrier between the stages keeps ptxas from interleaving them (their values live at once): 183
            # registers instead of 246 for the complex kernel on sm_90 with Triton 3.9 (8 bytes spilled instead of
            # 108 with 3.6); the scans synchronise the program anyway
            tl.debug_barrier()
            # 2. h_{t-1}: the steps before t in this tile (the first row: none), scanned from the tile's checkpoint
            h_r, h_i = _load_state(ckpt_ptr + (b * CHUNKS + chunk) * S, n, n_ok, U, COMPLEX, ACC)
            prev = valid & (t > chunk * BLOCK_T)[:, None]
            pgi, _, pq, par, pai, pxr, pxi = _step_chain(x_row, wi_ptr, wr_ptr, bi, br, sp, th, t - 1, n, prev, T, U, W,
                                                         c, COMPLEX, PER_IN, PER_OUT, ACC)
            if COMPLEX:
                pur, pui = pq * pgi * pxr, pq * pgi * pxi
                par, pai, pur, pui = tl.associative_scan((par, pai, pur, pui), 0, _combine_complex)
                hp_r = par * h_r[None, :] - pai * h_i[None, :] + pur
                hp_i = par * h_i[None, :] + pai * h_r[None, :] + pui
            else:
                pur = pq * pgi * pxr
                par, pur = tl.associative_scan((par, pur), 0, _combine)
                hp_r = par * h_r[None, :] + pur
            tl.debug_barrier()
            # 3. step t's chain rule
            gi, gr, q, ar, ai, xr, xi = _step_chain(x_row, wi_ptr, wr_ptr, bi, br, sp, th, t, n, valid, T, U, W, c,
                                                    COMPLEX, PER_IN, PER_OUT, ACC)
            if COMPLEX:
                ga_r = g_r * hp_r + g_i * hp_i  # dL/da_t = g_t conj(h_{t-1})
                ga_i = g_i * hp_r - g_r * hp_i
                d_log = ga_r * ar + ga_i * ai  # through a = |a| e^{i arg a}
                d_arg = ga_i * ar - ga_r * ai
                d_scale = g_r * xr + g_i * xi
                tl.store(gx_row + go_off + U, (q * gi * g_i).to(gx_ptr.dtype.element_ty), mask=valid)
                a0_i = tl.sum(tl.where(first_row, ai, 0.0), axis=0)
                d_th += tl.sum(tl.where(valid, d_arg * gr, 0.0), axis=0)
                mag2 = ar * ar + ai * ai
            else:
                d_log = g_r * hp_r * ar
                d_scale = g_r * xr
                d_arg = tl.zeros_like(d_log)
                mag2 = ar * ar
            tl.store(gx_row + go_off, (q * gi * g_r).to(gx_ptr.dtype.element_ty), mask=valid)
            a0_r = tl.sum(tl.where(first_row, ar, 0.0), axis=0)
            # q = sqrt(1 - |a|^2), its derivative capped as the composite's; d(1 - |a|^2) / d log|a| = -2 |a|^2
            d_q = d_scale * gi / tl.maximum(2.0 * q, floor)
            d_log -= 2.0 * d_q * mag2
            d_sp += tl.sum(tl.where(valid, d_log * (-c * gr), 0.0), axis=0)
            d_gr = d_log * (-c * sp[None, :]) + d_arg * th[None, :]  # log|a| = -c r softplus(Lambda), arg = r theta
            gp_off = t[:, None] * 2 * U + n[None, :]
            tl.store(gp_row + gp_off, (d_scale * q * gi * (1.0 - gi)).to(gpre_ptr.dtype.element_ty), mask=valid)
            tl.store(gp_row + gp_off + U, (d_gr * gr * (1.0 - gr)).to(gpre_ptr.dtype.element_ty), mask=valid)
        tl.store(gsp_ptr + b * U + n, d_sp.to(gsp_ptr.dtype.element_ty), mask=n_ok)
        if COMPLEX:  # dL/dh0 = conj(a_0) g_0
            tl.store(gth_ptr + b * U + n, d_th.to(gth_ptr.dtype.element_ty), mask=n_ok)
            tl.store(gh0_ptr + b * S + n, (a0_r * gc_r + a0_i * gc_i).to(gh0_ptr.dtype.element_ty), mask=n_ok)
            tl.store(gh0_ptr + b * S + U + n, (a0_r * gc_i - a0_i * gc_r).to(gh0_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(gh0_ptr + b * S + n, (a0_r * gc_r).to(gh0_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch and the custom operator
# ---------------------------------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result  # a compiled graph bakes the choice in instead of tracing numba's import
def fused_rglru_available(implementation: str, device_type: str) -> bool:
    """Whether the fused op runs for a resolved scan implementation: "numba" on CPU, "triton" on CUDA (or in the
    interpreter). The torch scans ("loop", "chunked") keep the composite."""
    if implementation == "numba":
        return device_type == "cpu" and numba_rglru_kernels() is not None
    if implementation == "triton":
        return triton is not None and (device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    return False


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _numpy(x: torch.Tensor):
    return x.detach().contiguous().numpy()


def _numba_pair(t: torch.Tensor, acc: torch.dtype) -> tuple:
    """(float array, int16 array) for a numba kernel: a bf16 tensor as its bit patterns (the float array empty), any
    other as floats at the arithmetic's precision (the int16 array empty). Arrays share the tensor's memory, so a
    kernel can write an output through them."""
    if t.dtype == torch.bfloat16:
        return torch.empty(0, 0, 0, dtype=acc).numpy(), t.detach().contiguous().view(torch.int16).numpy()
    return t.detach().to(acc).contiguous().numpy(), torch.empty(0, 0, 0, dtype=torch.int16).numpy()


def _chunks(steps: int) -> int:
    return max(1, -(-steps // CHECKPOINT))


# (units per program, warps) of a GPU launch, the widest first: four of a tile's CHECKPOINT x units (t, n) elements
# per thread. There the backward's 150-200 registers hold everything; at 16 per thread (32 units on 4 warps) ptxas
# spilled 0.4-3.7 KB per thread to local memory, and at 2 per thread the register cap (128 at 16 warps) spills as well
# (`python -m benchmarks.kernel_build` prints each kernel's registers and spills; `benchmarks.bench_scan`'s
# LAUNCH_SHAPES times others on a GPU)
CUDA_BLOCKS = ((16, 8), (8, 4))


def _launch_shape(batch: int, units: int, device: torch.device) -> tuple:
    """(units per program, warps): on a GPU the widest of `CUDA_BLOCKS` whose programs fill it (four per
    multiprocessor), else the narrowest; 32 units in Triton's interpreter, which ignores warps."""
    if device.type != "cuda":
        return 32, 4
    for block, warps in CUDA_BLOCKS:
        if batch * triton.cdiv(units, block) >= 4 * _multiprocessors(device):
            return block, warps
    return CUDA_BLOCKS[-1]


def _kernel_inputs(x, wi, bi, wr, br, decay_param, phase_param, is_complex, implementation) -> tuple:
    """(the arithmetic's dtype, [wi, bi, wr, br] at that precision, the arguments both kernels of `implementation`
    start with: x, the gate weights and biases, softplus(Lambda) and theta, the last softplus(Lambda) again for a real
    recurrence, where the kernels do not read it)."""
    acc = _acc_dtype(x)
    sp = torch.nn.functional.softplus(decay_param.to(acc))
    theta = phase_param.to(acc) if is_complex else sp
    params = [t.detach().to(acc).contiguous() for t in (wi, bi, wr, br)]
    if implementation == "numba":
        return acc, params, [*_numba_pair(x, acc), *(p.numpy() for p in params), _numpy(sp), _numpy(theta)]
    return acc, params, [x.contiguous(), *params, sp.contiguous(), theta.contiguous()]


def _triton_launch(x: torch.Tensor, wi: torch.Tensor, units: int, is_complex: bool, acc: torch.dtype) -> tuple:
    """(grid, compile-time keywords) of both Triton kernels: a program per batch row and block of units."""
    block_n, warps = _launch_shape(x.shape[0], units, x.device)
    return (x.shape[0], triton.cdiv(units, block_n)), dict(
        COMPLEX=is_complex, PER_IN=wi.shape[1], PER_OUT=wi.shape[2], FP64=acc == torch.float64, BLOCK_T=CHECKPOINT,
        BLOCK_N=block_n, num_warps=warps)


def _rglru_forward(x, wi, bi, wr, br, decay_param, phase_param, h0, is_complex, scale, out_dtype, implementation):
    batch, steps, width = x.shape
    units = decay_param.shape[0]
    acc, _, inputs = _kernel_inputs(x, wi, bi, wr, br, decay_param, phase_param, is_complex, implementation)
    last = torch.empty(h0.shape, dtype=acc, device=x.device)
    ckpt = torch.empty(batch, _chunks(steps), h0.shape[1], dtype=acc, device=x.device)
    if implementation == "numba":
        forward, _, block_size = numba_rglru_kernels()
        out = torch.empty(batch, steps, width, dtype=out_dtype if out_dtype in (acc, torch.bfloat16) else acc)
        forward(*inputs, _numpy(h0.to(acc)), *_numba_pair(out, acc), last.numpy(), ckpt.numpy(), float(scale),
                is_complex, block_size(batch, units))
        return out.to(out_dtype), last, ckpt
    out = torch.empty(batch, steps, width, dtype=out_dtype, device=x.device)
    grid, meta = _triton_launch(x, wi, units, is_complex, acc)
    _rglru_fwd_kernel[grid](*inputs, h0.to(acc).contiguous(), out, last, ckpt, steps, units, width, ckpt.shape[1],
                            float(scale), **meta)
    return out, last, ckpt


def _rglru_backward(x, wi, bi, wr, br, decay_param, phase_param, ckpt, grad_out, grad_last, is_complex, scale, max_grad,
                    implementation):
    """Gradients of (x, wi, bi, wr, br, decay_param, phase_param, h0). The kernels give x's direct gradient and the
    gate pre-activations' (B, T, 2U); the block-diagonal matmuls' backward is torch's."""
    batch, steps, width = x.shape
    units = decay_param.shape[0]
    acc, params, inputs = _kernel_inputs(x, wi, bi, wr, br, decay_param, phase_param, is_complex, implementation)
    grad_x = torch.empty(batch, steps, width, dtype=acc, device=x.device)
    grad_pre = torch.empty(batch, steps, 2 * units, dtype=acc, device=x.device)
    grad_sp = torch.empty(batch, units, dtype=acc, device=x.device)
    grad_theta = torch.zeros(batch, units, dtype=acc, device=x.device)
    grad_h0 = torch.empty(ckpt.shape[0], ckpt.shape[2], dtype=acc, device=x.device)
    if implementation == "numba":
        _, backward, block_size = numba_rglru_kernels()
        backward(*inputs, _numpy(ckpt), *_numba_pair(grad_out, acc), _numpy(grad_last.to(acc)), float(scale),
                 float(max_grad), is_complex, block_size(batch, units), grad_x.numpy(), grad_pre.numpy(),
                 grad_sp.numpy(), grad_theta.numpy(), grad_h0.numpy())
    else:
        grid, meta = _triton_launch(x, wi, units, is_complex, acc)
        _rglru_bwd_kernel[grid](*inputs, ckpt.contiguous(), grad_out.contiguous(), grad_last.to(acc).contiguous(),
                                grad_x, grad_pre, grad_sp, grad_theta, grad_h0, steps, units, width, ckpt.shape[1],
                                float(scale), 1.0 / max_grad, **meta)
    # the gate matmuls, both gates at once: pre = x W + b per block, so dx += dpre W^T, dW = x^T dpre, db = sum dpre
    blocks = wi.shape[0]
    grad_pre = grad_pre.unflatten(-1, (2, blocks, -1))
    grad_x += torch.einsum("...gho,ghio->...hi", grad_pre, torch.stack(params[::2])).flatten(-2)
    grads_w = torch.einsum("...hi,...gho->ghio", x.to(acc).unflatten(-1, (blocks, -1)), grad_pre)
    grads_b = grad_pre.sum(dim=(0, 1)).flatten(-2)
    # softplus' derivative is sigmoid (torch's softplus is linear above its threshold of 20)
    d_lambda = grad_sp.sum(0) * torch.where(decay_param.to(acc) > 20, 1.0, torch.sigmoid(decay_param.to(acc)))
    d_theta = grad_theta.sum(0) if is_complex else torch.zeros_like(phase_param)
    # separate outputs (an operator's outputs may not alias each other); parameter-sized, so the copies are free
    return (grad_x.to(x.dtype), grads_w[0].to(wi.dtype, copy=True), grads_b[0].to(bi.dtype, copy=True),
            grads_w[1].to(wr.dtype, copy=True), grads_b[1].to(br.dtype, copy=True), d_lambda.to(decay_param.dtype),
            d_theta.to(phase_param.dtype), grad_h0)


def _rglru_op(x: torch.Tensor, wi: torch.Tensor, bi: torch.Tensor, wr: torch.Tensor, br: torch.Tensor,
              decay_param: torch.Tensor, phase_param: torch.Tensor, h0: torch.Tensor, is_complex: bool, scale: float,
              max_grad: float, out_dtype: torch.dtype,
              implementation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rglru_forward(x, wi, bi, wr, br, decay_param, phase_param, h0, is_complex, scale, out_dtype, implementation)


def _rglru_backward_op(x: torch.Tensor, wi: torch.Tensor, bi: torch.Tensor, wr: torch.Tensor, br: torch.Tensor,
                       decay_param: torch.Tensor, phase_param: torch.Tensor, ckpt: torch.Tensor, grad_out: torch.Tensor,
                       grad_last: torch.Tensor, is_complex: bool, scale: float, max_grad: float,
                       implementation: str) -> list[torch.Tensor]:
    return list(_rglru_backward(x, wi, bi, wr, br, decay_param, phase_param, ckpt, grad_out, grad_last, is_complex,
                                scale, max_grad, implementation))


def _rglru_fake(x, wi, bi, wr, br, decay_param, phase_param, h0, is_complex, scale, max_grad, out_dtype, implementation):
    acc = _acc_dtype(x)
    return (x.new_empty(x.shape, dtype=out_dtype), h0.new_empty(h0.shape, dtype=acc),
            x.new_empty(x.shape[0], _chunks(x.shape[1]), h0.shape[1], dtype=acc))


def _rglru_backward_fake(x, wi, bi, wr, br, decay_param, phase_param, ckpt, grad_out, grad_last, is_complex, scale,
                         max_grad, implementation):
    return [torch.empty_like(t) for t in (x, wi, bi, wr, br, decay_param, phase_param)] + [
        ckpt.new_empty(ckpt.shape[0], ckpt.shape[2])]


def _rglru_setup_context(ctx, inputs, output):
    x, wi, bi, wr, br, decay_param, phase_param, h0, ctx.is_complex, ctx.scale, ctx.max_grad, _, ctx.implementation = \
        inputs
    ctx.save_for_backward(x, wi, bi, wr, br, decay_param, phase_param, output[2])
    ctx.h0_dtype = h0.dtype
    ctx.mark_non_differentiable(output[2])


def _rglru_gradients(ctx, grad_out, grad_last, _):
    x, wi, bi, wr, br, decay_param, phase_param, ckpt = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if grad_last is None:
        grad_last = ckpt.new_zeros(ckpt.shape[0], ckpt.shape[2])
    grads = torch.ops.poolformer.rglru_backward(x, wi, bi, wr, br, decay_param, phase_param, ckpt, grad_out, grad_last,
                                                ctx.is_complex, ctx.scale, ctx.max_grad, ctx.implementation)
    return *grads[:7], grads[7].to(ctx.h0_dtype), None, None, None, None, None


rglru_op = define_autograd_op("rglru", _rglru_op, _rglru_backward_op, _rglru_fake, _rglru_backward_fake,
                              _rglru_setup_context, _rglru_gradients)


def fused_rglru(x: torch.Tensor, wi: torch.Tensor, bi: torch.Tensor, wr: torch.Tensor, br: torch.Tensor,
                decay_param: torch.Tensor, phase_param: Optional[torch.Tensor], h0: Optional[torch.Tensor],
                scale: float, max_grad: float, out_dtype: Optional[torch.dtype] = None,
                implementation: str = "numba") -> tuple:
    """The RG-LRU from x (B, T, W) to (features (B, T, W) as [Re h, Im h] or h, h_last (B, S)), differentiable in
    every input; see the module docstring for the formula. `wi`, `wr`: (blocks, W / blocks, U / blocks) block weights,
    `bi`, `br`: (U,) biases, `phase_param` None for a real recurrence, `h0`: (B, S) with S = 2U as (re, im) halves
    (or U), zeros if None. Complex when `phase_param` is given. `implementation`: "numba" or "triton"."""
    is_complex = phase_param is not None
    units = decay_param.shape[0]
    if x.dim() != 3 or x.shape[-1] != (2 * units if is_complex else units):
        raise ValueError(f"fused_rglru: x must be (B, T, {2 * units if is_complex else units}), got {tuple(x.shape)}")
    if implementation not in ("numba", "triton"):
        raise ValueError(f"fused_rglru: implementation must be 'numba' or 'triton', got {implementation!r}")
    acc = _acc_dtype(x)
    if h0 is None:
        h0 = x.new_zeros(x.shape[0], x.shape[-1], dtype=acc)
    out, last, _ = rglru_op(x, wi, bi, wr, br, decay_param, decay_param if phase_param is None else phase_param, h0,
                            is_complex, float(scale), float(max_grad), out_dtype or acc, implementation)
    return out, last
