"""``torch.library`` registration of the fused adapter: ``adamix::adapter_fwd`` / ``adamix::adapter_bwd``.

Each op has a fake (meta) implementation, so ``torch.compile`` and other tracers see shapes without
running Triton; the forward op has an autograd formula that calls the backward op; and both have a
FLOP formula, so ``torch.utils.flop_counter.FlopCounterMode`` counts them as the eager path's matmuls.

These are ``custom_op`` rather than ``triton_op``: the kernels are already one fused pass per
direction, so there is nothing for the compiler to gain by tracing into them, and keeping the ops
opaque lets ``torch.compile`` run them under ``TRITON_INTERPRET=1`` too (``wrap_triton`` hands an
interpreted kernel straight back, so a traced ``triton_op`` body would launch it on fake tensors).

Importing this module imports Triton; the dispatcher in ``adamix_ds.kernels`` imports it only when
the Triton path is chosen.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from adamix_ds.kernels.triton_adapter import adapter_backward_triton, adapter_forward_triton


@torch.library.custom_op("adamix::adapter_fwd", mutates_args=())
def adapter_fwd(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    routes: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused adapter forward over ``P = len(routes)`` equal chunks of dim 0 of ``hidden``, chunk ``p`` through
    experts ``routes[p]`` (an integer ``[P, 2]`` tensor of (down, up) on ``hidden``'s device); returns
    ``(y, pre)`` with ``pre`` the fp32 ``[..., r]`` pre-activation kept for backward."""
    hidden_size = hidden.shape[-1]
    rank = down_weight.shape[1]
    y, pre = adapter_forward_triton(
        hidden.reshape(-1, hidden_size).contiguous(),
        down_weight.contiguous(),
        down_bias.contiguous(),
        up_weight.contiguous(),
        up_bias.contiguous(),
        routes.contiguous(),
        activation,
    )
    return y.view(hidden.shape), pre.view(*hidden.shape[:-1], rank)


@adapter_fwd.register_fake
def _adapter_fwd_fake(hidden, down_weight, down_bias, up_weight, up_bias, routes, activation):
    rank = down_weight.shape[1]
    pre = hidden.new_empty((*hidden.shape[:-1], rank), dtype=torch.float32)
    return hidden.new_empty(hidden.shape), pre


@torch.library.custom_op("adamix::adapter_bwd", mutates_args=())
def adapter_bwd(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    pre: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    routes: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused adapter backward; returns ``(dh, dWd, dbd, dWu, dbu)``, the weight ones dense over all experts."""
    hidden_size = hidden.shape[-1]
    rank = down_weight.shape[1]
    grad_hidden, *grad_params = adapter_backward_triton(
        grad_out.reshape(-1, hidden_size).contiguous(),
        hidden.reshape(-1, hidden_size).contiguous(),
        pre.reshape(-1, rank).contiguous(),
        down_weight.contiguous(),
        up_weight.contiguous(),
        routes.contiguous(),
        activation,
    )
    return grad_hidden.view(hidden.shape), *grad_params


@adapter_bwd.register_fake
def _adapter_bwd_fake(grad_out, hidden, pre, down_weight, up_weight, routes, activation):
    return (
        hidden.new_empty(hidden.shape),
        down_weight.new_empty(down_weight.shape),
        down_weight.new_empty(down_weight.shape[:2]),
        up_weight.new_empty(up_weight.shape),
        up_weight.new_empty(up_weight.shape[:2]),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, down_weight, _, up_weight, _, routes, activation = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    # Otherwise autograd fills pre's (never used) gradient with zeros: one more launch per backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, pre, down_weight, up_weight, routes)
    ctx.activation = activation


def _backward(ctx, grad_out, _grad_pre):
    if grad_out is None:  # y did not reach the loss
        return (None,) * 7
    hidden, pre, down_weight, up_weight, routes = ctx.saved_tensors
    grads = torch.ops.adamix.adapter_bwd(grad_out, hidden, pre, down_weight, up_weight, routes, ctx.activation)
    return *grads, None, None


adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def _tokens_hidden_rank(hidden_shape, down_weight_shape) -> tuple[int, int, int]:
    return math.prod(hidden_shape[:-1]), hidden_shape[-1], down_weight_shape[1]


@register_flop_formula(torch.ops.adamix.adapter_fwd)
def _adapter_fwd_flops(hidden_shape, down_weight_shape, *args, out_shape=None, **kwargs) -> int:
    # Two [N, d] x [d, r]-sized matmuls at 2 FLOPs per multiply-add; bias, GELU and residual are
    # not counted, as FlopCounterMode does not count them on the eager path either.
    n, d, r = _tokens_hidden_rank(hidden_shape, down_weight_shape)
    return 4 * n * d * r


@register_flop_formula(torch.ops.adamix.adapter_bwd)
def _adapter_bwd_flops(grad_out_shape, hidden_shape, pre_shape, down_weight_shape, *args, out_shape=None, **kwargs) -> int:
    # Four matmuls of the same size: dz, dh, dWd and dWu.
    n, d, r = _tokens_hidden_rank(hidden_shape, down_weight_shape)
    return 8 * n * d * r
