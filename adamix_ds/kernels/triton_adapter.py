"""Fused Triton kernels for the routed bottleneck adapter.

``h`` is ``[N, d]`` and holds ``P`` equal chunks of rows (stacked passes; ``P = 1`` for one routed pass);
chunk ``p`` goes through down expert ``i = routes[p, 0]`` and up expert ``j = routes[p, 1]``. Forward, one
launch, one program per (block of tokens, pass):
``pre = h @ Wd[i]^T + bd[i]`` (kept in fp32), ``y = h + act(pre) @ Wu[j]^T + bu[j]``.

The experts are read inside the kernels from ``routes``, an integer tensor on the device, and selected by
offsetting the stacked weight pointers, so no expert is ever copied, the merged single adapter is the same
call with one expert, and a captured CUDA graph replays with whatever routing is in ``routes`` at replay.

Backward saves, rather than recomputes, the fp32 bottleneck pre-activation ``pre`` (``[N, r]``).
Saving costs ``4·N·r`` bytes written in the forward and read in the backward; recomputing it would
re-read ``h`` (``N·d`` elements) in the backward's first kernel, which otherwise reads only ``dy``.
For 16-bit activations with ``r <= 64`` and ``d >= 768`` that re-read is at least 3x the saved
traffic (24x at ``r = 8``); the saved tensor holds no more memory than the two ``[N, r]`` tensors
eager autograd keeps for the same layer; and the backward differentiates exactly the forward's
pre-activation. The backward is three launches, whatever ``P`` and the number of experts:

1. per (block of tokens, pass): ``dz = (dy @ Wu[j]) * act'(pre)`` (``[N, r]``, fp32). Every element of
   ``dh`` needs a complete row of ``dz``, which needs a complete row of ``dy``, so this is its own pass.
2. per (hidden-column block, token split, pass): ``dh = dy + dz @ Wd[i]`` and this split's partial sums of
   ``dWd[i] = dz^T h``, ``dWu[j] = dy^T act(pre)``, ``dbu[j]`` and ``dbd[i]``.
3. per (hidden-column block, expert): every expert's slice of the four gradient tensors, the sum of the
   partials of the passes routed to it (in a fixed order, so the gradients are deterministic: no
   atomics), zero for an expert no pass chose. The gradient tensors are written whole here, so they
   need no zero fill.

All products accumulate in fp32; fp32 operands use IEEE dots, so the result does not silently drop
to TF32 on GPUs that have it. Every load and store is masked, so any token count and hidden size
works; the rank is padded to a power of two of at least 16 (``tl.dot``'s minimum) and masked.
Negative expert indices count from the end, as tensor indexing does; indices must lie in ``[-M, M)``.

The kernels call Triton builtins and this module's own ``triton.jit`` helpers, not the ``triton.jit``
functions of Triton's standard library (``tl.zeros``, ``tl.sum``, ``tl.cdiv``, ...): the interpreter
(``TRITON_INTERPRET=1``) can only run those if it was set before Triton itself was first imported
(in the test suite other modules import Triton first), whereas for these kernels it suffices to set it
before importing this module. Sums are ``tl.reduce`` with ``tl.sum``'s own combine function, which
the interpreter recognises and never calls.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

# tl.sum's combine function: the interpreter recognises it and reduces with numpy, where any other
# combine function is called element by element in Python.
from triton.language.standard import _sum_combine

ACTIVATION_IDS = {"gelu": 0, "gelu_tanh": 1, "relu": 2}

# Triton kernels may only read module globals that are constexpr. In kernels they stand right of
# tensors: the interpreter's constexpr * tensor wraps the tensor in a constexpr instead of multiplying.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tanh(x):
    # tl.math has no portable tanh (it lives in the CUDA-only libdevice). This form saturates
    # correctly: exp overflowing to inf gives 1, underflowing to 0 gives -1.
    return 1.0 - 2.0 / (tl.math.exp(2.0 * x) + 1.0)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT_2))
    elif ACTIVATION == 1:
        return 0.5 * x * (1.0 + _tanh((x + x * x * x * _TANH_CUBIC) * _SQRT_2_OVER_PI))
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return cdf + x * pdf
    elif ACTIVATION == 1:
        t = _tanh((x + x * x * x * _TANH_CUBIC) * _SQRT_2_OVER_PI)
        dt = (1.0 - t * t) * (1.0 + x * x * (3.0 * _TANH_CUBIC)) * _SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * x * dt
    else:
        return tl.where(x > 0.0, 1.0, 0.0)


@triton.jit
def _expert(routes_ptr, pass_id, projection, n_experts):
    # routes is [P, 2] (down, up); (index + M) % M maps [-M, M) onto [0, M) as tensor indexing does.
    return (tl.load(routes_ptr + pass_id * 2 + projection).to(tl.int64) + n_experts) % n_experts


@triton.jit
def _adapter_fwd_kernel(
    h_ptr,
    wd_ptr,
    bd_ptr,
    wu_ptr,
    bu_ptr,
    y_ptr,
    pre_ptr,
    routes_ptr,
    rows_per_pass,
    hidden_size,
    rank,
    n_down,
    n_up,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Expert selection is a pointer offset into the stacked [M, r, d] / [M, d, r] weights.
    pass_id = tl.program_id(1)
    down_index = _expert(routes_ptr, pass_id, 0, n_down)
    up_index = _expert(routes_ptr, pass_id, 1, n_up)
    expert_size = rank * hidden_size
    wd_ptr += down_index * expert_size
    bd_ptr += down_index * rank
    wu_ptr += up_index * expert_size
    bu_ptr += up_index * hidden_size

    local_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local_rows < rows_per_pass
    # int64 rows: N * d may exceed 2**31 for long sequences.
    rows = pass_id.to(tl.int64) * rows_per_pass + local_rows
    row_offsets = rows[:, None] * hidden_size
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank

    pre = tl.full([BLOCK_N, BLOCK_R], 0.0, tl.float32)
    for d0 in range(0, hidden_size, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < hidden_size
        h = tl.load(h_ptr + row_offsets + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        wd_t = tl.load(wd_ptr + ranks[None, :] * hidden_size + cols[:, None], mask=rank_mask[None, :] & col_mask[:, None], other=0.0)
        pre = tl.dot(h, wd_t, pre, input_precision=DOT_PRECISION)
    pre += tl.load(bd_ptr + ranks, mask=rank_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(pre_ptr + rows[:, None] * rank + ranks[None, :], pre, mask=row_mask[:, None] & rank_mask[None, :])
    # Padded rank columns hold act(0) = 0 and meet zero-masked weights, so they add nothing.
    act = _activation(pre, ACTIVATION).to(h_ptr.dtype.element_ty)

    # Second sweep over h for the residual: this block's rows were just read and are still in L2.
    for d0 in range(0, hidden_size, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < hidden_size
        tile_mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(h_ptr + row_offsets + cols[None, :], mask=tile_mask, other=0.0)
        wu_t = tl.load(wu_ptr + cols[None, :] * rank + ranks[:, None], mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        bu = tl.load(bu_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = tl.dot(act, wu_t, input_precision=DOT_PRECISION) + h.to(tl.float32) + bu[None, :]
        tl.store(y_ptr + row_offsets + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _adapter_bwd_dz_kernel(
    dy_ptr,
    pre_ptr,
    wu_ptr,
    dz_ptr,
    routes_ptr,
    rows_per_pass,
    hidden_size,
    rank,
    n_up,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pass_id = tl.program_id(1)
    wu_ptr += _expert(routes_ptr, pass_id, 1, n_up) * rank * hidden_size

    local_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local_rows < rows_per_pass
    rows = pass_id.to(tl.int64) * rows_per_pass + local_rows
    row_offsets = rows[:, None] * hidden_size
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank

    grad_act = tl.full([BLOCK_N, BLOCK_R], 0.0, tl.float32)
    for d0 in range(0, hidden_size, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < hidden_size
        dy = tl.load(dy_ptr + row_offsets + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        wu = tl.load(wu_ptr + cols[:, None] * rank + ranks[None, :], mask=col_mask[:, None] & rank_mask[None, :], other=0.0)
        grad_act = tl.dot(dy, wu, grad_act, input_precision=DOT_PRECISION)

    small_offsets = rows[:, None] * rank + ranks[None, :]
    small_mask = row_mask[:, None] & rank_mask[None, :]
    pre = tl.load(pre_ptr + small_offsets, mask=small_mask, other=0.0)
    tl.store(dz_ptr + small_offsets, grad_act * _activation_grad(pre, ACTIVATION), mask=small_mask)


@triton.jit
def _adapter_bwd_main_kernel(
    dy_ptr,
    h_ptr,
    pre_ptr,
    dz_ptr,
    wd_ptr,
    dh_ptr,
    dwd_part_ptr,
    dbd_part_ptr,
    dwu_part_ptr,
    dbu_part_ptr,
    routes_ptr,
    rows_per_pass,
    hidden_size,
    rank,
    n_down,
    n_splits,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Axis 0 (column block) varies fastest in launch order, so the programs running together share a
    # token split and the r-wide dz / pre tiles they all re-read are served from L2.
    col_block = tl.program_id(0)
    split = tl.program_id(1)
    pass_id = tl.program_id(2)
    wd_ptr += _expert(routes_ptr, pass_id, 0, n_down) * rank * hidden_size
    first_row = pass_id.to(tl.int64) * rows_per_pass

    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < hidden_size
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank
    wd = tl.load(wd_ptr + ranks[:, None] * hidden_size + cols[None, :], mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
    compute_dtype = h_ptr.dtype.element_ty

    dwd = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    dwu = tl.full([BLOCK_D, BLOCK_R], 0.0, tl.float32)
    dbu = tl.full([BLOCK_D], 0.0, tl.float32)
    dbd = tl.full([BLOCK_R], 0.0, tl.float32)
    for block in range(split, (rows_per_pass + BLOCK_N - 1) // BLOCK_N, n_splits):
        local_rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = local_rows < rows_per_pass
        rows = first_row + local_rows
        tile_offsets = rows[:, None] * hidden_size + cols[None, :]
        tile_mask = row_mask[:, None] & col_mask[None, :]
        small_offsets = rows[:, None] * rank + ranks[None, :]
        small_mask = row_mask[:, None] & rank_mask[None, :]

        dy = tl.load(dy_ptr + tile_offsets, mask=tile_mask, other=0.0)
        h = tl.load(h_ptr + tile_offsets, mask=tile_mask, other=0.0)
        dz = tl.load(dz_ptr + small_offsets, mask=small_mask, other=0.0)
        act = _activation(tl.load(pre_ptr + small_offsets, mask=small_mask, other=0.0), ACTIVATION)
        # Products run in the input dtype (tensor cores for 16-bit inputs), as eager autograd does.
        dz_c = dz.to(compute_dtype)

        dh = dy.to(tl.float32) + tl.dot(dz_c, wd, input_precision=DOT_PRECISION)
        tl.store(dh_ptr + tile_offsets, dh.to(dh_ptr.dtype.element_ty), mask=tile_mask)
        dwd = tl.dot(tl.trans(dz_c), h, dwd, input_precision=DOT_PRECISION)
        dwu = tl.dot(tl.trans(dy), act.to(compute_dtype), dwu, input_precision=DOT_PRECISION)
        dbu += tl.reduce(dy.to(tl.float32), 0, _sum_combine)
        dbd += tl.reduce(dz, 0, _sum_combine)

    # Partials are indexed [pass, split]; the buffers are small (P · splits · r · d), so int32 offsets.
    part = pass_id * n_splits + split
    part_offsets = part * rank * hidden_size
    tl.store(
        dwd_part_ptr + part_offsets + ranks[:, None] * hidden_size + cols[None, :],
        dwd,
        mask=rank_mask[:, None] & col_mask[None, :],
    )
    tl.store(
        dwu_part_ptr + part_offsets + cols[:, None] * rank + ranks[None, :],
        dwu,
        mask=col_mask[:, None] & rank_mask[None, :],
    )
    tl.store(dbu_part_ptr + part * hidden_size + cols, dbu, mask=col_mask)
    # Every column block computed the same dbd; the first one writes it.
    if col_block == 0:
        tl.store(dbd_part_ptr + part * rank + ranks, dbd, mask=rank_mask)


@triton.jit
def _adapter_bwd_reduce_kernel(
    routes_ptr,
    dwd_part_ptr,
    dbd_part_ptr,
    dwu_part_ptr,
    dbu_part_ptr,
    dwd_ptr,
    dbd_ptr,
    dwu_ptr,
    dbu_ptr,
    n_passes,
    n_splits,
    hidden_size,
    rank,
    n_down,
    n_up,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program per (column block, expert) writes that expert's slice of all four gradients: the partials
    # of the passes routed to it, summed pass by pass and split by split, or zeros.
    col_block = tl.program_id(0)
    expert = tl.program_id(1)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < hidden_size
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < rank
    expert_size = rank * hidden_size
    down_offsets = ranks[:, None] * hidden_size + cols[None, :]
    down_mask = rank_mask[:, None] & col_mask[None, :]
    up_offsets = cols[:, None] * rank + ranks[None, :]
    up_mask = col_mask[:, None] & rank_mask[None, :]

    if expert < n_down:
        dwd = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
        dbd = tl.full([BLOCK_R], 0.0, tl.float32)
        for pass_id in range(0, n_passes):
            if _expert(routes_ptr, pass_id, 0, n_down) == expert:
                for split in range(0, n_splits):
                    part = pass_id * n_splits + split
                    dwd += tl.load(dwd_part_ptr + part * expert_size + down_offsets, mask=down_mask, other=0.0)
                    dbd += tl.load(dbd_part_ptr + part * rank + ranks, mask=rank_mask, other=0.0)
        tl.store(dwd_ptr + expert * expert_size + down_offsets, dwd.to(dwd_ptr.dtype.element_ty), mask=down_mask)
        if col_block == 0:
            tl.store(dbd_ptr + expert * rank + ranks, dbd.to(dbd_ptr.dtype.element_ty), mask=rank_mask)
    if expert < n_up:
        dwu = tl.full([BLOCK_D, BLOCK_R], 0.0, tl.float32)
        dbu = tl.full([BLOCK_D], 0.0, tl.float32)
        for pass_id in range(0, n_passes):
            if _expert(routes_ptr, pass_id, 1, n_up) == expert:
                for split in range(0, n_splits):
                    part = pass_id * n_splits + split
                    dwu += tl.load(dwu_part_ptr + part * expert_size + up_offsets, mask=up_mask, other=0.0)
                    dbu += tl.load(dbu_part_ptr + part * hidden_size + cols, mask=col_mask, other=0.0)
        tl.store(dwu_ptr + expert * expert_size + up_offsets, dwu.to(dwu_ptr.dtype.element_ty), mask=up_mask)
        tl.store(dbu_ptr + expert * hidden_size + cols, dbu.to(dbu_ptr.dtype.element_ty), mask=col_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # input_precision only affects fp32 operands; "ieee" keeps them out of TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _default_splits(n_token_blocks: int, n_other_programs: int, device: torch.device) -> int:
    """Token splits for the backward's partial sums: enough programs to fill the device a few times over.

    More splits mean more parallelism but a bigger ``[P, splits, r, d]`` partial-sum buffer to write and
    reduce, so the target is a small multiple of the SM count.
    """
    if device.type == "cuda":
        target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target_programs = 4
    return max(1, min(n_token_blocks, math.ceil(target_programs / n_other_programs)))


def adapter_forward_triton(
    hidden: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    routes: torch.Tensor,
    activation: str,
    block_n: int = 64,
    block_d: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward, one launch, on a ``[N, d]`` contiguous ``hidden`` of ``P`` equal chunks and the contiguous
    ``[P, 2]`` integer ``routes`` on its device; returns ``(y [N, d], pre [N, r] fp32)``."""
    n_tokens, hidden_size = hidden.shape
    n_passes = routes.shape[0]
    if n_passes == 0 or n_tokens % n_passes:
        raise ValueError(f"{n_passes} routes for {n_tokens} rows: allowed one (down, up) pair per equal chunk")
    rank = down_weight.shape[1]
    y = torch.empty_like(hidden)
    pre = torch.empty(n_tokens, rank, dtype=torch.float32, device=hidden.device)
    rows_per_pass = n_tokens // n_passes
    if rows_per_pass == 0:
        return y, pre
    grid = (triton.cdiv(rows_per_pass, block_n), n_passes)
    with _launch_device(hidden.device):
        _adapter_fwd_kernel[grid](
            hidden,
            down_weight,
            down_bias,
            up_weight,
            up_bias,
            y,
            pre,
            routes,
            rows_per_pass,
            hidden_size,
            rank,
            down_weight.shape[0],
            up_weight.shape[0],
            ACTIVATION=ACTIVATION_IDS[activation],
            DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            BLOCK_R=_block_rank(rank),
        )
    return y, pre


