"""No quadratic paths in de-duplication: a dense block of near-identical frames is chained
once (about one pixel correlation per face), never compared pair by pair."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import uniform_filter
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fer_pipeline.dedup import groups
from fer_pipeline.dedup.groups import (
    _cross_candidates_bound,
    deduplicate_incremental,
    near_pairs,
)
from fer_pipeline.faces.phash import from_hex, phashes, to_hex


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


def _table(pixels: np.ndarray, start: int = 0) -> pd.DataFrame:
    h, m = phashes(pixels)
    shas = [f"{k:064x}" for k in range(start, start + len(pixels))]
    return pd.DataFrame({"sha256": shas, "source": "s", "source_path": [f"f{k}.png" for k in range(start, start + len(pixels))],
                         "image_id": shas, "label": "Neutral", "width": 48, "height": 48, "bytes": 100,
                         "pixel_sha": [f"p{k}" for k in shas], "phash": to_hex(h), "phash_mirror": to_hex(m)})


def test_new_frames_of_a_cached_dense_block_are_walked_not_joined(tmp_path: Path) -> None:
    """A static camera's next day: 300 new frames against 1,500 cached ones. The (new, cached)
    pairs sharing a band value number hundreds of thousands; they are walked with the cached
    groups known, so each new frame costs about one correlation."""
    pixels = _static_camera(1800, seed=3)
    cached, fresh = pixels[:1500], pixels[1500:]
    cache = tmp_path / "links.npz"
    deduplicate_incremental(_table(cached), 4, True, lambda rows: cached[rows], 0.95, cache_path=cache)
    table = _table(pixels)
    new = np.arange(1500, 1800)
    old = np.arange(1500)
    h, m = from_hex(table["phash"].tolist()), from_hex(table["phash_mirror"].tolist())
    assert _cross_candidates_bound(new, old, h, m, 4) > 50 * len(pixels)  # the join would enumerate these
    loaded: list[int] = []

    def load(rows: np.ndarray) -> np.ndarray:
        loaded.extend(rows.tolist())
        return pixels[rows]

    report, stats = deduplicate_incremental(table, 4, True, load, 0.95, cache_path=cache)
    assert stats.faces_cached == 1500 and stats.faces_compared == 300
    fresh_run = deduplicate_incremental(table, 4, True, lambda rows: pixels[rows], 0.95)[0]
    assert (report.table["dup_group"] == fresh_run.table["dup_group"]).all()
    assert report.table["dup_group"].value_counts().iloc[0] >= 1790  # the block is (nearly) one group
    assert stats.pairs_correlated <= 3 * len(fresh)
    assert report.n_near_candidates - stats.faces_cached < 10 * len(pixels)  # cross pairs met: walked, not joined
    assert len(fresh) <= len(set(loaded)) <= 2 * len(fresh) + 10  # the new frames and a few cached partners


def test_walked_cross_pairs_give_the_groups_of_a_fresh_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing the walk for every incremental run (even small ones) changes no group: the same
    partition as de-duplicating everything at once, on faces that mix dense blocks, distinct
    faces and pairs the pixel check rejects."""
    rng = np.random.default_rng(5)
    dense = _static_camera(120, seed=7)
    distinct = rng.integers(0, 256, (80, 48, 48), dtype=np.uint8)
    pixels = np.concatenate([dense, distinct, dense[:20, :, ::-1], np.clip(dense[:20].astype(int) + 40, 0, 255)
                             .astype(np.uint8)])
    order = rng.permutation(len(pixels))
    pixels = pixels[order]
    table = _table(pixels)

    def partition(df: pd.DataFrame) -> set[frozenset[str]]:
        return {frozenset(g["source_path"]) for _, g in df.groupby("dup_group")}

    reference = partition(deduplicate_incremental(table, 4, True, lambda rows: pixels[rows], 0.95)[0].table)
    monkeypatch.setattr(groups, "_cross_candidates_bound", lambda *a: 1 << 62)
    cache = tmp_path / "links.npz"
    half = len(pixels) // 2
    deduplicate_incremental(table.iloc[:half], 4, True, lambda rows: pixels[:half][rows], 0.95, cache_path=cache)
    report, _ = deduplicate_incremental(table, 4, True, lambda rows: pixels[rows], 0.95, cache_path=cache)
    assert partition(report.table) == reference
    assert 1 < len(reference) < len(pixels)  # some groups formed, not everything merged


def _blob_camera(n: int, seed: int) -> np.ndarray:
    """A smoother static scene (blurred coarse blobs): heavy noise keeps its phash."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (10, 10)).astype(np.float32)
    scene = uniform_filter(np.kron(coarse, np.ones((8, 8), np.float32))[:72, :72], 9, mode="nearest")
    dx, dy = rng.integers(0, 2, n), rng.integers(0, 2, n)
    frames = [scene[12 + b:60 + b, 12 + a:60 + a] + rng.integers(-2, 3, (48, 48)) for a, b in zip(dx, dy)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def test_outsiders_of_a_block_cost_a_few_rounds_and_change_no_group() -> None:
    """Frames that keep the block's phash but fail the pixel check (heavy noise) would each be
    correlated with every member; they are tried best first and given up after MAX_TRIES
    rejections. The groups equal exact single linkage over every candidate pair."""
    rng = np.random.default_rng(11)
    pixels = _blob_camera(400, seed=4)
    noisy = np.clip(pixels[:6].astype(np.int16) + rng.integers(-40, 41, (6, 48, 48)), 0, 255).astype(np.uint8)
    pixels = np.concatenate([pixels, noisy])[rng.permutation(406)]
    table = _table(pixels)
    report, stats = deduplicate_incremental(table, 4, True, lambda rows: pixels[rows], 0.95)
    assert report.n_given_up > 0 and stats.pairs_correlated < 2_000
    # exact reference: every candidate pair correlated, connected components of the accepted ones
    h, m = from_hex(table["phash"].tolist()), from_hex(table["phash_mirror"].tolist())
    i, j = near_pairs(h, 4, m)
    corr = groups.pixel_correlation(pixels, i, j, best_of_mirror=True)
    ok = corr >= 0.95
    n = len(pixels)
    _, labels = connected_components(coo_matrix((np.ones(ok.sum()), (i[ok], j[ok])), shape=(n, n)), directed=False)
    assert len(i) > 40 * n  # the reference correlates a dense block's every pair
    got = report.table["dup_group"].to_numpy()
    assert pd.crosstab(got, labels).astype(bool).sum(axis=1).max() == 1  # same partition
    assert len(np.unique(got)) == len(np.unique(labels)) >= 7  # the block and (at least) the six outsiders
