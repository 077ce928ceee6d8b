"""The columns and names of the published tables: the one home of what other tools read.

File *locations* live in :class:`fer_pipeline.paths.DataPaths`; the class names and their order
in :mod:`fer_pipeline.classes`. Writers build these columns, readers and checks expect them.
No heavy imports here: the CLI and the face workers read it too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fer_pipeline.classes import CLASSES

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Split names, in the order reports show them."""

TEST_FOLD = -1
"""``fold`` of a test image in ``splits.parquet`` (train+validation images carry 0..k-1)."""

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "source", "source_path", "original_label", "label", "split_hint",
    "width", "height", "face_path", "face_height", "face_width", "phash", "dup_group",
    "dup_group_size", "mean_intensity", "std_intensity", "gender", "age_group", "race",
    "sha256", "bytes", "framing", "face_index", "faces_found", "box_left", "box_top", "box_right",
    "box_bottom", "detector_score",
)  # fmt: skip
"""``manifest.parquet``: one row per kept face (the manifest asset adds ``relabelled_from`` and the review
provenance columns :data:`MANIFEST_REVIEW_COLUMNS`).

``framing`` is how the face was cut from its file: ``crop`` (the file is a face crop) or ``detect``
(found by the face detector). ``face_index`` is the face's rank in its file (0 = largest; always 0
for crops), so ``(source, source_path, face_index)`` names a row; ``faces_found`` is how many faces
the detector found in the file, and ``box_*`` (pixels of the EXIF-oriented file, the detector's
dataset-style box before any margin) and ``detector_score`` where it found this one: all null for
crops."""

MANIFEST_REVIEW_COLUMNS: tuple[str, ...] = ("label_before_review", "reviewed_label", "review_source")
"""Review provenance the manifest asset adds (all null for an image nobody reviewed): the label the
pipeline had before the review, the reviewer's class (``label`` then equals it) and where the decision
came from (``label-studio <project> task <id> annotation <id> by <reviewer> at <time>``). The
source's own label stays in ``original_label``."""

DETECTION_COLUMNS: tuple[str, ...] = ("faces_found", "box_left", "box_top", "box_right", "box_bottom",
                                      "detector_score")
"""The manifest columns only detected faces fill (nullable; null for crops)."""

FRAMING_COLUMN = "framing"
"""The manifest column saying how each face was cut from its file ("crop" or "detect")."""

MANIFEST_KEY_COLUMNS: tuple[str, ...] = ("image_id", "source", "source_path", "label", "face_path", "phash")
"""Manifest columns that may never be null."""

EXCLUDED_COLUMNS: tuple[str, ...] = ("source", "source_path", "stage", "reason", "raw_label", "label",
                                     "duplicate_of", "face_index")
"""``excluded.parquet``: one row per source file not kept, with the stage and the reason; for a
file with several detected faces, one row per face not kept (``face_index``; 0 otherwise)."""

EXCLUDED_STAGES: tuple[str, ...] = ("inventory", "label_mapping", "faces", "deduplication", "pool",
                                   "leakage_guard", "review", "quality")
"""``stage`` of an excluded row: where the pipeline set the file (or face) aside. ``pool``: an exact
duplicate (same processed pixels) of another pretraining-pool image; ``leakage_guard``: a pool image
that duplicates a validation or test image (``duplicate_of`` names it); ``review``: a person reviewing the
image (Label Studio) decided "not a face" or "exclude"; ``quality``: an image-quality flag the
settings exclude (``fer.exclude_flags``; the reason is the flag's)."""
(STAGE_INVENTORY, STAGE_LABEL_MAPPING, STAGE_FACES, STAGE_DEDUP, STAGE_POOL, STAGE_LEAKAGE_GUARD,
 STAGE_REVIEW, STAGE_QUALITY) = EXCLUDED_STAGES

SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "split", "fold")
"""``splits.parquet``."""

