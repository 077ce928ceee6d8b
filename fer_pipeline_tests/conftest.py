"""Shared fixtures: small real image files made by the tests, and the real-dataset folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
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
