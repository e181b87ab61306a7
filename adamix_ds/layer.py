"""The AdaMix layers: a frozen base layer plus a mixture of adapters, with routing and merging.

Experts are stacked: one parameter per projection with shape ``[M, ...]``, so an expert is a view
selected by index and ZeRO partitions one tensor per projection. A shared projection has ``M = 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from adamix_ds.checkpointing import record_routes, replayed_routes
from adamix_ds.config import AdaMixConfig
from adamix_ds.kernels import adapter_forward
from adamix_ds.kernels.eager import chosen_experts
from adamix_ds.routing import Projection, Stream, choose_expert

Weights = tuple[torch.Tensor, ...]


def base_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a ``Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    raise TypeError(f"cannot adapt a {type(layer).__name__}: allowed torch.nn.Linear or transformers Conv1D")


class AdaMixLayer(nn.Module):
    """Wraps ``base_layer``; routes each training forward to one expert per projection.

    Subclasses define the stacked parameters (``expert_parameters``, ordered as ``adapt`` takes them),
    which of them each projection owns (``projection_parameters``) and the adapter math, for one pass
    (``adapt``) and for passes stacked along the batch (``adapt_stacked``).
    """

    def __init__(self, base_layer: nn.Module, config: AdaMixConfig, layer_id: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_id = layer_id
        self.seed = config.seed
        self.eval_mode = config.eval_mode
        self.eval_expert = config.eval_expert
        # A (down, up) pair for eval_mode="fixed" that overrides eval_expert (see adamix_ds.model.set_eval_mode).
        self.eval_route: tuple[int, int] | None = None
        self.num_experts = config.num_experts
        self.forward_count = 0
        self.eval_forward_count = 0
        # Routed passes stacked along the batch dimension of one call (see adamix_ds.consistency).
        self.passes = 1
        # Experts used by training passes since the last optimizer step (see adamix_ds.optim).
        self.routed: dict[Projection, set[int]] = {p: set() for p in Projection}
        # Inside a pass scope (begin_pass .. end_pass): [] until the first call routes, then that call's routes,
        # which later calls of the same pass reuse. None outside a scope: every call routes.
        self.pass_routes: list[tuple[int, int]] | None = None
        # Which stacked pass a one-row input shared by all passes is computed for (see PerPassPositionBias).
        self.shared_pass: int | None = None
        # How the experts merge (see adamix_ds.merging.set_merge): per expert parameter, in expert_parameters' order,
        # weights over dim 0 that sum to 1, or None for the paper's uniform average.
        self.merge_coefficients: tuple[torch.Tensor | None, ...] | None = None
        self._merged_cache: tuple[tuple, Weights] | None = None

    # -- parameters -------------------------------------------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        """The stacked expert tensors, in the order ``adapt`` takes them."""
        raise NotImplementedError

    def projection_parameters(self, projection: Projection) -> list[nn.Parameter]:
        """The stacked tensors owned by ``projection`` (all with the same leading expert dimension)."""
        raise NotImplementedError

    def adapt(self, x: torch.Tensor, base_out: torch.Tensor, weights: Weights, down: int, up: int) -> torch.Tensor:
        """Output of the adapted layer with experts ``down`` and ``up`` of ``weights``."""
        raise NotImplementedError

    def adapt_stacked(self, x: torch.Tensor, base_out: torch.Tensor, weights: Weights, routes: list[tuple[int, int]]) -> torch.Tensor:
        """``adapt`` over stacked passes: dim 0 of ``x`` and ``base_out`` holds ``len(routes)`` equal chunks, chunk
        ``p`` routed by ``routes[p]``."""
        raise NotImplementedError

    def experts_in(self, projection: Projection) -> int:
        """Number of experts stored for ``projection`` (1 when shared or merged)."""
        param = self.projection_parameters(projection)[0]
        # Outside its module's forward a ZeRO-3 parameter is an empty placeholder; ds_shape is its real shape.
        return getattr(param, "ds_shape", param.shape)[0]

    # -- routing ----------------------------------------------------------------------------------
    def _draw(self, stream: Stream, count: int) -> tuple[int, int]:
        return tuple(
            choose_expert(self.seed, stream, count, self.layer_id, projection, self.experts_in(projection)) for projection in Projection
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        if self.training:
            return self._routed_forward(x, base_out)
        if self.eval_mode == "merged":
            return self.adapt(x, base_out, self.merged_weights(), 0, 0)
        if self.eval_mode == "random":
            down, up = self._draw(Stream.EVAL, self.eval_forward_count)
            self.eval_forward_count += 1
            return self.adapt(x, base_out, tuple(self.expert_parameters()), down, up)
        if self.eval_mode == "fixed":
            return self.adapt(x, base_out, tuple(self.expert_parameters()), *self.fixed_route())
        weights = tuple(self.expert_parameters())
        n_down, n_up = (self.experts_in(p) for p in Projection)
        outputs = [self.adapt(x, base_out, weights, k % n_down, k % n_up) for k in range(max(n_down, n_up))]
        return torch.stack(outputs).mean(dim=0)

    def _routed_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Training forward: each of the ``passes`` batch chunks is one routed pass, drawn exactly as
        that many consecutive calls would draw; an activation-checkpoint recompute reuses its forward's routes,
        and a later call in the same pass scope reuses the pass's routes."""
        weights = tuple(self.expert_parameters())
        routes = self.pass_routes or replayed_routes(self)
        if routes is None:
            routes = [self._draw(Stream.TRAIN, self.forward_count + p) for p in range(self.passes)]
            self.forward_count += self.passes
            for down, up in routes:
                self.routed[Projection.DOWN].add(down)
                self.routed[Projection.UP].add(up)
            record_routes(self, routes)
        if self.pass_routes is not None:
            self.pass_routes = routes
        # The routes, not self.passes: a recompute runs in the backward, after stacked_passes has reset it.
        passes = len(routes)
        if passes == 1 or x.shape[0] == 1:
            # One row: an input all stacked passes share rather than one stacked with them (DeBERTa-v2
            # projects its [1, 2k, d] relative-position embeddings with the attention's own query/key
            # layers); it gets the route of the pass it is computed for.
            return self.adapt(x, base_out, weights, *routes[self.shared_pass or 0])
        if x.shape[0] % passes:
            raise ValueError(f"batch of {x.shape[0]} rows cannot hold {passes} stacked passes: allowed a multiple of {passes}")
        return self.adapt_stacked(x, base_out, weights, routes)

    def fixed_route(self) -> tuple[int, int]:
        """The ``(down, up)`` experts of ``eval_mode="fixed"``: ``eval_route`` when set, else expert
        ``eval_expert`` of each projection (the shared one where a projection has a single copy)."""
        if self.eval_route is not None:
            return self.eval_route
        return tuple(min(self.eval_expert, self.experts_in(p) - 1) for p in Projection)

    def reset_routed(self) -> None:
        """Forget which experts were used; called after each optimizer step."""
        for used in self.routed.values():
            used.clear()

    # -- merging ----------------------------------------------------------------------------------
    def merge_tensors(self, params: list[torch.Tensor]) -> Weights:
        """``params`` (the expert parameters' values) averaged over their experts, ``[1, ...]`` each: uniformly, or
        weighted by ``merge_coefficients``. Computed in fp32 on ``params``' device and returned in their dtype:
        a bf16 average would round the weights (1/3 is 0.33398 in bf16) before it rounds the result."""
        coefficients = self.merge_coefficients or (None,) * len(params)
        return tuple(_expert_average(p, c) for p, c in zip(params, coefficients, strict=True))

    def set_merge_coefficients(self, coefficients: tuple[torch.Tensor | None, ...] | None) -> None:
        """Merge with ``coefficients`` from now on (``None``: the uniform average); see ``adamix_ds.merging``."""
        self.merge_coefficients = coefficients
        self._merged_cache = None

    def merged_weights(self) -> Weights:
        """Expert averages (``[1, ...]`` each; uniform unless ``merge_coefficients`` say otherwise), cached until a
        weight or the merge changes.

        With autograd on, the average is recomputed so that gradients reach the experts.
        """
        params = self.expert_parameters()
        if torch.is_grad_enabled():
            return self.merge_tensors(params)
        key = tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in params)
        if self._merged_cache is None or self._merged_cache[0] != key:
            self._merged_cache = (key, self.merge_tensors([p.detach() for p in params]))
        return self._merged_cache[1]

    @torch.no_grad()
    def merge_(self) -> None:
        """Collapse every projection to its expert average (``merged_weights``), in place: one ordinary adapter remains."""
        names = {id(param): name for name, param in self.named_parameters(recurse=False)}
        params = self.expert_parameters()
        for param, merged in zip(params, self.merge_tensors([p.detach() for p in params]), strict=True):
            setattr(self, names[id(param)], nn.Parameter(merged.clone(), requires_grad=param.requires_grad))
        self.num_experts = 1
        self.merge_coefficients = None
        self._merged_cache = None

    def train(self, mode: bool = True) -> AdaMixLayer:
        # Weights only change while training or on load; dropping the cache here keeps evals fresh even
        # when an optimizer rewrites storage without bumping tensor versions (e.g. ZeRO's flat buffers).
        self._merged_cache = None
        return super().train(mode)

    # -- state ------------------------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        # A tensor (not a dict) so that safetensors and DeepSpeed checkpoints carry the routing stream.
        return torch.tensor([self.forward_count, self.eval_forward_count], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.forward_count, self.eval_forward_count = (int(v) for v in state.tolist())
        self._merged_cache = None

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, num_experts={self.num_experts}, eval_mode={self.eval_mode!r}"


class AdaMixBottleneck(AdaMixLayer):
    """Bottleneck adapter mixture on a layer's output: ``h + up_j(act(down_i(h)))`` with ``h = base(x)``."""

    def __init__(self, base_layer: nn.Module, config: AdaMixConfig, layer_id: int) -> None:
        super().__init__(base_layer, config, layer_id)
        _, hidden = base_features(base_layer)
        rank = config.bottleneck_dim
        if rank > hidden:
            raise ValueError(f"bottleneck_dim={rank} is larger than the hidden size {hidden} of the adapted layer: allowed 1..{hidden}")
        n_down = 1 if config.share_down else config.num_experts
        n_up = 1 if config.share_up else config.num_experts
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.activation = config.activation
        self.down_weight = nn.Parameter(_normal_experts(n_down, (rank, hidden), config.expert_init, factory))
        self.down_bias = nn.Parameter(torch.zeros(n_down, rank, **factory))
        self.up_weight = nn.Parameter(_normal_experts(n_up, (hidden, rank), config.expert_init, factory))
        self.up_bias = nn.Parameter(torch.zeros(n_up, hidden, **factory))

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.down_weight, self.down_bias, self.up_weight, self.up_bias]

    def projection_parameters(self, projection: Projection) -> list[nn.Parameter]:
        if projection is Projection.DOWN:
            return [self.down_weight, self.down_bias]
        return [self.up_weight, self.up_bias]

    def adapt(self, x: torch.Tensor, base_out: torch.Tensor, weights: Weights, down: int, up: int) -> torch.Tensor:
        return adapter_forward(base_out, *weights, [(down, up)], self.activation)

    def adapt_stacked(self, x: torch.Tensor, base_out: torch.Tensor, weights: Weights, routes: list[tuple[int, int]]) -> torch.Tensor:
        return adapter_forward(base_out, *weights, routes, self.activation)


