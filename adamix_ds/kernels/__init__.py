"""The adapter's compute, behind one function: ``adapter_forward``.

The AdaMix layer calls ``adapter_forward`` and nothing else; which implementation runs (eager
PyTorch or the fused Triton kernel) is decided here:

* ``ADAMIX_KERNEL`` unset or empty: the fused Triton kernel only where it was measured faster than the
  eager chain, forward + backward, for the device, dtype and shape (``FUSED_FASTER_RULES``, derived by
  ``benchmarks/kernel_bench.py`` on that device class and recorded in ``benchmarks/RESULTS.md``); eager
  everywhere else, so the default is never the slower path. A device class no GPU benchmark has timed
  gets eager.
* ``ADAMIX_KERNEL=eager``: always the eager path.
* ``ADAMIX_KERNEL=triton``: always the Triton kernel; inputs it cannot take raise ``ValueError``.
  CPU tensors run in the Triton interpreter, which needs ``TRITON_INTERPRET=1`` set before the
  kernel module is first imported (the tests do this).
* any other value: ``ValueError`` naming the value and the allowed ones.

The kernel module (and with it Triton) is imported only when its path is chosen, so CPU-only use
never needs Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adamix_ds.kernels.eager import ACTIVATIONS, adapter_forward_eager, stacked_adapter_forward_eager

__all__ = ["FUSED_FASTER_RULES", "FusedFasterRule", "Routes", "adapter_forward", "fused_measured_faster"]

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

Routes = Sequence[tuple[int, int]] | torch.Tensor
"""The (down, up) experts of each stacked pass: pairs of ints, or an integer ``[P, 2]`` tensor on the device."""


@dataclass(frozen=True)
class FusedFasterRule:
    """Shapes where ``benchmarks/kernel_bench.py`` measured the fused kernel faster than eager on one device class.

    It covers calls with at least ``min_tokens`` rows (all passes together), a hidden size inside the measured
    ``hidden_range`` (inclusive) and a rank up to ``max_rank``: the benchmark derives the rule as the smallest
    measured token count from which every measured shape, routed and stacked, was faster by its margin.
    """

    device_name: str
    dtype: torch.dtype
    min_tokens: int
    hidden_range: tuple[int, int]
    max_rank: int

    def covers(self, device_name: str, dtype: torch.dtype, tokens: int, hidden_size: int, rank: int) -> bool:
        """Whether a call with these properties lies where the fused kernel was measured faster."""
        low, high = self.hidden_range
        return (
            device_name == self.device_name
            and dtype == self.dtype
            and tokens >= self.min_tokens
            and low <= hidden_size <= high
            and rank <= self.max_rank
        )


# Pasted from benchmarks/RESULTS.md ("Dispatcher rule"), where each rule's measurement is. No GPU has timed the
# current kernels yet (the last GPU numbers are of the previous, fifteen-launch backward, slower everywhere), so
# there is none and the automatic choice is eager on every device.
FUSED_FASTER_RULES: tuple[FusedFasterRule, ...] = ()


def fused_measured_faster(device_name: str, dtype: torch.dtype, tokens: int, hidden_size: int, rank: int) -> bool:
    """Whether ``FUSED_FASTER_RULES`` send a call with these properties to the fused kernel."""
    return any(rule.covers(device_name, dtype, tokens, hidden_size, rank) for rule in FUSED_FASTER_RULES)


def adapter_forward(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    routes: Routes,
    activation: str,
) -> torch.Tensor:
    """``hidden + act(hidden @ down_weight[i].T + down_bias[i]) @ up_weight[j].T + up_bias[j]`` over stacked passes.

    Dim 0 of ``hidden`` holds ``P = len(routes)`` equal chunks, and chunk ``p`` goes through experts
    ``(i, j) = routes[p]``; one routed pass is ``routes=[(i, j)]``. ``down_weight`` is ``[M_down, r, d]``,
    ``down_bias`` ``[M_down, r]``, ``up_weight`` ``[M_up, d, r]``, ``up_bias`` ``[M_up, d]``; experts are selected
    by index, without a copy, and gradients reach only the chosen ones. ``activation`` is ``"gelu"`` (exact
    erf), ``"gelu_tanh"`` or ``"relu"``.

    ``routes`` as Python ints is checked (``IndexError`` out of range) and becomes a device tensor made once per
    distinct routing and cached (the last 4096). As an integer ``[P, 2]`` tensor on ``hidden``'s device it reaches
    the kernel as it is, unchecked (values must lie in ``[-M, M)``), which is what a captured CUDA graph or
    ``torch.compile`` needs: a replay reads the routing the tensor holds at that time.
    """
    n_passes = _check_routes(routes, hidden, down_weight.shape[0], up_weight.shape[0])
    if not _use_triton(hidden, down_weight, down_bias, up_weight, up_bias, activation):
        if isinstance(routes, torch.Tensor) or n_passes > 1:
            downs, ups = (routes[:, 0], routes[:, 1]) if isinstance(routes, torch.Tensor) else zip(*routes, strict=True)
            return stacked_adapter_forward_eager(hidden, down_weight, down_bias, up_weight, up_bias, downs, ups, activation)
        ((down, up),) = routes
        return adapter_forward_eager(hidden, down_weight, down_bias, up_weight, up_bias, down, up, activation)
    fwd = _triton_op()
    y, _ = fwd(hidden, down_weight, down_bias, up_weight, up_bias, _routes_tensor(routes, hidden.device), activation)
    return y


def _check_routes(routes: Routes, hidden: torch.Tensor, n_down: int, n_up: int) -> int:
    """The number of passes ``routes`` holds; ``ValueError`` / ``IndexError`` where they cannot route ``hidden``."""
    if isinstance(routes, torch.Tensor):
        if routes.dim() != 2 or routes.shape[1] != 2 or routes.is_floating_point() or routes.is_complex():
            raise ValueError(f"routes must be an integer [P, 2] tensor of (down, up) experts, got {routes.dtype} {tuple(routes.shape)}")
        if routes.device != hidden.device:
            raise ValueError(f"routes are on {routes.device}, hidden on {hidden.device}: allowed the same device")
    else:
        for down, up in routes:
            for name, index, count in (("down", down, n_down), ("up", up, n_up)):
                if not -count <= index < count:
                    raise IndexError(f"{name} expert {index} is out of range for {count} experts")
    n_passes = len(routes)
    if n_passes == 0 or hidden.shape[0] % n_passes:
        raise ValueError(f"{n_passes} routes for a batch of {hidden.shape[0]} rows: allowed one (down, up) pair per equal chunk")
    return n_passes


def _routes_tensor(routes: Routes, device: torch.device) -> torch.Tensor:
    if isinstance(routes, torch.Tensor):
        return routes
    # Normalised so that equal routings share one cached tensor.
    key = tuple((int(down), int(up)) for down, up in routes)
    if torch.compiler.is_compiling():
        # Traced: the tensor is a constant of the graph, made once per compilation.
        return torch.tensor(key, dtype=torch.int64, device=device)
    return _cached_routes_tensor(key, device)


@functools.lru_cache(maxsize=4096)
def _cached_routes_tensor(routes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    # Made once per distinct routing (16 for M = 4 with up shared and two passes), so a call costs no
    # host-to-device copy; bounded for many experts and passes.
    return torch.tensor(routes, dtype=torch.int64).to(device)


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
    if reason is not None:
        return False
    if choice == "triton":
        return True
    hidden_size = hidden.shape[-1]
    return hidden.is_cuda and fused_measured_faster(
        _device_name(hidden.device), hidden.dtype, hidden.numel() // max(hidden_size, 1), hidden_size, down_weight.shape[1]
    )


# A constant of the process: torch.compile evaluates it once while tracing instead of tracing into it.
@torch.compiler.assume_constant_result
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


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


def _triton_op():
    from adamix_ds.kernels import ops

    return ops.adapter_fwd
