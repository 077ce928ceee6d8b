"""K-fold cross-validation of the main model over train+validation, one fold at a time.

Folds come from ``splits.parquet`` (the ``fold`` column, stratified by class with whole
duplicate groups inside one fold), so the cross-validation never puts two copies of a face on
both sides of a fold boundary. Fewer CV folds than stored folds are obtained by merging stored
folds (CV fold = stored fold mod k), which keeps both properties.

For CV fold ``f``:

* held out (evaluated): the rows of CV fold ``f`` -- never seen in training or early stopping;
* inner validation (early stopping): the first stored fold after ``f`` (cyclically) that is not
  held out; with k = number of stored folds that is simply fold ``(f + 1) % k``;
* training: every other row.

One fold is one unit of work, :func:`train_fold` (in the pipeline: one partition of the
``cv_fold`` asset, so folds can run on different machines and Dagster's partition status says
which are done). A fold's result is stored with the :class:`FoldRecipe` it was trained with
(data version, number of CV folds, architecture, training recipe) by :class:`FoldStore`, and
:func:`collect_folds` gathers the stored folds for the aggregate, refusing any trained with
another recipe: a table mixing data versions would describe no model anyone trained.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from fer_pipeline.analysis.partition_store import PartitionStore
from fer_pipeline.atomic import write_json, write_parquet, write_table
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.calibration import calibrate, softmax
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.inference import predict_logits
from fer_pipeline.ml.metrics import ClassificationMetrics, evaluate_predictions
from fer_pipeline.ml.train import TrainConfig, train_model
from fer_pipeline.paths import DataPaths

LogFn = Callable[[str], None]
TrainFn = Callable[..., Any]

#: Metric columns of the per-fold table, in display order.
METRIC_COLUMNS: tuple[str, ...] = ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                   "micro_precision", "micro_recall", "micro_f1")
PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)
NOT_MATERIALIZED = "not materialized"
#: Training settings that say how a model is computed (device, threads, kernels), not what it
#: learns: two folds that differ only in these were trained with the same recipe.
EXECUTION_FIELDS: tuple[str, ...] = ("device", "num_threads", "deterministic", "amp", "cuda_graphs",
                                     "eval_batch_size")


def metrics_row(m: ClassificationMetrics) -> dict[str, float]:
    """Accuracy and macro/micro precision, recall, F1 of one evaluation, as a flat dict."""
    return {
        "accuracy": m.accuracy,
        "macro_precision": m.precision["macro"], "macro_recall": m.recall["macro"], "macro_f1": m.f1["macro"],
        "micro_precision": m.precision["micro"], "micro_recall": m.recall["micro"], "micro_f1": m.f1["micro"],
    }


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short SHA-256 of a JSON-able object (sorted keys): a version string for recipes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def recipe_dict(config: TrainConfig) -> dict[str, Any]:
    """The training recipe without its execution settings (:data:`EXECUTION_FIELDS`)."""
    return {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}


def combine_arrays(parts: Sequence[SplitArrays]) -> SplitArrays:
    """Concatenate splits (e.g. train + validation) and sort the rows by ``image_id``."""
    frame = pd.concat([p.frame for p in parts], ignore_index=True)
    images = np.concatenate([p.images for p in parts]) if parts else np.zeros((0, 0, 0), np.uint8)
    labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(frame["image_id"].to_numpy(), kind="stable")
    return SplitArrays(images[order], labels[order], list(frame["image_id"].to_numpy()[order]),
                       frame.iloc[order].reset_index(drop=True))


def subset(arrays: SplitArrays, rows: np.ndarray) -> SplitArrays:
    rows = np.asarray(rows, dtype=np.int64)
    return SplitArrays(arrays.images[rows], arrays.labels[rows], [arrays.image_ids[i] for i in rows],
                       arrays.frame.iloc[rows].reset_index(drop=True))


# --------------------------------------------------------------------------------------------
# Fold plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldPlan:
    """Which rows of the train+validation pool one CV fold trains, early-stops and tests on."""

    fold: int
    held_out_stored_folds: tuple[int, ...]
    inner_stored_fold: int
    train_rows: np.ndarray = field(repr=False)
    inner_rows: np.ndarray = field(repr=False)
    test_rows: np.ndarray = field(repr=False)


def plan_folds(stored_fold: np.ndarray | Sequence[int], n_cv_folds: int | None = None) -> list[FoldPlan]:
    """One :class:`FoldPlan` per CV fold, from each pool row's stored fold number.

    ``n_cv_folds`` None or equal to the number of stored folds uses them as they are; fewer
    merges stored folds as ``stored % n_cv_folds``. More than stored, or fewer than 2, is an error.
    """
    stored = np.asarray(stored_fold, dtype=np.int64)
    if len(stored) and stored.min() < 0:
        raise ValueError("the cross-validation pool holds rows without a fold (fold -1 = test split)")
    n_stored = int(stored.max()) + 1 if len(stored) else 0
    k = n_stored if not n_cv_folds else int(n_cv_folds)
    if n_stored < 2:
        raise ValueError(f"cross-validation needs at least 2 stored folds, splits.parquet has {n_stored}")
    if k < 2 or k > n_stored:
        raise ValueError(f"n_cv_folds must be between 2 and the {n_stored} folds in splits.parquet, got {k}")
    plans = []
    cv_fold = stored % k
    for f in range(k):
        held = tuple(s for s in range(n_stored) if s % k == f)
        inner = next(s for s in ((f + d) % n_stored for d in range(1, n_stored + 1)) if s % k != f)
        test_rows = np.flatnonzero(cv_fold == f)
        inner_rows = np.flatnonzero(stored == inner)
        train_rows = np.flatnonzero((cv_fold != f) & (stored != inner))
        if not len(train_rows):
            raise ValueError(f"CV fold {f} of {k} leaves no training rows beside its inner validation fold "
                             f"(stored fold {inner}): use more folds in splits.parquet or another n_cv_folds")
        plans.append(FoldPlan(f, held, inner, train_rows, inner_rows, test_rows))
    return plans


# --------------------------------------------------------------------------------------------
# What a fold was trained with, and its result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything a trained unit's result depends on besides the unit itself (a fold, a
    held-out source): two results may be aggregated only when their recipes are equal."""

    data_version: str
    architecture: dict[str, Any]
    train_config: dict[str, Any]
    init: str = "scratch"  # where the weights started: "pretrained" (a backbone) or "scratch"
    backbone: str | None = None  # the backbone's identity when pretrained

    @classmethod
    def of(cls, data_version: str, arch: ArchConfig, config: TrainConfig, **extra: Any) -> Self:
        return cls(data_version=data_version, architecture=arch.to_dict(), train_config=recipe_dict(config), **extra)

    def identity(self, unit: object) -> str:
        """Version string of ``unit`` trained with this recipe (the partition's data version)."""
        return stable_hash({"unit": str(unit), **self.to_json()})

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Self:
        if not isinstance(d, dict) or not isinstance(d.get("architecture"), dict) \
                or not isinstance(d.get("train_config"), dict):  # else mismatch() would crash on it
            raise TypeError("the recipe is not an object with architecture and train_config objects")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})  # older files: defaults

    def mismatch(self, current: TrainingRecipe) -> str | None:
        """Why a result trained with this recipe does not belong to ``current`` (None: it does)."""
        if self.data_version != current.data_version:
            return f"trained on data version {self.data_version}, the published data is {current.data_version}"
        for f in fields(self):
            if f.name not in ("data_version", "architecture", "train_config") and \
                    getattr(self, f.name) != getattr(current, f.name):
                return f"trained with {f.name} {getattr(self, f.name)}, now {getattr(current, f.name)}"
        if self.architecture != current.architecture:
            return f"trained with another architecture ({self.architecture.get('name')})"
        changed = sorted(k for k in {*self.train_config, *current.train_config}
                         if self.train_config.get(k) != current.train_config.get(k))
        if changed:
            return "trained with another recipe (" + ", ".join(
                f"{k} {self.train_config.get(k)!r}, now {current.train_config.get(k)!r}" for k in changed) + ")"
        return None


