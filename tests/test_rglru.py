"""The fused RG-LRU operator against the composite of torch ops it replaces: values and every gradient (complex and
real recurrences, a carried state, the last state's gradient), gradcheck in float64, bf16 in and out, the Triton
kernels in the interpreter, and the whole model (prefill, decoding, time-chunked checkpointing) with and without it."""

import importlib.util
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_scan import LAUNCH_SHAPES
from helpers import hub_config
from modeling_poolformer import PoolformerForCausalLM, rglru
from modeling_poolformer.modeling_poolformer import PoolformerRGLRU, _SqrtBoundedGrad
from modeling_poolformer.rglru import CHECKPOINT, CUDA_BLOCKS, _launch_shape, fused_rglru, numba_rglru_kernels, rglru_op
from modeling_poolformer.scan import sequential_scan

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (a test extra)")
SCALE, MAX_GRAD = 8.0, 200.0


def composite(x, wi, bi, wr, br, decay, phase, h0):
    """The RG-LRU as separate torch ops (what `PoolformerRGLRU` runs without the fused op), on the sequential scan."""
    x = x.double() if x.dtype == torch.float64 else x.float()

    def block_diagonal(w, b):
        return torch.einsum("...hi,hij->...hj", x.unflatten(-1, (w.shape[0], -1)), w).flatten(-2) + b

    gate_x, gate_r = torch.sigmoid(block_diagonal(wi, bi)), torch.sigmoid(block_diagonal(wr, br))
    log_a = -SCALE * gate_r * F.softplus(decay)
    scale = _SqrtBoundedGrad.apply(-torch.expm1(2 * log_a), MAX_GRAD) * gate_x
    if phase is None:
        h = sequential_scan(torch.exp(log_a), scale * x, h0)
        return h, h[:, -1]
    units = decay.shape[0]
    h = sequential_scan(torch.polar(torch.exp(log_a), gate_r * phase),
                        torch.complex(scale * x[..., :units], scale * x[..., units:]),
                        torch.complex(h0[:, :units], h0[:, units:]))
    out = torch.cat([h.real, h.imag], dim=-1)
    return out, out[:, -1]


def _inputs(is_complex, batch=2, length=70, units=6, blocks=3, dtype=torch.float64, decay_shift=-3.0):
    width = 2 * units if is_complex else units
    g = torch.Generator().manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    x = randn(batch, length, width)
    wi, wr = randn(blocks, width // blocks, units // blocks, scale=0.5), randn(blocks, width // blocks, units // blocks, scale=0.5)
    bi, br = randn(units), randn(units)
    decay = (torch.randn(units, generator=g, dtype=dtype) * 2 + decay_shift).requires_grad_()
    phase = (torch.rand(units, generator=g, dtype=dtype) * 3).requires_grad_() if is_complex else None
    h0 = randn(batch, width)
    return [x, wi, bi, wr, br, decay, phase, h0]


def _values_and_grads(fn, args, weights):
    out, last = fn(*args)
    loss = (out.double() * weights[0]).sum() + (last.double() * weights[1]).sum()
    leaves = [a for a in args if a is not None]
    return (out, last), torch.autograd.grad(loss, leaves)


def _compare(implementation, is_complex, dtype, tol, **sizes):
    args = _inputs(is_complex, dtype=dtype, **sizes)
    out, last = composite(*args)
    weights = (torch.randn_like(out, dtype=torch.float64), torch.randn_like(last, dtype=torch.float64))
    want, want_grads = _values_and_grads(composite, args, weights)
    got, got_grads = _values_and_grads(
        lambda *a: fused_rglru(*a, SCALE, MAX_GRAD, implementation=implementation), args, weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    names = [n for n, a in zip(("x", "wi", "bi", "wr", "br", "decay", "phase", "h0"), args) if a is not None]
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()), msg=name)


def test_numba_kernels_are_available():
    assert numba_rglru_kernels() is not None


@pytest.mark.parametrize("is_complex", [True, False])
@pytest.mark.parametrize("length", [1, CHECKPOINT, 2 * CHECKPOINT + 7])  # one step, one whole chunk, a partial one
def test_fused_equals_composite_values_and_gradients(is_complex, length):
    _compare("numba", is_complex, torch.float32, 1e-5, length=length)
    _compare("numba", is_complex, torch.float64, 1e-10, length=length)


def test_fused_equals_composite_near_the_sqrt_bound():
    # decays with |a| -> 1 (softplus(Lambda) ~ 1e-6): the bounded sqrt's gradient cap is what the gradients go through
    _compare("numba", True, torch.float64, 1e-10, decay_shift=-14.0)


