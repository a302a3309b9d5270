"""The residual block's fused gated output (`fused_block.gated_output`) and its GELU-gate kernels (`gelu_gate`) against
the composite of torch ops: values and every gradient (gradcheck in float64 for each kernel family), what autograd
saves, and the whole model with and without them (complex and real recurrences, bf16 autocast, a carried state,
prefill and steps with gradients, activation checkpointing by config and by transformers' API)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from helpers import hub_config
from modeling_poolformer import PoolformerForCausalLM
from modeling_poolformer.fused_block import gated_output
from modeling_poolformer.gelu_gate import gelu_gate, gelu_gate_backward, numba_gate_kernels
from modeling_poolformer.modeling_poolformer import PoolformerResidualBlock

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (a test extra)")
IMPLEMENTATIONS = ["torch", "numba", pytest.param("triton", marks=needs_triton)]


def _gate_inputs(shape, dtype):
    b, g, grad = (torch.randn(shape, dtype=torch.float64) * 3 for _ in range(3))
    g.view(-1)[:6] = torch.tensor([0.0, -40.0, 40.0, -9.0, 9.0, 1e-4])  # tanh's saturation both ways, and 0
    return [t.to(dtype) for t in (b, g, grad)]


def test_numba_gate_kernels_are_available():
    assert numba_gate_kernels() is not None  # numba is a dependency: the CPU kernels must compile


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gate_kernels_equal_torch_ops(implementation, approximate, dtype):
    # 2 x 2600 elements: more than one numba job (4096) and a partial Triton block (1024)
    b, g, grad = _gate_inputs((2, 2600), dtype)
    # the reference: torch's ops in float64 on the same inputs, rounded once to the dtype
    b64, g64, grad64 = (t.double() for t in (b, g, grad))
    act = F.gelu(g64, approximate=approximate)
    want = [b64 * act, b64 * act, grad64 * act, torch.ops.aten.gelu_backward(grad64 * b64, g64, approximate=approximate)]
    got = [gelu_gate(b, g, approximate, implementation), *gelu_gate_backward(grad, b, g, approximate, implementation)]
    for x, y in zip(got, want):
        assert x.dtype == dtype and x.shape == y.shape
        if dtype == torch.bfloat16:  # the kernels round the fp32 result once: within half a bf16 ulp (Triton's
            # interpreter truncates: one ulp); torch's ops round twice
            rtol = {"torch": 2**-6, "numba": 2**-8, "triton": 2**-7}[implementation]
            torch.testing.assert_close(x.double(), y, rtol=rtol, atol=1e-6 * y.abs().max().item())
        else:
            tol = 1e-12 if dtype == torch.float64 else 1e-6  # fp32: torch's own ops are the loosest here
            torch.testing.assert_close(x.double(), y, rtol=10 * tol, atol=tol * y.abs().max().item())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gate_ops_pass_opcheck(implementation):
    b, g, grad = _gate_inputs((3, 5), torch.float32)
    torch.library.opcheck(torch.ops.poolformer.gelu_gate, (b, g, "tanh", implementation))
    torch.library.opcheck(torch.ops.poolformer.gelu_gate_backward, (grad, b, g, "none", implementation))


def test_argument_errors():
    b, g, _ = _gate_inputs((3, 5), torch.float32)
    with pytest.raises(ValueError, match="b, g must share"):
        gelu_gate(b, g[:2])
    with pytest.raises(ValueError, match="approximate"):
        gelu_gate(b, g, "erf")
    with pytest.raises(ValueError, match="implementation"):
        gelu_gate(b, g, "tanh", "cuda")
    gate, out = torch.nn.Linear(5, 5), torch.nn.Linear(5, 2)
    with pytest.raises(ValueError, match="exactly one of b and layer"):
        gated_output(b, g, gate, out, "gelu", layer=gate)
    with pytest.raises(ValueError, match="must be torch.float32"):
        gated_output(b.double(), g, gate, out, "gelu")


# ---------------------------------------------------------------------------------------------------------------------
# gated_output against the composite linear(b * act(gate(h))) (b given: the RG-LRU block; b = layer(h): the MLP)
# ---------------------------------------------------------------------------------------------------------------------


def _linears(dtype=torch.float32):
    return [torch.nn.Linear(i, o, dtype=dtype) for i, o in ((6, 10), (10, 4), (6, 10))]  # gate, out, layer


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu"])
def test_gated_output_equals_the_composite(implementation, mlp, hidden_act):
    gate, out, layer = _linears()
    h = torch.randn(2, 37, 6, requires_grad=True)
    b = None if mlp else torch.randn(2, 37, 10, requires_grad=True)
    leaves = [h, *gate.parameters(), *out.parameters()] + (list(layer.parameters()) if mlp else [b])
    grad = torch.randn(2, 37, 4)
    results = []
    for fused in (False, True):
        bb = layer(h) if mlp and not fused else b
        if fused:
            y = gated_output(bb, h, gate, out, hidden_act, layer if mlp else None, implementation)
        else:
            y = out(bb * ACT2FN[hidden_act](gate(h)))
        results.append((y, *torch.autograd.grad(y, leaves, grad)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # sums over 74 tokens of fp32 values ~1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mlp", [False, True])
def test_gated_output_gradcheck(implementation, mlp):
    gate, out, layer = _linears(torch.float64)
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 10, dtype=torch.float64, requires_grad=True)
    params = [*gate.parameters(), *out.parameters(), *layer.parameters()]
    if mlp:
        def fn(h, *params):
            return gated_output(None, h, gate, out, "gelu_pytorch_tanh", layer, implementation)
        inputs = (h, *params)
    else:
        def fn(b, h, *params):
            return gated_output(b, h, gate, out, "gelu", implementation=implementation)
        inputs = (b, h, *params[:4])
    assert torch.autograd.gradcheck(fn, inputs)


def test_gated_output_in_bf16_autocast_equals_the_composite():
    gate, out, layer = _linears()
    h = torch.randn(2, 37, 6).bfloat16().requires_grad_()
    grad = torch.randn(2, 37, 4)
    params = [*gate.parameters(), *out.parameters(), *layer.parameters()]
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                y = gated_output(None, h, gate, out, "gelu_pytorch_tanh", layer, "numba")
            else:
                y = out(layer(h) * ACT2FN["gelu_pytorch_tanh"](gate(h)))
        assert y.dtype == torch.bfloat16
        results.append((y, *torch.autograd.grad(y, [h, *params], grad.to(y.dtype))))
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype
        # bf16: the fused gate rounds b * act(g) once, torch's ops twice
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("mlp", [False, True])
def test_gated_output_saves_only_b_and_h(mlp):
    gate, out, layer = _linears()
    h = torch.randn(2, 37, 6, requires_grad=True)
    b = None if mlp else torch.randn(2, 37, 10, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in (*gate.parameters(), *out.parameters(), *layer.parameters())}
    saved = []
    for fused in (False, True):
        storages = set()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: storages.add(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            if fused:
                gated_output(b, h, gate, out, "gelu", layer if mlp else None, "numba")
            else:
                out((layer(h) if mlp else b) * ACT2FN["gelu"](gate(h)))
        saved.append(storages - params)
    assert saved[1] == {h.untyped_storage().data_ptr()} | (set() if mlp else {b.untyped_storage().data_ptr()})
    assert len(saved[0]) >= (4 if mlp else 5)  # h, b, g, act(g) (as its input), the product


# ---------------------------------------------------------------------------------------------------------------------
# recomputed_in_backward: the blocks' normalised input h recomputed from x in the backward pass instead of kept
# ---------------------------------------------------------------------------------------------------------------------


def _block_grads(block, x, recompute, autocast=False):
    """The gradients of a fused block's output and the storages autograd kept, with or without the recipe for h."""
    x = x.detach().requires_grad_()
    kept = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.add(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if recompute:
                y = block._fused_forward(x, None)
            else:  # the same block keeping h: as under activation checkpointing, where the block keeps nothing
                block.gradient_checkpointing = True
                try:
                    y = block._fused_forward(x, None)
                finally:
                    block.gradient_checkpointing = False
    grads = torch.autograd.grad(y, [x, *block.parameters()], torch.ones_like(y), allow_unused=True)
    return y, grads, len(kept)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("layer", ["rglru", "mlp"])
def test_recomputed_normalised_input_gives_the_same_gradients_and_is_not_kept(autocast, layer):
    model = PoolformerForCausalLM(hub_config("sc09", fused_rglru=True)).train()
    block = [m for m in model.modules() if isinstance(m, PoolformerResidualBlock)][0 if layer == "rglru" else 1]
    x = torch.randn(2, 50, block.norm.normalized_shape[0])
    y0, grads0, kept0 = _block_grads(block, x, False, autocast)
    y1, grads1, kept1 = _block_grads(block, x, True, autocast)
    assert torch.equal(y1, y0)
    for got, want in zip(grads1, grads0):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))  # the same ops: bitwise
    assert kept0 - kept1 == 1  # h (the recipe's input, x, is kept by the norm anyway)


