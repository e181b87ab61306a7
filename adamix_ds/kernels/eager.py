"""Reference PyTorch implementation of the routed bottleneck adapter."""

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def adapter_forward_eager(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    down_index: int,
    up_index: int,
    activation: str,
) -> torch.Tensor:
    """Eager routed adapter; indexing a stacked parameter is a view, so no expert is copied."""
    bottleneck = ACTIVATIONS[activation](F.linear(hidden, down_weight[down_index], down_bias[down_index]))
    return hidden + F.linear(bottleneck, up_weight[up_index], up_bias[up_index])