@pytest.mark.parametrize("is_complex", [True, False])
@pytest.mark.parametrize("length,fast", [(5, False), (CHECKPOINT + 3, True)])  # full Jacobians; across a checkpoint
def test_fused_gradcheck(is_complex, length, fast):
    args = _inputs(is_complex, batch=2 if fast else 1, length=length, units=2, blocks=1)
    leaves = [a for a in args if a is not None]

    def fn(*leaves):
        it = iter(leaves)
        full = [next(it) if a is not None else None for a in args]
        return fused_rglru(*full, SCALE, MAX_GRAD, implementation="numba")

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast)


def test_bf16_in_and_out_round_the_fp32_result():
    # under autocast x arrives in bf16 and the output projection wants bf16: fp32 arithmetic in between
    args = _inputs(True, dtype=torch.float32)
    x16 = args[0].detach().to(torch.bfloat16).requires_grad_()
    out, last = fused_rglru(x16, *args[1:], SCALE, MAX_GRAD, torch.bfloat16, implementation="numba")
    want, want_last = composite(x16.float(), *args[1:])
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    # one rounding of the same fp32 values (up to one bf16 step where the fp32 results straddle a rounding boundary)
    torch.testing.assert_close(out.float(), want, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)
    # the kernel widens bf16 and rounds its results as torch's casts do: the same bits as fp32 in, then a cast
    x32 = x16.detach().float().requires_grad_()
    out32, last32 = fused_rglru(x32, *args[1:], SCALE, MAX_GRAD, torch.float32, implementation="numba")
    assert torch.equal(out, out32.to(torch.bfloat16)) and torch.equal(last, last32)
    grad = torch.randn_like(out)  # a bf16 gradient arriving from the output projection
    (gx16,) = torch.autograd.grad(out, x16, grad)
    (gx32,) = torch.autograd.grad(out32, x32, grad.float())
    assert gx16.dtype == torch.bfloat16 and torch.equal(gx16, gx32.to(torch.bfloat16))


