"""K-fold cross-validation of the main model over train+validation, resumable fold by fold.

Folds come from ``splits.parquet`` (the ``fold`` column, stratified by class with whole
duplicate groups inside one fold), so the cross-validation never puts two copies of a face on
both sides of a fold boundary. Fewer CV folds than stored folds are obtained by merging stored
folds (CV fold = stored fold mod k), which keeps both properties.

For CV fold ``f``:

* held out (evaluated): the rows of CV fold ``f`` -- never seen in training or early stopping;
* inner validation (early stopping): the first stored fold after ``f`` (cyclically) that is not
  held out; with k = number of stored folds that is simply fold ``(f + 1) % k``;
* training: every other row.

Each finished fold is cached under ``cache_dir/<arch>-<key>/`` (metrics JSON + out-of-fold
probabilities), keyed by the data version, the fold assignment, the number of CV folds, the
architecture and the training config, so a re-run (or a run interrupted after some folds)
does not retrain finished folds for the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.atomic import write_json, write_parquet, write_table
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.inference import predict_proba
from fer_pipeline.ml.metrics import ClassificationMetrics, evaluate_predictions
from fer_pipeline.ml.train import TrainConfig, train_model
from fer_pipeline.paths import DataPaths

LogFn = Callable[[str], None]
TrainFn = Callable[..., Any]

#: Metric columns of the per-fold table, in display order.
METRIC_COLUMNS: tuple[str, ...] = ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                   "micro_precision", "micro_recall", "micro_f1")
PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)


def metrics_row(m: ClassificationMetrics) -> dict[str, float]:
    """Accuracy and macro/micro precision, recall, F1 of one evaluation, as a flat dict."""
    return {
        "accuracy": m.accuracy,
        "macro_precision": m.precision["macro"], "macro_recall": m.recall["macro"], "macro_f1": m.f1["macro"],
        "micro_precision": m.precision["micro"], "micro_recall": m.recall["micro"], "micro_f1": m.f1["micro"],
    }


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short SHA-256 of a JSON-able object (sorted keys), for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


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
# Results and cache
# --------------------------------------------------------------------------------------------


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
    cached: bool = False

    def row(self) -> dict[str, Any]:
        return {"fold": str(self.fold), "n_train": self.n_train, "n_inner_validation": self.n_inner_validation,
                "n_test": self.n_test, **self.metrics, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "train_seconds": round(self.train_seconds, 2),
                "from_cache": self.cached}

    def to_json(self) -> dict[str, Any]:
        return {"fold": self.fold, "held_out_stored_folds": list(self.held_out_stored_folds),
                "inner_stored_fold": self.inner_stored_fold, "n_train": self.n_train,
                "n_inner_validation": self.n_inner_validation, "n_test": self.n_test, "metrics": self.metrics,
                "best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "train_seconds": self.train_seconds}


class FoldCache:
    """Finished folds of one CV configuration: ``fold_NN.json`` (written last) + ``fold_NN_oof.parquet``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def _paths(self, fold: int) -> tuple[Path, Path]:
        return self.dir / f"fold_{fold:02d}.json", self.dir / f"fold_{fold:02d}_oof.parquet"

    def load(self, fold: int) -> FoldResult | None:
        meta_path, oof_path = self._paths(fold)
        if not (meta_path.is_file() and oof_path.is_file()):
            return None
        try:
            d = json.loads(meta_path.read_text())
            oof = pd.read_parquet(oof_path)
        except (OSError, ValueError):
            return None  # a damaged cache entry is retrained, not trusted
        return FoldResult(fold=int(d["fold"]), held_out_stored_folds=tuple(d["held_out_stored_folds"]),
                          inner_stored_fold=int(d["inner_stored_fold"]), n_train=int(d["n_train"]),
                          n_inner_validation=int(d["n_inner_validation"]), n_test=int(d["n_test"]),
                          metrics={k: float(v) for k, v in d["metrics"].items()}, best_epoch=int(d["best_epoch"]),
                          epochs_run=int(d["epochs_run"]), train_seconds=float(d["train_seconds"]), oof=oof,
                          cached=True)

    def save(self, result: FoldResult, extra: dict[str, Any] | None = None) -> None:
        meta_path, oof_path = self._paths(result.fold)
        write_parquet(oof_path, result.oof)
        write_json(meta_path, {**result.to_json(), **(extra or {})})  # last: marks the fold complete


def cv_cache_key(data_version: str, pool_folds: pd.DataFrame, n_cv_folds: int, arch: ArchConfig,
                 config: TrainConfig) -> str:
    """Key of one CV configuration: same key = same inputs, so cached folds are valid."""
    folds = pool_folds[["image_id", "fold"]].sort_values("image_id").astype(str).agg(":".join, axis=1)
    return stable_hash({"data_version": data_version, "folds": hashlib.sha256("\n".join(folds).encode()).hexdigest(),
                        "n_cv_folds": n_cv_folds, "arch": arch.to_dict(), "train_config": config.to_dict()})


