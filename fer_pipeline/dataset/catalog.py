"""The source catalogue (``<data root>/sources.yaml``): parsed and validated up front.

A malformed catalogue fails fast with a :class:`CatalogError` that names the source and the
field, before any image is touched, so a typo never surfaces as a crash halfway through a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.classes import CLASSES
from fer_pipeline.schema import DEMOGRAPHIC_ATTRIBUTES

KINDS = ("image_folders", "fer2013_csv", "synthetic")

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

    def map_label(self, raw_label: str | None) -> str | None:
        """The target class for a source label (case-insensitive), or None when unmapped."""
        if raw_label is None:
            return None
        return self.label_map.get(raw_label.lower())


@dataclass(frozen=True)
class Catalog:
    sources: tuple[SourceSpec, ...]
    path: Path | None = None

    def source(self, name: str) -> SourceSpec:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


def _err(source: str, field_name: str, message: str) -> CatalogError:
    return CatalogError(f"sources.yaml: source '{source}', field '{field_name}': {message}")


def _parse_label_map(name: str, kind: str, raw: Any) -> dict[str, str]:
    if raw is None:
        if kind == "synthetic":
            return {c.lower(): c for c in CLASSES}
        raise _err(name, "label_map", "is required (map source label names to " + "/".join(CLASSES) + ")")
    if not isinstance(raw, dict) or not raw:
        raise _err(name, "label_map", "must be a non-empty mapping of source label -> class")
    out: dict[str, str] = {}
    for src_label, target in raw.items():
        target_class = _CLASS_BY_LOWER.get(str(target).strip().lower())
        if target_class is None:
            raise _err(
                name, f"label_map.{src_label}",
                f"maps to '{target}', which is not one of the classes {', '.join(CLASSES)}",
            )
        key = str(src_label).strip().lower()
        if kind == "fer2013_csv" and key not in FER2013_EMOTIONS and not key.isdigit():
            raise _err(name, f"label_map.{src_label}", f"FER2013 labels are {', '.join(FER2013_EMOTIONS)}")
        if kind == "fer2013_csv" and key.isdigit():
            key = FER2013_EMOTIONS[int(key)]
        out[key] = target_class
    return out


def _parse_demographics(name: str, raw: Any) -> DemographicsSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _err(name, "demographics", "must be a mapping with 'csv' or 'filename_regex'")
    unknown = set(raw) - {"csv", "key", "columns", "filename_regex"}
    if unknown:
        raise _err(name, f"demographics.{sorted(unknown)[0]}", "unknown field")
    has_csv, has_regex = "csv" in raw, "filename_regex" in raw
    if has_csv == has_regex:
        raise _err(name, "demographics", "give exactly one of 'csv' or 'filename_regex'")
    if has_regex:
        try:
            pattern = re.compile(str(raw["filename_regex"]))
        except re.error as exc:
            raise _err(name, "demographics.filename_regex", f"invalid regular expression: {exc}") from exc
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
    for attr in columns:
        if attr not in DEMOGRAPHIC_ATTRIBUTES:
            raise _err(name, f"demographics.columns.{attr}",
                       f"unknown attribute; use {', '.join(DEMOGRAPHIC_ATTRIBUTES)}")
    return DemographicsSpec(csv=str(raw["csv"]), key=str(raw["key"]),
                            columns={str(k): str(v) for k, v in columns.items()})


def parse_catalog(data: Any, data_root: Path, origin: Path | None = None) -> Catalog:
    """Validate a loaded YAML document and resolve paths against ``data_root``."""
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
        if name in seen:
            raise _err(name, "name", "is used by two sources")
        seen.add(name)
        kind = entry.get("kind")
        if kind is None:
            raise _err(name, "kind", "is required")
        if kind not in KINDS:
            raise _err(name, "kind", f"unknown kind '{kind}'; expected one of {', '.join(KINDS)}")
        if not entry.get("path"):
            raise _err(name, "path", "is required")
        path = Path(str(entry["path"])).expanduser()
        path = path if path.is_absolute() else data_root / path
        if kind != "synthetic" and not path.exists():
            raise _err(name, "path", f"does not exist: {path}")
        if kind == "image_folders" and path.is_file() and path.suffix.lower() != ".zip":
            raise _err(name, "path", f"must be a folder or a .zip archive: {path}")
        if kind == "fer2013_csv" and not path.is_file():
            raise _err(name, "path", f"must be the FER2013 CSV file: {path}")
        label_map = _parse_label_map(name, kind, entry.get("label_map"))
        demographics = _parse_demographics(name, entry.get("demographics"))
        if kind == "synthetic" and demographics is None:  # the generator writes this CSV
            demographics = DemographicsSpec(csv="demographics.csv", key="file",
                                            columns={"gender": "gender", "age_group": "age_group"})
        known = {"name", "kind", "path", "label_map", "demographics"}
        options = {k: v for k, v in entry.items() if k not in known}
        if kind != "synthetic" and options:
            raise _err(name, sorted(options)[0], "unknown field")
        if kind == "synthetic":
            for opt in options:
                if opt not in ("n_images", "seed", "image_size"):
                    raise _err(name, opt, "unknown field (synthetic takes n_images, seed, image_size)")
                if not isinstance(options[opt], int) or options[opt] <= 0 and opt != "seed":
                    raise _err(name, opt, "must be a positive integer")
        specs.append(SourceSpec(name=name, kind=kind, path=path, label_map=label_map,
                                demographics=demographics, options=options))
    return Catalog(sources=tuple(specs), path=origin)


def load_catalog(path: Path, data_root: Path | None = None) -> Catalog:
    """Read and validate ``sources.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"sources.yaml not found at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    return parse_catalog(data, data_root or path.parent, origin=path)
