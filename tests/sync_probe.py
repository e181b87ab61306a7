"""Runs ``launchers/train.py`` on this rank while counting the reads of tensor values by the host, and writes the counts
to ``$SYNC_PROBE_OUTPUT.<rank>.json``. Started by ``torch.distributed.run`` from ``tests/test_gpu_readiness.py``.

A read of a tensor's value by the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``, boolean-mask indexing,
whose result size the host must know) is where a GPU run waits for the device. On CPU ranks nothing waits, but the
reads happen all the same, so they are counted here: the aten operations that produce a host value
(``_local_scalar_dense``; ``nonzero`` and ``masked_select``, whose output shape depends on values) and ``tolist``,
which reads memory without an aten operation. Each read is charged to where it happened: the training loop's own
code (``train_step``, ``LossWindow.close``), or inside it DeepSpeed's ``backward`` and ``step`` or transformers'
SDPA mask helper, which reads the padding mask to skip it when nothing is padded (one read per forward).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values per ``place`` while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.place: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.place is not None and str(func) in HOST_READS:
            self.counts[self.place] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str]) -> None:
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "launchers"))
    import deepspeed
    import train as launcher
    import transformers.masking_utils

    reads = HostReads()
    calls: Counter[str] = Counter()

    def charged(place: str, function, inner: bool = False):
        """``function`` with its host reads charged to ``place``; an ``inner`` place only inside another one (the
        dispatch mode, slow, is on only inside the loop's places)."""

        @functools.wraps(function)
        def call(*args, **kwargs):
            outer = reads.place
            if inner and outer is None:
                return function(*args, **kwargs)
            reads.place = place
            calls[place] += 1
            try:
                if outer is not None:
                    return function(*args, **kwargs)
                with reads:
                    return function(*args, **kwargs)
            finally:
                reads.place = outer

        return call

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if reads.place is not None:
            reads.counts[reads.place] += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    launcher.train_step = charged("train_step", launcher.train_step)
    launcher.LossWindow.close = charged("window_close", launcher.LossWindow.close)
    deepspeed.DeepSpeedEngine.backward = charged("deepspeed_backward", deepspeed.DeepSpeedEngine.backward, inner=True)
    deepspeed.DeepSpeedEngine.step = charged("deepspeed_step", deepspeed.DeepSpeedEngine.step, inner=True)
    masks = transformers.masking_utils
    masks._ignore_bidirectional_mask_sdpa = charged("transformers_mask", masks._ignore_bidirectional_mask_sdpa, inner=True)
    optimizer = {}
    initialize = launcher.deepspeed.initialize

    def recording_initialize(*args, **kwargs):
        engine, *rest = initialize(*args, **kwargs)
        # What the shipped config's optimizer section became: no JIT-built DeepSpeed FusedAdam on a GPU.
        optimizer.update(type=type(engine.basic_optimizer).__name__, fused=engine.basic_optimizer.defaults.get("fused"))
        return (engine, *rest)

    launcher.deepspeed.initialize = recording_initialize
    launcher.main(argv)
    rank = int(os.environ.get("RANK", 0))
    report = {"reads": dict(reads.counts), "calls": dict(calls), "optimizer": optimizer}
    Path(f"{os.environ['SYNC_PROBE_OUTPUT']}.{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
