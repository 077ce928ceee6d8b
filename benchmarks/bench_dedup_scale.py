"""De-duplication at scale: no quadratic paths (issue 19).

(a) ``near_pairs`` over 1,000,000 random 64-bit hashes with 1 % planted near-duplicates
    (distance <= 4); target <= 20 s.
(b) N near-identical frames (one static 48x48 scene, small noise and 1-pixel shifts) against N
    distinct faces (smooth random blobs), N in (2000, 20000), through the asset's entry point
    (``deduplicate_incremental`` with pixel loading, empty cache); target dense <= 1.5x distinct.

Prints seconds, peak RSS (``resource.getrusage``, the process's high-water mark so far) and
pixel correlations for each, and writes benchmarks/results/bench_dedup_scale.json.

    PYTHONPATH=. python benchmarks/bench_dedup_scale.py [--quick]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import write_result  # noqa: E402
from fer_pipeline.dedup.groups import deduplicate_incremental, near_pairs  # noqa: E402
from fer_pipeline.faces.phash import phashes, to_hex  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def planted_hashes(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random hashes, 1 % of them overwritten by a copy of another with <= 4 bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n, dtype=np.uint64)
    k = n // 100
    flips = np.zeros(k, np.uint64)
    for _ in range(4):  # up to 4 distinct bits (repeats make it fewer)
        flips |= np.uint64(1) << rng.integers(0, 64, k).astype(np.uint64)
    h[rng.choice(n, k, replace=False)] = h[rng.integers(0, n, k)] ^ flips
    return h


def bench_near_pairs(n: int) -> dict[str, float]:
    hashes = planted_hashes(n)
    start = time.perf_counter()
    i, _ = near_pairs(hashes, 4)
    return {"hashes": n, "pairs": int(len(i)), "seconds": round(time.perf_counter() - start, 2)}


def dense_frames(n: int, seed: int = 1) -> np.ndarray:
    """A static camera: one smooth scene, per frame noise of +-2 grey levels and a 1-pixel shift."""
    rng = np.random.default_rng(seed)
    scene = blobs(1, rng, 72, smooth=4)[0].astype(np.int16)
    dx, dy = rng.integers(0, 2, n), rng.integers(0, 2, n)
    out = np.empty((n, 48, 48), np.uint8)
    for k in range(n):
        frame = scene[12 + dy[k]:60 + dy[k], 12 + dx[k]:60 + dx[k]] + rng.integers(-2, 3, (48, 48))
        out[k] = np.clip(frame, 0, 255)
    return out


def blobs(n: int, rng: np.random.Generator, size: int = 48, smooth: int = 1) -> np.ndarray:
    """Smooth random images (faces' low-frequency structure without rendering faces)."""
    coarse = rng.integers(0, 256, (n, size // 8 + 1, size // 8 + 1)).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :size, :size]
    kernel = np.ones(5, np.float32) / 5
    for _ in range(smooth):  # a smoother scene: a 1-pixel camera shift keeps correlation high
        for axis in (1, 2):
            fine = np.apply_along_axis(lambda v: np.convolve(v, kernel, "same"), axis, fine)
    return np.clip(fine + rng.normal(0, 6 / smooth, fine.shape), 0, 255).astype(np.uint8)


def face_table(pixels: np.ndarray, tag: str) -> pd.DataFrame:
    """The columns ``deduplicate_incremental`` needs, for faces already processed."""
    n = len(pixels)
    h, m = phashes(pixels)
    shas = [f"{tag}{k:060x}" for k in range(n)]
    return pd.DataFrame({"sha256": shas, "source": "bench", "source_path": [f"{tag}/{k}.png" for k in range(n)],
                         "image_id": shas, "label": "Neutral", "width": 48, "height": 48, "bytes": 1000,
                         "pixel_sha": [f"p{tag}{k}" for k in range(n)], "phash": to_hex(h), "phash_mirror": to_hex(m)})


def bench_dedup(pixels: np.ndarray, tag: str) -> dict[str, float]:
    table = face_table(pixels, tag)
    start = time.perf_counter()
    report, stats = deduplicate_incremental(table, 4, True, lambda rows: pixels[rows], 0.95)
    seconds = time.perf_counter() - start
    return {"faces": len(pixels), "seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "groups": int(report.table["dup_group"].nunique()), "near_candidates_met": report.n_near_candidates,
            "near_links": report.n_near_links, "pixel_correlations": stats.pairs_correlated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
    n_hashes = 100_000 if args.quick else 1_000_000
    sizes = (500, 2000) if args.quick else (2000, 20000)
    result: dict[str, object] = {}
    np_result = bench_near_pairs(n_hashes)
    print(f"near_pairs: {np_result}", flush=True)
    result["near_pairs"] = np_result
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        distinct = bench_dedup(blobs(n, rng), "d")
        dense = bench_dedup(dense_frames(n), "s")
        ratio = round(dense["seconds"] / distinct["seconds"], 2)
        print(f"N={n}: distinct {distinct}\n        dense {dense}\n        dense/distinct = {ratio}", flush=True)
        rows.append({"n": n, "distinct": distinct, "dense": dense, "dense_over_distinct": ratio})
    result["dedup"] = rows
    path = write_result("bench_dedup_scale" + ("_quick" if args.quick else ""), result,
                        targets={"near_pairs.seconds": "<= 20", "dedup.dense_over_distinct": "<= 1.5"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
