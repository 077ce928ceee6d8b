"""Evaluate trained models on a labelled split: one :class:`Evaluation` per model, and the
comparison of every model (what ``model_evaluation`` publishes as ``reports/metrics.json``):
the best model is chosen by *validation* macro-F1, and the test split is read only to report
each model's score beside its validation score (choosing on test would make the reported
number the maximum of several noisy test scores: optimistic by construction).

Metrics are computed on the raw probabilities (as they always were); calibration is reported
beside them: the temperature each checkpoint recorded (fitted on the validation split when the
model was trained) applied to the test logits, ECE before/after (:mod:`fer_pipeline.ml.calibration`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.ml.calibration import CalibrationEffect, apply_temperature, softmax
from fer_pipeline.ml.checkpoint import (
    LoadedModel,
    load_checkpoint,
)
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.metrics import (
    ClassificationMetrics,
    compare_models,
    evaluate_predictions,
    majority_baseline,
    select_by_validation,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import (
    SELECTED_BY_VALIDATION,
    TEST_PREDICTION_COLUMNS,
    MetricsReport,
)

BASELINE_NAME = "majority_baseline"


@dataclass
class Evaluation:
    """A model's predictions on a labelled split, with its metrics and the model itself."""

    metrics: ClassificationMetrics
    y_true: np.ndarray
    y_pred: np.ndarray
    probabilities: np.ndarray  # (N, C), uncalibrated: softmax(logits)
    loaded: LoadedModel
    logits: np.ndarray | None = None  # (N, C) raw

    @cached_property
    def calibration(self) -> CalibrationEffect:
        """The checkpoint's recorded temperature applied to these logits: ECE/NLL before and after."""
        logits = self.logits if self.logits is not None else np.log(np.clip(self.probabilities, 1e-300, None))
        return apply_temperature(logits, self.y_true, self.loaded.temperature)

    @property
    def calibration_recorded(self) -> bool:
        """Whether the checkpoint records a fitted temperature (older ones do not: T = 1)."""
        return "temperature" in (self.loaded.metadata.get("calibration") or {})

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
    logits = model.predict_logits(images)
    probs = softmax(logits)
    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    return Evaluation(evaluate_predictions(y_true, y_pred, probs, classes=model.classes), y_true, y_pred, probs, model,
                      logits)


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
    """Every model on the test split beside the majority-class baseline, the best chosen on
    validation (``validation``: each model's validation evaluation)."""

    evaluations: dict[str, Evaluation]
    baseline: ClassificationMetrics
    table: pd.DataFrame  # one row per model + the baseline (compare_models)
    best: str
    report: MetricsReport
    warnings: list[str]  # stale models, models without a fitted temperature
    image_ids: list[str] = field(default_factory=list)  # the test rows, in evaluation order
    validation: dict[str, Evaluation] = field(default_factory=dict)

    def below(self, floor: float) -> dict[str, float]:
        """Models whose test macro-F1 is under ``floor``."""
        return {n: round(e.metrics.macro_f1, 4) for n, e in self.evaluations.items() if e.metrics.macro_f1 < floor}


def compare_checkpoints(paths: DataPaths, names: Iterable[str], train: SplitArrays, test: SplitArrays,
                        data_version: str, *, validation: SplitArrays) -> ModelComparison:
    """Evaluate each named model's checkpoint on ``validation`` and ``test``, compare with the
    majority baseline (most frequent class of ``train``) and pick the best by *validation*
    macro-F1; the test scores are reported beside, never used to choose."""
    names = list(names)
    missing = [n for n in names if not paths.checkpoint(n).is_file()]
    if len(missing) == len(names):
        raise FileNotFoundError(f"no model checkpoint to evaluate: {', '.join(missing)}; materialize the models")
    present = [n for n in names if n not in missing]
    # validation first: the choice is made before any test prediction exists
    on_validation = {name: evaluate_checkpoint(paths.checkpoint(name), validation) for name in present}
    best = select_by_validation({n: e.metrics for n, e in on_validation.items()})
    evaluations = {name: evaluate_checkpoint(paths.checkpoint(name), test) for name in present}
    warnings = [f"{n} has no checkpoint ({paths.checkpoint(n)}): left out of the comparison; materialize "
                f"model_{n}" for n in missing]
    warnings += [w for n, e in evaluations.items()
                 if (w := staleness(n, e.trained_on, data_version, "re-materialize the model"))]
    warnings += [f"{n} records no calibration temperature (trained before temperature scaling): its probabilities "
                 f"are uncalibrated (T = 1); re-materialize the model" for n, e in evaluations.items()
                 if not e.calibration_recorded]
    baseline = majority_baseline(train.labels, test.labels)
    baseline_val = majority_baseline(train.labels, validation.labels)
    table = compare_models({**{n: e.metrics for n, e in evaluations.items()}, BASELINE_NAME: baseline})
    val_scores = {**{n: e.metrics for n, e in on_validation.items()}, BASELINE_NAME: baseline_val}
    table["val_accuracy"] = table["model"].map(lambda m: val_scores[m].accuracy).astype(float)
    table["val_macro_f1"] = table["model"].map(lambda m: val_scores[m].macro_f1).astype(float)
    table["is_best"] = table["model"] == best
    table["selected_by"] = SELECTED_BY_VALIDATION
    calibration = {n: calibration_summary(e) for n, e in evaluations.items()}
    for column, key in (("ece", "ece_before"), ("ece_calibrated", "ece_after"), ("temperature", "temperature")):
        table[column] = table["model"].map(lambda m, key=key: (calibration.get(m) or {}).get(key)).astype(float)
    inits = {n: (e.loaded.metadata.get("extra") or {}).get("init", "scratch")
             for n, e in evaluations.items()}  # "pretrained" (from the backbone) or "scratch"; older: scratch
    table["init"] = table["model"].map(inits)
    # the chosen model first, then by validation score: the order the choice was made in
    table = table.sort_values(["is_best", "val_macro_f1", "model"], ascending=[False, False, True]).reset_index(drop=True)
    report = MetricsReport(best_model=best, data_version=data_version, n_test=int(len(test)),
                           models={n: e.metrics.to_dict() for n, e in evaluations.items()},
                           majority_baseline=baseline.to_dict(),
                           checkpoints={n: str(paths.checkpoint(n)) for n in evaluations},
                           calibration=calibration, selected_by=SELECTED_BY_VALIDATION,
                           validation={n: {"accuracy": e.metrics.accuracy, "macro_f1": e.metrics.macro_f1,
                                           "n": e.metrics.n} for n, e in on_validation.items()})
    return ModelComparison(evaluations, baseline, table, best, report, warnings, list(test.image_ids), on_validation)