@dataclass(frozen=True)
class FoldRecipe(TrainingRecipe):
    """A CV fold's recipe: also the number of CV folds (fold k of 3 is not fold k of 10)."""

    n_cv_folds: int = 0


@dataclass
class FoldResult:
    fold: int
    held_out_stored_folds: tuple[int, ...]
    inner_stored_fold: int
    n_train: int
    n_inner_validation: int
    n_test: int
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    train_seconds: float
    oof: pd.DataFrame  # image_id, label, fold, p_<class>..., predicted
    run_id: str = ""  # the Dagster run that trained it ("" outside a run)
    # temperature scaling fitted on this fold's held-out rows only (never an image it trained or
    # early-stopped on): Calibration.to_dict(), fitted_on "out-of-fold"; {} for older results
    calibration: dict[str, Any] = field(default_factory=dict)
    trained: Any = field(default=None, repr=False)  # the TrainResult (in memory only, not stored)

    def row(self) -> dict[str, Any]:
        return {"fold": str(self.fold), "n_train": self.n_train, "n_inner_validation": self.n_inner_validation,
                "n_test": self.n_test, **self.metrics, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "train_seconds": round(self.train_seconds, 2),
                "run_id": self.run_id}

    def to_json(self) -> dict[str, Any]:
        return {"fold": self.fold, "held_out_stored_folds": list(self.held_out_stored_folds),
                "inner_stored_fold": self.inner_stored_fold, "n_train": self.n_train,
                "n_inner_validation": self.n_inner_validation, "n_test": self.n_test, "metrics": self.metrics,
                "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "train_seconds": self.train_seconds,
                "run_id": self.run_id, "calibration": self.calibration}

    @classmethod
    def from_json(cls, d: dict[str, Any], oof: pd.DataFrame) -> FoldResult:
        return cls(fold=int(d["fold"]), held_out_stored_folds=tuple(d["held_out_stored_folds"]),
                   inner_stored_fold=int(d["inner_stored_fold"]), n_train=int(d["n_train"]),
                   n_inner_validation=int(d["n_inner_validation"]), n_test=int(d["n_test"]),
                   metrics={k: float(v) for k, v in d["metrics"].items()}, best_epoch=int(d["best_epoch"]),
                   epochs_run=int(d["epochs_run"]), train_seconds=float(d["train_seconds"]), oof=oof,
                   run_id=str(d.get("run_id", "")), calibration=dict(d.get("calibration") or {}))


