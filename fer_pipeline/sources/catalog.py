"""The source catalogue (``<data root>/sources.yaml``): parsed and validated up front.

A malformed catalogue fails fast with a :class:`CatalogError` that names the source and the
field, before any image is touched, so a typo never surfaces as a crash halfway through a run.
Nothing ambiguous is guessed: labels equal after case-folding (``angry`` and ``ANGRY``), label
keys YAML reads as numbers, booleans or null (``1:``, ``yes:``, ``~:``; quote them), a key
repeated in one mapping, and two demographic attributes read from one CSV column are refused.

Each source also says how its images frame a face (``faces``): ``crop`` (default: the images are
face crops, centre-cropped and resized) or ``detect`` (photos: faces are found, aligned and cut
out; options under ``detect``, see :class:`fer_pipeline.sources.framing.DetectSpec`).

A source may give labels the four classes do not use to the pretraining pool (``pretrain_labels``:
``all``, a list of its labels, or a mapping label -> pool label to merge synonyms across sources);
a ``role: pretrain`` source feeds only the pool (no ``label_map``; ``pretrain_labels`` defaults to
``all``). A label goes to the classes or to the pool, never both.

A ``role: unlabelled`` source holds images with no class yet (its folder or file labels are
ignored): they are decoded, de-duplicated with the labelled faces and published in the
``unlabelled`` table, where the review queue ranks them and a reviewer's class brings them into
the four classes. It has no ``label_map`` nor ``pretrain_labels`` (refused, not ignored: a map on
such a source would say the author expected its labels to count).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.classes import CLASSES
from fer_pipeline.config_yaml import (
    BoundedAliasLoader,
    YamlRefused,
    load_yaml,
    read_config_text,
    short_repr,
    short_text,
    yaml_problem,
)
from fer_pipeline.schema import DEMOGRAPHIC_ATTRIBUTES
from fer_pipeline.sources.framing import CROP, KEEP, SOURCE_FRAMINGS, DetectSpec
from fer_pipeline.sources.regex_guard import HINT as REGEX_HINT
from fer_pipeline.sources.regex_guard import backtracking_risk

KINDS = ("image_folders", "fer2013_csv", "synthetic")
SYNTHETIC_OPTIONS = ("n_images", "seed", "image_size", "scenes")
# the bounds of each synthetic option: (least, most); the least is the generator's own minimum
# (fer_pipeline.demo.synthetic_faces: every class and defect, every pool expression twice, every
# class's scene), the most keeps a typo from asking for terabytes or a huge array
SYNTHETIC_BOUNDS = {"n_images": (40, 1_000_000), "seed": (0, 2**32 - 1), "image_size": (32, 1024),
                    "scenes": (len(CLASSES), 100_000)}
POOL_MIN_IMAGES = 6  # a `role: pretrain` synthetic source: two faces of each pool expression
MAX_CATALOG_BYTES = 1 << 20  # a catalogue is a few lines per source: anything larger is refused unread
MAX_NAME_CHARS = 100  # a source's name: a file-name part and a partition key
MAX_PATH_CHARS = 4096  # PATH_MAX: a longer `path` cannot name a file
TRAIN, PRETRAIN, UNLABELLED = "train", "pretrain", "unlabelled"
ROLES = (TRAIN, PRETRAIN, UNLABELLED)  # the four classes (and maybe the pool); the pool only; no class yet
ALL_LABELS = "all"

FER2013_EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_CLASS_BY_LOWER = {c.lower(): c for c in CLASSES}


class CatalogError(ValueError):
    """A problem in ``sources.yaml``; the message names the source and the field."""


@dataclass(frozen=True)
class DemographicsSpec:
    """Where a source's demographic attributes come from: a CSV or a file-name regex."""

    csv: str | None = None
    key: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # attribute -> CSV column
    filename_regex: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """One catalogued source. ``label_map`` keys are lower-cased source label names."""

    name: str
    kind: str
    path: Path
    label_map: dict[str, str]
    demographics: DemographicsSpec | None = None
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific (e.g. synthetic n_images)
    faces: str = CROP  # SOURCE_FRAMINGS: how an image frames its face
    detect: DetectSpec | None = None  # set when faces == DETECT
    licence: str | None = None  # as the catalogue declares it (the model card shows it; None: not declared)
    role: str = TRAIN  # ROLES
    pool_labels: dict[str, str] = field(default_factory=dict)  # folded source label -> pool label
    pool_all: bool = False  # `pretrain_labels: all`: every label not in label_map goes to the pool

    @property
    def unlabelled(self) -> bool:
        """Its images have no class yet (``role: unlabelled``): their labels are ignored."""
        return self.role == UNLABELLED

    def map_label(self, raw_label: str | None) -> str | None:
        """The target class for a source label (case-insensitive), or None when unmapped."""
        if raw_label is None:
            return None
        return self.label_map.get(fold_label(raw_label))

    def pool_label(self, raw_label: str | None) -> str | None:
        """The pretraining-pool label for a source label (case-insensitive), or None when the label
        is not a pool label (a target class, or neither)."""
        key = fold_label(raw_label) if raw_label is not None else ""
        if not key or key in self.label_map:
            return None
        return self.pool_labels.get(key, key if self.pool_all else None)

    def is_pool_folder(self, folder: str) -> bool:
        """A folder name that is one of this source's listed pool labels (not one of ``all``)."""
        return fold_label(folder) in self.pool_labels