POOL_COLUMNS: tuple[str, ...] = (
    "image_id", "source", "source_path", "original_label", "pool_label", "width", "height", "face_path",
    "face_height", "face_width", "phash", "phash_mirror", "pixel_sha", "mean_intensity", "std_intensity",
    "gender", "age_group", "race", "sha256", "bytes", "framing", "face_index", "faces_found", "box_left",
    "box_top", "box_right", "box_bottom", "detector_score",
)  # fmt: skip
"""``pool.parquet``: one row per pretraining-pool image (a face whose raw label is one of its source's
pool labels, see the catalogue's ``pretrain_labels``), after exact duplicates within the pool and the
leakage guard. ``original_label`` is the source's own label, ``pool_label`` the label pretraining
learns (lower case; a catalogue may merge synonyms). ``phash_mirror`` (the mirrored face's hash) and
``pixel_sha`` (SHA-256 of the processed pixels) are what the guard and the pool version use; the
other columns mean what they mean in the manifest."""

DEMOGRAPHIC_ATTRIBUTES: tuple[str, ...] = ("gender", "age_group", "race")
"""Nullable demographic columns of the inventory and the manifest."""


NOT_A_FACE = "not a face"
EXCLUDE = "exclude"
REVIEW_EXCLUSIONS: tuple[str, ...] = (NOT_A_FACE, EXCLUDE)
"""Review decisions that take an image out of the manifest (an excluded row, stage ``review``)."""
REVIEW_DECISIONS: tuple[str, ...] = (*CLASSES, *REVIEW_EXCLUSIONS)
"""What a reviewer may answer for an image: one of the four classes, or one of the exclusions."""

REVIEW_QUEUE_COLUMNS: tuple[str, ...] = (
    "rank", "image_id", "sha256", "face_index", "source", "source_path", "image", "label", "reasons", "score",
    "predicted", "probabilities", *(f"p_{c}" for c in CLASSES),
)  # fmt: skip
"""``reviews/review_queue.parquet``: what a person should look at first (``rank`` 1 first; ``score``
higher = more worth a look). ``sha256`` is the content hash of the image file (with ``face_index``,
which face of it), ``image`` the face to show (a face-store ref under the data root), ``label`` the
current label (null: an unlabelled image), ``reasons`` why it is queued, ``predicted`` and ``p_<class>``
the model's class and probabilities (null: no model yet), ``probabilities`` where they come from
(``calibrated``: the best model with its temperature; ``out-of-fold``: the cross-validation fold model
that never saw the image, not calibrated)."""

REVIEW_COLUMNS: tuple[str, ...] = (
    "sha256", "face_index", "image_id", "source", "source_path", "decision", "reviewer", "time", "task_id",
    "annotation_id", "project", "refused",
)  # fmt: skip
"""``reviews/reviews.parquet``: one row per annotation pulled from the review tool, keyed by the image's
content hash (``sha256``, ``face_index``). ``decision`` is one of :data:`REVIEW_DECISIONS`; ``time`` the
annotation's last update (ISO 8601, UTC). ``refused`` is null for a usable review, else why the row
is not one (unknown label, malformed hash, duplicate task, skipped): the manifest applies only the
usable ones, the latest per image."""

TEST_PREDICTION_COLUMNS: tuple[str, ...] = ("model", "image_id", "true", "predicted", "correct", "confidence",
                                           "calibrated_confidence")
"""``reports/test_predictions.parquet`` (model_evaluation): one row per model and test image; then one
``p_<class>`` column per class (calibrated probabilities, class order of :mod:`fer_pipeline.classes`).
``confidence`` is the top raw probability, ``calibrated_confidence`` after the model's temperature."""


# --------------------------------------------------------------------------------------------
# reports/metrics.json: written by model_evaluation, read by `fer-pipeline predict` (default
# model) and the summary `make demo` prints
# --------------------------------------------------------------------------------------------


SELECTED_BY_VALIDATION = "validation macro-F1"
"""``selected_by`` of a model chosen on the validation split (metrics.json, shipped.json)."""
SELECTED_BY_OOF = "out-of-fold macro-F1 (cross-validation)"
"""``selected_by`` of a fold ensemble chosen on its members' out-of-fold predictions."""


