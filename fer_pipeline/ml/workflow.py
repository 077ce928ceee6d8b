"""Plain-Python steps the model assets are made of: fingerprint the data a model is trained on,
load it, train + save one architecture (evaluation lives in :mod:`fer_pipeline.ml.evaluate`).

Kept apart from the Dagster wiring so scripts (benchmarks, cross-validation) reuse exactly the
recipe the assets use.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fer_pipeline.atomic import replace_synced
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.publish import data_version, read_published  # noqa: F401  (data_version re-exported)
from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.calibration import calibrate, softmax
from fer_pipeline.ml.checkpoint import Framing, save_checkpoint, weights_are_finite
from fer_pipeline.ml.data import SplitArrays, load_split_arrays
from fer_pipeline.ml.inference import predict_logits
from fer_pipeline.ml.metrics import (
    ClassificationMetrics,
    evaluate_predictions,
    majority_baseline,
)
from fer_pipeline.ml.plots import plot_training_curves
from fer_pipeline.ml.pretrain import Start
from fer_pipeline.ml.train import TrainConfig, TrainResult, train_model
from fer_pipeline.paths import DataPaths
from fer_pipeline.publish_lock import publish_files
from fer_pipeline.schema import FRAMING_COLUMN, SPLITS
from fer_pipeline.sources.framing import CROP, DETECT, MIXED, SOURCE_FRAMINGS

if TYPE_CHECKING:
    from fer_pipeline.sources.catalog import Catalog

MANIFEST_FRAMING = FRAMING_COLUMN  # kept for importers; the name lives in schema.py

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


def training_framing(rows: pd.DataFrame, catalog: Catalog | None = None) -> Framing:
    """How ``rows`` (training manifest rows) were framed: "crop", "detect" or "mixed", and for
    detected rows the detector settings and margin ingestion used.

    A manifest without the ``framing`` column, or a row without a value, is "crop" (manifests
    written before detection existed). The settings are those ``catalog`` gives the detected
    rows' sources (:meth:`fer_pipeline.faces.framing.SourceFraming.of`, what ingestion runs);
    a source it does not list as ``faces: detect`` (or no catalogue) counts with the ``detect:``
    defaults. Sources detected with different settings: the settings of the most rows."""
    from fer_pipeline.faces.framing import Detection, SourceFraming

    column = MANIFEST_FRAMING
    values = (rows[column].astype(object).where(rows[column].notna(), CROP) if column in rows.columns
              else pd.Series([CROP] * len(rows), index=rows.index, dtype=object))
    counts = {str(k): int(v) for k, v in values.value_counts().sort_index().items()}
    unknown = sorted(set(counts) - set(SOURCE_FRAMINGS))
    if unknown:
        raise ValueError(f"manifest column '{column}' holds {unknown}; expected {' or '.join(map(repr, SOURCE_FRAMINGS))}")
    if not counts.get(DETECT):
        return Framing(CROP, rows=counts)
    specs = {s.name: s for s in catalog.sources} if catalog is not None else {}
    sources = rows.loc[values == DETECT, "source"] if "source" in rows.columns else pd.Series([None] * counts[DETECT])
    weight: dict[str, int] = {}  # face-store key (what changes the faces; not `keep`) -> rows
    detections: dict[str, Detection] = {}
    for source, n in sources.value_counts(dropna=False).items():
        spec = specs.get(source)
        detection = (SourceFraming.of(spec).detection if spec is not None else None) or Detection()
        detections.setdefault(detection.key, detection)
        weight[detection.key] = weight.get(detection.key, 0) + int(n)
    chosen = detections[max(weight, key=lambda k: (weight[k], k))]
    return Framing(MIXED if counts.get(CROP) else DETECT, chosen.settings(), chosen.margin, counts)


def _catalog_beside(paths: DataPaths, rows: pd.DataFrame, log: LogFn | None) -> Catalog | None:
    """The data root's catalogue, read only when ``rows`` hold detected faces (None: none there)."""
    from fer_pipeline.sources.catalog import load_catalog

    column = MANIFEST_FRAMING
    if column not in rows.columns or not (rows[column] == DETECT).any():
        return None
    try:
        return load_catalog(paths.catalog, paths.root, check_paths=False)  # settings only: sources may be elsewhere
    except Exception as exc:  # noqa: BLE001 -- the checkpoint then records the detect defaults, said aloud
        if log:
            log(f"framing: cannot read {paths.catalog} ({exc}); recording the default detector settings")
        return None