def calibration_summary(ev: Evaluation) -> dict[str, Any]:
    """What ``metrics.json`` records under ``calibration.<model>``: the test split before/after
    the checkpoint's temperature (ECE, NLL, reliability bins) and the validation fit it recorded."""
    recorded = ev.loaded.metadata.get("calibration") or {}
    return {**ev.calibration.to_dict(), "split": "test", "recorded": ev.calibration_recorded,
            "fitted_on": recorded.get("fitted_on"), "fit": recorded}


def prediction_table(comparison: ModelComparison) -> pd.DataFrame:
    """One row per (model, test image): true and predicted class, raw and calibrated confidence,
    calibrated class probabilities (``schema.TEST_PREDICTION_COLUMNS`` + ``p_<class>``)."""
    frames = []
    for name, ev in comparison.evaluations.items():
        classes = ev.metrics.classes
        calibrated = softmax(ev.logits, ev.loaded.temperature) if ev.logits is not None else ev.probabilities
        df = pd.DataFrame({"model": name, "image_id": comparison.image_ids or [""] * len(ev.y_true),
                           "true": [classes[i] for i in ev.y_true], "predicted": [classes[i] for i in ev.y_pred],
                           "correct": ev.y_true == ev.y_pred,
                           "confidence": ev.probabilities.max(axis=1) if len(ev.y_true) else [],
                           "calibrated_confidence": calibrated.max(axis=1) if len(ev.y_true) else []},
                          columns=list(TEST_PREDICTION_COLUMNS))
        for j, c in enumerate(classes):
            df[f"p_{c}"] = calibrated[:, j]
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TEST_PREDICTION_COLUMNS))


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap_intervals(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int,
                        n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of accuracy and macro-F1 (test images resampled with
    replacement, ``n_resamples`` times, seeded: the same predictions give the same interval).

    Macro-F1 per resample averages all ``n_classes`` (a class absent from a resample scores 0),
    as :func:`fer_pipeline.ml.metrics.evaluate_predictions` does on the full set."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if not len(t):
        return {"accuracy": (float("nan"), float("nan")), "macro_f1": (float("nan"), float("nan"))}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n_resamples, len(t)))
    cells = (t * n_classes + p)[idx] + (np.arange(n_resamples) * n_classes * n_classes)[:, None]
    cm = np.bincount(cells.ravel(), minlength=n_resamples * n_classes * n_classes).reshape(
        n_resamples, n_classes, n_classes).astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=1) + cm.sum(axis=2)  # predicted + true per class
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    scores = {"accuracy": tp.sum(axis=1) / len(t), "macro_f1": f1.mean(axis=1)}
    alpha = (1.0 - level) / 2.0
    return {k: (float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))) for k, v in scores.items()}


def write_comparison(paths: DataPaths, comparison: ModelComparison) -> dict[str, Path]:
    """Publish a comparison: ``metrics.csv``, ``metrics.json``, the test predictions and, per
    model, a confusion plot and a reliability diagram."""
    from fer_pipeline.atomic import write_csv, write_json, write_parquet
    from fer_pipeline.ml.plots import plot_confusion_matrix, plot_reliability_diagram

    files = {"metrics_csv": write_csv(paths.report("metrics_csv"), comparison.table),
             "metrics_json": write_json(paths.metrics_json, comparison.report.to_json()),
             "test_predictions": write_parquet(paths.report("test_predictions"), prediction_table(comparison),
                                               meta={"data_version": comparison.report.data_version})}
    for name, ev in comparison.evaluations.items():
        files[f"confusion_{name}"] = plot_confusion_matrix(
            ev.metrics.confusion, ev.metrics.classes, paths.confusion(name),
            title=f"{name} — test split (n={ev.metrics.n})")
        files[f"reliability_{name}"] = plot_reliability_diagram(
            ev.calibration, paths.reliability(name), title=f"{name} — test split (n={ev.metrics.n})")
    return files
