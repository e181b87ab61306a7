"""Expert optimizer semantics inside DeepSpeed: ``OptimizerAccess`` for an engine's optimizer.

``ExpertStepGuard`` (``adamix_ds.optim``) with ``unrouted="untouched"`` restores the experts no pass routed
to since the previous step, so AdamW neither moves nor decays them. Under DeepSpeed a parameter lives in up
to two places:

* the fp32 master copy the optimizer updates, with its per-element state (``exp_avg``, ``exp_avg_sq``):
  a slice of a flat partition under ZeRO 1/2/3 (possibly offloaded to CPU for DeepSpeedCPUAdam), a
  slice of a flat fp32 buffer for bf16/fp16 at stage 0, or the module parameter itself otherwise;
* the module's parameter the forward pass reads: the full tensor (ZeRO 0/1/2) or this rank's
  partition of it (ZeRO 3), in the training precision.

``DeepSpeedOptimizerAccess`` reads and writes both, so a restored expert is restored everywhere.
Every call is collective under ZeRO (all ranks make the same calls: routing is identical on all).
"""

from __future__ import annotations

import torch
from deepspeed import DeepSpeedEngine
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from adamix_ds.io import gathered
from adamix_ds.optim import TorchOptimizerAccess


class DeepSpeedOptimizerAccess:
    """``OptimizerAccess`` for ``engine.optimizer`` at ZeRO stage 0-3, fp32/bf16/fp16, fused or CPU Adam."""

    def __init__(self, engine: DeepSpeedEngine) -> None:
        wrapper = engine.optimizer
        self.wrapper = wrapper
        # The torch optimizer that owns the per-element state (ZeRO and fp16 wrappers keep it as .optimizer).
        self.base = getattr(wrapper, "optimizer", wrapper)
        self.plain = TorchOptimizerAccess(self.base)
        # Stage 0 with bf16/fp16 (DeepSpeed's FP16_Optimizer): module params are views of one flat
        # low-precision buffer per group, the master weights one flat fp32 buffer per group.
        self.flat: dict[int, tuple[torch.Tensor, int]] = {}
        if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups_flat"):
            for params, master in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat, strict=True):
                offset = 0
                for param in params:
                    self.flat[id(param)] = (master, offset)
                    offset += param.numel()

    @staticmethod
    def _zero(param: nn.Parameter) -> bool:
        return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")

    def _master_slice(self, param: nn.Parameter, key: str | None = None) -> torch.Tensor:
        master, offset = self.flat[id(param)]
        source = master if key is None else self.base.state[master][key]
        return source.narrow(0, offset, param.numel()).view_as(param)

    def get_param(self, param: nn.Parameter) -> torch.Tensor:
        if self._zero(param):
            return safe_get_full_fp32_param(param).clone()
        if id(param) in self.flat:
            return self._master_slice(param).clone()
        return self.plain.get_param(param)

    @torch.no_grad()
    def set_param(self, param: nn.Parameter, value: torch.Tensor) -> None:
        if self._zero(param):
            safe_set_full_fp32_param(param, value.float())
        elif id(param) in self.flat:
            self._master_slice(param).copy_(value)
        # The module's copy: the step already wrote the moved value there (ZeRO-3: into this rank's partition;
        # gathering with modifier_rank re-partitions what rank 0 writes, and every rank holds the same value).
        with gathered([param], modifier_rank=0):
            param.data.copy_(value.to(param.dtype).view_as(param.data))

    def state_keys(self, param: nn.Parameter) -> list[str]:
        if not self._zero(param) and id(param) not in self.flat:
            return self.plain.state_keys(param)
        self._link_zero_state()
        # From the optimizer's own state, not from the parameter: under ZeRO a rank may hold no fragment of
        # this parameter, yet every rank must make the same collective calls.
        keys = {
            key
            for owner, state in self.base.state.items()
            for key, value in state.items()
            if torch.is_tensor(value) and value.shape == owner.shape
        }
        return sorted(keys)

    def _link_zero_state(self) -> None:
        """Point every ZeRO-1/2 parameter at its slice of the optimizer state.

        DeepSpeed 0.19 links these views once, right after the first parameter group's first step, before
        the other groups have any state; the parameters of later groups (here: the biases) stay unlinked
        and ``safe_get_full_optimizer_state`` fails for them. Linking is cheap and idempotent, and redoing
        it also follows state tensors replaced by a checkpoint load.
        """
        groups = getattr(self.wrapper, "bit16_groups", None)
        partitions = getattr(self.wrapper, "single_partition_of_fp32_groups", None)
        if groups is None or partitions is None:
            return
        for params, partition in zip(groups, partitions, strict=True):
            if partition in self.base.state:
                lazy_init_hp_params_optimizer_state(params, partition, self.base.state)

    def get_state(self, param: nn.Parameter, key: str) -> torch.Tensor | None:
        if self._zero(param):
            self._link_zero_state()
            value = safe_get_full_optimizer_state(param, key)
            return None if value is None else value.clone()
        if id(param) in self.flat:
            return self._master_slice(param, key).clone()
        return self.plain.get_state(param, key)

    @torch.no_grad()
    def set_state(self, param: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self._zero(param):
            self._link_zero_state()
            safe_set_full_optimizer_state(param, value.float(), key)
        elif id(param) in self.flat:
            self._master_slice(param, key).copy_(value)
        else:
            self.plain.set_state(param, key, value)