class AdaMixLoRA(AdaMixLayer):
    """LoRA mixture: ``base(x) + B_j A_i dropout(x) * alpha / r`` on some or all output features.

    ``out_slices`` lists ``(start, length)`` output ranges that are adapted (GPT-2's fused ``c_attn``:
    query and value only). Each range has its own rank-``r`` block of ``A`` and its own rows of ``B``;
    one routing choice covers all ranges, as in the reference code's merged LoRA layer.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        config: AdaMixConfig,
        layer_id: int,
        out_slices: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(base_layer, config, layer_id)
        in_features, out_features = base_features(base_layer)
        self.out_slices = list(out_slices) if out_slices is not None else [(0, out_features)]
        rank = config.bottleneck_dim
        if rank > min(in_features, out_features):
            raise ValueError(
                f"bottleneck_dim={rank} is larger than the adapted layer ({in_features} -> {out_features}): allowed 1..{min(in_features, out_features)}"
            )
        n_a = 1 if config.share_down else config.num_experts
        n_b = 1 if config.share_up else config.num_experts
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.rank = rank
        self.scaling = config.lora_scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        self.lora_A = nn.Parameter(_kaiming_experts(n_a, (rank * len(self.out_slices), in_features), config.expert_init, factory))
        self.lora_B = nn.Parameter(torch.zeros(n_b, sum(length for _, length in self.out_slices), rank, **factory))

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def projection_parameters(self, projection: Projection) -> list[nn.Parameter]:
        return [self.lora_A] if projection is Projection.DOWN else [self.lora_B]

    def _slice_blocks(self, lora_b: torch.Tensor):
        """Yield ``(start, length, rank block of A, rows of B)`` per adapted output range (``B``'s rows on dim -2)."""
        row = 0
        for index, (start, length) in enumerate(self.out_slices):
            yield start, length, slice(index * self.rank, (index + 1) * self.rank), lora_b[..., row : row + length, :]
            row += length

    def _add_to_slices(self, base_out: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        """``base_out`` with ``deltas[k]`` added to output range ``out_slices[k]``."""
        if self.out_slices == [(0, base_out.shape[-1])]:
            return base_out + deltas[0]
        pieces, cursor = [], 0
        for (start, length), delta in zip(self.out_slices, deltas, strict=True):
            pieces += [base_out[..., cursor:start], base_out[..., start : start + length] + delta]
            cursor = start + length
        pieces.append(base_out[..., cursor:])
        return torch.cat(pieces, dim=-1)

    def adapt(self, x: torch.Tensor, base_out: torch.Tensor, weights: Weights, down: int, up: int) -> torch.Tensor:
        lora_a, lora_b = weights
        low_rank = F.linear(self.lora_dropout(x), lora_a[down]) * self.scaling
        return self._add_to_slices(base_out, [F.linear(low_rank[..., block], rows) for _, _, block, rows in self._slice_blocks(lora_b[up])])

    def adapt_stacked(self, x: torch.Tensor, base_out: torch.Tensor, weights: Weights, routes: list[tuple[int, int]]) -> torch.Tensor:
        # As stacked_adapter_forward_eager: one batched matmul per factor over the chosen experts, stacked.
        lora_a, lora_b = weights
        downs, ups = zip(*routes, strict=True)
        chunks = self.lora_dropout(x).reshape(len(routes), -1, x.shape[-1])
        low_rank = torch.bmm(chunks, chosen_experts(lora_a, downs).transpose(1, 2)) * self.scaling
        up_rows = chosen_experts(lora_b, ups)
        deltas = [
            torch.bmm(low_rank[..., block], rows.transpose(1, 2)).reshape(*base_out.shape[:-1], length)
            for _, length, block, rows in self._slice_blocks(up_rows)
        ]
        return self._add_to_slices(base_out, deltas)

    def delta_weight(self) -> torch.Tensor:
        """The merged update ``scaling * B A`` in ``nn.Linear`` layout ``[out, in]``."""
        lora_a, lora_b = (p[0] for p in self.merge_tensors([p.detach() for p in self.expert_parameters()]))
        in_features, out_features = base_features(self.base_layer)
        delta = lora_a.new_zeros(out_features, in_features)
        for start, length, block, rows in self._slice_blocks(lora_b):
            delta[start : start + length] = rows @ lora_a[block] * self.scaling
        return delta

    @torch.no_grad()
    def folded_base_layer(self) -> nn.Module:
        """The base layer with the merged delta added to its weight: zero inference overhead."""
        delta = self.delta_weight()
        weight = self.base_layer.weight
        weight.add_((delta.T if isinstance(self.base_layer, Conv1D) else delta).to(weight.dtype))
        return self.base_layer


def _expert_average(values: torch.Tensor, coefficients: torch.Tensor | None) -> torch.Tensor:
    """``values`` (``[M, ...]``) averaged over dim 0 in fp32, uniformly or weighted by ``coefficients``."""
    full = values.float()
    if coefficients is None:
        merged = full.mean(dim=0, keepdim=True)
    else:
        merged = (full * coefficients.to(device=values.device, dtype=torch.float32)).sum(dim=0, keepdim=True)
    return merged.to(values.dtype)


def _normal_experts(num: int, shape: tuple[int, ...], init: str, factory: dict) -> torch.Tensor:
    """N(0, 0.02) weights, drawn per expert or once and copied (``expert_init``)."""
    draws = 1 if init == "shared" else num
    return torch.empty(draws, *shape, **factory).normal_(0.0, 0.02).expand(num, *shape).clone()


def _kaiming_experts(num: int, shape: tuple[int, ...], init: str, factory: dict) -> torch.Tensor:
    """``nn.Linear``'s kaiming-uniform init, drawn per expert or once and copied (``expert_init``)."""
    draws = torch.empty(1 if init == "shared" else num, *shape, **factory)
    for expert in draws:
        nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
    return draws.expand(num, *shape).clone()


def _adamix_children(module: nn.Module) -> list[AdaMixLayer]:
    return [child for child in module.children() if isinstance(child, AdaMixLayer)]


def begin_pass(module: nn.Module, *args: object) -> None:
    """Forward pre-hook: from here to ``end_pass`` each AdaMix child of ``module`` routes once, on its first call."""
    for layer in _adamix_children(module):
        layer.pass_routes = []


def end_pass(module: nn.Module, *args: object) -> None:
    """Forward hook (``always_call``): close the scope ``begin_pass`` opened."""
    for layer in _adamix_children(module):
        layer.pass_routes = None


class PerPassPositionBias:
    """DeBERTa-v2's ``disentangled_attention_bias`` computed per stacked pass, so that the relative-position
    projections (by the attention's own AdaMix ``query_proj``/``key_proj``, ``share_att_key``) use each pass's
    experts. The embeddings are one row shared by the whole batch, so one call could carry only one route."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention

    def __call__(
        self,
        query_layer: torch.Tensor,
        key_layer: torch.Tensor,
        relative_pos: torch.Tensor | None,
        rel_embeddings: torch.Tensor,
        scale_factor: int,
    ) -> torch.Tensor:
        """``disentangled_attention_bias``'s arguments and result (transformers' DeBERTa-v2)."""
        attention = self.attention
        bias = type(attention).disentangled_attention_bias
        layers = [m for m in (attention.query_proj, attention.key_proj) if isinstance(m, AdaMixLayer)]
        passes = max((len(layer.pass_routes or ()) for layer in layers), default=0)
        if passes <= 1:
            return bias(attention, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
        batch_positions = relative_pos is not None and relative_pos.dim() >= 3 and relative_pos.shape[0] > 1
        positions = relative_pos.chunk(passes) if batch_positions else [relative_pos] * passes
        scores = []
        try:
            for index, (query, key) in enumerate(zip(query_layer.chunk(passes), key_layer.chunk(passes), strict=True)):
                for layer in layers:
                    layer.shared_pass = index
                scores.append(bias(attention, query, key, positions[index], rel_embeddings, scale_factor))
        finally:
            for layer in layers:
                layer.shared_pass = None
        return torch.cat(scores)
