"""No quadratic paths in de-duplication: a dense block of near-identical frames is chained
once (about one pixel correlation per face), never compared pair by pair."""

import numpy as np
import pandas as pd

from fer_pipeline.dedup.groups import deduplicate_incremental, near_pairs
from fer_pipeline.faces.phash import phashes, to_hex


def _static_camera(n: int, seed: int = 0) -> np.ndarray:
    """One smooth scene, per frame +-2 grey levels of noise and a 0/1-pixel shift."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    scene = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 9.0) + 30 * np.sin((x + y) / 13.0)
    dx, dy = rng.integers(0, 2, n), rng.integers(0, 2, n)
    frames = [scene[8 + b:56 + b, 8 + a:56 + a] + rng.integers(-2, 3, (48, 48)) for a, b in zip(dx, dy)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def test_dense_block_is_one_group_with_linear_correlations() -> None:
    n = 1500
    pixels = _static_camera(n)
    h, m = phashes(pixels)
    all_pairs = len(near_pairs(h, 4, m)[0])
    assert all_pairs > 20 * n  # the phashes really collide: a dense block (81,014 pairs)
    shas = [f"{k:064x}" for k in range(n)]
    table = pd.DataFrame({"sha256": shas, "source": "s", "source_path": [f"f{k}.png" for k in range(n)],
                          "image_id": shas, "label": "Neutral", "width": 48, "height": 48, "bytes": 100,
                          "pixel_sha": [f"p{k}" for k in range(n)], "phash": to_hex(h), "phash_mirror": to_hex(m)})
    loaded: list[int] = []

    def load(rows: np.ndarray) -> np.ndarray:
        loaded.extend(rows.tolist())
        return pixels[rows]

    report, stats = deduplicate_incremental(table, 4, True, load, 0.95)
    assert report.table["dup_group"].nunique() == 1 and report.table["is_representative"].sum() == 1
    assert stats.pairs_correlated <= 3 * n  # all pairs would be n * (n - 1) / 2 = 1,124,250
    assert report.n_near_candidates < all_pairs // 2  # pairs inside settled runs are never met
    assert len(loaded) == len(set(loaded)) <= n  # each face's pixels loaded once
