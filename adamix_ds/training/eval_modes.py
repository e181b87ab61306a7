"""Every inference routing of one trained AdaMix model on the same evaluation split (the paper's Fig. 5).

``merged`` (expert averages), ``ensemble`` (mean of the experts' outputs), ``fixed`` (each single
expert: every down expert with the shared up, every (down, up) pair when neither is shared) and
``random`` (R independent random-routing evaluations); by name also the merges beyond the uniform
average, ``greedy_soup``, ``fisher`` and ``best_expert`` (``adamix_ds.training.merges``). The result, one JSON object::

    {"merged": {"eval_accuracy": ..}, "ensemble": {..},
     "fixed": [{"down": 0, "up": 0, "eval_accuracy": ..}, ..], "random": [{"draw": 0, "eval_accuracy": ..}, ..],
     "greedy_soup": {"selection_split": .., "chosen": [..], "eval_accuracy": ..}, "fisher": {"fisher_batches": .., ..},
     "best_expert": {"selection_split": .., "chosen": [k], "expert_scores": [..], "eval_accuracy": ..}}
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from adamix_ds.config import EVAL_MODES
from adamix_ds.data import TaskData
from adamix_ds.distributed import DistEnv
from adamix_ds.merging import Coefficients, same_merge, set_merge
from adamix_ds.model import adamix_layers, get_config, set_eval_mode
from adamix_ds.routing import Projection
from adamix_ds.training.data import evaluate_splits
from adamix_ds.training.merges import MERGE_MODES

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from adamix_ds.families import TaskFamily

ALL = "all"
EVAL_MODES_FILE = "eval_modes.json"
# Random draw d evaluates with the EVAL stream from counter d * DRAW_STRIDE: draws never overlap, and the
# same draw gives the same routes in every run.
DRAW_STRIDE = 2**32


def parse_eval_modes(text: str) -> tuple[str, ...]:
    """A comma-separated list of ``merged, ensemble, fixed, random``, the merges (``MERGE_MODES``) and ``all`` (the
    four routings); ``ValueError`` otherwise."""
    named = [m.strip() for m in text.split(",") if m.strip()]
    modes = tuple(mode for m in named for mode in (EVAL_MODES if m == ALL else (m,)))
    allowed = EVAL_MODES + MERGE_MODES
    bad = [m for m in modes if m not in allowed]
    if bad or not modes:
        raise ValueError(f"eval_modes={text!r} is invalid: allowed {ALL!r} or a comma-separated list of {', '.join(allowed)}")
    return tuple(dict.fromkeys(modes))


def evaluate_modes(
    engine: DeepSpeedEngine | nn.Module,
    task_data: TaskData,
    family: TaskFamily,
    batch_size: int,
    env: DistEnv,
    modes: Sequence[str] = EVAL_MODES,
    random_draws: int = 10,
    merges: Mapping[str, tuple[Coefficients, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Evaluate ``engine`` (an engine, or an AdaMix model) under each routing of ``modes`` on every eval split,
    through ``family`` (its batches, logits and metrics). A merge mode (``MERGE_MODES``) evaluates
    ``merges[mode]``'s coefficients (``adamix_ds.training.merges.compute_merges``) and reports its record; two merge
    modes that chose the same merge (a greedy soup of the best expert alone) are evaluated once.

    The model's own eval mode, merge and random-routing counters are restored afterwards, so a run that calls
    this at its end saves the same adapter and checkpoint as one that does not.
    """
    missing = [mode for mode in modes if mode in MERGE_MODES and mode not in (merges or {})]
    if missing:
        raise ValueError(f"eval_modes {', '.join(missing)} need their merge computed first (compute_merges)")
    if random_draws < 1:
        raise ValueError(f"random_draws={random_draws} is invalid: allowed an integer >= 1")
    model = getattr(engine, "module", engine)
    config = get_config(model)
    layers = [layer for _, layer in adamix_layers(model)]
    counters = [layer.eval_forward_count for layer in layers]
    previous = {name: layer.merge_coefficients for name, layer in adamix_layers(model)}
    n_down, n_up = (layers[0].experts_in(p) for p in Projection)

    def scores() -> dict[str, float]:
        return evaluate_splits(engine, task_data, family, batch_size, env)

    results: dict[str, Any] = {}
    merges_scored: list[tuple[Coefficients, dict[str, float]]] = []  # a merge another mode chose too is scored once
    try:
        for mode in modes:
            if mode in ("merged", "ensemble"):
                set_eval_mode(model, mode)
                results[mode] = scores()
            elif mode in MERGE_MODES:
                coefficients, record = merges[mode]
                known = next((metrics for other, metrics in merges_scored if same_merge(other, coefficients)), None)
                if known is None:
                    set_merge(model, coefficients)
                    set_eval_mode(model, "merged")
                    known = scores()
                    set_merge(model, previous)
                    merges_scored.append((coefficients, known))
                results[mode] = {**record, **known}
            elif mode == "fixed":
                results[mode] = []
                for down, up in itertools.product(range(n_down), range(n_up)):
                    set_eval_mode(model, "fixed", eval_route=(down, up))
                    results[mode].append({"down": down, "up": up, **scores()})
            else:
                set_eval_mode(model, "random")
                results[mode] = []
                for draw in range(random_draws):
                    for layer in layers:
                        layer.eval_forward_count = draw * DRAW_STRIDE
                    results[mode].append({"draw": draw, **scores()})
    finally:
        set_merge(model, previous)
        set_eval_mode(model, config.eval_mode, config.eval_expert)
        for layer, count in zip(layers, counters, strict=True):
            layer.eval_forward_count = count
    return results
