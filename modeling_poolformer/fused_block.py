"""The gated output of a residual block, y = Linear_out(b * act(Linear_gate(h))), as one autograd function that
saves only b and h for the backward pass.

The composite of torch ops keeps h (for the gate linear), g = Linear_gate(h) (for act's backward), act(g) and b (for
the product's) and the product (for the output linear's): five activations where two determine them all, and h is
kept anyway by the linear that made b (the MLP's first linear, or the RG-LRU's input projection, read the same cast
of h). The backward recomputes g with one matmul and then, in one elementwise pass (`gelu_gate`), act(g), the
product and the gradients of b and g; the matmuls' backward is the composite's, in the composite's dtypes (a bf16
linear's gradients in bf16, cast to the parameters' dtype by autograd), so the gradients are the composite's up to
the rounding of act inside one kernel instead of two ops.

`PoolformerResidualBlock` runs its gated GELU blocks through it when the config's `fused_rglru` switch is on and
gradients are recorded (without gradients nothing is saved, and the composite runs). It keeps h itself neither:
`recomputed_in_backward` hands every linear that saves h a recipe instead, h = Norm(x) from the x the norm saves
anyway, run again when the backward pass needs h.
"""

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .gelu_gate import gelu_gate, gelu_gate_backward

__all__ = ["GELU_APPROXIMATIONS", "gated_output", "recomputed_in_backward"]

# the activations this covers (transformers' names -> torch's gelu `approximate`)
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear on x computes in: autocast's if it is on, else the promoted one."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)  # (not result_type: a compiled graph would break on it)


class _GatedOutput(torch.autograd.Function):
    """(b, h, W_g, b_g, W_o, b_o, W_b, b_b) -> (b * act(h W_g^T + b_g)) W_o^T + b_o, the weights in the compute dtype;
    with b None, b = h W_b^T + b_b (the MLP's first linear), recomputed in the backward pass too."""

    @staticmethod
    def forward(ctx, b, h, gate_weight, gate_bias, out_weight, out_bias, layer_weight, layer_bias, approximate,
                implementation):
        ctx.recompute_b = b is None
        if ctx.recompute_b:
            b = F.linear(h, layer_weight, layer_bias)
        product = gelu_gate(b, F.linear(h, gate_weight, gate_bias), approximate, implementation)
        ctx.save_for_backward(None if ctx.recompute_b else b, h, gate_weight, gate_bias, out_weight, layer_weight,
                              layer_bias)
        ctx.approximate, ctx.implementation, ctx.has_bias = approximate, implementation, out_bias is not None
        return F.linear(product, out_weight, out_bias)

    @staticmethod
    def backward(ctx, grad_y):
        b, h, gate_weight, gate_bias, out_weight, layer_weight, layer_bias = ctx.saved_tensors
        if ctx.recompute_b:
            b = F.linear(h, layer_weight, layer_bias)
        flat_grad, flat_h = grad_y.to(out_weight.dtype).flatten(0, -2), h.flatten(0, -2)
        grad_product = (flat_grad @ out_weight).view(b.shape)
        g = F.linear(h, gate_weight, gate_bias)
        product, grad_b, grad_g = gelu_gate_backward(grad_product, b, g, ctx.approximate, ctx.implementation)
        grad_out_weight = flat_grad.t() @ product.flatten(0, -2)
        grad_out_bias = flat_grad.sum(0) if ctx.has_bias else None
        grad_g = grad_g.flatten(0, -2)
        grad_gate_weight = grad_g.t() @ flat_h
        grad_gate_bias = grad_g.sum(0) if gate_bias is not None else None
        grad_h = grad_g @ gate_weight
        grad_layer_weight = grad_layer_bias = None
        if ctx.recompute_b:  # b's linear, its gradient of h added to the gate's in the same matmul
            grad_b = grad_b.flatten(0, -2)
            grad_layer_weight = grad_b.t() @ flat_h
            grad_layer_bias = grad_b.sum(0) if layer_bias is not None else None
            grad_h, grad_b = torch.addmm(grad_h, grad_b, layer_weight), None
        return (grad_b, grad_h.view(h.shape), grad_gate_weight, grad_gate_bias, grad_out_weight, grad_out_bias,
                grad_layer_weight, grad_layer_bias, None, None)