@dataclass(frozen=True)
class Catalog:
    sources: tuple[SourceSpec, ...]
    path: Path | None = None

    def source(self, name: str) -> SourceSpec:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


def fold_label(label: str) -> str:
    """The form labels are compared in: trimmed and case-folded (``ANGRY``, `` angry`` -> ``angry``)."""
    return label.strip().casefold()


def catalog_error(source: str, field_name: str, message: str) -> CatalogError:
    """The error for one field of one source, in the one format users see (a hostile name or
    field path is cut short: the message stays a line, whatever the file holds)."""
    return CatalogError(f"sources.yaml: source '{short_text(str(source))}', field '{short_text(str(field_name))}': "
                        f"{message}")


_err = catalog_error


def _label_key(name: str, kind: str, src_label: Any, field_name: str = "label_map") -> str:
    """The folded label a ``label_map`` (or ``pretrain_labels``) key stands for (FER2013 codes 0..6
    become emotion names)."""
    where = f"{field_name}.{src_label}"
    if kind == "fer2013_csv" and isinstance(src_label, int) and not isinstance(src_label, bool):
        src_label = str(src_label)
    if not isinstance(src_label, str):
        raise _err(name, where, f"label names must be text, but YAML read {short_repr(src_label)} as "
                                f"{type(src_label).__name__}: quote it (e.g. '{short_text(str(src_label))}': ...)")
    key = fold_label(src_label)
    if not key:
        raise _err(name, where, "empty label name")
    if kind == "fer2013_csv":
        if key.isdigit() and int(key) < len(FER2013_EMOTIONS):
            return FER2013_EMOTIONS[int(key)]
        if key not in FER2013_EMOTIONS:
            raise _err(name, where, f"FER2013 labels are {', '.join(FER2013_EMOTIONS)} (or their codes "
                                    f"0..{len(FER2013_EMOTIONS) - 1})")
    return key


def _parse_label_map(name: str, kind: str, raw: Any, role: str = TRAIN) -> dict[str, str]:
    if role == UNLABELLED:
        if raw is not None:
            raise _err(name, "label_map", "a 'role: unlabelled' source has no classes yet, so it has no label_map "
                                          "(its images reach the four classes through review)")
        return {}
    if role == PRETRAIN:
        if raw is not None and raw != {}:
            raise _err(name, "label_map", "a 'role: pretrain' source feeds only the pretraining pool, so it has no "
                                          "label_map (its labels go to the pool: see pretrain_labels)")
        return {}
    if raw is None:
        if kind == "synthetic":
            return {fold_label(c): c for c in CLASSES}
        raise _err(name, "label_map", "is required (map source label names to " + "/".join(CLASSES) + ")")
    if not isinstance(raw, dict) or not raw:
        raise _err(name, "label_map", "must be a non-empty mapping of source label -> class")
    out: dict[str, str] = {}
    spelled: dict[str, Any] = {}
    for src_label, target in raw.items():
        key = _label_key(name, kind, src_label)
        target_class = _CLASS_BY_LOWER.get(str(target).strip().lower()) if isinstance(target, str) else None
        if target_class is None:
            raise _err(
                name, f"label_map.{src_label}",
                f"maps to '{short_text(str(target))}', which is not one of the classes {', '.join(CLASSES)}",
            )
        if key in out:  # one label spelled twice would silently relabel a class
            raise _err(name, f"label_map.{src_label}",
                       f"is the same label as '{short_text(str(spelled[key]))}' (labels are compared "
                       "case-insensitively); "
                       f"keep one of them")
        out[key], spelled[key] = target_class, src_label
    return out


