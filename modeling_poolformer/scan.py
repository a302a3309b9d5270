"""The RG-LRU's linear recurrence `h_t = a_t h_{t-1} + u_t` over time: every implementation, the torch custom
operator they run behind (with its autograd) and the choice between them.

- `sequential_scan`: the plain reference loop;
- "numba": compiled CPU kernels (the CPU default);
- "loop": one fused torch op per step (the CPU fallback without numba);
- "chunked": a chunked parallel scan in torch ops (the fallback on accelerators without Triton);
- "triton": a Triton kernel (the CUDA default; `TRITON_INTERPRET=1` runs it on CPU tensors, as the tests do).

The backward of every one is the same recurrence run backwards in time with conjugated decays. Complex values
cross the custom operator as real (re, im) pairs, so `torch.compile` sees one opaque call in a graph without complex
tensors (inductor generates no code for those).
"""

import functools
import math
import os
from typing import Optional

import torch

from .configuration_poolformer import SCAN_IMPLEMENTATIONS

__all__ = [
    "SCAN_IMPLEMENTATIONS",
    "define_autograd_op",
    "linear_scan",
    "numba_kernels",
    "resolve_scan_implementation",
    "scan_op",
    "sequential_scan",
    "triton_available",
    "triton_scan",
]

# ---------------------------------------------------------------------------------------------------------------------
# Reference and pure-torch scans
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


# ---------------------------------------------------------------------------------------------------------------------
# numba kernels (CPU)
# ---------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def numba_kernels():
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


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels (GPUs): a program scans BLOCK_N channels of one batch row through one stretch of time, BLOCK_T steps
# at a time: a tile of decays and inputs is combined with `tl.associative_scan` ((a1, u1) then (a2, u2) = (a1 a2,
# a2 u1 + u2)), the carry from the previous tile is applied, and the tile's last state is the next carry. Arithmetic is
# fp32 for fp32/bf16/fp16 inputs (fp64 stays fp64). Complex tensors are read as interleaved (re, im) pairs. With
# REVERSE it walks from the last step, and with SHIFT_CONJ it uses conj(a_{t+1}) as the decay of step t: the gradient.
#
# Time is cut into chunks when batch x channel blocks alone would leave the GPU's multiprocessors idle (a program's
# tiles run one after another: latency, not bandwidth, bounds a few long programs). A first kernel reduces each chunk
# to its total decay and its last state from zero; the scan kernel's program for chunk c then starts from h0 carried
# through chunks 0 .. c-1 (c small products) and scans its chunk. That reads a and u twice instead of once, for
# C times as many programs.
# ---------------------------------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # the fallback is the chunked torch scan
    triton = None

