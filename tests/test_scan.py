"""The chunked parallel scan (training) against the plain sequential loop: values, gradients, gradcheck."""

import importlib.util

import pytest
import torch

from modeling_poolformer import linear_scan, sequential_scan
from modeling_poolformer.scan import numba_kernels, triton_scan

IMPLEMENTATIONS = ["loop", "chunked", "auto"] + (["numba"] if numba_kernels() is not None else [])


def test_numba_kernels_are_available():
    """The fast CPU path is part of the install (pyproject depends on numba); the torch paths are the fallback."""
    assert numba_kernels() is not None


def _inputs(dtype, batch=3, length=50, units=5, with_h0=True, requires_grad=False):
    if dtype.is_complex:
        # |a| < 1 with a random phase, like the RG-LRU's decays
        a = torch.polar(torch.rand(batch, length, units, dtype=dtype.to_real()) * 0.98,
                        torch.rand(batch, length, units, dtype=dtype.to_real()) * 6.28)
    else:
        a = torch.rand(batch, length, units, dtype=dtype) * 0.98
    u = torch.randn(batch, length, units, dtype=dtype)
    h0 = torch.randn(batch, units, dtype=dtype) if with_h0 else None
    tensors = [a, u] + ([h0] if with_h0 else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return a, u, h0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("length,chunk", [(1, 0), (2, 0), (7, 3), (50, 0), (64, 8), (333, 16), (1000, 0), (37, 100)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_equals_sequential(implementation, dtype, length, chunk, with_h0):
    a, u, h0 = _inputs(dtype, length=length, with_h0=with_h0)
    ref = sequential_scan(a, u, h0)
    out = linear_scan(a, u, h0, implementation, chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_scan_gradients_equal_sequential(implementation, dtype):
    a, u, h0 = _inputs(dtype, length=203, requires_grad=True)
    weight = torch.randn(3, 203, 5, dtype=dtype)  # a non-trivial loss mixes every output

    def grads(fn):
        loss = (fn(a, u, h0) * weight).real.sum() if dtype.is_complex else (fn(a, u, h0) * weight).sum()
        return torch.autograd.grad(loss, (a, u, h0))

    for got, want in zip(grads(lambda *x: linear_scan(*x, implementation, chunk=16)), grads(sequential_scan)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("length,chunk", [(1, 0), (9, 4), (20, 0)])
def test_scan_gradcheck(implementation, dtype, length, chunk):
    a, u, h0 = _inputs(dtype, batch=2, length=length, units=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, u, h0: linear_scan(a, u, h0, implementation, chunk), (a, u, h0))


def test_scan_argument_errors():
    with pytest.raises(ValueError, match="a and u must both be"):
        linear_scan(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="implementation must be one of"):
        linear_scan(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), implementation="cuda")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_model_logits_agree_across_scan_implementations(implementation):
    from helpers import hub_config
    from modeling_poolformer import PoolformerForCausalLM

    torch.manual_seed(0)
    ref = PoolformerForCausalLM(hub_config("sc09", scan_implementation="loop")).eval()
    model = PoolformerForCausalLM(hub_config("sc09", scan_implementation=implementation)).eval()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 500))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", [i for i in IMPLEMENTATIONS if i != "auto"])
@pytest.mark.parametrize("is_complex", [False, True])
def test_scan_custom_op_passes_opcheck(implementation, is_complex):
    """torch's own checks of the custom op: its fake kernels (shapes and strides the compiler is promised), its
    registered autograd and its schema, against real runs. The chunk of 7 leaves a padded last chunk."""
    from modeling_poolformer.scan import scan_op

    a, u, h0 = _inputs(torch.complex128 if is_complex else torch.float64, length=30)
    args = [(torch.view_as_real(t) if is_complex else t).clone().requires_grad_() for t in (a, u, h0)]
    torch.library.opcheck(scan_op, (*args, is_complex, implementation, 7))


# ---------------------------------------------------------------------------------------------------------------------
# The Triton kernels, in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU); small
# sizes, since the interpreter runs each program in numpy. Odd sizes leave partial tiles in time and channels.
# ---------------------------------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (a test extra)")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("batch,length,units", [(1, 1, 3), (3, 37, 5), pytest.param(2, 70, 37, marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_triton_scan_equals_sequential(dtype, batch, length, units, with_h0):
    a, u, h0 = _inputs(dtype, batch=batch, length=length, units=units, with_h0=with_h0)
    torch.testing.assert_close(linear_scan(a, u, h0, "triton"), sequential_scan(a, u, h0), rtol=1e-5, atol=1e-5)
    out, last = triton_scan(a, u, torch.zeros_like(u[:, 0]) if h0 is None else h0, block_t=16, block_n=4)
    torch.testing.assert_close(last, out[:, -1], rtol=0, atol=0)  # the final state, for prefill and checkpointing


def _slow_decays(dtype, batch, length, units):
    """Decays with |a| in [0.99, 1): the carry across a time chunk still matters hundreds of steps later."""
    real = dtype.to_real() if dtype.is_complex else dtype
    magnitude = 0.99 + 0.01 * torch.rand(batch, length, units, dtype=real)
    a = torch.polar(magnitude, torch.rand_like(magnitude) * 0.2) if dtype.is_complex else magnitude
    return a, torch.randn(batch, length, units, dtype=dtype), 10 * torch.randn(batch, units, dtype=dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64])
def test_triton_scan_in_time_chunks_equals_sequential(dtype):
    # three chunks of 64 steps (the last one partial), each scanned from the state the chunks before carry to it
    time_chunks = 3
    a, u, h0 = _slow_decays(dtype, 2, 150, 5)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    want = sequential_scan(a, u, h0)
    out, last = triton_scan(a, u, h0, block_t=16, block_n=4, time_chunks=time_chunks)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(last, out[:, -1], rtol=0, atol=0)
    # the gradient recurrence g_t = x_t + conj(a_{t+1}) g_{t+1}, run from the end: the forward scan of the flipped
    # sequence with the decays shifted by one step (1 past the end)
    shifted = torch.cat([a[:, 1:].conj(), torch.ones_like(a[:, :1])], dim=1)
    want = sequential_scan(shifted.flip(1), u.flip(1), h0).flip(1)
    out, last = triton_scan(a, u, h0, reverse=True, shift_conj=True, block_t=16, block_n=4, time_chunks=time_chunks)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(last, out[:, 0], rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_triton_scan_gradients_equal_sequential(dtype):
    a, u, h0 = _inputs(dtype, batch=2, length=37, units=5, requires_grad=True)
    weight = torch.randn(2, 37, 5, dtype=dtype)

    def grads(fn):
        loss = (fn(a, u, h0) * weight).real.sum() if dtype.is_complex else (fn(a, u, h0) * weight).sum()
        return torch.autograd.grad(loss, (a, u, h0))

    for got, want in zip(grads(lambda *x: linear_scan(*x, "triton")), grads(sequential_scan)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.complex128, marks=pytest.mark.slow)])
def test_triton_scan_gradcheck(dtype):
    a, u, h0 = _inputs(dtype, batch=2, length=7, units=2, requires_grad=True)
    # fast mode (random directions): each interpreted call takes a fraction of a second
    assert torch.autograd.gradcheck(lambda a, u, h0: linear_scan(a, u, h0, "triton"), (a, u, h0), fast_mode=True)


@needs_triton
@pytest.mark.slow  # the interpreter runs the whole model's scans in numpy: ~25 s
def test_model_with_triton_scan_equals_numba_or_loop():
    from helpers import hub_config
    from modeling_poolformer import PoolformerForCausalLM

    ref = PoolformerForCausalLM(hub_config("tiny", scan_implementation="loop")).train()
    model = PoolformerForCausalLM(hub_config("tiny", scan_implementation="triton")).train()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 40))
    outs = [m(ids, labels=ids) for m in (ref, model)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
    for m, out in zip((ref, model), outs):
        out.loss.backward()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Training under torch.compile and bf16 autocast: the scan is one opaque custom op, and it runs in fp32.
# ---------------------------------------------------------------------------------------------------------------------


def _loss_and_grads(model, ids, forward=None):
    model.zero_grad(set_to_none=True)
    loss = (model if forward is None else forward)(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_training_step_is_one_graph_and_equals_eager():
    from helpers import hub_model

    torch._dynamo.reset()
    model = hub_model("tiny").train()
    ids = torch.randint(0, 256, (2, 300))
    want_loss, want_grads = _loss_and_grads(model, ids)
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    for _ in range(2):  # the second call reuses the graph
        loss, grads = _loss_and_grads(model, ids, compiled)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_bf16_autocast_training_keeps_the_recurrence_in_fp32(monkeypatch):
    from helpers import hub_model
    from modeling_poolformer import scan as scan_module

    seen, scan = [], scan_module._scan

    def recording_scan(a, u, h0, implementation, chunk):
        seen.append((a.dtype, u.dtype, h0.dtype))
        return scan(a, u, h0, implementation, chunk)

    monkeypatch.setattr(scan_module, "_scan", recording_scan)
    model = hub_model("tiny", fused_rglru=False).train()  # the composite's scans (the fused op: test_rglru.py)
    ids = torch.randint(0, 256, (2, 300))
    want_loss, want_grads = _loss_and_grads(model, ids)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, ids)
    assert seen and all(dtype in (torch.float32, torch.complex64) for dtypes in seen for dtype in dtypes)
    assert abs(loss.item() - want_loss.item()) < 0.05 * want_loss.item()
    cosines = [torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0) for g, w in zip(grads, want_grads)
               if w.abs().max() > 0]
    assert min(cosines) > 0.9, f"bf16 gradients point elsewhere than fp32 ones: cosine {min(cosines):.3f}"