def _parse_pool_labels(name: str, kind: str, raw: Any, label_map: dict[str, str],
                       role: str) -> tuple[dict[str, str], bool]:
    """(folded source label -> pool label, every other label too) from ``pretrain_labels``."""
    if role == UNLABELLED and raw is not None:
        raise _err(name, "pretrain_labels", "a 'role: unlabelled' source has no labels to give the pretraining pool")
    if raw is None:
        return {}, role == PRETRAIN
    if raw == ALL_LABELS:
        return {}, True
    if isinstance(raw, list):
        pairs = [(label, label) for label in raw]
    elif isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        raise _err(name, "pretrain_labels", f"must be '{ALL_LABELS}', a list of the source's labels or a mapping "
                                            f"source label -> pool label, not {short_repr(raw)}")
    if not pairs:
        raise _err(name, "pretrain_labels", f"is empty: name labels, or '{ALL_LABELS}' (or leave it out)")
    out: dict[str, str] = {}
    spelled: dict[str, Any] = {}
    for src_label, pool_label in pairs:
        where = f"pretrain_labels.{src_label}"
        key = _label_key(name, kind, src_label, "pretrain_labels")
        if key in label_map:
            raise _err(name, where, f"is also in label_map (as {label_map[key]}): a label goes to the four classes "
                                    "or to the pretraining pool, not both")
        if key in out:
            raise _err(name, where, f"is the same label as '{short_text(str(spelled[key]))}' (labels are compared "
                                    "case-insensitively); keep one of them")
        if isinstance(raw, list):  # kept under its own (folded) name; a FER2013 code names its emotion
            target = key
        elif not isinstance(pool_label, str):
            raise _err(name, where, f"the pool label must be text, not {short_repr(pool_label)}")
        else:
            target = fold_label(pool_label)
            if not target:
                raise _err(name, where, "empty pool label")
        out[key], spelled[key] = target, src_label
    return out, False


def _parse_demographics(name: str, raw: Any) -> DemographicsSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _err(name, "demographics", "must be a mapping with 'csv' or 'filename_regex'")
    unknown = sorted(set(map(str, raw)) - {"csv", "key", "columns", "filename_regex"})
    if unknown:
        raise _err(name, f"demographics.{unknown[0]}", "unknown field")
    has_csv, has_regex = "csv" in raw, "filename_regex" in raw
    if has_csv == has_regex:
        raise _err(name, "demographics", "give exactly one of 'csv' or 'filename_regex'")
    if has_csv and (not isinstance(raw["csv"], str) or not raw["csv"].strip()):
        raise _err(name, "demographics.csv", "must be a file name or glob pattern")
    if has_regex:
        try:
            pattern = re.compile(str(raw["filename_regex"]))
        except re.error as exc:
            raise _err(name, "demographics.filename_regex", f"invalid regular expression: {exc}") from exc
        risk = backtracking_risk(pattern.pattern)
        if risk is not None:
            raise _err(name, "demographics.filename_regex", f"refused: {risk}: {REGEX_HINT}")
        groups = set(pattern.groupindex)
        if not groups & set(DEMOGRAPHIC_ATTRIBUTES):
            raise _err(name, "demographics.filename_regex",
                       f"needs at least one named group among {', '.join(DEMOGRAPHIC_ATTRIBUTES)}")
        return DemographicsSpec(filename_regex=str(raw["filename_regex"]))
    if not raw.get("key"):
        raise _err(name, "demographics.key", "is required with 'csv' (the column holding the file path or name)")
    columns = raw.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise _err(name, "demographics.columns", "must map attributes (gender, age_group, race) to CSV columns")
    used: dict[str, str] = {}
    for attr, column in columns.items():
        if attr not in DEMOGRAPHIC_ATTRIBUTES:
            raise _err(name, f"demographics.columns.{attr}",
                       f"unknown attribute; use {', '.join(DEMOGRAPHIC_ATTRIBUTES)}")
        if not isinstance(column, str) or not column.strip():
            raise _err(name, f"demographics.columns.{attr}", f"must be a CSV column name, not {short_repr(column)}")
        if column in used:
            raise _err(name, f"demographics.columns.{attr}",
                       f"column '{short_text(column)}' is already read as '{used[column]}'; each attribute needs "
                       "its own column")
        used[column] = attr
    return DemographicsSpec(csv=str(raw["csv"]), key=str(raw["key"]),
                            columns={str(k): str(v) for k, v in columns.items()})