def gated_output(b: Optional[torch.Tensor], h: torch.Tensor, gate: torch.nn.Linear, out: torch.nn.Linear,
                 hidden_act: str, layer: Optional[torch.nn.Linear] = None, implementation: str = "torch") -> torch.Tensor:
    """`out(b * act(gate(h)))` for a GELU `act` (`hidden_act` one of GELU_APPROXIMATIONS), saving only b and h, or
    with `b` None and b = `layer(h)` (an MLP), saving only h: the linears' outputs, act's and the product are
    recomputed in the backward pass. b and h in the dtype the linears compute in (autocast's, if it is on);
    `implementation`: the gate's kernels (`gelu_gate.gate_implementation`)."""
    dtype = _compute_dtype(h, gate.weight)
    if (b is None) == (layer is None):
        raise ValueError("gated_output: pass exactly one of b and layer")
    if h.dtype != dtype or (b is not None and b.dtype != dtype):
        raise ValueError(f"gated_output: b and h must be {dtype} (the linears' compute dtype), got "
                         f"{None if b is None else b.dtype}, {h.dtype}")
    # the parameters in the compute dtype as autocast casts them, outside the function so that autograd casts their
    # gradients back: the backward then casts nothing, as the composite's
    linears = (gate, out, layer) if layer is not None else (gate, out)
    params = [None if p is None else p.to(dtype) for linear in linears for p in (linear.weight, linear.bias)]
    params += [None, None] * (layer is None)
    return _GatedOutput.apply(b, h, *params, GELU_APPROXIMATIONS[hidden_act], implementation)


class _Recomputed:
    """What autograd keeps of a tensor that `recomputed_in_backward` recomputes: the view that was saved, and a holder
    shared by every save of the tensor, so that one backward pass recomputes it once for all of them."""

    def __init__(self, holder: dict, t: torch.Tensor):
        self.holder, self.shape, self.stride, self.offset = holder, t.shape, t.stride(), t.storage_offset()


def _active_hooks():
    """The innermost (pack, unpack) saved-tensor hooks active now, or None: hooks nest without chaining, so a
    context that installs its own must pass on what it does not handle. (torch has no public accessor.)"""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)
    except TypeError:  # older releases take no argument
        return top()


@contextlib.contextmanager
def recomputed_in_backward(tensor: torch.Tensor, recompute: Callable[..., torch.Tensor], inputs: tuple,
                           parameters=()):
    """Autograd saves, for the ops run inside this context, a recipe for `tensor` (any view of its storage) instead
    of the tensor: `recompute(*inputs)`, called once when the backward pass first unpacks it, must return the same
    values (the same ops on the same inputs; `parameters`, which it reads too, and `inputs` are checked for in-place
    changes as autograd checks what it saves). The recomputed tensor is dropped once every save of it was unpacked.

    Hooks active around this context (activation checkpointing's, `torch.autograd.graph.save_on_cpu`) get every
    other saved tensor, and `inputs` too, as saved tensors: under checkpointing the recipe keeps no input alive."""
    storage = tensor.untyped_storage().data_ptr()
    outer = _active_hooks()
    holder = {"saves": 0, "value": None, "inputs": None}
    versions = [t._version for t in parameters]

    def pack(t):
        if t.untyped_storage().data_ptr() != storage:
            return outer[0](t) if outer else t
        if holder["inputs"] is None:  # the recipe's inputs, saved once, as autograd would save them
            holder["inputs"] = [(outer[0](x) if outer else x, x._version) for x in inputs]
        holder["saves"] += 1
        return _Recomputed(holder, t)

    def unpack(packed):
        if not isinstance(packed, _Recomputed):
            return outer[1](packed) if outer else packed
        if holder["value"] is None:
            kept = [(outer[1](x) if outer else x, version) for x, version in holder["inputs"]]
            if [t._version for t in parameters] != versions or any(
                    outer is None and x._version != version for x, version in kept):
                raise RuntimeError("a tensor needed to recompute a block's normalised input for the backward pass "
                                   "was modified in place after the forward pass")
            with torch.no_grad():
                holder["value"] = recompute(*(x for x, _ in kept))
        value = holder["value"]
        holder["saves"] -= 1
        if holder["saves"] == 0:
            holder["value"] = None
        return value.as_strided(packed.shape, packed.stride, packed.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
