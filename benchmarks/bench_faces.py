"""Benchmark: faces + de-duplication stages over FER2013 (about 40,000 real images) against a
single-core floor that only decodes, converts, resizes and perceptual-hashes each image.

    .venv/bin/python benchmarks/bench_faces.py [--zip ../shared/datasets/fer2013-folders.zip] [--limit N]

Prints images/s for the pipeline and for the floor, their ratio, and peak memory (parent and
worker processes). Target (issue #2): ratio >= 1.5 on 2 cores, peak memory < 2 GB.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import imagehash
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fer_pipeline.sources.catalog import parse_catalog  # noqa: E402
from fer_pipeline.dedup.groups import deduplicate_incremental, link_cache_name  # noqa: E402
from fer_pipeline.faces.store import FaceStore, load_faces  # noqa: E402
from fer_pipeline.faces.stage import process_faces  # noqa: E402
from fer_pipeline.sources.inventory import build_inventory  # noqa: E402
from fer_pipeline.dataset.manifest import candidates_for_decoding, dedup_input  # noqa: E402
from fer_pipeline.faces.preprocess import PreprocessSettings  # noqa: E402
from fer_pipeline.sources.readers import SourceBytes  # noqa: E402

ALL_FER = {k: "Angry" for k in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")}


def floor(zip_path: Path, names: list[str], size: int) -> float:
    """The bare single-core loop: decode, grayscale, resize, imagehash.phash. Returns seconds."""
    start = time.perf_counter()
    with zipfile.ZipFile(zip_path) as zf:
        for name in names:
            img = Image.open(io.BytesIO(zf.read(name)))
            img = ImageOps.fit(img.convert("L"), (size, size))
            imagehash.phash(img)
    return time.perf_counter() - start


def max_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=REPO.parent / "shared" / "datasets" / "fer2013-folders.zip")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    if not args.zip.exists():
        sys.exit(f"{args.zip} not found: this benchmark needs the real FER2013 archive")
    settings = PreprocessSettings()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # every FER folder is mapped so that all ~40,000 images go through decoding
        catalog = parse_catalog({"sources": [{"name": "fer2013", "kind": "image_folders", "path": str(args.zip),
                                              "label_map": ALL_FER}]}, root)
        t0 = time.perf_counter()
        inv = build_inventory(catalog, root).table
        cands = candidates_for_decoding(inv)
        if args.limit:
            cands = cands.head(args.limit)
        t1 = time.perf_counter()
        with SourceBytes({s.name: s for s in catalog.sources}) as read:
            report = process_faces(cands, read, FaceStore(root, settings.key), settings, workers=args.workers or None)
        t2 = time.perf_counter()
        # what the deduplicated_faces asset runs, from an empty candidate-pair cache
        accepted = dedup_input(inv, report.table)
        refs = accepted["face_ref"].to_numpy()
        cache = root / "dedup" / link_cache_name(settings.key, 4, True)
        dd, _ = deduplicate_incremental(accepted, 4, True, lambda rows: load_faces(root, refs[rows].tolist()),
                                        0.95, cache_path=cache)
        t3 = time.perf_counter()
        n = len(cands)
        names = cands["source_path"].tolist()
    parent_mb, child_mb = max_rss_mb(resource.RUSAGE_SELF), max_rss_mb(resource.RUSAGE_CHILDREN)
    floor_s = floor(args.zip, names, settings.image_size[0])
    pipeline_s = t2 - t1 + (t3 - t2)
    print(f"images: {n}  (inventory of {len(inv)} files: {t1 - t0:.1f} s, not counted below)")
    print(f"faces stage: {t2 - t1:.1f} s on {report.workers} worker(s); dedup: {t3 - t2:.1f} s "
          f"({dd.n_near_candidates} phash candidates, {dd.n_near_links} confirmed near links, "
          f"{dd.n_exact_links} exact links, {dd.n_conflict_groups} label-conflict groups)")
    print(f"pipeline (faces + dedup): {n / pipeline_s:,.0f} images/s")
    print(f"floor (1 core, decode+resize+imagehash.phash): {n / floor_s:,.0f} images/s")
    print(f"ratio pipeline/floor: {floor_s / pipeline_s:.2f}x  (target >= 1.5x)")
    print(f"peak memory: parent {parent_mb:,.0f} MB, largest worker {child_mb:,.0f} MB, "
          f"sum {parent_mb + child_mb:,.0f} MB (target < 2 GB)")


if __name__ == "__main__":
    main()