if triton is not None:

    @triton.jit
    def _combine(a1, u1, a2, u2):
        return a1 * a2, a2 * u1 + u2

    @triton.jit
    def _combine_complex(ar1, ai1, ur1, ui1, ar2, ai2, ur2, ui2):
        return (ar1 * ar2 - ai1 * ai2, ar1 * ai2 + ai1 * ar2,
                ar2 * ur1 - ai2 * ui1 + ur2, ar2 * ui1 + ai2 * ur1 + ui2)

    @triton.jit
    def _load_tile(a_ptr, u_ptr, row, n, n_mask, step, end, T, width,
                   COMPLEX: tl.constexpr, REVERSE: tl.constexpr, SHIFT_CONJ: tl.constexpr, ACC: tl.constexpr):
        """The decays and inputs of walk steps `step` (< `end`) as (ar, ai, ur, ui), the identity (a = 1, u = 0)
        outside, so that a tile's last row is the last real state; and where step t's outputs go."""
        pairs = 2 if COMPLEX else 1
        t = T - 1 - step if REVERSE else step  # the time index each tile row holds
        valid = (step < end)[:, None] & n_mask[None, :]
        t_a = t + 1 if SHIFT_CONJ else t  # the decay applied at step t
        a_valid = valid & (t_a < T)[:, None]
        base = row * T * width + pairs * n[None, :]
        a_off = base + t_a[:, None] * width
        u_off = base + t[:, None] * width
        ar = tl.load(a_ptr + a_off, mask=a_valid, other=1.0).to(ACC)
        ar = tl.where(valid, ar, 1.0)
        ur = tl.load(u_ptr + u_off, mask=valid, other=0.0).to(ACC)
        ai = tl.zeros_like(ar)
        ui = tl.zeros_like(ur)
        if COMPLEX:
            ai = tl.load(a_ptr + a_off + 1, mask=a_valid, other=0.0).to(ACC)
            if SHIFT_CONJ:
                ai = -ai
            ui = tl.load(u_ptr + u_off + 1, mask=valid, other=0.0).to(ACC)
        return ar, ai, ur, ui, valid, u_off

    @triton.jit
    def _scan_summary_kernel(a_ptr, u_ptr, sum_ptr, T, N, CHUNK, CHUNKS,
                             COMPLEX: tl.constexpr, REVERSE: tl.constexpr, SHIFT_CONJ: tl.constexpr,
                             FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """Chunk c of walk steps [c CHUNK, (c + 1) CHUNK) -> sum[b, c] = (its decays' product (re, im), its last state
        from zero (re, im)): (B, CHUNKS, 4, N) in the arithmetic's dtype."""
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        row, c = tl.program_id(0), tl.program_id(2)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        width = 2 * N if COMPLEX else N
        first, end = c * CHUNK, tl.minimum(c * CHUNK + CHUNK, T)
        dec_re = tl.full((BLOCK_N,), 1.0, ACC)
        dec_im = tl.zeros((BLOCK_N,), ACC)
        h_re = tl.zeros((BLOCK_N,), ACC)
        h_im = tl.zeros((BLOCK_N,), ACC)
        last_row = tl.arange(0, BLOCK_T)[:, None] == BLOCK_T - 1
        for start in range(first, end, BLOCK_T):
            ar, ai, ur, ui, _, _ = _load_tile(a_ptr, u_ptr, row, n, n_mask, start + tl.arange(0, BLOCK_T), end, T,
                                              width, COMPLEX, REVERSE, SHIFT_CONJ, ACC)
            if COMPLEX:
                ar, ai, ur, ui = tl.associative_scan((ar, ai, ur, ui), 0, _combine_complex)
            else:
                ar, ur = tl.associative_scan((ar, ur), 0, _combine)
            tar, tai = tl.sum(tl.where(last_row, ar, 0.0), axis=0), tl.sum(tl.where(last_row, ai, 0.0), axis=0)
            tur, tui = tl.sum(tl.where(last_row, ur, 0.0), axis=0), tl.sum(tl.where(last_row, ui, 0.0), axis=0)
            # (dec, h) then the tile (ta, tu): h <- ta h + tu, dec <- ta dec
            h_re, h_im = tar * h_re - tai * h_im + tur, tar * h_im + tai * h_re + tui
            dec_re, dec_im = tar * dec_re - tai * dec_im, tar * dec_im + tai * dec_re
        out = sum_ptr + (row * CHUNKS + c) * 4 * N + n
        tl.store(out, dec_re, mask=n_mask)
        tl.store(out + N, dec_im, mask=n_mask)
        tl.store(out + 2 * N, h_re, mask=n_mask)
        tl.store(out + 3 * N, h_im, mask=n_mask)

    @triton.jit
    def _scan_kernel(a_ptr, u_ptr, h0_ptr, out_ptr, last_ptr, sum_ptr, T, N, CHUNK, CHUNKS,
                     COMPLEX: tl.constexpr, REVERSE: tl.constexpr, SHIFT_CONJ: tl.constexpr, FP64: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """a, u, out: (B, T, N) (times 2 for complex pairs), h0 and last: (B, N) (x2), all contiguous; with CHUNKS > 1
        program (b, ., c) scans walk steps [c CHUNK, (c + 1) CHUNK) from the state `_scan_summary_kernel`'s sums
        carry h0 to."""
        ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
        row, c = tl.program_id(0), tl.program_id(2)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        width = 2 * N if COMPLEX else N  # floats per time step
        n_mask = n < N
        pairs = 2 if COMPLEX else 1
        carry_re = tl.load(h0_ptr + row * width + pairs * n, mask=n_mask, other=0.0).to(ACC)
        carry_im = tl.zeros_like(carry_re)
        if COMPLEX:
            carry_im = tl.load(h0_ptr + row * width + 2 * n + 1, mask=n_mask, other=0.0).to(ACC)
        for k in range(0, c):  # h0 through the chunks before this one
            sums = sum_ptr + (row * CHUNKS + k) * 4 * N + n
            dr, di = tl.load(sums, mask=n_mask, other=1.0), tl.load(sums + N, mask=n_mask, other=0.0)
            hr, hi = tl.load(sums + 2 * N, mask=n_mask, other=0.0), tl.load(sums + 3 * N, mask=n_mask, other=0.0)
            carry_re, carry_im = dr * carry_re - di * carry_im + hr, dr * carry_im + di * carry_re + hi
        first, end = c * CHUNK, tl.minimum(c * CHUNK + CHUNK, T)
        last_row = tl.arange(0, BLOCK_T)[:, None] == BLOCK_T - 1
        for start in range(first, end, BLOCK_T):
            ar, ai, ur, ui, valid, u_off = _load_tile(a_ptr, u_ptr, row, n, n_mask, start + tl.arange(0, BLOCK_T),
                                                      end, T, width, COMPLEX, REVERSE, SHIFT_CONJ, ACC)
            if COMPLEX:
                ar, ai, ur, ui = tl.associative_scan((ar, ai, ur, ui), 0, _combine_complex)
                h_re = ar * carry_re[None, :] - ai * carry_im[None, :] + ur
                h_im = ar * carry_im[None, :] + ai * carry_re[None, :] + ui
                tl.store(out_ptr + u_off, h_re.to(out_ptr.dtype.element_ty), mask=valid)
                tl.store(out_ptr + u_off + 1, h_im.to(out_ptr.dtype.element_ty), mask=valid)
                carry_re = tl.sum(tl.where(last_row, h_re, 0.0), axis=0)
                carry_im = tl.sum(tl.where(last_row, h_im, 0.0), axis=0)
            else:
                ar, ur = tl.associative_scan((ar, ur), 0, _combine)
                h_re = ar * carry_re[None, :] + ur
                tl.store(out_ptr + u_off, h_re.to(out_ptr.dtype.element_ty), mask=valid)
                carry_re = tl.sum(tl.where(last_row, h_re, 0.0), axis=0)
        if c == CHUNKS - 1:
            tl.store(last_ptr + row * width + pairs * n, carry_re.to(last_ptr.dtype.element_ty), mask=n_mask)
            if COMPLEX:
                tl.store(last_ptr + row * width + 2 * n + 1, carry_im.to(last_ptr.dtype.element_ty), mask=n_mask)


# channels per program `triton_scan` picks from, the widest first (every one spill-free: at 32 complex channels the
# kernels hold up to 250 registers per thread; `python -m benchmarks.kernel_build` prints them)
BLOCK_N_CHOICES = (32, 16, 8, 4)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _as_floats(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x.contiguous()) if x.is_complex() else x.contiguous()


def triton_scan(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, reverse: bool = False, shift_conj: bool = False,
                block_t: int = 64, block_n: Optional[int] = None, time_chunks: Optional[int] = None) -> tuple:
    """(h, h_last) for (B, T, N) a, u and (B, N) h0, real or complex. `reverse=True, shift_conj=True` runs the
    gradient recurrence g_t = x_t + conj(a_{t+1}) g_{t+1} (with `u` = x) from the end.

    `block_n` channels per program (32 by default: 256 contiguous bytes of complex64 pairs per time step) and
    `time_chunks` stretches of time scanned in parallel: by default 1 on a CPU; on a GPU as many as fill it (four
    programs per multiprocessor), each at least 8 tiles long, when batch x channel blocks do not, and then narrower
    channel blocks (down to 4) if that is still too few."""
    batch, steps, units = u.shape
    target = 4 * _multiprocessors(u.device) if u.is_cuda else 1
    if time_chunks is None:
        programs = batch * triton.cdiv(units, block_n or BLOCK_N_CHOICES[0])
        time_chunks = max(1, min(triton.cdiv(target, programs), steps // (8 * block_t)))
    if block_n is None:  # still too few programs (a short sequence): narrower blocks, down to one 32-byte sector
        block_n = next((block for block in BLOCK_N_CHOICES if time_chunks * batch * triton.cdiv(units, block) >= target),
                       BLOCK_N_CHOICES[-1])
    chunk = triton.cdiv(triton.cdiv(max(steps, 1), time_chunks), block_t) * block_t  # whole tiles per chunk
    time_chunks = triton.cdiv(max(steps, 1), chunk)
    # contiguous outputs, so that the float views the kernel writes through are the outputs themselves
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty_like(h0, memory_format=torch.contiguous_format)
    a_f, u_f, h0_f = _as_floats(a), _as_floats(u), _as_floats(h0)
    out_f, last_f = _as_floats(out), _as_floats(last)
    fp64 = u.dtype in (torch.float64, torch.complex128)
    sums = torch.empty(batch, time_chunks, 4, units, dtype=torch.float64 if fp64 else torch.float32, device=u.device)
    grid = (batch, triton.cdiv(units, block_n), time_chunks)
    meta = dict(COMPLEX=u.is_complex(), REVERSE=reverse, SHIFT_CONJ=shift_conj, FP64=fp64, BLOCK_T=block_t,
                BLOCK_N=block_n)
    if time_chunks > 1:
        _scan_summary_kernel[grid](a_f, u_f, sums, steps, units, chunk, time_chunks, **meta)
    _scan_kernel[grid](a_f, u_f, h0_f, out_f, last_f, sums, steps, units, chunk, time_chunks, **meta)
    return out, last


def triton_available() -> bool:
    return triton is not None


# ---------------------------------------------------------------------------------------------------------------------
# Selection, dispatch and the custom operator
# ---------------------------------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result  # a compiled graph bakes the choice in instead of tracing numba's import
def resolve_scan_implementation(implementation: str, device_type: str) -> str:
    if implementation == "auto":
        if device_type == "cuda":
            return "triton" if triton_available() else "chunked"
        if device_type != "cpu":
            return "chunked"
        return "numba" if numba_kernels() is not None else "loop"
    if implementation == "numba" and (device_type != "cpu" or numba_kernels() is None):
        raise RuntimeError("scan_implementation='numba' needs numba installed and tensors on the CPU")
    if implementation == "triton":
        if not triton_available():
            raise RuntimeError("scan_implementation='triton' needs the triton package")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("scan_implementation='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones)")
    return implementation


def _numpy(x: torch.Tensor):
    return x.detach().contiguous().numpy()


def _scan(a, u, h0, implementation, chunk):
    if implementation == "numba":
        forward, _, block_size = numba_kernels()
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        forward(_numpy(a), _numpy(u), _numpy(h0), out.numpy(), block_size(u.shape[0], u.shape[2]))
        return out
    if implementation == "triton":
        return triton_scan(a, u, h0)[0]
    if implementation == "loop":
        return _loop_scan(a, u, h0)
    # contiguous, like every other implementation's output: the custom op's fake kernel promises it to the compiler
    return _chunked_scan(a, u, h0, chunk if chunk > 0 else max(8, int(math.sqrt(u.shape[1])))).contiguous()


def _scan_backward(a, h, h0, grad_h, implementation, chunk):
    """The scan's gradients: the same recurrence run backwards in time with conjugated decays,
    `g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}`, then `dL/du_t = g_t`, `dL/da_t = g_t conj(h_{t-1})`,
    `dL/dh0 = conj(a_0) g_0`."""
    if implementation == "numba":
        _, backward, block_size = numba_kernels()
        grad_a, grad_u, grad_h0 = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h0)
        backward(_numpy(a), _numpy(h), _numpy(h0), _numpy(grad_h), grad_a.numpy(), grad_u.numpy(),
                 grad_h0.numpy(), block_size(h.shape[0], h.shape[2]))
        return grad_a, grad_u, grad_h0
    if implementation == "triton":  # reads a_{t+1} and walks backwards itself: no shifted or flipped copies
        g = triton_scan(a, grad_h, torch.zeros_like(h0), reverse=True, shift_conj=True)[0]
    else:  # step s of the reversed scan multiplies by conj(a_{T-s}); its first one is unused
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1).conj().flip(1)
        g = _scan(a_next, grad_h.flip(1), torch.zeros_like(h0), implementation, chunk).flip(1)
    h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
    return g * h_prev.conj(), g, a[:, 0].conj() * g[:, 0]


# The scan as a torch custom operator with autograd, on real tensors (complex values as (re, im) pairs in a last dim
# of 2): under torch.compile it is one opaque call (numba, Triton and numpy are not traced), and a compiled graph
# around it holds no complex tensors, which inductor cannot generate code for.


def define_autograd_op(name: str, forward, backward, forward_fake, backward_fake, setup_context, gradients):
    """`torch.ops.poolformer.<name>`: `forward` (a function with a typed signature) as a torch custom operator, and
    `backward` as `poolformer::<name>_backward`, each with its fake kernel (`forward_fake`, `backward_fake`: outputs
    of the right shapes, for tracing), and the first's autograd: `setup_context(ctx, inputs, output)` saves what
    `gradients(ctx, *output_grads)` needs to call the second. Once per process: another copy of these files (the
    package, or a Hub folder's) may have defined the operators already, and torch keeps one definition per name."""
    try:
        return getattr(torch.ops.poolformer, name)
    except AttributeError:
        pass
    op = torch.library.custom_op(f"poolformer::{name}", forward, mutates_args=())
    backward_op = torch.library.custom_op(f"poolformer::{name}_backward", backward, mutates_args=())
    op.register_fake(forward_fake)
    backward_op.register_fake(backward_fake)
    op.register_autograd(gradients, setup_context=setup_context)
    return getattr(torch.ops.poolformer, name)


def _pairs_to_complex(*tensors):
    return [torch.view_as_complex(t.contiguous()) for t in tensors]


def _scan_op(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, is_complex: bool, implementation: str,
             chunk: int) -> torch.Tensor:
    if not is_complex:
        return _scan(a, u, h0, implementation, chunk)
    return torch.view_as_real(_scan(*_pairs_to_complex(a, u, h0), implementation, chunk))


def _scan_backward_op(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor, grad_h: torch.Tensor, is_complex: bool,
                      implementation: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not is_complex:
        return _scan_backward(a, h, h0, grad_h, implementation, chunk)
    grads = _scan_backward(*_pairs_to_complex(a, h, h0, grad_h), implementation, chunk)
    return tuple(torch.view_as_real(g) for g in grads)


def _scan_fake(a, u, h0, is_complex, implementation, chunk):
    return u.new_empty(u.shape)


def _scan_backward_fake(a, h, h0, grad_h, is_complex, implementation, chunk):
    return a.new_empty(a.shape), h.new_empty(h.shape), h0.new_empty(h0.shape)


def _scan_setup_context(ctx, inputs, output):
    a, _, h0, ctx.is_complex, ctx.implementation, ctx.chunk = inputs
    ctx.save_for_backward(a, output, h0)


def _scan_gradients(ctx, grad_h):
    a, h, h0 = ctx.saved_tensors
    grads = torch.ops.poolformer.linear_scan_backward(a, h, h0, grad_h.contiguous(), ctx.is_complex,
                                                      ctx.implementation, ctx.chunk)
    return *grads, None, None, None


scan_op = define_autograd_op("linear_scan", _scan_op, _scan_backward_op, _scan_fake, _scan_backward_fake,
                             _scan_setup_context, _scan_gradients)


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
    implementation, chunk = resolve_scan_implementation(implementation, a.device.type), max(chunk, 0)
    if not u.is_complex():
        return scan_op(a, u, h0, False, implementation, chunk)
    pairs = [torch.view_as_real(t) for t in (a, u, h0)]
    return torch.view_as_complex(scan_op(*pairs, True, implementation, chunk))