class FoldStore(PartitionStore[int, FoldResult, FoldRecipe]):
    """Stored fold results, one pair per fold: ``fold_NN_oof.parquet``, then ``fold_NN.json``
    (written last: its presence marks the fold complete) with the fold's recipe."""

    recipe_type = FoldRecipe
    missing = NOT_MATERIALIZED

    def files(self, fold: int) -> tuple[Path, Path]:
        return self.dir / f"fold_{fold:02d}.json", self.dir / f"fold_{fold:02d}_oof.parquet"

    paths = files

    def save(self, result: FoldResult, recipe: FoldRecipe) -> dict[str, str]:
        meta_path, oof_path = self.write(result.fold, result, recipe)
        return {"result": str(meta_path), "oof": str(oof_path)}

    def encode(self, result: FoldResult, data: tuple[Path, ...]) -> dict[str, Any]:
        write_parquet(data[0], result.oof)
        return result.to_json()

    def read(self, path: Path) -> pd.DataFrame:
        return pd.read_parquet(path)

    def decode(self, key: int, record: Any, data: list[Any]) -> FoldResult:
        return FoldResult.from_json(record, data[0])


@dataclass
class FoldCollection:
    """The stored folds of one cross-validation: usable ones, missing ones, refused ones (why)."""

    used: list[FoldResult]
    missing: list[int]
    refused: dict[int, str]

    @property
    def complete(self) -> bool:
        return not self.missing and not self.refused


def collect_folds(store: FoldStore, current: FoldRecipe) -> FoldCollection:
    """Folds 0..k-1 of ``current`` from ``store``: a fold stored with another recipe (another
    data version above all) is refused with the reason, never mixed in."""
    used, missing, refused = [], [], {}
    for fold in range(current.n_cv_folds):
        loaded = store.load(fold)
        if loaded == NOT_MATERIALIZED:
            missing.append(fold)
            continue
        why = loaded if isinstance(loaded, str) else loaded[1].mismatch(current)
        if why:
            refused[fold] = why
        else:
            used.append(loaded[0])
    return FoldCollection(used, missing, refused)


