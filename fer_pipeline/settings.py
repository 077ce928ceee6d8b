"""One home for the pipeline's settings: a YAML file every launch path reads.

The code location reads the file once, when it loads, and binds its values to the resources
(``fer``, ``training``, ``analysis``); the UI's Materialize button and launchpad, the sensors,
the schedule, declarative automation, the CLI and ``make demo`` therefore all run with the same
settings without pasting anything or repeating an environment variable. A run config may still
override a value for one experiment; what it overrides is recorded on the run and on every
asset it materializes (:func:`overrides`).

Where the file is: ``$FER_SETTINGS`` when set, else ``settings.yaml`` in the data root
(``$FER_DATA_DIR``, default ``./data``). No file: every setting has its default (the full
recipe). The format::

    cv_folds: 3              # the number of cv_fold partitions (sized when the code location loads)
    fer: {image_size: 48}    # the data half           (fer_pipeline.defs.resources.FerSettings)
    training: {epochs: 6}    # the training recipe     (TrainSettings)
    analysis: {cv_epochs: 3} # the evaluation assets   (AnalysisSettings)

The run-config form (``resources: {training: {config: {...}}}``) is accepted too, so a file
pasted into the launchpad before also works here. Errors name the file and the field, and never
echo a large value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_pipeline.atomic import write_bytes
from fer_pipeline.config_yaml import (
    YamlRefused,
    load_yaml,
    read_config_text,
    yaml_problem,
)
from fer_pipeline.config_yaml import short_repr as _short
from fer_pipeline.paths import data_root_setting, is_store_url

SETTINGS_ENV = "FER_SETTINGS"
FILE_NAME = "settings.yaml"
SECTIONS = ("fer", "training", "analysis")
CV_FOLDS = "cv_folds"
DEFAULT_CV_FOLDS = 10
MAX_SETTINGS_BYTES = 1 << 20  # a settings file is a few lines: anything larger is refused unread

OPERATIONAL = {
    "fer": {"data_root", "working_copy", "workers", "rebuild", "max_bytes_in_flight"},
    "training": {"device", "num_threads"},
    "analysis": set(),
}
"""Fields that say how or where to run, not what to compute: left out of the settings'
fingerprint, so moving to another machine or changing the worker count marks nothing stale."""


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Settings:
    """What the settings file says (``path`` None: no file, every default)."""

    path: Path | None = None
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cv_folds: int = DEFAULT_CV_FOLDS

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name) or {})

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "defaults (no settings file)"


def settings_path(environ: Mapping[str, str] | None = None, data_root: str | None = None) -> Path | None:
    """Where the settings file is (it may not exist): ``$FER_SETTINGS``, else ``settings.yaml``
    in a local data root; None for an object-store data root without ``$FER_SETTINGS``."""
    env = os.environ if environ is None else environ
    named = env.get(SETTINGS_ENV, "").strip()
    if named:
        return Path(named).expanduser()
    root = data_root or env.get("FER_DATA_DIR") or data_root_setting()
    return None if is_store_url(root) else Path(root).expanduser() / FILE_NAME


def parse_settings(text: str, origin: str = "<settings>") -> dict[str, Any]:
    """The YAML document of a settings file as a mapping (errors name ``origin``)."""
    try:
        data = load_yaml(text)
    except YamlRefused as exc:
        raise SettingsError(f"{origin}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{origin}: {yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)}, {CV_FOLDS}), "
                            f"got {type(data).__name__}")
    return data


def _sections(data: dict[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    resources = data.get("resources")
    if resources is not None:  # the run-config form: resources: {name: {config: {...}}}
        if not isinstance(resources, dict):
            raise SettingsError(f"{origin}: 'resources' must be a mapping")
        data = {k: v for k, v in data.items() if k != "resources"}
        for name, entry in resources.items():
            if not isinstance(entry, dict) or set(entry) - {"config"}:
                raise SettingsError(f"{origin}: resources.{name} must be a mapping with one key, 'config'")
            data.setdefault(name, entry.get("config") or {})
    unknown = sorted(map(str, set(data) - {*SECTIONS, CV_FOLDS}))
    if unknown:
        raise SettingsError(f"{origin}: unknown section(s) {', '.join(_short(u, 30) for u in unknown[:5])}; "
                            f"expected {', '.join(SECTIONS)} or {CV_FOLDS}")
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise SettingsError(f"{origin}: section '{name}' must be a mapping of setting: value")
        out[name] = values
    return out


def _cv_folds(data: dict[str, Any], origin: str) -> int:
    value = data.get(CV_FOLDS, DEFAULT_CV_FOLDS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise SettingsError(f"{origin}: {CV_FOLDS} must be a whole number of folds, 2 or more (got {_short(value)})")
    return value


def load_settings(path: Path | None) -> Settings:
    """The settings in ``path`` (None or a missing file: the defaults). A directory, a special
    file, an oversized or malformed file is refused naming it."""
    if path is None or not os.path.lexists(path):
        return Settings()
    origin = str(path)
    text = read_config_text(path, MAX_SETTINGS_BYTES, "a settings file", SettingsError)
    data = parse_settings(text, origin)
    return Settings(path=path, sections=_sections(data, origin), cv_folds=_cv_folds(data, origin))


def current_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings every launch path uses now (see the module docstring for where)."""
    return load_settings(settings_path(environ))


def fingerprint(values: Mapping[str, Any], section: str) -> str:
    """A short hash of what a section's values compute (operational fields left out)."""
    kept = {k: v for k, v in sorted(values.items()) if k not in OPERATIONAL.get(section, set())}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def overrides(bound: Mapping[str, Any], effective: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a run changed: ``effective`` values that differ from the ``bound`` ones."""
    return {k: v for k, v in sorted(effective.items()) if k in bound and bound[k] != v}


def install_settings(source: Path, target: Path) -> bool:
    """Make ``source`` the settings in force at ``target`` (validated first; written atomically).
    Returns whether ``target`` changed."""
    load_settings(source)  # refuse a bad file before it replaces a good one
    data = source.read_bytes()
    if target.is_file() and target.read_bytes() == data:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(target, data)
    return True
