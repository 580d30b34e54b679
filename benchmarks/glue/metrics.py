"""Evaluation metrics of the SAM paper, scaled to 0-100 (scikit-learn / scipy only)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .data import TaskSpec, get_spec

__all__ = ["compute_metrics"]


def _as_predictions(predictions: Any, is_regression: bool) -> np.ndarray:
    """Logits ``(N, C)`` -> argmax; regression outputs ``(N,)`` / ``(N, 1)`` -> floats; ints pass through."""
    if isinstance(predictions, tuple):  # e.g. HF Trainer's (logits, extra outputs)
        predictions = predictions[0]
    preds = np.asarray(predictions)
    if is_regression:
        return preds.reshape(-1).astype(np.float64)
    if preds.ndim == 2:
        return preds.argmax(axis=-1)
    return preds.reshape(-1).astype(np.int64)


def _correlation(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    # A constant input makes the correlation undefined (scipy returns NaN with a warning); a model that
    # predicts a constant has no linear/rank agreement with the targets, so report 0.0 instead of NaN.
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    value = float(fn(x, y)[0])
    return 0.0 if np.isnan(value) else value


def compute_metrics(name: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """Task metrics in percent; ``"score"`` is the task's main number (the mean where the metric is a mean).

    ``predictions`` may be logits ``(N, C)`` (argmaxed), regression outputs ``(N,)`` / ``(N, 1)`` or class
    ints.
    """
    spec = get_spec(name)
    preds = _as_predictions(predictions, spec.is_regression)
    y = np.asarray(labels).reshape(-1)
    if len(preds) != len(y):
        raise ValueError(f"{len(preds)} predictions for {len(y)} labels")
    if spec.metric == "pearson_spearman":
        y = y.astype(np.float64)
        out = {
            "pearson": 100.0 * _correlation(pearsonr, preds, y),
            "spearman": 100.0 * _correlation(spearmanr, preds, y),
        }
        out["score"] = (out["pearson"] + out["spearman"]) / 2
        return out
    y = y.astype(np.int64)
    if spec.metric == "mcc":
        # sklearn returns 0.0 (not NaN) for a degenerate confusion matrix, e.g. constant predictions
        mcc = 100.0 * float(matthews_corrcoef(y, preds))
        return {"mcc": mcc, "score": mcc}
    acc = 100.0 * float(accuracy_score(y, preds))
    if spec.metric == "accuracy":
        return {"accuracy": acc, "score": acc}
    if spec.metric == "acc_f1":
        f1 = 100.0 * float(f1_score(y, preds, average="binary", pos_label=1, zero_division=0))
        return {"accuracy": acc, "f1": f1, "score": (acc + f1) / 2}
    if spec.metric == "acc_macro_f1":
        # macro over the classes present in labels or predictions (as sklearn / HF super_glue do)
        macro = 100.0 * float(f1_score(y, preds, average="macro", zero_division=0))
        return {"accuracy": acc, "macro_f1": macro, "score": (acc + macro) / 2}
    raise ValueError(f"unknown metric {spec.metric!r} for task {spec.name!r}")  # pragma: no cover
