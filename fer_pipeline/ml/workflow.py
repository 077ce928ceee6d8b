"""Plain-Python steps the model assets are made of: fingerprint the data a model is trained on,
load it, train + save one architecture (evaluation lives in :mod:`fer_pipeline.ml.evaluate`).

Kept apart from the Dagster wiring so scripts (benchmarks, cross-validation) reuse exactly the
recipe the assets use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.dataset.preprocess import PreprocessSettings
from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.checkpoint import save_checkpoint
from fer_pipeline.ml.data import SplitArrays, load_split_arrays
from fer_pipeline.ml.inference import predict_proba
from fer_pipeline.ml.metrics import (
    ClassificationMetrics,
    evaluate_predictions,
    majority_baseline,
)
from fer_pipeline.ml.plots import plot_training_curves
from fer_pipeline.ml.train import TrainConfig, TrainResult, train_model
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import SPLITS

LogFn = Callable[[str], None]


def data_version(manifest: pd.DataFrame, splits: pd.DataFrame) -> str:
    """Fingerprint of what a model sees: every image id with its label and split."""
    joined = manifest[["image_id", "label"]].merge(splits[["image_id", "split"]], on="image_id")
    rows = joined.sort_values("image_id").astype(str).agg("|".join, axis=1)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def load_pipeline_data(paths: DataPaths, split_names: tuple[str, ...] = SPLITS,
                       with_images: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, SplitArrays], str]:
    """(manifest, splits, per-split arrays, data version) from the data root: what every model
    and evaluation asset starts from."""
    kept = pd.read_parquet(paths.manifest)
    split_table = pd.read_parquet(paths.splits)
    arrays = load_split_arrays(paths.root, kept, split_table, split_names, with_images=with_images)
    return kept, split_table, arrays, data_version(kept, split_table)


@dataclass
class TrainedModel:
    name: str
    checkpoint: Path
    curves_png: Path
    result: TrainResult
    validation: ClassificationMetrics
    baseline_validation: ClassificationMetrics


def train_and_save(name: str, arch: ArchConfig, config: TrainConfig, arrays: dict[str, SplitArrays],
                   paths: DataPaths, version: str, preprocess: PreprocessSettings, *,
                   train_rows: np.ndarray | None = None, sample_weights: np.ndarray | None = None,
                   extra: dict[str, Any] | None = None, log: LogFn | None = None) -> TrainedModel:
    """Train on the train split (optionally a row selection with per-row weights, e.g. a
    mitigation plan), early-stop on validation, write checkpoint + curves.

    ``preprocess`` is recorded in the checkpoint so prediction prepares inputs exactly as the
    training faces were prepared."""
    train, val = arrays["train"], arrays["validation"]
    images, labels = (train.images, train.labels) if train_rows is None else (train.images[train_rows],
                                                                              train.labels[train_rows])
    result = train_model(images, labels, val.images, val.labels, arch, config, sample_weights=sample_weights,
                         log=log)
    probs = predict_proba(result.build(), val.images, result.normalization, tta_flip=config.tta_flip)
    validation = evaluate_predictions(val.labels, probs.argmax(axis=1), probs)
    baseline = majority_baseline(labels, val.labels)
    ckpt = save_checkpoint(paths.checkpoint(name), result, data_version=version, preprocess=preprocess,
                           metrics={"validation": validation.to_dict()}, model_name=name, extra=extra)
    curves = plot_training_curves(result.history, paths.curves(name), title=name, best_epoch=result.best_epoch)
    return TrainedModel(name, ckpt, curves, result, validation, baseline)


def weights_are_finite(checkpoint: Path) -> tuple[bool, list[str]]:
    """(all finite, names of tensors holding NaN/inf)."""
    from safetensors.numpy import load_file

    bad = [k for k, v in load_file(str(checkpoint)).items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    return not bad, bad
