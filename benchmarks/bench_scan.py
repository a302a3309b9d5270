"""1. The RG-LRU scan, forward + backward, per implementation, against a memcpy of the bytes it must move; and the
fused RG-LRU operator of an sc09 layer (gates, decays and scan in one op) against the bytes its kernels must move,
beside the composite of torch ops it replaces."""

from unittest import mock

import torch

from modeling_poolformer import linear_scan, rglru, sequential_scan
from modeling_poolformer.modeling_poolformer import PoolformerRGLRU
from modeling_poolformer.scan import numba_kernels, resolve_scan_implementation, triton_available

from .common import AUTOCAST, DEVICE, SC09, best_of, poolformer

# the fused RG-LRU's GPU launch shapes tried side by side, (units per program, warps): `rglru.CUDA_BLOCKS`' two,
# then fewer units per program (more programs, fewer registers: see `python -m benchmarks.kernel_build`) and more
# per warp
LAUNCH_SHAPES = ((8, 4), (16, 8), (4, 2), (4, 1), (16, 4))


def bench_scan(quick, batch=4, reference=True, fused=True):
    length, units = 4000 if quick else 16000, 128
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
    if reference:
        t = best_of(fwd_bwd(sequential_scan), repeats=1)
        rows.append({"implementation": "autograd loop (reference)", "seconds": t, "over_bound": t / bound})
    mb = a.numel() * a.element_size() / 1e6
    return {"batch": batch, "length": length, "units": units, "array_mb": mb, "memcpy_s": copy, "bound_s": bound,
            "rows": rows, **({"fused": bench_fused_rglru(batch, length)} if fused else {})}


def fused_rglru_bytes(batch: int, length: int, width: int, itemsize: int) -> int:
    """The bytes the fused RG-LRU's kernels move at the least, forward + backward, per (B, T, W) element: x read by
    both, the output written and its gradient read (`itemsize` bytes each: 2 in bf16), x's gradient and the gate
    pre-activations' (fp32, W of them: 2 gates x U units) written. The checkpoints (1/64 of a state row per step)
    are left out."""
    return batch * length * width * (4 * itemsize + 4 + 4)


def bench_fused_rglru(batch, length, sweep=False):
    """An sc09 RG-LRU (128 complex units, W = 256, 32 gate blocks; its initialised parameters) over an x of
    (batch, length, W) in the training dtype (bf16 on a GPU, fp32 on a CPU, as `common.AUTOCAST`), forward + backward:
    the fused op against `fused_rglru_bytes` at the copy bandwidth (on a GPU at each of `LAUNCH_SHAPES` with
    `sweep`), then the layer's whole recurrence (gates, scan, output projection) fused and composite, side by
    side."""
    model = poolformer(SC09, dropout=0.0)
    layer = next(m for m in model.modules() if isinstance(m, PoolformerRGLRU)).to(DEVICE)
    width = layer.input_gate.weight.shape[0] * layer.input_gate.weight.shape[1]
    implementation = resolve_scan_implementation("auto", DEVICE)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x = torch.randn(batch, length, width, generator=g).to(DEVICE, dtype)
    grad = torch.randn(batch, length, width, generator=g).to(DEVICE, dtype)
    grad_d = torch.randn(batch, length, layer.out_proj.out_features, generator=g).to(DEVICE, dtype)

    def op():
        xg = x.detach().requires_grad_()
        features, _ = rglru.fused_rglru(
            xg, layer.input_gate.weight, layer.input_gate.bias, layer.recurrence_gate.weight,
            layer.recurrence_gate.bias, layer.recurrence_param, layer.phase_param, None, layer.scale, layer.max_grad,
            dtype, implementation)
        torch.autograd.backward(features, grad)

    def recurrence(fused):
        def run():
            layer.fused = fused
            xg = x.detach().requires_grad_()
            with AUTOCAST:
                out = layer.recurrence(xg, None, dtype)
            torch.autograd.backward(out, grad_d)
        return run

    src = torch.empty(batch, length, width, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    copy = best_of(lambda: dst.copy_(src), repeats=5)
    bandwidth = 2 * src.numel() * src.element_size() / copy  # read + write
    bound = fused_rglru_bytes(batch, length, width, x.element_size()) / bandwidth
    rows = []
    for shape in LAUNCH_SHAPES if sweep and DEVICE == "cuda" else [None]:  # None: the shape the op picks itself
        with mock.patch.object(rglru, "CUDA_BLOCKS", (shape,) if shape else rglru.CUDA_BLOCKS):
            t = best_of(op)
        name = f"fused op, {shape[0]} units on {shape[1]} warps" if shape else f"fused op ({implementation})"
        rows.append({"implementation": name, "seconds": t, "over_bound": t / bound})
    fused, composite = best_of(recurrence(True)), best_of(recurrence(False))
    return {"batch": batch, "length": length, "width": width, "dtype": str(dtype).removeprefix("torch."),
            "bandwidth_gb_s": bandwidth / 1e9, "bound_s": bound,
            "rows": rows, "recurrence_fused_s": fused, "recurrence_composite_s": composite,
            "composite_over_fused": composite / fused}
