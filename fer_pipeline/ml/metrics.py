"""Classification metrics in plain numpy (no scikit-learn dependency).

Conventions follow scikit-learn's with ``zero_division=0``: a class that is never predicted
has precision 0, a class absent from ``y_true`` has recall 0 (and weight 0 in weighted
averages). For single-label multi-class data, micro precision = recall = F1 = accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.classes import CLASSES


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError("labels must be in [0, n_classes)")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def normalize_confusion(cm: np.ndarray) -> np.ndarray:
    """Row-normalised confusion matrix (each true class sums to 1; empty rows stay 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 (the model-selection metric)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm)
    f1 = _safe_div(2 * tp, cm.sum(0) + cm.sum(1))
    return float(f1.mean())


@dataclass
class ClassificationMetrics:
    """Everything :func:`evaluate_predictions` computes; ``to_dict()`` is JSON-ready."""

    classes: tuple[str, ...]
    n: int
    accuracy: float
    precision: dict[str, float]  # keys: macro, micro, weighted
    recall: dict[str, float]
    f1: dict[str, float]
    per_class: pd.DataFrame  # class, precision, recall, f1, support
    confusion: np.ndarray  # counts
    log_loss: float | None = None

    @property
    def macro_f1(self) -> float:
        return self.f1["macro"]

    @property
    def confusion_normalized(self) -> np.ndarray:
        return normalize_confusion(self.confusion)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "precision": dict(self.precision),
            "recall": dict(self.recall),
            "f1": dict(self.f1),
            "macro_f1": self.macro_f1,
            "log_loss": self.log_loss,
            "per_class": self.per_class.to_dict(orient="records"),
            "classes": list(self.classes),
            "confusion_matrix": self.confusion.tolist(),
            "confusion_matrix_normalized": self.confusion_normalized.round(6).tolist(),
        }


def evaluate_predictions(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    probabilities: np.ndarray | None = None,
    classes: Sequence[str] = CLASSES,
) -> ClassificationMetrics:
    """Accuracy; macro/micro/weighted precision, recall, F1; per-class report; confusion matrix.

    ``probabilities`` (N, C), when given, adds the mean log loss (clipped at 1e-12).
    """
    classes = tuple(classes)
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    n = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)

    prec = _safe_div(tp, predicted)
    rec = _safe_div(tp, support)
    f1 = _safe_div(2 * prec * rec, prec + rec)
    weights = _safe_div(support, np.full_like(support, n))
    accuracy = float(tp.sum() / n) if n else 0.0

    def averages(per: np.ndarray, micro: float) -> dict[str, float]:
        return {"macro": float(per.mean()), "micro": micro, "weighted": float((per * weights).sum())}

    micro_p = float(_safe_div(tp.sum(), predicted.sum()))
    micro_r = float(_safe_div(tp.sum(), support.sum()))
    micro_f = float(_safe_div(2 * micro_p * micro_r, micro_p + micro_r))

    log_loss = None
    if probabilities is not None and n:
        p = np.asarray(probabilities, dtype=np.float64)
        t = np.asarray(y_true, dtype=np.int64)
        log_loss = float(-np.log(np.clip(p[np.arange(len(t)), t], 1e-12, 1.0)).mean())

    per_class = pd.DataFrame(
        {"class": classes, "precision": prec, "recall": rec, "f1": f1, "support": support.astype(np.int64)}
    )
    return ClassificationMetrics(
        classes=classes,
        n=n,
        accuracy=accuracy,
        precision=averages(prec, micro_p),
        recall=averages(rec, micro_r),
        f1=averages(f1, micro_f),
        per_class=per_class,
        confusion=cm,
        log_loss=log_loss,
    )


def majority_baseline(
    y_train: Sequence[int] | np.ndarray,
    y_true: Sequence[int] | np.ndarray,
    classes: Sequence[str] = CLASSES,
) -> ClassificationMetrics:
    """Metrics of always predicting the most frequent *training* class (ties: lowest index)."""
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=len(classes))
    majority = int(np.argmax(counts))
    y_true = np.asarray(y_true, dtype=np.int64)
    return evaluate_predictions(y_true, np.full_like(y_true, majority), classes=classes)


def compare_models(results: Mapping[str, ClassificationMetrics | Mapping[str, Any]]) -> pd.DataFrame:
    """One row per model, best macro-F1 first, with ``is_best`` marking the top row (callers
    that choose on another split, like :func:`fer_pipeline.ml.evaluate.compare_checkpoints`,
    set ``is_best`` themselves).

    ``results`` maps a model name to its :class:`ClassificationMetrics` (or its
    ``to_dict()``). Ties on macro-F1 are broken by accuracy, then by name.
    """
    rows = []
    for name, m in results.items():
        d = m.to_dict() if isinstance(m, ClassificationMetrics) else dict(m)
        rows.append(
            {
                "model": name,
                "accuracy": d["accuracy"],
                "macro_f1": d["f1"]["macro"],
                "weighted_f1": d["f1"]["weighted"],
                "macro_precision": d["precision"]["macro"],
                "macro_recall": d["recall"]["macro"],
                "n": d["n"],
            }
        )
    cols = ["model", "accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "n", "is_best"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows).sort_values(["macro_f1", "accuracy", "model"], ascending=[False, False, True])
    df = df.reset_index(drop=True)
    df["is_best"] = df.index == 0
    return df[cols]


def best_model_name(comparison: pd.DataFrame) -> str:
    """Name of the row marked best (``is_best``)."""
    return str(comparison.loc[comparison["is_best"], "model"].iloc[0])


def select_by_validation(validation: Mapping[str, ClassificationMetrics | Mapping[str, Any]]) -> str:
    """The model with the highest *validation* macro-F1 (ties: accuracy, then name).

    Selection never looks at the test split: the test score of the chosen model is then an
    unbiased report, not the maximum of several noisy test scores."""
    if not validation:
        raise ValueError("no model to select: no validation scores")

    def key(item: tuple[str, Any]) -> tuple[float, float, str]:
        name, m = item
        d = m.to_dict() if isinstance(m, ClassificationMetrics) else dict(m)
        return (-float(d["f1"]["macro"]), -float(d["accuracy"]), name)

    return min(validation.items(), key=key)[0]


def group_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """n, accuracy and macro precision/recall/F1 over the classes present in ``y_true``: the
    score of one subset (a demographic group, a source). Averaging only present classes keeps a
    small group that lacks a class from being penalised for it."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if not len(y_true):
        return {"n": 0, "accuracy": np.nan, "macro_precision": np.nan, "macro_recall": np.nan, "macro_f1": np.nan}
    m = evaluate_predictions(y_true, y_pred, classes=classes)
    present = m.per_class[m.per_class["support"] > 0]
    return {"n": int(m.n), "accuracy": float(m.accuracy), "macro_precision": float(present["precision"].mean()),
            "macro_recall": float(present["recall"].mean()), "macro_f1": float(present["f1"].mean())}