def test_only_x_parameters_and_checkpoints_are_saved():
    # the point of the op: nothing of the elementwise chain outlives the forward
    args = _inputs(True, batch=1, length=1000, units=8, blocks=4, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_rglru(*args, SCALE, MAX_GRAD, implementation="numba")
    big = [t for t in saved if t.numel() > 1000]
    assert [t.shape for t in big] == [args[0].shape]  # x itself; the checkpoints are 1/64 of a state per step
    assert sum(t.numel() for t in saved if t is not args[0]) < args[0].numel() / 8


def test_fused_op_passes_opcheck():
    args = [a.detach().requires_grad_() for a in _inputs(True, batch=2, length=CHECKPOINT + 5, units=2, blocks=1)]
    torch.library.opcheck(rglru_op, (*args, True, SCALE, MAX_GRAD, torch.float64, "numba"))


def test_argument_errors():
    args = _inputs(True, length=3)
    with pytest.raises(ValueError, match="x must be"):
        fused_rglru(args[0][..., :-1], *args[1:], SCALE, MAX_GRAD)
    with pytest.raises(ValueError, match="implementation must be"):
        fused_rglru(*args, SCALE, MAX_GRAD, implementation="loop")


# ---------------------------------------------------------------------------------------------------------------------
# The Triton kernels, in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU): tiny sizes,
# lengths that leave a partial tile
# ---------------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("is_complex", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.float64, 1e-10, marks=pytest.mark.slow)])
def test_triton_fused_equals_composite(is_complex, dtype, tol):
    _compare("triton", is_complex, dtype, tol, batch=2, length=CHECKPOINT + 9, units=2, blocks=1)


@needs_triton
@pytest.mark.slow  # ~50 s in the interpreter; the float64 comparison above checks the same gradients to 1e-10
def test_triton_fused_gradcheck():
    args = _inputs(True, batch=1, length=5, units=2, blocks=1)
    leaves = [a for a in args if a is not None]
    assert torch.autograd.gradcheck(lambda *a: fused_rglru(*a, SCALE, MAX_GRAD, implementation="triton"), leaves,
                                    fast_mode=True)


def _phases_and_exponents():
    """float32 arguments: phases over [-10, 10] finely and up to 1e4 coarsely, and magnitudes from 1e-30 to 1 (the
    expm1's arguments are their negatives: 2 log|a| <= 0)."""
    return torch.cat([torch.linspace(-10, 10, 20001), torch.linspace(-1e4, 1e4, 20001), torch.logspace(-30, 0, 301),
                      -torch.logspace(-30, 0, 301), torch.zeros(1)]).float()


def _check_sincos_expm1(x, sin, cos, expm1):
    xd = x.double()
    for got, want in ((sin, xd.sin()), (cos, xd.cos())):
        assert (got.double() - want).abs().max().item() < 1e-7
    want = torch.expm1(-xd.abs())
    assert ((expm1.double() - want).abs() / want.abs().clamp_min(1e-300))[x != 0].max().item() < 1e-7
    assert (expm1[x == 0] == 0).all()


def test_numba_float32_sincos_and_expm1_are_within_1e7():
    numba_rglru_kernels()  # compiles the helpers into the module
    x = _phases_and_exponents()
    sin, cos, expm1 = (np.empty(x.numel(), np.float32) for _ in range(3))
    rglru._vsincos(x.numpy(), sin, cos)
    rglru._vexpm1(-x.abs().numpy(), expm1, np.empty(x.numel(), np.int32))
    _check_sincos_expm1(x, *(torch.from_numpy(a) for a in (sin, cos, expm1)))


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _sincos_expm1_kernel(x_ptr, sin_ptr, cos_ptr, expm1_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < N)
        sin, cos = rglru._sincos_f32(x)
        tl.store(sin_ptr + i, sin, mask=i < N)
        tl.store(cos_ptr + i, cos, mask=i < N)
        tl.store(expm1_ptr + i, rglru._expm1_f32(-tl.abs(x)), mask=i < N)


@needs_triton
def test_triton_float32_sincos_and_expm1_are_within_1e7():
    """The fused kernels' float32 sin, cos and expm1 (the numba kernels' polynomials, in place of libdevice's)."""
    x = _phases_and_exponents().to("cuda" if torch.cuda.is_available() else "cpu")
    outs = [torch.empty_like(x) for _ in range(3)]
    _sincos_expm1_kernel[(triton.cdiv(x.numel(), 1024),)](x, *outs, x.numel(), BLOCK=1024)
    _check_sincos_expm1(x.cpu(), *(o.cpu() for o in outs))


@needs_triton
def test_triton_bf16_output_equals_numba():
    args = _inputs(True, batch=1, length=20, units=4, blocks=2, dtype=torch.float32)
    x16 = args[0].detach().to(torch.bfloat16)
    outs = [fused_rglru(x16, *args[1:], SCALE, MAX_GRAD, torch.bfloat16, implementation=i) for i in ("numba", "triton")]
    torch.testing.assert_close(outs[1][0].float(), outs[0][0].float(), rtol=0, atol=2**-7 * outs[0][0].abs().max().item())
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# In the model: the fused path against the composite (fused_rglru=False), training, prefill + decoding, checkpointing
# ---------------------------------------------------------------------------------------------------------------------


def _pair(name, **overrides):
    composite_model = PoolformerForCausalLM(hub_config(name, fused_rglru=False, **overrides))
    fused_model = PoolformerForCausalLM(hub_config(name, fused_rglru=True, **overrides))
    fused_model.load_state_dict(composite_model.state_dict())
    return composite_model, fused_model


def test_the_model_runs_the_fused_op(monkeypatch):
    from modeling_poolformer import modeling_poolformer

    calls = []
    monkeypatch.setattr(modeling_poolformer, "fused_rglru", lambda *a, **k: calls.append(1) or fused_rglru(*a, **k))
    model = PoolformerForCausalLM(hub_config("tiny", fused_rglru=True)).train()
    ids = torch.randint(0, 256, (1, 50))
    model(ids, labels=ids).loss.backward()
    assert calls and len(calls) == sum(isinstance(m, PoolformerRGLRU) for m in model.modules())


@pytest.mark.parametrize("name,chunk", [("sc09", 0), ("sc09", 37), ("sc09-real-rglru", 0), ("sc09-no-pooling", 50)])
def test_model_training_equals_composite(name, chunk):
    # full forwards and time-chunked checkpointing (the state carried between chunks, gradients through it)
    models = _pair(name, conv1d_width=3, checkpoint_chunk_size=chunk)
    ids = torch.randint(0, 256, (2, 2 * 160 + 9))
    outputs = [m.train()(ids, labels=ids) for m in models]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-5, atol=1e-5)
    for out in outputs:
        out.loss.backward()
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_model_bf16_autocast_training_equals_composite():
    # the fused switch also fuses the residual blocks' gated outputs, whose bf16 roundings differ from torch's ops:
    # tests/test_fused_block.py compares both paths' accuracy against fp32 training; here the logits agree in norm
    models = _pair("sc09")
    ids = torch.randint(0, 256, (1, 200))
    outputs = []
    for m in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(m.train()(ids, labels=ids))
        outputs[-1].loss.backward()
    assert (outputs[1].logits.float() - outputs[0].logits.float()).norm() <= 2e-2 * outputs[0].logits.float().norm()
    errors = [((b.grad - a.grad).norm() / a.grad.norm()).item()
              for a, b in zip(models[0].parameters(), models[1].parameters()) if a.grad.norm() > 0]
    assert sum(errors) / len(errors) <= 0.05  # bf16 noise per tensor: ~2-4% on average either way