def _number(name: str, field_name: str, value: Any, lo: float, hi: float, hi_open: bool = False,
            integer: bool = False) -> float:
    """``value`` as a number in [lo, hi] (or [lo, hi)), else the catalogue error for the field."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and math.isnan(value)):
        raise _err(name, field_name, f"must be {kind}, not {short_repr(value)}")
    if value < lo or value > hi or (hi_open and value >= hi):  # int vs float compares exactly, never overflows
        raise _err(name, field_name, f"must be between {lo} and {hi}{' (exclusive)' if hi_open else ''}, "
                                     f"not {short_repr(value)}")
    return value


def _parse_framing(name: str, entry: dict[str, Any]) -> tuple[str, DetectSpec | None]:
    """``faces`` (crop | detect) and, for detect, the ``detect`` options."""
    faces = entry.get("faces", CROP)
    if faces not in SOURCE_FRAMINGS:
        raise _err(name, "faces", f"must be {' or '.join(repr(f) for f in SOURCE_FRAMINGS)}, not {short_repr(faces)}")
    raw = entry.get("detect")
    if faces == CROP:
        if raw is not None:
            raise _err(name, "detect", "only applies to sources with 'faces: detect'")
        return faces, None
    if raw is None:
        return faces, DetectSpec()
    if not isinstance(raw, dict):
        raise _err(name, "detect", "must be a mapping (keep, margin, min_score, min_face_size)")
    unknown = sorted(set(map(str, raw)) - {"keep", "margin", "min_score", "min_face_size"})
    if unknown:
        raise _err(name, f"detect.{unknown[0]}", "unknown field (detect takes keep, margin, min_score, min_face_size)")
    keep = raw.get("keep", DetectSpec.keep)
    if keep not in KEEP:
        raise _err(name, "detect.keep", f"must be {' or '.join(repr(k) for k in KEEP)}, not {short_repr(keep)}")
    margin = _number(name, "detect.margin", raw.get("margin", DetectSpec.margin), 0.0, 1.0)
    min_score = _number(name, "detect.min_score", raw.get("min_score", DetectSpec.min_score), 0.0, 1.0, hi_open=True)
    min_face = _number(name, "detect.min_face_size", raw.get("min_face_size", DetectSpec.min_face_size), 12, 4096,
                       integer=True)
    return faces, DetectSpec(keep=keep, margin=float(margin), min_score=float(min_score), min_face_size=int(min_face))


def _parse_synthetic_options(name: str, options: dict[str, Any], role: str) -> None:
    """Every generator option known and in its bounds (:data:`SYNTHETIC_BOUNDS`), so the
    generator never fails halfway with a bare ``ValueError`` nor allocates a huge image."""
    for opt, value in options.items():
        if opt not in SYNTHETIC_OPTIONS:
            raise _err(name, opt, f"unknown field (synthetic takes {', '.join(SYNTHETIC_OPTIONS)})")
        lo, hi = SYNTHETIC_BOUNDS[opt]
        if opt == "n_images" and role == PRETRAIN:
            lo = POOL_MIN_IMAGES
        _number(name, opt, value, lo, hi, integer=True)
    if "scenes" in options and ("n_images" in options or "image_size" in options):
        clash = "n_images" if "n_images" in options else "image_size"
        raise _err(name, clash, "does not apply with 'scenes' (the scene generator draws its own sizes)")


def parse_catalog(data: Any, data_root: Path, origin: Path | None = None, check_paths: bool = True) -> Catalog:
    """Validate a loaded YAML document and resolve paths against ``data_root``; ``check_paths``
    False skips checking that the sources exist (readers of the settings only, e.g. a model step
    on a worker that holds the published tables but not the raw sources)."""
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        raise CatalogError("sources.yaml: top level must be a mapping with a 'sources' list")
    seen: set[str] = set()
    specs: list[SourceSpec] = []
    for i, entry in enumerate(data["sources"]):
        if not isinstance(entry, dict):
            raise CatalogError(f"sources.yaml: entry #{i + 1} must be a mapping")
        name = entry.get("name")
        if not name or not isinstance(name, str):
            raise _err(f"#{i + 1}", "name", "is required")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise _err(name, "name", "use letters, digits, '_', '-' or '.' only")
        if len(name) > MAX_NAME_CHARS:  # it names folders, files and partitions
            raise _err(name, "name", f"use at most {MAX_NAME_CHARS} characters, not {len(name)}")
        if name in seen:
            raise _err(name, "name", "is used by two sources")
        seen.add(name)
        kind = entry.get("kind")
        if kind is None:
            raise _err(name, "kind", "is required")
        if kind not in KINDS:
            raise _err(name, "kind", f"unknown kind '{short_text(str(kind))}'; expected one of {', '.join(KINDS)}")
        raw_path = entry.get("path")
        if not raw_path:
            raise _err(name, "path", "is required")
        if not isinstance(raw_path, str) or "\0" in raw_path or len(raw_path) > MAX_PATH_CHARS:
            raise _err(name, "path", f"must be a file or folder name (text without NUL, at most {MAX_PATH_CHARS} "
                                     f"characters), not {short_repr(raw_path)}")
        path = Path(raw_path).expanduser()
        path = path if path.is_absolute() else data_root / path
        if check_paths and kind != "synthetic" and not path.exists():
            raise _err(name, "path", f"does not exist: {path}")
        if check_paths and kind == "image_folders" and path.is_file() and path.suffix.lower() != ".zip":
            raise _err(name, "path", f"must be a folder or a .zip archive: {path}")
        if check_paths and kind == "fer2013_csv" and not path.is_file():
            raise _err(name, "path", f"must be the FER2013 CSV file: {path}")
        role = entry.get("role", TRAIN)
        if role not in ROLES:
            raise _err(name, "role", f"must be {', '.join(repr(r) for r in ROLES[:-1])} or {ROLES[-1]!r}, not {short_repr(role)}")
        if role == UNLABELLED and kind == "synthetic":
            raise _err(name, "role", "'unlabelled' applies to sources of image files (image_folders, fer2013_csv), "
                                     "not to the synthetic generator")
        label_map = _parse_label_map(name, kind, entry.get("label_map"), role)
        pool_labels, pool_all = _parse_pool_labels(name, kind, entry.get("pretrain_labels"), label_map, role)
        demographics = _parse_demographics(name, entry.get("demographics"))
        if kind == "synthetic" and demographics is None:  # the generator writes this CSV
            demographics = DemographicsSpec(csv="demographics.csv", key="file",
                                            columns={"gender": "gender", "age_group": "age_group"})
        licence = entry.get("licence")
        if licence is not None and (not isinstance(licence, str) or not licence.strip()):
            raise _err(name, "licence", f"must be text naming the licence (e.g. 'CC BY-NC 4.0'), not {short_repr(licence)}")
        known = {"name", "kind", "path", "label_map", "demographics", "licence", "faces", "detect", "role",
                 "pretrain_labels"}
        options = {k: v for k, v in entry.items() if k not in known}
        if kind != "synthetic" and options:
            raise _err(name, min(map(str, options)), "unknown field")
        if kind == "synthetic":
            _parse_synthetic_options(name, options, role)
            if role == PRETRAIN and "scenes" in options:
                raise _err(name, "scenes", "does not apply with 'role: pretrain' (the pool generator draws face crops)")
        faces, detect = _parse_framing(name, entry)
        specs.append(SourceSpec(name=name, kind=kind, path=path, label_map=label_map,
                                demographics=demographics, options=options,
                                licence=licence.strip() if licence else None, faces=faces, detect=detect,
                                role=role, pool_labels=pool_labels, pool_all=pool_all))
    return Catalog(sources=tuple(specs), path=origin)


def load_catalog(path: Path, data_root: Path | None = None, check_paths: bool = True) -> Catalog:
    """Read and validate ``sources.yaml`` (``check_paths``: see :func:`parse_catalog`)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise CatalogError(f"sources.yaml not found at {path}")
    text = read_config_text(path, MAX_CATALOG_BYTES, "a sources.yaml file", CatalogError)
    try:
        data = load_yaml(text, BoundedAliasLoader)  # yaml.dump writes aliases for shared values
    except YamlRefused as exc:
        raise CatalogError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: {yaml_problem(exc)}") from None
    return parse_catalog(data, data_root or path.parent, origin=path, check_paths=check_paths)
