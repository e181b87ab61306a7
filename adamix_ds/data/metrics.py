"""GLUE metrics, as the ``glue`` metric of ``evaluate`` and ``run_glue.py`` compute them."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from adamix_ds.data.tasks import get_task_spec

__all__ = ["compute_metrics"]


def _to_numpy(values: Any) -> np.ndarray:
    # Duck-typed so that torch tensors (any device, with or without grad) work without importing
    # torch; .float() because bf16 has no NumPy dtype.
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


def _class_ids(values: np.ndarray, what: str) -> np.ndarray:
    if values.ndim != 1:
        raise ValueError(f"{what} must be 1-D class ids here, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.mod(values, 1) == 0):
            raise ValueError(f"{what} must be whole-number class ids, got e.g. {values[np.mod(values, 1) != 0][0]!r}")
        values = values.astype(np.int64)
    return values


def compute_metrics(task_name: str, predictions: Any, labels: Any) -> dict[str, float]:
    """The GLUE metrics of ``task_name``, keyed without the ``eval_`` prefix.

    ``predictions`` are logits ``[N, C]`` (arg-maxed here) or class ids ``[N]`` for classification,
    and the ``[N]`` or ``[N, 1]`` regression outputs for ``stsb``; ``labels`` are ``[N]``. NumPy
    arrays, lists and torch tensors are accepted. Returns ``accuracy`` (sst2, mnli, qnli, rte, wnli,
    mrpc, qqp), ``f1`` (mrpc, qqp), ``matthews_correlation`` (cola), ``pearson`` and ``spearmanr``
    (stsb), plus ``combined_score``, the mean of the others, where ``run_glue.py`` reports it
    (mrpc, qqp, stsb). The keys are exactly ``GLUE_TASKS[task_name].metric_names``.
    """
    spec = get_task_spec(task_name)
    preds = _to_numpy(predictions)
    golds = _to_numpy(labels).reshape(-1)
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"stsb predictions must be [N] or [N, 1], got shape {preds.shape}")
    else:
        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        preds = _class_ids(preds, "predictions")
        golds = _class_ids(golds, "labels")
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} labels")
    if len(golds) == 0:
        raise ValueError("no predictions to score")

    if spec.is_regression:
        result = {
            "pearson": float(pearsonr(preds, golds).statistic),
            "spearmanr": float(spearmanr(preds, golds).statistic),
        }
    elif spec.name == "cola":
        result = {"matthews_correlation": float(matthews_corrcoef(golds, preds))}
    else:
        result = {"accuracy": float(accuracy_score(golds, preds))}
        if "f1" in spec.metric_names:
            # zero_division=0 gives the value evaluate's glue metric reports, without the warning a
            # model that predicts only one class triggers early in training.
            result["f1"] = float(f1_score(golds, preds, zero_division=0.0))
    if "combined_score" in spec.metric_names:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result