@dataclass
class CVResult:
    folds: list[FoldResult]
    n_cv_folds: int
    seconds: float = 0.0

    @cached_property  # read by the writer, the plot and the asset's metadata
    def table(self) -> pd.DataFrame:
        return summarize_folds(pd.DataFrame([r.row() for r in self.folds]))

    @cached_property
    def oof(self) -> pd.DataFrame:
        """Out-of-fold probabilities of every held-out row of the folds run (one row per image)."""
        if not self.folds:
            return pd.DataFrame(columns=["image_id", "label", "fold", *PROB_COLUMNS, "predicted"])
        return pd.concat([r.oof for r in self.folds], ignore_index=True).sort_values("image_id").reset_index(drop=True)


def summarize_folds(rows: pd.DataFrame) -> pd.DataFrame:
    """Append ``mean`` and ``std`` rows (over the fold rows) for every metric column.

    ``std`` is the sample standard deviation (ddof=1); with a single fold it is NaN.
    """
    if rows.empty:
        return rows
    rows = rows.copy()
    rows["fold"] = rows["fold"].astype(str)
    metrics = [c for c in METRIC_COLUMNS if c in rows.columns]
    mean = {"fold": "mean", **{c: float(rows[c].mean()) for c in metrics},
            "n_test": float(rows["n_test"].mean()) if "n_test" in rows else np.nan}
    std = {"fold": "std", **{c: float(rows[c].std(ddof=1)) if len(rows) > 1 else np.nan for c in metrics}}
    out = pd.concat([rows, pd.DataFrame([mean, std])], ignore_index=True)
    for col in ("n_train", "n_inner_validation", "n_test", "best_epoch", "epochs_run"):
        if col in out:
            out[col] = out[col].astype("float64")
    if "run_id" in out:
        out["run_id"] = out["run_id"].fillna("").astype(str)
    return out


