"""Benchmark: peak memory of the inventory + faces stages with and without a 1 GiB zip bomb.

    .venv/bin/python benchmarks/bench_hostile_memory.py [--images 3000] [--bomb-gib 1] [--uncapped]

Builds an archive of synthetic faces (the demo generator), and the same archive plus one entry
``Angry/x.png`` of 1 GiB of zeros (written by streaming; about 1 MB compressed). Each variant
runs the inventory and the faces stage (the assets' own code paths) in a fresh subprocess, which
reports its peak RSS (``ru_maxrss``; worker processes separately). Target (issue #10): the run
with the bomb stays within 10 % of the run without it. ``--uncapped`` adds a run with the size
cap lifted, to show what the cap prevents. Results: ``benchmarks/results/bench_hostile_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.record import write_result  # noqa: E402
from fer_pipeline.classes import CLASSES  # noqa: E402

LABEL_MAP = {c.lower(): c for c in CLASSES}
BOMB = "Angry/x.png"


def build_archives(tmp: Path, n_images: int, bomb_bytes: int) -> tuple[Path, Path]:
    """(faces.zip, faces_with_bomb.zip): the same faces; the second adds the zero-filled entry."""
    from fer_pipeline.demo.synthetic_faces import generate_demo_source

    src = generate_demo_source(tmp / "faces", n_images=n_images, seed=0).root
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    paths = (tmp / "faces.zip", tmp / "faces_with_bomb.zip")
    for path in paths:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f.relative_to(src).as_posix())
            if path == paths[1]:
                block = bytes(1 << 20)
                with zf.open(BOMB, "w", force_zip64=True) as out:
                    for done in range(0, bomb_bytes, len(block)):
                        out.write(block[:min(len(block), bomb_bytes - done)])
    return paths


def child(archive: Path, max_file_bytes: int, workers: int, parallel_min: int) -> None:
    """Run inventory + faces on ``archive`` and print what the parent measures, as JSON."""
    from fer_pipeline.sources.catalog import parse_catalog
    from fer_pipeline.faces.store import FaceStore
    from fer_pipeline.faces.stage import process_faces
    from fer_pipeline.sources.inventory import build_inventory
    from fer_pipeline.dataset.manifest import candidates_for_decoding
    from fer_pipeline.faces.preprocess import PreprocessSettings
    from fer_pipeline.sources.readers import SourceBytes

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog = parse_catalog({"sources": [{"name": "s", "kind": "image_folders", "path": str(archive),
                                              "label_map": LABEL_MAP}]}, root)
        settings = PreprocessSettings()
        start = time.perf_counter()
        inv = build_inventory(catalog, root, max_file_bytes=max_file_bytes).table
        cands = candidates_for_decoding(inv)
        with SourceBytes({s.name: s for s in catalog.sources}, max_file_bytes=max_file_bytes) as read:
            faces = process_faces(cands, read, FaceStore(root, settings.key), settings, workers=workers or None,
                                  parallel_min=parallel_min).table
        seconds = time.perf_counter() - start
    bomb = inv.loc[inv["source_path"] == BOMB, ["status", "reason"]]
    bomb_face = faces.loc[faces["source_path"] == BOMB, "reason"]
    outcome = "absent" if not len(bomb) else bomb.iloc[0]["status"] if bomb["reason"].isna().all() else \
        f"{bomb.iloc[0]['status']}: {bomb.iloc[0]['reason']}"
    outcome += f" / faces: {bomb_face.iloc[0]}" if len(bomb_face) else ""
    print(json.dumps({"parent_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "files": len(inv), "accepted": int(faces["reason"].isna().sum()), "seconds": seconds,
                      "bomb": outcome}))


def measure(archive: Path, max_file_bytes: int, workers: int, parallel_min: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", str(archive), "--max-file-bytes", str(max_file_bytes),
           "--workers", str(workers), "--parallel-min", str(parallel_min)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    from fer_pipeline.sources.readers import DEFAULT_MAX_FILE_BYTES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000, help="synthetic faces in the archive")
    ap.add_argument("--bomb-gib", type=float, default=1.0, help="size of the zero-filled entry, GiB")
    ap.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES)
    ap.add_argument("--workers", type=int, default=0, help="faces stage processes (0 = one per core)")
    ap.add_argument("--parallel-min", type=int, default=10_000, help="new images from which workers are used")
    ap.add_argument("--uncapped", action="store_true", help="also run the bomb archive with the cap lifted")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.max_file_bytes, args.workers, args.parallel_min)
        return
    with tempfile.TemporaryDirectory() as tmp:
        plain, bombed = build_archives(Path(tmp), args.images, int(args.bomb_gib * (1 << 30)))
        print(f"archives: {plain.stat().st_size / 2**20:.1f} MB without, {bombed.stat().st_size / 2**20:.1f} MB with "
              f"the {args.bomb_gib:g} GiB zero entry {BOMB}")
        runs = [("without the bomb", plain, args.max_file_bytes), ("with the bomb", bombed, args.max_file_bytes)]
        if args.uncapped:
            runs.append(("with the bomb, cap lifted", bombed, 1 << 40))
        results = {}
        for label, archive, cap in runs:
            r = results[label] = measure(archive, cap, args.workers, args.parallel_min)
            print(f"{label:28s} peak RSS parent {r['parent_mb']:7.0f} MB, workers {r['workers_mb']:5.0f} MB; "
                  f"{r['files']} files, {r['accepted']} faces accepted, {r['seconds']:.1f} s; {BOMB}: {r['bomb']}")
    base, bomb = results["without the bomb"], results["with the bomb"]
    ratio = (bomb["parent_mb"] + bomb["workers_mb"]) / (base["parent_mb"] + base["workers_mb"])
    print(f"peak with / without the bomb: {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")

    def total_mb(r: dict[str, object]) -> float:
        return round(float(r["parent_mb"]) + float(r["workers_mb"]), 1)  # type: ignore[arg-type]

    figures: dict[str, object] = {
        "images": args.images, "bomb_gib": args.bomb_gib,
        "peak_mb_without": total_mb(base), "peak_mb_with": total_mb(bomb), "with_over_without": round(ratio, 3),
        "runs": results}
    if "with the bomb, cap lifted" in results:
        figures["peak_mb_uncapped"] = total_mb(results["with the bomb, cap lifted"])
    print(f"wrote {write_result('bench_hostile_memory', figures, targets={'with_over_without': '<= 1.10'})}")


if __name__ == "__main__":
    main()
