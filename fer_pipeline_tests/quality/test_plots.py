"""Plots render real PNGs from real face files, and degrade to a figure on empty inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_pipeline.quality.plots import (
    plot_class_distribution,
    plot_exclusions,
    plot_intensity_histograms,
    plot_sample_grid,
    reason_category,
)

FACE = 48


def _write_faces(root: Path, label_counts: dict[str, int], sources: tuple[str, ...] = ("a", "b")) -> pd.DataFrame:
    """Write random grayscale PNG faces under ``root`` and return a manifest pointing at them."""
    rng = np.random.default_rng(0)
    rows = []
    for label, n in label_counts.items():
        base = {"Neutral": 60, "Focused": 110, "Tired": 160, "Angry": 200}.get(label, 128)
        for i in range(n):
            image_id = f"{label.lower()}{i:03d}"
            rel = f"faces/test/{image_id[:2]}/{image_id}.png"
            pixels = np.clip(rng.normal(base, 25, size=(FACE, FACE)), 0, 255).astype(np.uint8)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(root / rel)
            rows.append(
                {
                    "image_id": image_id,
                    "source": sources[i % len(sources)],
                    "label": label,
                    "face_path": rel,
                    "face_height": FACE,
                    "face_width": FACE,
                }
            )
    return pd.DataFrame(rows, columns=["image_id", "source", "label", "face_path", "face_height", "face_width"])


def _assert_png(path: Path, min_w: int = 200, min_h: int = 100) -> tuple[int, int]:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        w, h = im.size
    assert w >= min_w and h >= min_h, (w, h)
    assert w <= 5000 and h <= 5000, (w, h)
    return w, h


@pytest.fixture()
def faces(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    # Angry deliberately has no images: every plot must still render a panel for it.
    manifest = _write_faces(tmp_path, {"Neutral": 30, "Focused": 7, "Tired": 3})
    return tmp_path, manifest


def test_class_distribution(faces: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    _, manifest = faces
    out = plot_class_distribution(manifest, tmp_path / "reports" / "class_distribution.png")
    assert out == tmp_path / "reports" / "class_distribution.png"
    _assert_png(out)


def test_class_distribution_empty_manifest(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["image_id", "source", "label", "face_path"])
    _assert_png(plot_class_distribution(empty, tmp_path / "empty.png"))


def test_sample_grid(faces: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, manifest = faces
    out = plot_sample_grid(manifest, root, tmp_path / "grid.png")
    w, h = _assert_png(out, min_w=600)
    assert w > h  # four class panels side by side


def test_sample_grid_is_deterministic(faces: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, manifest = faces
    a = plot_sample_grid(manifest, root, tmp_path / "a.png", per_class=9, seed=3)
    shuffled = manifest.sample(frac=1.0, random_state=1)
    b = plot_sample_grid(shuffled, root, tmp_path / "b.png", per_class=9, seed=3)
    with Image.open(a) as ia, Image.open(b) as ib:
        assert np.array_equal(np.asarray(ia), np.asarray(ib))


def test_sample_grid_survives_missing_face_file(faces: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, manifest = faces
    (root / manifest.loc[0, "face_path"]).unlink()
    _assert_png(plot_sample_grid(manifest, root, tmp_path / "grid.png"))


def test_intensity_histograms(faces: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, manifest = faces
    _assert_png(plot_intensity_histograms(manifest, root, tmp_path / "hist.png", max_per_class=10))


def test_face_plots_with_no_images(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["image_id", "source", "label", "face_path"])
    _assert_png(plot_sample_grid(empty, tmp_path, tmp_path / "grid.png"))
    _assert_png(plot_intensity_histograms(empty, tmp_path, tmp_path / "hist.png"))


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("duplicate of 3f2a9c", "duplicate"),
        ("Duplicate of abc (phash distance 2)", "duplicate"),
        ("label conflict", "label conflict"),
        ("label conflict: Angry vs Tired", "label conflict"),
        ("unmapped label: happy", "unmapped label"),
        ("no face detected", "no face detected"),
        ("no face detected (score 0.12)", "no face detected"),
        ("too small: 20x20 < 48", "too small"),
        ("too small 20x20", "too small"),
        ("unreadable: OSError: cannot identify image file", "unreadable"),
        ("", "unspecified"),
        (None, "unspecified"),
        (float("nan"), "unspecified"),
    ],
)
def test_reason_category(reason: object, category: str) -> None:
    assert reason_category(reason) == category


def test_exclusions(tmp_path: Path) -> None:
    excluded = pd.DataFrame(
        {
            "source": ["a"] * 7,
            "source_path": [f"x{i}.png" for i in range(7)],
            "stage": ["ingest", "ingest", "faces", "faces", "dedup", "dedup", "dedup"],
            "reason": [
                "unmapped label: happy",
                "unmapped label: sad",
                "no face detected",
                "unreadable: truncated file",
                "duplicate of abc",
                "duplicate of def",
                "label conflict",
            ],
        }
    )
    _assert_png(plot_exclusions(excluded, tmp_path / "excl.png"), min_h=80)


@pytest.mark.parametrize(
    "excluded",
    [
        pd.DataFrame(columns=["source", "source_path", "stage", "reason"]),
        pd.DataFrame(),
        pd.DataFrame({"source": ["a"], "source_path": ["p"]}),  # no stage/reason columns at all
    ],
    ids=["empty-with-columns", "no-columns", "no-reason"],
)
def test_exclusions_degenerate(excluded: pd.DataFrame, tmp_path: Path) -> None:
    _assert_png(plot_exclusions(excluded, tmp_path / "excl.png"), min_h=80)