def oof_frame(image_ids: Sequence[str], labels: np.ndarray, fold: int, probs: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame({"image_id": list(image_ids), "label": [CLASSES[i] for i in labels],
                       "fold": np.full(len(labels), fold, dtype=np.int64)})
    for j, col in enumerate(PROB_COLUMNS):
        df[col] = probs[:, j] if len(probs) else np.zeros(0)
    df["predicted"] = [CLASSES[i] for i in probs.argmax(1)] if len(probs) else []
    return df


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def train_fold(
    pool: SplitArrays,
    fold: int,
    arch: ArchConfig,
    config: TrainConfig,
    *,
    n_cv_folds: int | None = None,
    run_id: str = "",
    log: LogFn | None = None,
    train_log: LogFn | None = None,
    train_fn: TrainFn = train_model,
) -> FoldResult:
    """Train CV fold ``fold`` (0-based) of ``n_cv_folds`` and evaluate it on its held-out rows.

    ``pool`` is train+validation with a ``fold`` column in ``pool.frame``. ``train_fn`` has
    :func:`fer_pipeline.ml.train.train_model`'s signature (injectable for tests).
    """
    log = log or (lambda _m: None)
    plans = plan_folds(pool.frame["fold"].to_numpy(), n_cv_folds)
    k = len(plans)
    if not 0 <= int(fold) < k:
        raise ValueError(f"fold {fold} does not exist: the cross-validation has folds 0..{k - 1}")
    plan = plans[int(fold)]
    train, inner, test = subset(pool, plan.train_rows), subset(pool, plan.inner_rows), subset(pool, plan.test_rows)
    log(f"fold {fold} of {k}: training {arch.name} on {len(train)} images, early stopping on stored fold "
        f"{plan.inner_stored_fold} ({len(inner)} images), testing on stored folds "
        f"{list(plan.held_out_stored_folds)} ({len(test)} images)")
    t0 = time.perf_counter()
    prefix = f"[cv fold {fold}] "
    result = train_fn(train.images, train.labels, inner.images, inner.labels, arch, config,
                      log=(lambda m: train_log(prefix + m)) if train_log else None)
    logits = predict_logits(result.build(), test.images, result.normalization, tta_flip=config.tta_flip,
                            batch_size=config.eval_batch_size).double().numpy()
    probs = softmax(logits)
    metrics = evaluate_predictions(test.labels, probs.argmax(1), probs)
    # the fold model's temperature, fitted on its held-out rows only: the fold never trained or
    # early-stopped on them, so its calibration is judged on images it has not seen
    calibration = calibrate(logits, test.labels, fitted_on=f"out-of-fold (CV fold {int(fold)} of {k})")
    fr = FoldResult(fold=int(fold), held_out_stored_folds=plan.held_out_stored_folds,
                    inner_stored_fold=plan.inner_stored_fold, n_train=len(train), n_inner_validation=len(inner),
                    n_test=len(test), metrics=metrics_row(metrics), best_epoch=int(result.best_epoch),
                    epochs_run=len(result.history), train_seconds=time.perf_counter() - t0,
                    oof=oof_frame(test.image_ids, test.labels, int(fold), probs), run_id=run_id,
                    calibration=calibration.to_dict(), trained=result)
    log(f"fold {fold} of {k} done in {fr.train_seconds:.1f}s: accuracy {fr.metrics['accuracy']:.4f}, "
        f"macro-F1 {fr.metrics['macro_f1']:.4f}")
    return fr


def run_cross_validation(
    pool: SplitArrays,
    arch: ArchConfig,
    config: TrainConfig,
    *,
    n_cv_folds: int | None = None,
    folds: Sequence[int] | None = None,
    log: LogFn | None = None,
    train_log: LogFn | None = None,
    train_fn: TrainFn = train_model,
) -> CVResult:
    """Every selected fold (all by default) one after the other, in this process: for scripts
    and tests. The pipeline runs each fold as a partition of ``cv_fold`` instead."""
    start = time.perf_counter()
    k = len(plan_folds(pool.frame["fold"].to_numpy(), n_cv_folds))
    selected = sorted(set(range(k) if folds is None else (int(f) for f in folds)))
    bad = [f for f in selected if not 0 <= f < k]
    if bad:
        raise ValueError(f"folds {bad} do not exist: the cross-validation has folds 0..{k - 1}")
    results = [train_fold(pool, f, arch, config, n_cv_folds=k, log=log, train_log=train_log, train_fn=train_fn)
               for f in selected]
    return CVResult(results, k, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Published outputs (reports/cv_folds.*, cv_oof.parquet, cv_summary.json, cv_folds.png)
# --------------------------------------------------------------------------------------------


def write_cv_outputs(paths: DataPaths, cv: CVResult, arch: ArchConfig, config: TrainConfig, *,
                     data_version: str, n_pool: int, missing: Sequence[int] = (),
                     refused: dict[int, str] | None = None) -> dict[str, str]:
    """Publish a cross-validation: per-fold table, out-of-fold probabilities, summary, plot."""
    from fer_pipeline.analysis.plots import plot_cv_folds

    files = write_table(paths.report("cv_folds"), cv.table)
    files["oof"] = str(write_parquet(paths.report("cv_oof"), cv.oof))
    files["summary"] = str(write_json(paths.report("cv_summary"), {
        "data_version": data_version, "architecture": arch.name, "n_cv_folds": cv.n_cv_folds,
        "folds_run": [r.fold for r in cv.folds], "folds_missing": list(missing),
        "folds_refused": {str(k): v for k, v in (refused or {}).items()},
        "fold_runs": {str(r.fold): r.run_id for r in cv.folds},
        "train_config": config.to_dict(), "n_pool": n_pool, "n_oof": len(cv.oof)}))
    files["plot"] = str(plot_cv_folds(cv.table, paths.report("cv_folds_png"),
                                      title=f"{cv.n_cv_folds}-fold CV of {arch.name} ({config.epochs} epochs max)"))
    return files


@dataclass
class CVOutputs:
    """What a published cross-validation left for its readers (label issues)."""

    oof: pd.DataFrame
    summary: dict[str, Any]
    folds: pd.DataFrame | None

    @property
    def mean_macro_f1(self) -> float | None:
        if self.folds is None or not len(self.folds):
            return None
        return float(self.folds.loc[self.folds["fold"] == "mean", "macro_f1"].iloc[0])


def read_cv_outputs(paths: DataPaths) -> CVOutputs:
    """The published cross-validation (the out-of-fold table is required; the rest optional)."""
    oof_path = paths.report("cv_oof")
    if not oof_path.is_file():
        raise FileNotFoundError(f"{oof_path} does not exist: materialize cross_validation first")
    summary_path, folds_path = paths.report("cv_summary"), paths.report("cv_folds").with_suffix(".parquet")
    return CVOutputs(oof=pd.read_parquet(oof_path),
                     summary=json.loads(summary_path.read_text()) if summary_path.is_file() else {},
                     folds=pd.read_parquet(folds_path) if folds_path.is_file() else None)