def test_recomputed_normalised_input_refuses_a_changed_input_and_passes_other_tensors_on():
    model = PoolformerForCausalLM(hub_config("sc09", fused_rglru=True)).train()
    block = next(m for m in model.modules() if isinstance(m, PoolformerResidualBlock))
    x = torch.randn(2, 50, block.norm.normalized_shape[0], requires_grad=True)
    packed, unpacked = [], []  # hooks around the block (as torch.autograd.graph.save_on_cpu's) see every other tensor
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: unpacked.append(1) or t):
        y = block._fused_forward(x * 1.0, None)
    y.sum().backward()
    assert x.grad is not None and len(packed) == len(unpacked) > 0
    a = x.detach().clone().requires_grad_()
    b = a * 1.0
    y = block._fused_forward(b, None)
    with torch.no_grad():
        b.add_(1.0)  # the input the recipe reads changed after the forward pass
    with pytest.raises(RuntimeError, match="modified"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------------------------------
# In the model: fused_rglru=True (the fused RG-LRU and these blocks) against fused_rglru=False (the composite)
# ---------------------------------------------------------------------------------------------------------------------


def _pair(name, **overrides):
    composite_model = PoolformerForCausalLM(hub_config(name, fused_rglru=False, **overrides))
    fused_model = PoolformerForCausalLM(hub_config(name, fused_rglru=True, **overrides))
    fused_model.load_state_dict(composite_model.state_dict())
    return composite_model, fused_model


def _train_step(model, ids, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model.train()(ids, labels=ids)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_training(models, ids):
    """Logits and every parameter's gradient equal to fp32 tolerance."""
    (logits0, grads0), (logits1, grads1) = (_train_step(m, ids) for m in models)
    torch.testing.assert_close(logits1, logits0, rtol=1e-4, atol=1e-5)
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_the_model_runs_the_fused_blocks(monkeypatch):
    from modeling_poolformer import modeling_poolformer

    calls = []
    monkeypatch.setattr(modeling_poolformer, "gated_output", lambda *a, **k: calls.append(1) or gated_output(*a, **k))
    model = PoolformerForCausalLM(hub_config("sc09", fused_rglru=True))
    ids = torch.randint(0, 256, (1, 170))
    with torch.no_grad():  # nothing to save: the composite
        model.train()(ids, labels=ids)
    assert not calls
    model(ids, labels=ids).loss.backward()
    assert len(calls) == sum(isinstance(m, PoolformerResidualBlock) for m in model.modules())


@pytest.mark.parametrize("name", ["sc09", "sc09-real-rglru", "sc09-no-pooling"])
@pytest.mark.parametrize("chunk", [0, 37])
def test_model_training_equals_composite(name, chunk):
    # full forwards and time-chunked checkpointing (the state carried between chunks, gradients through it)
    _assert_same_training(_pair(name, checkpoint_chunk_size=chunk), torch.randint(0, 256, (2, 2 * 160 + 9)))


@pytest.mark.parametrize("name", ["sc09", "sc09-real-rglru"])
def test_model_bf16_autocast_training_is_as_accurate_as_the_composite(name):
    # under bf16 autocast the fused gate rounds b * act(g) once where torch's ops round twice, so the two paths differ
    # by bf16 roundings; the oracle is fp32 training: the fused path's error is no larger than the composite's
    composite_model, fused_model = _pair(name)
    ids = torch.randint(0, 256, (1, 200))
    reference = _train_step(composite_model, ids)
    composite_model.zero_grad()
    results = [_train_step(m, ids, autocast=True) for m in (composite_model, fused_model)]
    want = [reference[0], *reference[1].values()]
    errors = [[((got.float() - w).norm() / w.norm()).item() for got, w in zip([logits, *grads.values()], want)
               if w.norm() > 0] for logits, grads in results]  # (parameters without a gradient left out)
    # per tensor the bf16 roundings are noise (either path may be the worse on one), on average they are alike
    assert errors[1][0] <= 1.25 * errors[0][0]  # the logits
    assert sum(errors[1]) <= 1.25 * sum(errors[0])  # the logits and every gradient


@pytest.mark.parametrize("how", ["config", "transformers"])
def test_activation_checkpointing_equals_composite(how):
    models = _pair("sc09", activation_checkpointing=how == "config")
    if how == "transformers":  # GradientCheckpointingLayer's path
        for m in models:
            m.gradient_checkpointing_enable()
    assert all(b.gradient_checkpointing for m in models for b in m.modules() if isinstance(b, PoolformerResidualBlock))
    _assert_same_training(models, torch.randint(0, 256, (2, 2 * 160 + 9)))


def test_prefill_and_steps_with_gradients_equal_the_composite():
    # a cache carried through a prefill and one-sample steps while gradients are recorded: the fused blocks run
    models = _pair("sc09")
    ids = torch.randint(0, 256, (2, 173))
    results = []
    for model in models:
        model.train()
        out = model(ids[:, :100], use_cache=True)
        logits = [out.logits]
        for t in range(100, 104):
            logits.append(model(ids[:, t : t + 1], cache=out.cache).logits)
        logits = torch.cat(logits, dim=1)
        logits.square().mean().backward()
        results.append((logits, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.integration  # a heavy end-to-end check: the integration tier
@needs_triton
def test_model_training_with_triton_kernels_equals_composite():
    # scan_implementation="triton": the fused RG-LRU and the gate kernels in Triton's interpreter
    models = _pair("tiny", scan_implementation="triton")
    _assert_same_training(models, torch.randint(0, 256, (1, 70)))


@pytest.mark.integration  # compiles the training graph three times (about a minute on 2 cores)
def test_compiled_fused_training_equals_eager():
    # the fused ops are opaque calls in one graph (fullgraph: no break), whether the model compiles whole (what
    # `accelerate launch --dynamo_backend inductor` does, and its regional compilation too: a stack is no ModuleList)
    # or block by block (`block.compile()`)
    from accelerate.utils import compile_regions

    model = PoolformerForCausalLM(hub_config("tiny", fused_rglru=True, dropout=0.0))
    ids = torch.randint(0, 256, (2, 300))
    logits, grads = _train_step(model, ids)
    torch._dynamo.reset()
    try:
        for compile in ("regions", "blocks"):
            model.zero_grad(set_to_none=True)
            if compile == "regions":
                compiled = compile_regions(model, fullgraph=True)
                assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # the whole model, one graph
            else:
                compiled = model
                for block in model.modules():
                    if isinstance(block, PoolformerResidualBlock):
                        block.compile(fullgraph=True)
            got_logits, _ = _train_step(compiled, ids)
            torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    finally:
        torch._dynamo.reset()


def test_a_residual_stack_indexes_like_a_list_but_is_no_module_list():
    from modeling_poolformer.modeling_poolformer import PoolformerResidualStack

    model = PoolformerForCausalLM(hub_config("tiny"))
    stack = next(m for m in model.modules() if isinstance(m, PoolformerResidualStack))
    assert not isinstance(stack, torch.nn.ModuleList)
    blocks = list(stack)
    assert len(stack) == len(blocks) > 1 and stack[0] is blocks[0] and stack[-1] is blocks[-1]
    assert list(stack[1:]) == blocks[1:]
    assert [name for name, _ in stack.named_children()] == [str(i) for i in range(len(blocks))]  # checkpoint keys
