"""Evaluate trained models on a labelled split: one :class:`Evaluation` per model, and the
comparison of every model on the held-out test split that picks the best one (what
``model_evaluation`` publishes as ``reports/metrics.json``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fer_pipeline.ml.checkpoint import LoadedModel, load_checkpoint
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.metrics import (
    ClassificationMetrics,
    best_model_name,
    compare_models,
    evaluate_predictions,
    majority_baseline,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import MetricsReport

BASELINE_NAME = "majority_baseline"


@dataclass
class Evaluation:
    """A model's predictions on a labelled split, with its metrics and the model itself."""

    metrics: ClassificationMetrics
    y_true: np.ndarray
    y_pred: np.ndarray
    probabilities: np.ndarray  # (N, C)
    loaded: LoadedModel

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def trained_on(self) -> str | None:
        """The data version the model was trained on (recorded in its checkpoint)."""
        return self.loaded.metadata.get("data_version")

    def predictions_frame(self, image_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per sample: true/predicted class names, correctness, class probabilities."""
        classes = self.metrics.classes
        df = pd.DataFrame({"true": [classes[i] for i in self.y_true],
                           "predicted": [classes[i] for i in self.y_pred],
                           "correct": self.y_true == self.y_pred})
        for j, c in enumerate(classes):
            df[f"p_{c}"] = self.probabilities[:, j]
        if image_ids is not None:
            df.insert(0, "image_id", list(image_ids))
        return df


def evaluate_model(model: LoadedModel, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Run ``model`` (with its recorded test-time flip setting) on uint8 faces and score it."""
    probs = model.predict_proba(images)
    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    return Evaluation(evaluate_predictions(y_true, y_pred, probs, classes=model.classes), y_true, y_pred, probs, model)


def evaluate_checkpoint(checkpoint: Path, split: SplitArrays) -> Evaluation:
    """Metrics of a saved model on a split (the test split: the only place test data is used)."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint} does not exist: materialize its model asset first")
    return evaluate_model(load_checkpoint(checkpoint), split.images, split.labels)


def staleness(model_name: str, trained_on: str | None, current: str, remedy: str) -> str | None:
    """The warning for a model (or fold set) trained on another data version than the current
    splits, or None when it is up to date."""
    if trained_on == current:
        return None
    return f"{model_name} was trained on data version {trained_on}, the splits are now {current}: {remedy}"


@dataclass
class ModelComparison:
    """Every model on the test split beside the majority-class baseline."""

    evaluations: dict[str, Evaluation]
    baseline: ClassificationMetrics
    table: pd.DataFrame  # one row per model + the baseline (compare_models)
    best: str
    report: MetricsReport
    warnings: list[str]  # stale models

    def below(self, floor: float) -> dict[str, float]:
        """Models whose test macro-F1 is under ``floor``."""
        return {n: round(e.metrics.macro_f1, 4) for n, e in self.evaluations.items() if e.metrics.macro_f1 < floor}


def compare_checkpoints(paths: DataPaths, names: Iterable[str], train: SplitArrays, test: SplitArrays,
                        data_version: str) -> ModelComparison:
    """Evaluate each named model's checkpoint on ``test``, compare with the majority baseline
    (most frequent class of ``train``) and pick the best by test macro-F1."""
    evaluations = {name: evaluate_checkpoint(paths.checkpoint(name), test) for name in names}
    warnings = [w for n, e in evaluations.items()
                if (w := staleness(n, e.trained_on, data_version, "re-materialize the model"))]
    baseline = majority_baseline(train.labels, test.labels)
    table = compare_models({**{n: e.metrics for n, e in evaluations.items()}, BASELINE_NAME: baseline})
    best = best_model_name(table[table["model"] != BASELINE_NAME].reset_index(drop=True))
    report = MetricsReport(best_model=best, data_version=data_version, n_test=int(len(test)),
                           models={n: e.metrics.to_dict() for n, e in evaluations.items()},
                           majority_baseline=baseline.to_dict(),
                           checkpoints={n: str(paths.checkpoint(n)) for n in evaluations})
    return ModelComparison(evaluations, baseline, table, best, report, warnings)


def write_comparison(paths: DataPaths, comparison: ModelComparison) -> dict[str, Path]:
    """Publish a comparison: ``metrics.csv``, ``metrics.json`` and one confusion plot per model."""
    from fer_pipeline.atomic import write_csv, write_json
    from fer_pipeline.ml.plots import plot_confusion_matrix

    files = {"metrics_csv": write_csv(paths.report("metrics_csv"), comparison.table),
             "metrics_json": write_json(paths.metrics_json, comparison.report.to_json())}
    for name, ev in comparison.evaluations.items():
        files[f"confusion_{name}"] = plot_confusion_matrix(
            ev.metrics.confusion, ev.metrics.classes, paths.confusion(name),
            title=f"{name} — test split (n={ev.metrics.n})")
    return files