@pytest.mark.parametrize("name", ["sc09", "sc09-real-rglru"])
def test_prefill_and_decoding_equal_the_composite_forward(name):
    # prefill in two chunks through the fused op (state in and out), then one-sample steps (the step path)
    composite_model, fused_model = (m.eval() for m in _pair(name))
    ids = torch.randint(0, 256, (2, 173))
    with torch.no_grad():
        want = composite_model(ids).logits
        out = fused_model(ids[:, :100], use_cache=True)
        cache, logits = out.cache, [out.logits]
        logits.append(fused_model(ids[:, 100:160], cache=cache).logits)
        for t in range(160, 173):
            logits.append(fused_model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU: the compiled Triton kernels at the model's sizes against the numba kernels on the CPU (skipped without one)
# ---------------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs a CUDA device and triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("is_complex", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_BLOCKS)
def test_cuda_triton_equals_cpu_numba_at_model_sizes(is_complex, dtype, shape):
    """At each launch shape a GPU picks (units per program, warps): the narrowest at batch 4, the widest at the batch
    that fills the GPU with it."""
    units = 128 if is_complex else 256
    batch, length = 4, 2000 + 17
    if shape != CUDA_BLOCKS[-1]:
        batch, length = -(-4 * torch.cuda.get_device_properties(0).multi_processor_count // -(-units // shape[0])), 200
    assert _launch_shape(batch, units, torch.device("cuda")) == shape
    _cuda_triton_against_cpu_numba(is_complex, dtype, batch, length, units)


def _cuda_triton_against_cpu_numba(is_complex, dtype, batch, length, units):
    """The fused op's values and gradients from the Triton kernels on the GPU against the numba ones on the CPU."""
    args = _inputs(is_complex, batch=batch, length=length, units=units, blocks=32, dtype=torch.float32)
    args[0] = args[0].detach().to(dtype).requires_grad_()
    results = []
    for device, implementation in (("cpu", "numba"), ("cuda", "triton")):
        leaves = [a.detach().to(device).requires_grad_() if a is not None else None for a in args]
        out, last = fused_rglru(*leaves, SCALE, MAX_GRAD, dtype, implementation=implementation)
        g = torch.Generator().manual_seed(2)
        weights = (torch.randn(out.shape, generator=g).to(device, dtype), torch.randn(last.shape, generator=g).to(device))
        grads = torch.autograd.grad((out.float() * weights[0].float()).sum() + (last * weights[1]).sum(),
                                    [a for a in leaves if a is not None])
        results.append([t.detach().cpu().float() for t in (out, last, *grads)])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [shape for shape in LAUNCH_SHAPES if shape not in CUDA_BLOCKS])
def test_cuda_triton_equals_cpu_numba_at_the_benchmarks_other_launch_shapes(shape):
    """The launch shapes the benchmark tries beside `CUDA_BLOCKS` (`python -m benchmarks.gpu_probe --only scan`),
    so that the fastest can be taken: complex bf16 x, as the thesis recipe runs it."""
    with mock.patch.object(rglru, "CUDA_BLOCKS", (shape,)):
        _cuda_triton_against_cpu_numba(True, torch.bfloat16, 3, 600 + 17, 128)


@pytest.mark.gpu
@needs_cuda
def test_cuda_model_training_fused_equals_composite():
    composite_model, fused_model = (m.cuda().train() for m in _pair("sc09", scan_implementation="triton"))
    ids = torch.randint(0, 256, (2, 2 * 160 + 9), device="cuda")
    outputs = [m(ids, labels=ids) for m in (composite_model, fused_model)]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-4, atol=1e-4)
    for out in outputs:
        out.loss.backward()
    for (n, a), (_, b) in zip(composite_model.named_parameters(), fused_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=n)
