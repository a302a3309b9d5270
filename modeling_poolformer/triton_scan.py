"""The RG-LRU's linear recurrence h_t = a_t h_{t-1} + u_t as a Triton kernel (GPUs; `TRITON_INTERPRET=1` runs it on
CPU tensors, which is how the tests check it without a GPU).

One program scans BLOCK_N channels of one batch row through time, BLOCK_T steps at a time: a tile of decays and
inputs is combined with `tl.associative_scan` ((a1, u1) then (a2, u2) = (a1 a2, a2 u1 + u2)), the carry from the
previous tile is applied, and the tile's last state is the next carry. Arithmetic is fp32 for fp32/bf16/fp16 inputs
(fp64 stays fp64). Complex tensors are read as interleaved (real, imaginary) pairs (`torch.view_as_real`), so the
kernel never sees a complex dtype. The same kernel runs backwards in time for the gradient: with REVERSE it walks
from the last step, and with SHIFT_CONJ it uses conj(a_{t+1}) as the decay of step t.

Imported lazily by `modeling_poolformer.linear_scan`; without Triton the chunked torch scan is used instead.
"""

import functools
from typing import Optional

import torch

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
    def _scan_kernel(a_ptr, u_ptr, h0_ptr, out_ptr, last_ptr, T, N,
                     COMPLEX: tl.constexpr, REVERSE: tl.constexpr, SHIFT_CONJ: tl.constexpr, FP64: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """a, u, out: (B, T, N) (times 2 for complex pairs), h0 and last: (B, N) (x2), all contiguous."""
        row = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        width = 2 * N if COMPLEX else N  # floats per time step
        n_mask = n < N
        pairs = 2 if COMPLEX else 1
        acc = tl.float64 if FP64 else tl.float32  # the arithmetic's precision
        carry_re = tl.load(h0_ptr + row * width + pairs * n, mask=n_mask, other=0.0).to(acc)
        if COMPLEX:
            carry_im = tl.load(h0_ptr + row * width + 2 * n + 1, mask=n_mask, other=0.0).to(acc)
        last_row = tl.arange(0, BLOCK_T)[:, None] == BLOCK_T - 1
        for start in range(0, T, BLOCK_T):
            step = start + tl.arange(0, BLOCK_T)
            t = T - 1 - step if REVERSE else step  # the time index each tile row holds
            valid = (step < T)[:, None] & n_mask[None, :]
            t_a = t + 1 if SHIFT_CONJ else t  # the decay applied at step t
            a_valid = valid & (t_a < T)[:, None]
            base = row * T * width + pairs * n[None, :]
            a_off = base + t_a[:, None] * width
            u_off = base + t[:, None] * width
            # outside the sequence: a = 1, u = 0 (the identity), so the tile's last row is the last real state
            ar = tl.load(a_ptr + a_off, mask=a_valid, other=1.0).to(acc)
            ar = tl.where(valid, ar, 1.0)
            ur = tl.load(u_ptr + u_off, mask=valid, other=0.0).to(acc)
            if COMPLEX:
                ai = tl.load(a_ptr + a_off + 1, mask=a_valid, other=0.0).to(acc)
                if SHIFT_CONJ:
                    ai = -ai
                ui = tl.load(u_ptr + u_off + 1, mask=valid, other=0.0).to(acc)
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
        tl.store(last_ptr + row * width + pairs * n, carry_re.to(last_ptr.dtype.element_ty), mask=n_mask)
        if COMPLEX:
            tl.store(last_ptr + row * width + 2 * n + 1, carry_im.to(last_ptr.dtype.element_ty), mask=n_mask)


def available() -> bool:
    return triton is not None


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _as_floats(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x.contiguous()) if x.is_complex() else x.contiguous()


def triton_scan(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, reverse: bool = False, shift_conj: bool = False,
                block_t: int = 64, block_n: Optional[int] = None) -> tuple:
    """(h, h_last) for (B, T, N) a, u and (B, N) h0, real or complex. `reverse=True, shift_conj=True` runs the
    gradient recurrence g_t = x_t + conj(a_{t+1}) g_{t+1} (with `u` = x) from the end.

    `block_n` channels per program; by default 32, halved (down to 4: one 32-byte memory sector of complex64 pairs
    per time step) on a GPU until there are enough programs to fill it, since programs only split batch and channels,
    never time."""
    if triton is None:
        raise RuntimeError("scan_implementation='triton' needs the triton package")
    batch, steps, units = u.shape
    if block_n is None:
        block_n = 32
        while u.is_cuda and block_n > 4 and batch * triton.cdiv(units, block_n) < 4 * _multiprocessors(u.device):
            block_n //= 2
    # contiguous outputs, so that the float views the kernel writes through are the outputs themselves
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty_like(h0, memory_format=torch.contiguous_format)
    a_f, u_f, h0_f = _as_floats(a), _as_floats(u), _as_floats(h0)
    out_f, last_f = _as_floats(out), _as_floats(last)
    grid = (batch, triton.cdiv(units, block_n))
    _scan_kernel[grid](a_f, u_f, h0_f, out_f, last_f, steps, units, COMPLEX=u.is_complex(), REVERSE=reverse,
                       SHIFT_CONJ=shift_conj, FP64=u.dtype in (torch.float64, torch.complex128), BLOCK_T=block_t,
                       BLOCK_N=block_n)
    return out, last