@dataclass(frozen=True)
class MetricsReport:
    """The test-split report of every model, and which one is best *on validation*.

    ``best_model`` is chosen by ``selected_by`` (validation macro-F1; reports written before
    this was recorded chose on the test split and read back as ``"test macro-F1 (legacy)"``);
    ``validation`` holds each model's validation accuracy, macro-F1 and n beside the test
    metrics in ``models``."""

    best_model: str
    data_version: str
    n_test: int
    models: dict[str, dict[str, Any]]  # model name -> ClassificationMetrics.to_dict()
    majority_baseline: dict[str, Any]
    checkpoints: dict[str, str]  # model name -> checkpoint path (absolute, or relative to the data root)
    split: str = "test"
    # model name -> the checkpoint's temperature on the test split: temperature, ece_before, ece_after,
    # nll_before, nll_after, n_bins, reliability bins, and the validation fit it recorded ("fit")
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    selected_by: str = SELECTED_BY_VALIDATION
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> accuracy, macro_f1, n

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "MetricsReport":
        """Parse ``metrics.json``; ValueError (naming the file and key) when it is not one."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return cls(best_model=str(data["best_model"]), data_version=str(data.get("data_version", "")),
                       n_test=int(data.get("n_test", 0)), models=dict(data.get("models") or {}),
                       majority_baseline=dict(data.get("majority_baseline") or {}),
                       checkpoints=dict(data.get("checkpoints") or {}), split=str(data.get("split", "test")),
                       calibration=dict(data.get("calibration") or {}),
                       selected_by=str(data.get("selected_by", "test macro-F1 (legacy)")),
                       validation=dict(data.get("validation") or {}))
        except KeyError as exc:
            raise ValueError(f"{path} records no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a metrics report: {exc}") from None

    def best_macro_f1(self) -> float | None:
        """The best model's test macro-F1, when recorded."""
        value = ((self.models.get(self.best_model) or {}).get("f1") or {}).get("macro")
        return float(value) if value is not None else None

    def best_validation_macro_f1(self) -> float | None:
        """The best model's validation macro-F1, when recorded."""
        value = (self.validation.get(self.best_model) or {}).get("macro_f1")
        return float(value) if value is not None else None


# --------------------------------------------------------------------------------------------
# models/shipped.json: written by shipped_model, read by `fer-pipeline predict` (default model),
# the model card, the summary and an export (fer_pipeline.ml.shipped loads the networks)
# --------------------------------------------------------------------------------------------

SHIPPED_FORMAT = "fer-pipeline-shipped"
SHIPPED_FORMAT_VERSION = 1
SINGLE, ENSEMBLE = "single", "ensemble"
KINDS = (SINGLE, ENSEMBLE)


@dataclass(frozen=True)
class ShippedMember:
    """One network of the shipped model: its checkpoint and the temperature its probabilities
    are divided by (fitted on validation for a single model, out-of-fold for a fold model)."""

    name: str
    checkpoint: str  # relative to the data root (or absolute)
    temperature: float


@dataclass(frozen=True)
class ShippedSpec:
    """The content of ``models/shipped.json``."""

    kind: str
    name: str
    members: tuple[ShippedMember, ...]
    selected_by: str
    data_version: str
    scores: dict[str, Any] = field(default_factory=dict)  # "selection": the estimate chosen on; "test": reported
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate with its estimate and test score
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"shipped model kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.members:
            raise ValueError("the shipped model lists no member checkpoint")
        if self.kind == SINGLE and len(self.members) != 1:
            raise ValueError(f"a single shipped model has one member, got {len(self.members)}")
        for m in self.members:
            t = m.temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
                raise ValueError(f"member {m.name!r}: temperature {t!r} is not a finite number > 0")

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["members"] = [asdict(m) for m in self.members]
        return {"format": SHIPPED_FORMAT, "format_version": SHIPPED_FORMAT_VERSION, **body}

    @classmethod
    def from_json(cls, data: Any, origin: str = "shipped.json") -> ShippedSpec:
        """Parse (``ValueError`` naming ``origin`` and the problem)."""
        try:
            if not isinstance(data, dict) or data.get("format") != SHIPPED_FORMAT:
                raise ValueError("not a shipped-model file")
            members = tuple(ShippedMember(str(m["name"]), str(m["checkpoint"]), m["temperature"])
                            for m in data["members"])
            return cls(kind=str(data["kind"]), name=str(data["name"]), members=members,
                       selected_by=str(data["selected_by"]), data_version=str(data.get("data_version", "")),
                       scores=dict(data.get("scores") or {}), candidates=list(data.get("candidates") or []),
                       notes=[str(n) for n in data.get("notes") or []])
        except KeyError as exc:
            raise ValueError(f"{origin} records no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{origin}: {exc}") from None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ShippedSpec:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the shipped model: {exc}") from None
        return cls.from_json(data, str(path))


