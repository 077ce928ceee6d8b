"""Plain-Python steps the model assets are made of: fingerprint the data a model is trained on,
load it, train + save one architecture (evaluation lives in :mod:`fer_pipeline.ml.evaluate`).

Kept apart from the Dagster wiring so scripts (benchmarks, cross-validation) reuse exactly the
recipe the assets use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.atomic import replace_synced
from fer_pipeline.dataset.preprocess import PreprocessSettings
from fer_pipeline.dataset.publish import data_version, read_published  # noqa: F401  (data_version re-exported)
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


def load_pipeline_data(paths: DataPaths, split_names: tuple[str, ...] = SPLITS,
                       with_images: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, SplitArrays], str]:
    """(manifest, splits, per-split arrays, data version) from the data root: what every model
    and evaluation asset starts from."""
    published = read_published(paths)  # refuses tables from two different runs
    kept, split_table = published.manifest, published.splits
    arrays = load_split_arrays(paths.root, kept, split_table, split_names, with_images=with_images)
    return kept, split_table, arrays, published.data_version


@dataclass
class TrainedModel:
    name: str
    checkpoint: Path  # the published checkpoint, or the rejected candidate when ``bad_tensors``
    curves_png: Path
    result: TrainResult
    validation: ClassificationMetrics
    baseline_validation: ClassificationMetrics
    bad_tensors: list[str]  # tensors holding NaN/inf: such a model is never published

    @property
    def published(self) -> bool:
        return not self.bad_tensors


def train_and_save(name: str, arch: ArchConfig, config: TrainConfig, arrays: dict[str, SplitArrays],
                   paths: DataPaths, version: str, preprocess: PreprocessSettings, *,
                   train_rows: np.ndarray | None = None, sample_weights: np.ndarray | None = None,
                   extra: dict[str, Any] | None = None, log: LogFn | None = None) -> TrainedModel:
    """Train on the train split (optionally a row selection with per-row weights, e.g. a
    mitigation plan), early-stop on validation, write checkpoint + curves.

    Write, audit, publish: checkpoint and curves are written as candidates under
    ``models/candidates/`` and renamed over the published ones only when every weight is
    finite, so readers never load a broken model in place of the last good one. ``preprocess``
    is recorded in the checkpoint so prediction prepares inputs exactly as the training faces
    were prepared."""
    train, val = arrays["train"], arrays["validation"]
    images, labels = (train.images, train.labels) if train_rows is None else (train.images[train_rows],
                                                                              train.labels[train_rows])
    result = train_model(images, labels, val.images, val.labels, arch, config, sample_weights=sample_weights,
                         log=log)
    probs = predict_proba(result.build(), val.images, result.normalization, tta_flip=config.tta_flip)
    validation = evaluate_predictions(val.labels, probs.argmax(axis=1), probs)
    baseline = majority_baseline(labels, val.labels)
    candidates = paths.model_candidates_dir
    ckpt = save_checkpoint(candidates / paths.checkpoint(name).name, result, data_version=version,
                           preprocess=preprocess, metrics={"validation": validation.to_dict()}, model_name=name,
                           extra=extra)
    curves = plot_training_curves(result.history, candidates / paths.curves(name).name, title=name,
                                  best_epoch=result.best_epoch)
    finite, bad = weights_are_finite(ckpt)
    if finite:
        ckpt = replace_synced(ckpt, paths.checkpoint(name))
        curves = replace_synced(curves, paths.curves(name))
    return TrainedModel(name, ckpt, curves, result, validation, baseline, bad)


def weights_are_finite(checkpoint: Path) -> tuple[bool, list[str]]:
    """(all finite, names of tensors holding NaN/inf)."""
    from safetensors.numpy import load_file

    bad = [k for k, v in load_file(str(checkpoint)).items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    return not bad, bad