def adapter_backward_triton(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    pre: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    routes: torch.Tensor,
    activation: str,
    block_n: int = 64,
    block_d: int = 64,
    n_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward, three launches, on ``[N, d]`` contiguous ``grad_out`` / ``hidden``, the saved ``pre`` and
    the forward's ``routes``.

    Returns ``(dh, dWd, dbd, dWu, dbu)``; the weight and bias gradients have the stacked shapes, each chosen
    expert's slice the sum over the passes routed to it, and are zero outside the chosen experts.
    """
    n_tokens, hidden_size = hidden.shape
    n_passes = routes.shape[0]
    rank = down_weight.shape[1]
    n_down, n_up = down_weight.shape[0], up_weight.shape[0]
    device = hidden.device
    rows_per_pass = n_tokens // n_passes
    # Every element of these is written by the reduction kernel, so they are allocated, not zero-filled.
    grad_hidden = torch.empty_like(hidden)
    grad_down_weight = torch.empty_like(down_weight)
    grad_down_bias = down_weight.new_empty(down_weight.shape[:2])
    grad_up_weight = torch.empty_like(up_weight)
    grad_up_bias = up_weight.new_empty(up_weight.shape[:2])

    n_token_blocks = triton.cdiv(rows_per_pass, block_n)
    n_col_blocks = triton.cdiv(hidden_size, block_d)
    block_r = _block_rank(rank)
    if n_token_blocks == 0:
        n_splits = 0  # no partials: the reduction writes zero gradients
    elif n_splits is None:
        n_splits = _default_splits(n_token_blocks, n_col_blocks * n_passes, device)
    constants = dict(
        ACTIVATION=ACTIVATION_IDS[activation],
        DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_R=block_r,
    )
    dz = torch.empty(n_tokens, rank, dtype=torch.float32, device=device)
    # At least one split's room even with none, so the reduction never gets a null pointer (it reads none).
    slots = max(n_splits, 1)
    dwd_part = torch.empty(n_passes, slots, rank, hidden_size, dtype=torch.float32, device=device)
    dbd_part = torch.empty(n_passes, slots, rank, dtype=torch.float32, device=device)
    dwu_part = torch.empty(n_passes, slots, hidden_size, rank, dtype=torch.float32, device=device)
    dbu_part = torch.empty(n_passes, slots, hidden_size, dtype=torch.float32, device=device)
    with _launch_device(device):
        if n_token_blocks:
            _adapter_bwd_dz_kernel[(n_token_blocks, n_passes)](
                grad_out, pre, up_weight, dz, routes, rows_per_pass, hidden_size, rank, n_up, **constants
            )
            _adapter_bwd_main_kernel[(n_col_blocks, n_splits, n_passes)](
                grad_out,
                hidden,
                pre,
                dz,
                down_weight,
                grad_hidden,
                dwd_part,
                dbd_part,
                dwu_part,
                dbu_part,
                routes,
                rows_per_pass,
                hidden_size,
                rank,
                n_down,
                n_splits,
                **constants,
            )
        _adapter_bwd_reduce_kernel[(n_col_blocks, max(n_down, n_up))](
            routes,
            dwd_part,
            dbd_part,
            dwu_part,
            dbu_part,
            grad_down_weight,
            grad_down_bias,
            grad_up_weight,
            grad_up_bias,
            n_passes,
            n_splits,
            hidden_size,
            rank,
            n_down,
            n_up,
            BLOCK_D=block_d,
            BLOCK_R=block_r,
        )
    return grad_hidden, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias
