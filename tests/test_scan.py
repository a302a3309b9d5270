"""The chunked parallel scan (training) against the plain sequential loop: values, gradients, gradcheck."""

import pytest
import torch

from modeling_poolformer import linear_scan, sequential_scan
from modeling_poolformer.modeling_poolformer import _numba_kernels

IMPLEMENTATIONS = ["loop", "chunked", "auto"] + (["numba"] if _numba_kernels() is not None else [])


def test_numba_kernels_are_available():
    """The fast CPU path is part of the install (pyproject depends on numba); the torch paths are the fallback."""
    assert _numba_kernels() is not None


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
        linear_scan(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), implementation="triton")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_model_logits_agree_across_scan_implementations(implementation):
    from conftest import hub_config
    from modeling_poolformer import PoolformerForCausalLM

    torch.manual_seed(0)
    ref = PoolformerForCausalLM(hub_config("sc09", scan_implementation="loop")).eval()
    model = PoolformerForCausalLM(hub_config("sc09", scan_implementation=implementation)).eval()
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 256, (2, 500))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
