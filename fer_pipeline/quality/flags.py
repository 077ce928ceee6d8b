"""Image-quality flags: one row per (face, flag) with a score and a reason.

Flags are for a person to look at: the ``data_quality_flags`` asset computes them on the published
manifest's faces and the unlabelled ones, and the review queue (:mod:`fer_pipeline.review.queue`)
ranks flagged faces right after cleanlab's label suspects. A flagged face stays in the manifest unless the settings name its
flag in ``fer.exclude_flags``: then the manifest stage moves it to the excluded table
(:func:`flag_stored_faces` here, :func:`fer_pipeline.dataset.manifest.exclude_flagged` there).

:func:`quality_flags`, vectorised over the processed 48x48 grayscale faces, makes the checks
cleanvision makes (blurry, dark, light, low information, odd aspect ratio) on the face store's
arrays directly. cleanvision itself is not used: it reads image files one by one through PIL (or
a Hugging Face / torchvision dataset), while these are the processed faces every model sees, in
memory; and it would be one more dependency for five statistics:

  - ``blurred``: variance of the Laplacian over the pixel variance (contrast does not matter) below
    ``blur_max``; score 1 - ratio / blur_max; ``noisy``: the same ratio above ``noise_min``;
  - ``dark`` / ``washed_out``: the 90th percentile below ``dark_max`` / the 10th above ``light_min``;
  - ``low_information``: entropy of the 256-bin histogram below ``entropy_min`` bits;
  - ``near_constant``: pixel standard deviation below ``std_min`` (the faces stage rejects blank
    images; this catches the nearly blank that got through);
  - ``extreme_aspect``: the original image's width/height beyond ``max_aspect`` (either way): the
    centre crop kept little of it.

Outliers in an embedding space are not a pixel statistic: they need a model, so they live above
``ml`` (:mod:`fer_pipeline.review.embeddings`, the ``face_embeddings`` asset).

Plain Python (numpy, pandas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fer_pipeline.quality.face_check import FaceCheck, ScoreCache, no_face_rows

FLAG_COLUMNS = ["row", "flag", "score", "reason"]
QUALITY_FLAGS = ("blurred", "noisy", "dark", "washed_out", "low_information", "near_constant", "extreme_aspect",
                 "no_face")  # no_face: only when the face check is on (fer_pipeline/quality/face_check.py)
FLAGS = QUALITY_FLAGS


@dataclass(frozen=True)
class FlagThresholds:
    # Set from the spread of 2,462 real AffectNet faces at 48x48 (measured in issue 20; what they catch:
    # benchmarks/bench_bad_faces.py):
    # Laplacian ratio 0.005..0.125 (1st percentile 0.010), entropy >= 5.4 bits (0.5th percentile 6.2),
    # 90th percentile intensity >= 74, 10th percentile <= 155
    blur_max: float = 0.006  # Laplacian variance / pixel variance
    noise_min: float = 0.3  # the same ratio: above it the face is mostly pixel noise
    dark_max: float = 50.0  # 90th percentile intensity
    light_min: float = 190.0  # 10th percentile intensity
    entropy_min: float = 5.0  # bits, of 8
    std_min: float = 8.0
    max_aspect: float = 2.5


def _laplacian_ratio(x: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian over the pixel variance, per face (float64 (N,H,W))."""
    lap = (x[:, 1:-1, :-2] + x[:, 1:-1, 2:] + x[:, :-2, 1:-1] + x[:, 2:, 1:-1] - 4 * x[:, 1:-1, 1:-1])
    var = x.reshape(len(x), -1).var(axis=1)
    return lap.reshape(len(x), -1).var(axis=1) / np.maximum(var, 1e-6) / 16.0


