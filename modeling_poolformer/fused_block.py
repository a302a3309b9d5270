"""The gated output of a residual block, `y = Linear_out(b * act(g))`, as one autograd function that keeps only b and g
for the backward: the composite keeps g (for act's backward), act(g) and b (for the product's) and the product (for the
linear's), four activations where two determine them all. The backward recomputes act(g) and the product, then runs
exactly the composite's backward ops in the composite's dtypes, so the gradients are the same numbers.

Not wired into `PoolformerResidualBlock` here: `benchmarks/bench_train.py` (section 8) measures what it saves.
"""

import torch
import torch.nn.functional as F

__all__ = ["GELU_APPROXIMATIONS", "gated_projection"]

# the activations this covers (transformers' names -> torch's gelu `approximate`)
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


class _GatedProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b, g, weight, bias, approximate):
        device = b.device.type
        # the linear's compute dtype: autocast's if it is on (the backward runs outside autocast and must match)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.result_type(b, weight)
        ctx.save_for_backward(b, g, weight)
        ctx.approximate, ctx.dtype, ctx.has_bias = approximate, dtype, bias is not None
        return F.linear(b * F.gelu(g, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        b, g, weight = ctx.saved_tensors
        act = F.gelu(g, approximate=ctx.approximate)
        product = b * act
        grad_y = grad_y.to(ctx.dtype)
        flat_grad, flat_product = grad_y.flatten(0, -2), product.to(ctx.dtype).flatten(0, -2)
        grad_weight = (flat_grad.t() @ flat_product).to(weight.dtype)
        grad_bias = flat_grad.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_product = (grad_y @ weight.to(ctx.dtype)).to(product.dtype)
        grad_b = grad_product * act
        grad_g = torch.ops.aten.gelu_backward(grad_product * b, g, approximate=ctx.approximate)
        return grad_b, grad_g, grad_weight, grad_bias, None


def gated_projection(b: torch.Tensor, g: torch.Tensor, linear: torch.nn.Linear, hidden_act: str) -> torch.Tensor:
    """`linear(b * act(g))` for a GELU `act` (`hidden_act` one of GELU_APPROXIMATIONS), saving only b and g."""
    return _GatedProjection.apply(b, g, linear.weight, linear.bias, GELU_APPROXIMATIONS[hidden_act])