def framing_of(paths: DataPaths, rows: pd.DataFrame, log: LogFn | None = None) -> Framing:
    """:func:`training_framing` of ``rows`` with the data root's catalogue (what a checkpoint of
    a model trained on them records; CV fold models use it too)."""
    return training_framing(rows, _catalog_beside(paths, rows, log))


def train_and_save(name: str, arch: ArchConfig, config: TrainConfig, arrays: dict[str, SplitArrays],
                   paths: DataPaths, version: str, preprocess: PreprocessSettings, *,
                   train_rows: np.ndarray | None = None, sample_weights: np.ndarray | None = None,
                   extra: dict[str, Any] | None = None, log: LogFn | None = None,
                   catalog: Catalog | None = None, start: Start | None = None) -> TrainedModel:
    """Train on the train split (optionally a row selection with per-row weights, e.g. a
    mitigation plan), early-stop on validation, write checkpoint + curves.

    Write, audit, publish: checkpoint and curves are written as candidates under
    ``models/candidates/`` (under names of this process's own) and renamed over the published ones,
    under the data root's publication lock, only when every weight is finite, so readers never
    load a broken model in place of the last good one, nor one run's checkpoint beside another's
    curves; a rejected pair is kept as ``models/candidates/<name>``. ``preprocess``
    and the framing of the rows trained on (:func:`training_framing`, with the detection settings
    of ``catalog``, by default the data root's ``sources.yaml``) are recorded in the checkpoint
    so prediction prepares inputs exactly as the training faces were prepared. ``start`` (a
    pretrained backbone's features, :func:`fer_pipeline.ml.pretrain.starting_point`) is where the
    weights begin, recorded in the checkpoint's ``extra`` (default: random weights)."""
    train, val = arrays["train"], arrays["validation"]
    images, labels = (train.images, train.labels) if train_rows is None else (train.images[train_rows],
                                                                              train.labels[train_rows])
    rows = train.frame if train_rows is None else train.frame.iloc[train_rows]
    framing = training_framing(rows, catalog if catalog is not None else _catalog_beside(paths, rows, log))
    start = start or Start("scratch", "no start given")
    extra = {**(extra or {}), **start.describe()}
    result = train_model(images, labels, val.images, val.labels, arch, config, sample_weights=sample_weights,
                         init_state=start.state, log=log)
    logits = predict_logits(result.build(), val.images, result.normalization, tta_flip=config.tta_flip).double().numpy()
    probs = softmax(logits)
    validation = evaluate_predictions(val.labels, probs.argmax(axis=1), probs)
    calibration = calibrate(logits, val.labels, fitted_on="validation")  # temperature scaling, stored below
    baseline = majority_baseline(labels, val.labels)
    candidates = paths.model_candidates_dir
    # this process's own candidate names: two runs training the same model never write, check or
    # rename each other's files
    own = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ckpt_target, curves_target = paths.checkpoint(name), paths.curves(name)
    own_ckpt = ckpt = candidates / f"{ckpt_target.stem}.{own}{ckpt_target.suffix}"
    own_curves = curves = candidates / f"{curves_target.stem}.{own}{curves_target.suffix}"
    try:
        save_checkpoint(ckpt, result, data_version=version, preprocess=preprocess,
                        metrics={"validation": validation.to_dict()}, model_name=name, extra=extra,
                        framing=framing, calibration=calibration.to_dict())
        plot_training_curves(result.history, curves, title=name, best_epoch=result.best_epoch)
        finite, bad = weights_are_finite(ckpt)
        if finite:  # under the data root's publication lock: never interleaved with another publisher
            ckpt, curves = publish_files(paths.root, [(ckpt, ckpt_target), (curves, curves_target)],
                                         what=f"publishing model {name}")
        else:  # kept for inspection under the model's own name (the newest rejected one)
            ckpt = replace_synced(ckpt, candidates / ckpt_target.name)
            curves = replace_synced(curves, candidates / curves_target.name)
    finally:
        for leftover in (own_ckpt, own_curves):
            leftover.unlink(missing_ok=True)  # failed before its rename
    return TrainedModel(name, ckpt, curves, result, validation, baseline, bad)
