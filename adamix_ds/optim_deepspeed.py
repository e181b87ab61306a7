"""Expert optimizer semantics inside DeepSpeed: ``OptimizerAccess`` for an engine's optimizer.

``ExpertStepGuard`` (``adamix_ds.optim``) with ``unrouted="untouched"`` restores the experts no pass routed
to since the previous step, so AdamW neither moves nor decays them. Under DeepSpeed a rank keeps a parameter's
values in up to three places, whole or as its partition:

* the weights the forward reads: the whole tensor (ZeRO 0/1/2) or this rank's partition of it (``ds_tensor``,
  ZeRO 3), in the training precision;
* the fp32 master copy the optimizer updates: this rank's fragment of a flat partition (ZeRO 1/2, and bf16 at
  stage 0), its partition of the parameter (ZeRO 3; possibly offloaded to CPU for DeepSpeedCPUAdam), a slice of a
  flat fp32 buffer (fp16 at stage 0), or the weights themselves (fp32 at stage 0);
* the per-element optimizer state (``exp_avg``, ``exp_avg_sq``), laid out like the master copy.

``DeepSpeedOptimizerAccess.local_copies`` gives each as a flat tensor with its offset in the parameter: routing is
the same on every rank, so each rank restores the same experts in what it keeps, and no rank communicates.
``get_param``/``get_state`` read whole values (collective under ZeRO), to inspect what a step did.
"""

from __future__ import annotations

import torch
from deepspeed import DeepSpeedEngine
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

from adamix_ds.optim import MASTER, WEIGHTS, LocalCopies, TorchOptimizerAccess


class DeepSpeedOptimizerAccess:
    """``OptimizerAccess`` for ``engine.optimizer`` at ZeRO stage 0-3, fp32/bf16/fp16, fused or CPU Adam."""

    def __init__(self, engine: DeepSpeedEngine) -> None:
        wrapper = engine.optimizer
        self.wrapper = wrapper
        # The torch optimizer that owns the per-element state (ZeRO and fp16 wrappers keep it as .optimizer).
        self.base = getattr(wrapper, "optimizer", wrapper)
        self.plain = TorchOptimizerAccess(self.base)
        # Stage 0 with fp16 (DeepSpeed's FP16_Optimizer): module params are views of one flat low-precision buffer
        # per group, the master weights one flat fp32 buffer per group.
        self.flat: dict[int, tuple[torch.Tensor, int]] = {}
        if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups_flat"):
            for params, master in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat, strict=True):
                offset = 0
                for param in params:
                    self.flat[id(param)] = (master, offset)
                    offset += param.numel()

    def _state_keys(self) -> list[str]:
        """The optimizer's per-element state keys (none before its first step)."""
        return sorted(
            {
                key
                for owner, state in self.base.state.items()
                for key, value in state.items()
                if torch.is_tensor(value) and value.shape == owner.shape
            }
        )

    def _master_slice(self, param: nn.Parameter, key: str | None = None) -> torch.Tensor:
        master, offset = self.flat[id(param)]
        source = master if key is None else self.base.state[master][key]
        return source.narrow(0, offset, param.numel())

    def local_copies(self, param: nn.Parameter) -> LocalCopies:
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of each
            offset = param.ds_tensor.numel() * self.wrapper._get_param_partition_rank(param)
            copies = {WEIGHTS: (param.ds_tensor.data.view(-1), offset), MASTER: (safe_get_local_fp32_param(param).view(-1), offset)}
            for key in self._state_keys():
                copies[key] = (safe_get_local_optimizer_state(param, key).view(-1), offset)
            return copies
        copies = {WEIGHTS: (param.data.view(-1), 0)}
        if hasattr(param, "_hp_mapping"):  # ZeRO 1/2, bf16 at stage 0: this rank's fragment of the master, if any
            self._link_zero_state()
            fragment = param._hp_mapping
            if fragment is not None:
                offset = fragment.lp_fragment_address.start
                copies[MASTER] = (fragment.hp_fragment.data.view(-1), offset)
                for key in fragment.optim_fragment or {}:
                    copies[key] = (fragment.get_optim_state_fragment(key).data.view(-1), offset)
            return copies
        if id(param) in self.flat:
            master, _ = self.flat[id(param)]
            keys = [key for key, value in self.base.state.get(master, {}).items() if torch.is_tensor(value) and value.shape == master.shape]
            return {**copies, MASTER: (self._master_slice(param), 0), **{key: (self._master_slice(param, key), 0) for key in keys}}
        return self.plain.local_copies(param)

    @torch.no_grad()
    def write_local(self, param: nn.Parameter, kind: str, values: torch.Tensor) -> None:
        # ZeRO-3's local reads copy to the device when the partition is offloaded: write those back. Every other
        # copy is a view of what the rank keeps, already written.
        if not hasattr(param, "ds_id") or kind == WEIGHTS:
            return
        if kind == MASTER:
            safe_set_local_fp32_param(param, values)
        else:
            safe_set_local_optimizer_state(param, values, kind)

    def _link_zero_state(self) -> None:
        """Point every ZeRO-1/2 parameter at its slice of the optimizer state.

        DeepSpeed 0.19 links these views once, right after the first parameter group's first step, before
        the other groups have any state; the parameters of later groups (here: the biases) stay unlinked.
        Linking is cheap and idempotent, and redoing it also follows state tensors replaced by a checkpoint load.
        """
        groups = getattr(self.wrapper, "bit16_groups", None)
        partitions = getattr(self.wrapper, "single_partition_of_fp32_groups", None)
        if groups is None or partitions is None:
            return
        for params, partition in zip(groups, partitions, strict=True):
            if partition in self.base.state:
                lazy_init_hp_params_optimizer_state(params, partition, self.base.state)

    # -- whole values, for inspection (collective under ZeRO) ----------------------------------------------
    @staticmethod
    def _zero(param: nn.Parameter) -> bool:
        return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")

    def get_param(self, param: nn.Parameter) -> torch.Tensor:
        """The whole fp32 master value of ``param`` (the weights where there is no master copy)."""
        if self._zero(param):
            return safe_get_full_fp32_param(param).clone()
        if id(param) in self.flat:
            return self._master_slice(param).view_as(param).clone()
        return param.detach().clone()

    def state_keys(self, param: nn.Parameter) -> list[str]:
        """The per-element optimizer state keys of ``param`` (the same on every rank)."""
        if not self._zero(param) and id(param) not in self.flat:
            return [key for key in self.plain.local_copies(param) if key != WEIGHTS]
        self._link_zero_state()
        return self._state_keys()

    def get_state(self, param: nn.Parameter, key: str) -> torch.Tensor | None:
        """The whole per-element optimizer state ``key`` of ``param``, ``None`` before it exists."""
        if self._zero(param):
            self._link_zero_state()
            value = safe_get_full_optimizer_state(param, key)
            return None if value is None else value.clone()
        if id(param) in self.flat:
            return self._master_slice(param, key).view_as(param).clone()
        local = self.plain.local_copies(param).get(key)
        return None if local is None else local[0].view_as(param).clone()
