"""The adapter's compute, behind one function: ``adapter_forward``.

The AdaMix layer calls ``adapter_forward`` and nothing else; which implementation runs (eager
PyTorch or the fused Triton kernel) is decided here:

* ``ADAMIX_KERNEL`` unset or empty: the fused Triton kernel for CUDA tensors when Triton is
  importable and the shapes and dtypes are ones it supports, the eager PyTorch path otherwise.
* ``ADAMIX_KERNEL=eager``: always the eager path.
* ``ADAMIX_KERNEL=triton``: always the Triton kernel; inputs it cannot take raise ``ValueError``.
  CPU tensors run in the Triton interpreter, which needs ``TRITON_INTERPRET=1`` set before the
  kernel module is first imported (the tests do this).
* any other value: ``ValueError`` naming the value and the allowed ones.

The kernel module (and with it Triton) is imported only when its path is chosen, so CPU-only use
never needs Triton.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from adamix_ds.kernels.eager import ACTIVATIONS, adapter_forward_eager, stacked_adapter_forward_eager

__all__ = ["adapter_forward", "stacked_adapter_forward"]

KERNEL_ENV_VAR = "ADAMIX_KERNEL"
KERNEL_CHOICES = ("eager", "triton")
# Looked up once, without importing Triton.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
# Fused kernel limits: r bounds the register tiles; the interpreter (CPU) has no bf16.
_TRITON_MAX_RANK = 64
_TRITON_DTYPES = {
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float16),
}


def adapter_forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    down_index: int,
    up_index: int,
    activation: str,
) -> torch.Tensor:
    """``hidden + act(hidden @ down_weight[down_index].T + down_bias[down_index]) @ up_weight[up_index].T + up_bias[up_index]``.

    ``down_weight`` is ``[M_down, r, d]``, ``down_bias`` ``[M_down, r]``, ``up_weight`` ``[M_up, d, r]``,
    ``up_bias`` ``[M_up, d]``; the expert is selected by index, without a copy. Gradients reach only the
    chosen slices. ``activation`` is ``"gelu"`` (exact erf), ``"gelu_tanh"`` or ``"relu"``.
    """
    if not _use_triton(hidden, down_weight, down_bias, up_weight, up_bias, activation):
        return adapter_forward_eager(hidden, down_weight, down_bias, up_weight, up_bias, down_index, up_index, activation)
    down_index = _normalize_index(down_index, down_weight.shape[0], "down_index")
    up_index = _normalize_index(up_index, up_weight.shape[0], "up_index")
    fwd = _triton_op()
    y, _ = fwd(hidden, down_weight, down_bias, up_weight, up_bias, down_index, up_index, activation)
    return y


def stacked_adapter_forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    down_indices: Sequence[int],
    up_indices: Sequence[int],
    activation: str,
) -> torch.Tensor:
    """``adapter_forward`` over stacked passes: dim 0 of ``hidden`` holds ``len(down_indices)`` equal chunks, and
    chunk ``p`` goes through experts ``down_indices[p]`` and ``up_indices[p]``.

    The fused kernel runs once per chunk; the eager path runs every chunk in one batched matmul per projection.
    """
    if len(down_indices) != len(up_indices) or hidden.shape[0] % len(down_indices):
        raise ValueError(
            f"{len(down_indices)} down and {len(up_indices)} up indices for a batch of {hidden.shape[0]} rows: "
            "allowed one index of each per equal chunk"
        )
    if not _use_triton(hidden, down_weight, down_bias, up_weight, up_bias, activation):
        return stacked_adapter_forward_eager(hidden, down_weight, down_bias, up_weight, up_bias, down_indices, up_indices, activation)
    chunks = zip(hidden.chunk(len(down_indices)), down_indices, up_indices, strict=True)
    return torch.cat([adapter_forward(chunk, down_weight, down_bias, up_weight, up_bias, d, u, activation) for chunk, d, u in chunks])


def _use_triton(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    activation: str,
) -> bool:
    """Whether the fused kernel takes this call (see the module docstring); a bad choice raises ``ValueError``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    choice = _forced_kernel()
    if choice == "eager":
        return False
    reason = _triton_unsupported_reason(hidden, down_weight, down_bias, up_weight, up_bias)
    if choice == "triton" and reason is not None:
        raise ValueError(f"{KERNEL_ENV_VAR}=triton cannot run this adapter call: {reason}")
    return reason is None and (choice == "triton" or hidden.is_cuda)


def _forced_kernel() -> str | None:
    """The implementation ``ADAMIX_KERNEL`` forces, or ``None`` to choose automatically."""
    value = os.environ.get(KERNEL_ENV_VAR, "").strip()
    if not value:
        return None
    if value not in KERNEL_CHOICES:
        raise ValueError(
            f"{KERNEL_ENV_VAR}={value!r} is not a valid kernel choice; allowed values are "
            f"{', '.join(repr(c) for c in KERNEL_CHOICES)} (or unset for automatic selection)"
        )
    return value


def _triton_unsupported_reason(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
) -> str | None:
    """Why the fused kernel cannot take these inputs, or ``None`` when it can."""
    if not _TRITON_AVAILABLE:
        return "Triton is not installed"
    device = hidden.device
    if device.type not in _TRITON_DTYPES:
        return f"device type {device.type!r} is not supported"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "tensors are on CPU and TRITON_INTERPRET=1 is not set"
    tensors = (hidden, down_weight, down_bias, up_weight, up_bias)
    if any(t.device != device for t in tensors):
        return "all tensors must be on one device"
    if any(t.dtype != hidden.dtype for t in tensors):
        return f"all tensors must share one dtype, got {sorted({str(t.dtype) for t in tensors})}"
    if hidden.dtype not in _TRITON_DTYPES[device.type]:
        return f"dtype {hidden.dtype} is not supported on {device.type}"
    if down_weight.dim() != 3 or up_weight.dim() != 3:
        return "down_weight and up_weight must be stacked 3-d tensors [M, r, d] and [M, d, r]"
    n_down, rank, hidden_size = down_weight.shape
    n_up = up_weight.shape[0]
    expected = {
        "down_bias": (down_bias.shape, (n_down, rank)),
        "up_weight": (up_weight.shape, (n_up, hidden_size, rank)),
        "up_bias": (up_bias.shape, (n_up, hidden_size)),
    }
    for name, (shape, want) in expected.items():
        if tuple(shape) != want:
            return f"{name} has shape {tuple(shape)}, expected {want}"
    if hidden.shape[-1] != hidden_size:
        return f"hidden size {hidden.shape[-1]} does not match the adapter's {hidden_size}"
    if rank > _TRITON_MAX_RANK:
        return f"rank {rank} exceeds the kernel's maximum of {_TRITON_MAX_RANK}"
    return None


def _normalize_index(index: int, n_experts: int, name: str) -> int:
    # Negative indices count from the end, as they do for the eager path's tensor indexing.
    if not -n_experts <= index < n_experts:
        raise IndexError(f"{name} {index} is out of range for {n_experts} experts")
    return index % n_experts


def _triton_op():
    from adamix_ds.kernels import ops

    return ops.adapter_fwd
