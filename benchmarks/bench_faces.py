"""Benchmark: faces + de-duplication stages over FER2013 (about 40,000 real images) against a
single-core floor that only decodes, converts, resizes and perceptual-hashes each image.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_faces.py [--zip ../shared/datasets/fer2013-folders.zip] [--limit N] [--repeat 3]

Prints images/s for the pipeline and for the floor, their ratio (each run measures the pipeline
and then the floor, so a pair shares the machine's conditions), and peak memory (parent and
largest worker). Writes benchmarks/results/bench_faces.json. Target (issue 19): ratio >= 1.8 on
2 cores; peak memory < 2 GB.

The pipeline's modules are imported inside :func:`main`, not at the top: face workers are
spawned, and a spawned process re-runs the top-level imports of the launching script. Importing
pandas, pyarrow, SciPy and imagehash there cost each worker ~0.5 s of CPU and ~100 MB before it
decoded anything (a Dagster run starts from ``python -m dagster``, which workers do not re-import).
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALL_FER = {k: "Angry" for k in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")}


def floor(zip_path: Path, names: list[str], size: int) -> float:
    """The bare single-core loop: decode, grayscale, resize, imagehash.phash. Returns seconds."""
    import imagehash
    from PIL import Image, ImageOps

    start = time.perf_counter()
    with zipfile.ZipFile(zip_path) as zf:
        for name in names:
            img = Image.open(io.BytesIO(zf.read(name)))
            img = ImageOps.fit(img.convert("L"), (size, size))
            imagehash.phash(img)
    return time.perf_counter() - start


def max_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def pipeline(zip_path: Path, limit: int, workers: int) -> dict[str, float | int | str]:
    """One run of what the faces and deduplicated_faces assets run, from empty caches."""
    from fer_pipeline.dataset.manifest import candidates_for_decoding, dedup_input
    from fer_pipeline.dedup.groups import deduplicate_incremental, link_cache_name
    from fer_pipeline.dedup.views import ViewRule, descriptor_cache_name
    from fer_pipeline.faces.preprocess import PreprocessSettings
    from fer_pipeline.faces.stage import process_faces
    from fer_pipeline.faces.store import FaceStore, load_faces
    from fer_pipeline.sources.catalog import parse_catalog
    from fer_pipeline.sources.inventory import build_inventory
    from fer_pipeline.sources.readers import SourceBytes

    settings = PreprocessSettings()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # every FER folder is mapped so that all ~40,000 images go through decoding
        catalog = parse_catalog({"sources": [{"name": "fer2013", "kind": "image_folders", "path": str(zip_path),
                                              "label_map": ALL_FER}]}, root)
        t0 = time.perf_counter()
        inv = build_inventory(catalog, root).table
        cands = candidates_for_decoding(inv)
        if limit:
            cands = cands.head(limit)
        t1 = time.perf_counter()
        with SourceBytes({s.name: s for s in catalog.sources}) as read:
            report = process_faces(cands, read, FaceStore(root, settings.key), settings, workers=workers or None)
        t2 = time.perf_counter()
        # what the deduplicated_faces asset runs, from an empty candidate-pair cache
        accepted = dedup_input(inv, report.table)
        refs = accepted["face_ref"].to_numpy()
        cache = root / "dedup" / link_cache_name(settings.key, 4, True)
        dd, _ = deduplicate_incremental(accepted, 4, True, lambda rows: load_faces(root, refs[rows].tolist()),
                                        0.95, cache_path=cache)
        t3 = time.perf_counter()
        # and the re-cropped-copy search the asset adds by default (view_duplicates): the same call with
        # the view rule, its pHash pairs now from the cache, so the extra time is the view search
        dv, _ = deduplicate_incremental(accepted, 4, True, lambda rows: load_faces(root, refs[rows].tolist()),
                                        0.95, cache_path=cache, view_rule=ViewRule(),
                                        view_cache_path=root / "dedup" / descriptor_cache_name(settings.key))
        t4 = time.perf_counter()
    return {"images": len(cands), "inventory_files": len(inv), "inventory_s": round(t1 - t0, 2),
            "faces_s": round(t2 - t1, 2), "dedup_s": round(t3 - t2, 2), "views_s": round(t4 - t3, 2),
            "workers": report.workers,
            "peak_bytes_in_flight": report.peak_bytes_in_flight, "names": "\n".join(cands["source_path"]),
            "links": f"{dd.n_near_candidates} phash candidates, {dd.n_near_links} confirmed near links, "
                     f"{dd.n_exact_links} exact links, {dd.n_conflict_groups} label-conflict groups; "
                     f"{dv.n_view_links} re-cropped-copy links"}


def main() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.record import write_result
    from fer_pipeline.faces.preprocess import PreprocessSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=REPO.parent / "shared" / "datasets" / "fer2013-folders.zip")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="pipeline/floor pairs to measure")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/bench_faces.json")
    args = ap.parse_args()
    if not args.zip.exists():
        sys.exit(f"{args.zip} not found: this benchmark needs the real FER2013 archive")
    size = PreprocessSettings().image_size[0]
    runs = []
    for k in range(1, args.repeat + 1):
        r = pipeline(args.zip, args.limit, args.workers)
        names = str(r.pop("names")).split("\n")
        floor_s = floor(args.zip, names, size)
        n, pipeline_s = int(r["images"]), float(r["faces_s"]) + float(r["dedup_s"])
        with_views_s = pipeline_s + float(r["views_s"])
        r.update(pipeline_images_per_s=round(n / pipeline_s), floor_images_per_s=round(n / floor_s),
                 ratio=round(floor_s / pipeline_s, 2), ratio_with_views=round(floor_s / with_views_s, 2))
        runs.append(r)
        print(f"run {k}: {n} images (inventory of {r['inventory_files']} files: {r['inventory_s']} s, not counted); "
              f"faces {r['faces_s']} s on {r['workers']} worker(s), dedup {r['dedup_s']} s, re-cropped-copy "
              f"search {r['views_s']} s ({r['links']})")
        print(f"run {k}: pipeline {r['pipeline_images_per_s']:,} images/s, floor (1 core, decode+resize+"
              f"imagehash.phash) {r['floor_images_per_s']:,} images/s, ratio {r['ratio']:.2f}x (target >= 1.8x)")
    parent_mb, child_mb = max_rss_mb(resource.RUSAGE_SELF), max_rss_mb(resource.RUSAGE_CHILDREN)
    ratios = [float(r["ratio"]) for r in runs]
    print(f"ratios: {', '.join(f'{x:.2f}x' for x in ratios)}; median {statistics.median(ratios):.2f}x")
    print(f"peak memory: parent {parent_mb:,.0f} MB, largest worker {child_mb:,.0f} MB, "
          f"sum {parent_mb + child_mb:,.0f} MB (target < 2 GB)")
    if not args.no_record:
        path = write_result("bench_faces", {
            "ratio_median": statistics.median(ratios), "ratios": ratios, "runs": runs,
            "ratio_with_views_median": statistics.median(float(r["ratio_with_views"]) for r in runs),
            "views_s_median": statistics.median(float(r["views_s"]) for r in runs),
            "peak_parent_mb": round(parent_mb), "peak_largest_worker_mb": round(child_mb)},
            targets={"ratio_median": ">= 1.8", "peak_parent_mb + peak_largest_worker_mb": "< 2048"})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
