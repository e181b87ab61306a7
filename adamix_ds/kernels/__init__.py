"""The adapter's compute, behind one function: ``adapter_forward``.

The AdaMix layer calls ``adapter_forward`` and nothing else; which implementation runs (eager
PyTorch or the fused Triton kernel) is decided here.
"""

from adamix_ds.kernels.eager import adapter_forward_eager

__all__ = ["adapter_forward"]


def adapter_forward(hidden, down_weight, down_bias, up_weight, up_bias, down_index: int, up_index: int, activation: str):
    """``hidden + act(hidden @ down_weight[down_index].T + down_bias[down_index]) @ up_weight[up_index].T + up_bias[up_index]``.

    ``down_weight`` is ``[M_down, r, d]``, ``down_bias`` ``[M_down, r]``, ``up_weight`` ``[M_up, d, r]``,
    ``up_bias`` ``[M_up, d]``; the expert is selected by index, without a copy. Gradients reach only the
    chosen slices. ``activation`` is ``"gelu"`` (exact erf), ``"gelu_tanh"`` or ``"relu"``.
    """
    return adapter_forward_eager(hidden, down_weight, down_bias, up_weight, up_bias, down_index, up_index, activation)