def _entropy(faces: np.ndarray) -> np.ndarray:
    n = len(faces)
    flat = faces.reshape(n, -1).astype(np.int64)
    # one bincount over (face, grey level) keys: np.add.at would be an unbuffered loop per pixel
    counts = np.bincount((flat + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    p = counts / flat.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)


def quality_flags(faces: np.ndarray, width: np.ndarray, height: np.ndarray,
                  thresholds: FlagThresholds = FlagThresholds()) -> pd.DataFrame:
    """Quality flags of uint8 faces (N, H, W) whose original images were ``width`` x ``height``:
    ``FLAG_COLUMNS`` rows (``row`` indexes ``faces``), scores in (0, 1], higher is worse."""
    t = thresholds
    faces = np.asarray(faces)
    if not len(faces):
        return pd.DataFrame(columns=FLAG_COLUMNS)
    x = faces.astype(np.float64)
    flat = x.reshape(len(x), -1)
    std = flat.std(axis=1)
    p10, p90 = np.percentile(flat, [10, 90], axis=1)
    ratio = _laplacian_ratio(x)
    entropy = _entropy(faces)
    w = np.asarray(width, np.float64)
    h = np.asarray(height, np.float64)
    aspect = np.maximum(w, h) / np.maximum(np.minimum(w, h), 1.0)
    checks = [
        ("blurred", (ratio < t.blur_max) & (std >= t.std_min), 1 - ratio / t.blur_max,
         lambda k: f"blurred: Laplacian/pixel variance {ratio[k]:.3f} < {t.blur_max}"),
        ("noisy", ratio > t.noise_min, 1 - t.noise_min / np.maximum(ratio, 1e-9),
         lambda k: f"noisy: Laplacian/pixel variance {ratio[k]:.2f} > {t.noise_min}"),
        ("dark", p90 < t.dark_max, 1 - p90 / t.dark_max,
         lambda k: f"dark: 90th percentile intensity {p90[k]:.0f} < {t.dark_max:.0f}"),
        ("washed_out", p10 > t.light_min, (p10 - t.light_min) / (255 - t.light_min),
         lambda k: f"washed out: 10th percentile intensity {p10[k]:.0f} > {t.light_min:.0f}"),
        ("low_information", entropy < t.entropy_min, 1 - entropy / t.entropy_min,
         lambda k: f"low information: histogram entropy {entropy[k]:.2f} bits < {t.entropy_min}"),
        ("near_constant", std < t.std_min, 1 - std / t.std_min,
         lambda k: f"near-constant: pixel std {std[k]:.1f} < {t.std_min}"),
        ("extreme_aspect", aspect > t.max_aspect, 1 - t.max_aspect / aspect,
         lambda k: f"extreme aspect: original {int(w[k])}x{int(h[k])} (ratio {aspect[k]:.1f} > {t.max_aspect})"),
    ]
    rows = []
    for flag, hit, score, reason in checks:
        for k in np.flatnonzero(hit):
            rows.append((int(k), flag, float(np.clip(score[k], 1e-3, 1.0)), reason(k)))
    return pd.DataFrame(rows, columns=FLAG_COLUMNS).sort_values(["row", "flag"]).reset_index(drop=True)


STORED_FLAG_COLUMNS = ["image_id", "flag", "score", "reason"]
FLAG_CHUNK = 4096  # faces read and flagged at once: 4096 x 48 x 48 x 8 bytes = 75 MB of float64 at most


def flag_stored_faces(root: str | Path, faces: pd.DataFrame, thresholds: FlagThresholds = FlagThresholds(),
                      chunk: int = FLAG_CHUNK, face_check: FaceCheck | None = None,
                      face_check_cache: Path | None = None) -> pd.DataFrame:
    """:func:`quality_flags` of stored faces (``image_id``, ``face_path``, ``width``, ``height``
    columns), read from the face store ``chunk`` faces at a time so memory does not grow with the
    dataset. Rows: ``STORED_FLAG_COLUMNS``, in ``faces`` order. ``face_check`` adds ``no_face``
    (the face detector's verdict, cached by face reference in ``face_check_cache``)."""
    from fer_pipeline.faces.store import load_faces

    parts = []
    cache = ScoreCache(face_check_cache) if face_check is not None else None
    for start in range(0, len(faces), chunk):
        part = faces.iloc[start:start + chunk]
        pixels = load_faces(root, part["face_path"].tolist())
        found = quality_flags(pixels, part["width"].to_numpy(), part["height"].to_numpy(), thresholds)
        if cache is not None and face_check is not None:
            scores = cache.scores_for(part["face_path"].astype(str).tolist(), lambda rows: pixels[rows], face_check)
            found = pd.concat([found, no_face_rows(scores, face_check)], ignore_index=True).sort_values(
                ["row", "flag"], kind="mergesort").reset_index(drop=True)
        if len(found):
            parts.append(found.assign(image_id=part["image_id"].to_numpy()[found["row"].to_numpy(dtype=int)]))
    if cache is not None:
        cache.save()
    if not parts:
        return pd.DataFrame(columns=STORED_FLAG_COLUMNS)
    return pd.concat(parts, ignore_index=True)[STORED_FLAG_COLUMNS]


def unknown_flags(names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are not quality flags (settings validation)."""
    return [n for n in names if n not in QUALITY_FLAGS]
