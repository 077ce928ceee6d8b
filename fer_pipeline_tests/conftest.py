"""Shared fixtures and helpers: small real image files made by the tests, the real-dataset folder,
split arrays for tiny models, a catalogue on disk, and a data-half run through Dagster."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = (REPO.parent / "shared" / "datasets").resolve()


def shared_dataset(name: str) -> Path:
    """Path of a real dataset archive, or skip the test with a reason when it is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"real dataset {path} is absent (only present next to the project checkout)")
    return path


def blob_pattern(seed: int, size: int = 64) -> np.ndarray:
    """A smooth, seed-dependent uint8 picture (blobs), distinct enough not to be a near-duplicate."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size))
    for _ in range(6):
        cx, cy, r = rng.uniform(0.1, 0.9, 3)
        img += rng.uniform(-1, 1) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.02 + 0.1 * r))
    return ((img - img.min()) / (np.ptp(img) + 1e-9) * 255).astype(np.uint8)


def face_png(seed: int, size: int = 64, mode: str = "L", fmt: str = "PNG", **save: object) -> bytes:
    """A random but structured image (smooth blobs), different per seed, encoded as bytes."""
    pil = Image.fromarray(blob_pattern(seed, size), "L")
    if mode != "L":
        pil = pil.convert(mode)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **save)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def split_arrays():
    """Factory ``make(n, seed, *, size=16, noise=25.0) -> SplitArrays``: ``n`` random ``size``×``size``
    faces whose brightness follows the label (label ``i % 4``: a tiny model learns it), ids
    ``"{seed}-{i}"``. Session-scoped, so module-scoped fixtures may use it too."""
    from fer_pipeline.ml.data import SplitArrays  # imports torch: only for the tests that ask

    def make(n: int, seed: int, *, size: int = 16, noise: float = 25.0) -> SplitArrays:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % 4
        images = np.clip(labels[:, None, None] * 50 + rng.normal(60, noise, (n, size, size)), 0, 255).astype(np.uint8)
        ids = [f"{seed}-{i}" for i in range(n)]
        return SplitArrays(images, labels.astype(np.int64), ids, pd.DataFrame({"image_id": ids}))

    return make


def write_catalogue(root: Path, sources: list[dict]) -> Path:
    """``root/sources.yaml`` holding ``sources``, each entry's fields in the order given."""
    path = root / "sources.yaml"
    path.write_text(yaml.safe_dump({"sources": sources}, sort_keys=False))
    return path


def run_data_pipeline(root: Path, run_config: dict | None = None):  # type: ignore[no-untyped-def]
    """The ``data_pipeline`` job in process on the data root ``root`` (an ephemeral instance;
    failures are returned, not raised)."""
    import dagster as dg

    from fer_pipeline.definitions import defs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DATA_DIR", str(root))
        return defs.resolve_job_def("data_pipeline").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), run_config=run_config, raise_on_error=False)


def asset_metadata(result, asset: str) -> dict:  # type: ignore[no-untyped-def]
    """The metadata values of ``asset``'s first materialization in a run's result."""
    event = next(e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset)
    return {k: v.value for k, v in event.materialization.metadata.items()}