@dataclass
class CVResult:
    folds: list[FoldResult]
    n_cv_folds: int
    key: str
    cache_dir: Path | None
    seconds: float

    @property
    def trained(self) -> list[int]:
        return [r.fold for r in self.folds if not r.cached]

    @property
    def from_cache(self) -> list[int]:
        return [r.fold for r in self.folds if r.cached]

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
    if "from_cache" in out:
        out["from_cache"] = out["from_cache"].astype("boolean")
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


def run_cross_validation(
    pool: SplitArrays,
    arch: ArchConfig,
    config: TrainConfig,
    *,
    data_version: str,
    n_cv_folds: int | None = None,
    folds: Sequence[int] | None = None,
    cache_dir: Path | None = None,
    log: LogFn | None = None,
    train_log: LogFn | None = None,
    train_fn: TrainFn = train_model,
) -> CVResult:
    """Train and evaluate the selected CV folds (all by default), reusing cached folds.

    ``pool`` is train+validation with a ``fold`` column in ``pool.frame``; ``folds`` selects a
    subset of CV folds (0-based); ``cache_dir`` None disables caching. ``train_fn`` has
    :func:`fer_pipeline.ml.train.train_model`'s signature (injectable for tests).
    """
    log = log or (lambda _m: None)
    start = time.perf_counter()
    plans = plan_folds(pool.frame["fold"].to_numpy(), n_cv_folds)
    k = len(plans)
    selected = sorted(set(range(k) if folds is None else (int(f) for f in folds)))
    bad = [f for f in selected if not 0 <= f < k]
    if bad:
        raise ValueError(f"folds {bad} do not exist: the cross-validation has folds 0..{k - 1}")
    key = cv_cache_key(data_version, pool.frame, k, arch, config)
    cache = FoldCache(Path(cache_dir) / f"{arch.name}-{key}") if cache_dir is not None else None
    log(f"cross-validation of {arch.name}: {k} folds over {len(pool)} train+validation images, "
        f"running folds {selected}; cache {cache.dir if cache else 'off'}")
    results: list[FoldResult] = []
    for i, f in enumerate(selected, 1):
        plan = plans[f]
        cached = cache.load(f) if cache else None
        if cached is not None:
            results.append(cached)
            log(f"fold {f} ({i}/{len(selected)}): reused from cache, macro-F1 {cached.metrics['macro_f1']:.4f}")
            continue
        train, inner, test = subset(pool, plan.train_rows), subset(pool, plan.inner_rows), subset(pool, plan.test_rows)
        log(f"fold {f} ({i}/{len(selected)}): training on {len(train)} images, early stopping on stored fold "
            f"{plan.inner_stored_fold} ({len(inner)} images), testing on stored folds "
            f"{list(plan.held_out_stored_folds)} ({len(test)} images)")
        t0 = time.perf_counter()
        prefix = f"[cv fold {f}] "
        result = train_fn(train.images, train.labels, inner.images, inner.labels, arch, config,
                          log=(lambda m: train_log(prefix + m)) if train_log else None)
        probs = predict_proba(result.build(), test.images, result.normalization, tta_flip=config.tta_flip,
                              batch_size=config.eval_batch_size)
        metrics = evaluate_predictions(test.labels, probs.argmax(1), probs)
        fr = FoldResult(fold=f, held_out_stored_folds=plan.held_out_stored_folds,
                        inner_stored_fold=plan.inner_stored_fold, n_train=len(train), n_inner_validation=len(inner),
                        n_test=len(test), metrics=metrics_row(metrics), best_epoch=int(result.best_epoch),
                        epochs_run=len(result.history), train_seconds=time.perf_counter() - t0,
                        oof=oof_frame(test.image_ids, test.labels, f, probs))
        if cache:
            cache.save(fr, {"key": key, "data_version": data_version, "arch": arch.to_dict(),
                            "train_config": config.to_dict()})
        results.append(fr)
        done = time.perf_counter() - start
        remaining = len(selected) - i
        eta = f", about {done / i * remaining:.0f}s left" if remaining else ""
        log(f"fold {f} ({i}/{len(selected)}) done in {fr.train_seconds:.1f}s: accuracy {fr.metrics['accuracy']:.4f}, "
            f"macro-F1 {fr.metrics['macro_f1']:.4f}{eta}")
    return CVResult(results, k, key, cache.dir if cache else None, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Published outputs (reports/cv_folds.*, cv_oof.parquet, cv_summary.json, cv_folds.png)
# --------------------------------------------------------------------------------------------


def write_cv_outputs(paths: DataPaths, cv: CVResult, arch: ArchConfig, config: TrainConfig, *,
                     data_version: str, n_pool: int) -> dict[str, str]:
    """Publish a cross-validation: per-fold table, out-of-fold probabilities, summary, plot."""
    from fer_pipeline.analysis.plots import plot_cv_folds

    files = write_table(paths.report("cv_folds"), cv.table)
    files["oof"] = str(write_parquet(paths.report("cv_oof"), cv.oof))
    files["summary"] = str(write_json(paths.report("cv_summary"), {
        "data_version": data_version, "cache_key": cv.key, "architecture": arch.name, "n_cv_folds": cv.n_cv_folds,
        "folds_run": [r.fold for r in cv.folds], "trained_this_run": cv.trained, "from_cache": cv.from_cache,
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
