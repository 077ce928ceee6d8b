"""Where everything lives under the data root (``data/`` or ``$FER_DATA_DIR``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "FER_DATA_DIR"


def default_data_root() -> Path:
    """``$FER_DATA_DIR`` if set, else ``data/`` at the repository root."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


@dataclass(frozen=True)
class DataPaths:
    """All output locations, derived from one root so tests can point it at a temp dir."""

    root: Path

    @classmethod
    def from_env(cls) -> "DataPaths":
        return cls(default_data_root())

    @property
    def catalog(self) -> Path:
        return self.root / "sources.yaml"

    @property
    def settings(self) -> Path:
        return self.root / "pipeline.yaml"

    @property
    def faces_dir(self) -> Path:
        return self.root / "faces"

    @property
    def manifest_dir(self) -> Path:
        return self.root / "manifest"

    @property
    def raw_inventory(self) -> Path:
        return self.manifest_dir / "raw_inventory.parquet"

    @property
    def faces_table(self) -> Path:
        return self.manifest_dir / "faces.parquet"

    @property
    def dedup_table(self) -> Path:
        return self.manifest_dir / "dedup.parquet"

    @property
    def manifest(self) -> Path:
        return self.manifest_dir / "manifest.parquet"

    @property
    def excluded(self) -> Path:
        return self.manifest_dir / "excluded.parquet"

    @property
    def splits(self) -> Path:
        return self.manifest_dir / "splits.parquet"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """Resolve a catalogue path: absolute as given, relative to the data root otherwise."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)
