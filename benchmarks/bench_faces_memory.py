"""Benchmark: the faces stage's peak memory is bounded by bytes, not by file sizes (issue 19).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_faces_memory.py [--files 10000] [--big-kb 2048] [--small-kb 20]

Writes ``--files`` real JPEGs of about ``--big-kb`` KB into a temporary folder, and as many of
about ``--small-kb`` KB into another (noisy photos at high quality: a few encoded images, each
file made distinct by a trailer after the end-of-image marker, which decoders ignore, so every
file has its own SHA-256 and is decoded). Each folder goes through the faces stage (the asset's
code path: ``SourceBytes`` + ``process_faces`` with worker processes) in a fresh subprocess,
which reports its peak RSS and each worker's (``VmHWM``, read from /proc, the worker's while it
lives: a spawned child's ``ru_maxrss`` starts at its parent's RSS when it was
forked). Peak (parent + workers) is the parent's peak plus the sum of the workers' peaks.
Target: big / small <= 1.3. Writes benchmarks/results/bench_faces_memory.json; the temporary
files (about files × big-kb, 20 GB by default) are removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASES = 8  # distinct encoded images per folder


def encoded_jpegs(target_bytes: int, seed: int) -> list[bytes]:
    """``BASES`` noisy photo-like JPEGs of about ``target_bytes`` each (quality 95, side grown
    until the size is reached)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    side = 64
    for k in range(BASES):
        while True:
            h, w = side * 3 // 4, side
            y, x = np.mgrid[0:h, 0:w]
            scene = (np.sin(x / (7 + k)) + np.cos(y / (11 + k))) * 60 + 128
            pixels = np.clip(scene[..., None] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=95)
            if buf.tell() >= target_bytes * 0.9:
                out.append(buf.getvalue())
                break
            side = int(side * max(1.05, (target_bytes / max(buf.tell(), 1)) ** 0.5 * 0.97))
    return out


def write_folder(root: Path, n: int, bases: list[bytes]) -> list[tuple[str, str, int]]:
    """``n`` distinct files under ``root/angry``; returns (path in the source, sha256, bytes)."""
    folder = root / "angry"
    folder.mkdir(parents=True)
    states = [hashlib.sha256(b) for b in bases]
    rows = []
    for i in range(n):
        base = bases[i % len(bases)]
        trailer = f"file {i:08d}".encode()
        name = f"img_{i:06d}.jpg"
        with open(folder / name, "wb") as fh:
            fh.write(base)
            fh.write(trailer)
        h = states[i % len(bases)].copy()
        h.update(trailer)
        rows.append((f"angry/{name}", h.hexdigest(), len(base) + len(trailer)))
    return rows


class WorkerPeaks:
    """Polls this process's children's VmHWM (peak RSS since their exec) until stopped."""

    def __init__(self) -> None:
        import threading

        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self) -> list[int]:
        pids: list[int] = []
        for task in Path("/proc/self/task").iterdir():
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return pids

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self._children():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peaks[pid] = max(self.peaks.get(pid, 0.0), int(line.split()[1]) / 1024)

    def stop(self) -> dict[int, float]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def own_peak_mb() -> float:
    """This process's peak RSS since its exec (VmHWM; ``ru_maxrss`` includes the parent's RSS at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(folder: Path, rows_file: Path, workers: int, budget: int) -> None:
    """Run the faces stage over ``folder`` and print what the parent measures, as JSON."""
    import pandas as pd

    from fer_pipeline.faces.preprocess import PreprocessSettings
    from fer_pipeline.faces.stage import process_faces
    from fer_pipeline.faces.store import FaceStore
    from fer_pipeline.sources.catalog import parse_catalog
    from fer_pipeline.sources.readers import SourceBytes

    rows = json.loads(rows_file.read_text())
    cands = pd.DataFrame(rows, columns=["source_path", "sha256", "bytes"]).assign(source="s")
    before_mb = own_peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog = parse_catalog({"sources": [{"name": "s", "kind": "image_folders", "path": str(folder),
                                              "label_map": {"angry": "Angry"}}]}, root)
        settings = PreprocessSettings()
        start = time.perf_counter()
        sampler = WorkerPeaks()
        with SourceBytes({s.name: s for s in catalog.sources}) as read:
            report = process_faces(cands, read, FaceStore(root, settings.key), settings, workers=workers or None,
                                   parallel_min=1, max_bytes_in_flight=budget)
        peaks = sampler.stop()
        seconds = time.perf_counter() - start
    print(json.dumps({"parent_mb": own_peak_mb(),
                      "parent_before_stage_mb": before_mb,
                      "worker_peaks_mb": sorted(round(v) for v in peaks.values()),
                      "workers": report.workers, "files": len(cands),
                      "accepted": int(report.table["reason"].isna().sum()),
                      "peak_bytes_in_flight": report.peak_bytes_in_flight, "seconds": round(seconds, 1)}))


def measure(folder: Path, rows_file: Path, workers: int, budget: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(folder), "--rows", str(rows_file), "--workers", str(workers),
           "--budget", str(budget)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["peak_sum_mb"] = round(r["parent_mb"] + sum(r["worker_peaks_mb"]))
    return r


def main() -> None:
    sys.path.insert(0, str(REPO))
    from fer_pipeline.limits import MAX_BYTES_IN_FLIGHT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000, help="files per folder")
    ap.add_argument("--big-kb", type=int, default=2048)
    ap.add_argument("--small-kb", type=int, default=20)
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0 = one per core)")
    ap.add_argument("--budget", type=int, default=MAX_BYTES_IN_FLIGHT, help="max_bytes_in_flight")
    ap.add_argument("--tmp", type=Path, default=None, help="where to write the files (default: the system temp)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.rows, args.workers, args.budget)
        return
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_faces_memory_", dir=args.tmp))
    try:
        for label, kb, seed in (("small", args.small_kb, 1), ("big", args.big_kb, 2)):
            t = time.perf_counter()
            bases = encoded_jpegs(kb * 1024, seed)
            rows = write_folder(tmp / label, args.files, bases)
            rows_file = tmp / f"{label}.json"
            rows_file.write_text(json.dumps(rows))
            total = sum(r[2] for r in rows)
            print(f"{label}: {args.files} files, {total / args.files / 1024:.0f} KB each on average, "
                  f"{total / 2**30:.2f} GiB, written in {time.perf_counter() - t:.0f} s")
            r = results[label] = measure(tmp / label, rows_file, args.workers, args.budget)
            r["mean_file_kb"] = round(total / args.files / 1024, 1)
            print(f"{label}: peak RSS parent {r['parent_mb']:.0f} MB (before the stage {r['parent_before_stage_mb']:.0f}),"
                  f" workers {r['worker_peaks_mb']} MB; sum {r['peak_sum_mb']} MB; "
                  f"peak bytes in flight {r['peak_bytes_in_flight'] / 2**20:.1f} MiB; {r['accepted']} of {r['files']} "
                  f"accepted in {r['seconds']} s")
            shutil.rmtree(tmp / label)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = results["big"]["peak_sum_mb"] / results["small"]["peak_sum_mb"]
    print(f"peak (parent + workers) big / small: {ratio:.2f} (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
    if not args.no_record:
        from benchmarks.record import write_result

        path = write_result("bench_faces_memory", {"ratio": round(ratio, 3), "budget_bytes": args.budget,
                                                   "small": results["small"], "big": results["big"]},
                            targets={"ratio": "<= 1.3"})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
