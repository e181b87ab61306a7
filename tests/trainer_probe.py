"""Runs a Trainer script (``examples/run_glue.py``, ``examples/sft_e2e.py``) on this rank while recording what the
rank routed and how its optimizer was built, and writes them to ``$TRAINER_PROBE_OUTPUT.<rank>.json``. Started by
``accelerate launch``, ``deepspeed`` or ``torchrun`` from ``tests/test_trainer.py``.

Recorded: the experts each AdaMix layer routed to between two optimizer steps (``ExpertStepGuard`` resets them
after each step: one entry per step and layer), and the optimizer's parameter groups (learning rate, weight decay)
and class when the first model is saved.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

from adamix_ds.layer import AdaMixLayer
from adamix_ds.trainer import AdaMixTrainerMixin


def main(argv: list[str]) -> None:
    record: dict[str, list] = {"routed": [], "groups": [], "optimizer": []}
    reset_routed = AdaMixLayer.reset_routed

    def recording_reset(layer: AdaMixLayer) -> None:
        record["routed"].append([layer.layer_id, *(sorted(experts) for experts in layer.routed.values())])
        reset_routed(layer)

    save_model = AdaMixTrainerMixin.save_model

    def recording_save(trainer: AdaMixTrainerMixin, *args, **kwargs) -> None:
        if not record["groups"]:
            optimizer = trainer.optimizer
            record["groups"] = [[group["lr"], group["weight_decay"], len(group["params"])] for group in optimizer.param_groups]
            inner = getattr(trainer.model_wrapped, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer
            base = getattr(inner, "optimizer", optimizer.optimizer)
            record["optimizer"] = [type(base).__name__, bool(base.defaults.get("fused"))]
        save_model(trainer, *args, **kwargs)

    AdaMixLayer.reset_routed = recording_reset
    AdaMixTrainerMixin.save_model = recording_save

    def write() -> None:
        with open(f"{os.environ['TRAINER_PROBE_OUTPUT']}.{os.environ.get('RANK', '0')}.json", "w") as file:
            json.dump(record, file)

    atexit.register(write)
    sys.argv = [arg for arg in argv if not arg.startswith("--local_rank")]  # the deepspeed launcher's; LOCAL_RANK is set
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
