"""1. The RG-LRU scan, forward + backward, per implementation, against a memcpy of the bytes it must move."""

import torch

from modeling_poolformer import linear_scan, sequential_scan
from modeling_poolformer.scan import numba_kernels, triton_available

from .common import DEVICE, best_of


def bench_scan(quick):
    batch, length, units = 4, 4000 if quick else 16000, 128
    g = torch.Generator().manual_seed(0)
    a = torch.polar(torch.rand(batch, length, units, generator=g) * 0.98, torch.rand(batch, length, units, generator=g))
    u = torch.randn(batch, length, units, dtype=torch.complex64, generator=g)
    a, u = a.to(DEVICE), u.to(DEVICE)
    grad = torch.randn_like(u)

    def fwd_bwd(fn):
        def run():
            x, y = a.detach().requires_grad_(), u.detach().requires_grad_()
            h = fn(x, y)
            torch.autograd.backward(h, grad)
        return run

    dst = torch.empty_like(a)
    copy = best_of(lambda: dst.copy_(a), repeats=5)
    bound = 4 * copy  # 8 passes over an array of this size; one copy is 2 (read + write)
    rows = []
    impls = ["numba", "loop", "chunked"] if DEVICE == "cpu" else ["triton", "chunked"]
    impls = [i for i in impls if i != "numba" or numba_kernels() is not None]
    impls = [i for i in impls if i != "triton" or triton_available()]
    for impl in impls:
        t = best_of(fwd_bwd(lambda x, y, impl=impl: linear_scan(x, y, implementation=impl)))
        rows.append({"implementation": impl, "seconds": t, "over_bound": t / bound})
    t = best_of(fwd_bwd(sequential_scan), repeats=1)
    rows.append({"implementation": "autograd loop (reference)", "seconds": t, "over_bound": t / bound})
    mb = a.numel() * a.element_size() / 1e6
    return {"batch": batch, "length": length, "units": units, "array_mb": mb, "memcpy_s": copy, "bound_s": bound,
            "rows": rows}
