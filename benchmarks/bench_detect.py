"""Benchmark: faces/s of detect + align + preprocess (issue #11) against today's crop path.

Both paths start from the same encoded images (640x480 JPEG canvases, quality 90):

* detect path: ``Image.open`` -> ``MTCNNDetector.detect`` -> ``align_face`` (48x48) ->
  ``preprocess_image`` for every face found;
* crop path: ``decode_face`` (what the faces stage runs today: decode, grayscale, fit to 48x48),
  on the same canvases, and on the dataset's own face crops (the files today's pipeline reads);
  the detect path is timed on those crops too (faces/s < images/s where it finds no face).

The canvases are real AffectNet faces pasted into clutter (``compare_detectors.build_testset``,
60-250 px, up to +-15 deg, 1-2 faces or none) when ``../shared/datasets`` is present, else the
project's cartoon demo faces (``synthetic_faces.render_face``) pasted the same way.

    .venv/bin/python benchmarks/bench_detect.py                  # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_detect.py --canvases 40 --synthetic
    .venv/bin/python benchmarks/bench_detect.py --fit-calibration  # refit MTCNN_CALIBRATION (~1 min)

``--fit-calibration`` runs MTCNN with raw boxes on the evaluation set of compare_detectors.py
(seed 11, 200 faces, 50 face-free canvases), matches faces at IoU >= 0.3, prints the fitted
``BoxCalibration``, then recall at IoU >= 0.5 and false positives per canvas by score threshold.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import compare_detectors as cd  # noqa: E402

from benchmarks.record import write_result  # noqa: E402

from fer_pipeline.faces.detect import MTCNNDetector, align_face, fit_calibration  # noqa: E402
from fer_pipeline.faces.preprocess import (  # noqa: E402
    PreprocessSettings,
    decode_face,
    preprocess_image,
)
from fer_pipeline.demo.scenes import is_false_positive, match_boxes  # noqa: E402


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def synthetic_set(n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """Cartoon demo faces in clutter canvases (no dataset needed); and the faces as 96 px crops."""
    from fer_pipeline.classes import CLASSES
    from fer_pipeline.demo.synthetic_faces import render_face, sample_face_params

    rng = np.random.default_rng(seed)

    def face(i: int) -> Image.Image:
        r = np.random.default_rng([seed, i])
        p = sample_face_params(CLASSES[i % len(CLASSES)], ("male", "female")[i % 2],
                               ("young", "middle", "senior")[i % 3], r)
        return render_face(p, 96, r)

    faces = [face(i) for i in range(2 * n + 20)]
    canvases, it = [], iter(faces[20:])
    for _ in range(n):
        img, _ = cd.background(rng, faces[:20])
        for _k in range(int(rng.integers(0, 3))):
            size = int(rng.integers(70, 200))
            cd.paste_face(img, next(it), size, float(rng.uniform(-10, 10)),
                          float(rng.uniform(size, cd.W - size)), float(rng.uniform(size, cd.H - size)))
        canvases.append(jpeg(np.asarray(img)))
    return canvases, [jpeg(np.asarray(f)) for f in faces[20:20 + n]]


def real_set(zip_path: Path, n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    n_faces = max(4, round(n * 0.8))  # compare_detectors' layout: 1/2 of faces alone, 1/4 in pairs
    ts = cd.build_testset(zip_path, n_faces, n - (n_faces - n_faces // 4), n, seed)
    crops = [jpeg(c[24:120, 24:120]) for c in ts.crops]  # the 96 px dataset crops, re-encoded
    return [jpeg(c) for c in ts.canvases], crops


def time_detect(datas: list[bytes], num_threads: int, size: tuple[int, int]) -> tuple[float, int]:
    det = MTCNNDetector(num_threads=num_threads)
    for data in datas[:2]:  # warm-up
        det.detect(Image.open(io.BytesIO(data)))
    n_faces = 0
    t0 = time.perf_counter()
    for data in datas:
        img = Image.open(io.BytesIO(data))
        for face in det.detect(img):
            crop = align_face(img, face, margin=0.0, size=size)
            preprocess_image(crop, size)
            n_faces += 1
    return time.perf_counter() - t0, n_faces


def time_decode(datas: list[bytes], settings: PreprocessSettings) -> float:
    t0 = time.perf_counter()
    for data in datas:
        decode_face(data, settings)
    return time.perf_counter() - t0


def bench(args: argparse.Namespace) -> None:
    real = not args.synthetic and args.zip.exists()
    load0 = os.getloadavg()
    canvases, crops = real_set(args.zip, args.canvases, args.seed) if real else synthetic_set(args.canvases, args.seed)
    settings = PreprocessSettings()
    print(f"{len(canvases)} canvases 640x480 ({'real AffectNet faces' if real else 'synthetic demo faces'} in clutter), "
          f"{os.cpu_count()} CPUs, load average before {load0[0]:.2f}", flush=True)
    rows = []
    for threads in args.threads:
        dt, n_faces = time_detect(canvases, threads, settings.image_size)
        rows.append((f"detect+align+preprocess, {threads} torch thread{'s' if threads > 1 else ''}",
                     len(canvases) / dt, n_faces / dt, 1000 * dt / len(canvases)))
    dt, n_faces = time_detect(crops, max(args.threads), settings.image_size)
    rows.append((f"detect+align+preprocess on the same 96 px face crops, {max(args.threads)} torch threads",
                 len(crops) / dt, n_faces / dt, 1000 * dt / len(crops)))
    time_decode(canvases[:5], settings)
    dt = time_decode(canvases, settings)
    rows.append(("decode_face on the same canvases (one 'face' per image)", len(canvases) / dt, len(canvases) / dt,
                 1000 * dt / len(canvases)))
    dt = time_decode(crops, settings)
    rows.append(("decode_face on 96 px face crops (today's input)", len(crops) / dt, len(crops) / dt, 1000 * dt / len(crops)))
    print("\n| path | images/s | faces/s | ms/image |\n|---|---|---|---|")
    for name, ips, fps, ms in rows:
        print(f"| {name} | {ips:.1f} | {fps:.1f} | {ms:.1f} |")
    print(f"\nload average after {os.getloadavg()[0]:.2f}")
    keys = [f"detect_{t}_threads" for t in args.threads] + [f"detect_crops_{max(args.threads)}_threads",
                                                             "decode_canvases", "decode_crops"]
    figures: dict[str, object] = {"faces": "real AffectNet" if real else "synthetic demo", "canvases": len(canvases),
                                  "load_average_before": round(load0[0], 2),
                                  "load_average_after": round(os.getloadavg()[0], 2)}
    for key, (name, ips, fps, ms) in zip(keys, rows):
        figures[key] = {"path": name, "images_per_s": round(ips, 1), "faces_per_s": round(fps, 1),
                        "ms_per_image": round(ms, 2)}
    name = "bench_detect" if real else "bench_detect_synthetic"
    print(f"wrote {write_result(name, figures)}")


def fit(args: argparse.Namespace) -> None:
    if not args.zip.exists():
        print(f"{args.zip} not found: fitting needs the real AffectNet archive; skipping")
        return
    ts = cd.build_testset(args.zip, 200, 50, 100, 11)
    print(f"evaluation set {ts.fingerprint()} (compare_detectors.py, seed 11)", flush=True)
    det = MTCNNDetector(calibration=None, score_threshold=0.7, num_threads=2)
    dets = [det.detect(Image.fromarray(c)) for c in ts.canvases]
    pairs = []
    for ds, gts in zip(dets, ts.boxes):
        for gi, di in match_boxes([d.box for d in ds], gts, 0.3).items():
            pairs.append((ds[di].box, ds[di].left_eye, ds[di].right_eye, gts[gi]))
    cal = fit_calibration(pairs)
    print(f"fitted on {len(pairs)} faces: {cal}")
    n_faces = sum(len(b) for b in ts.boxes)
    empty = [i for i, b in enumerate(ts.boxes) if not b]
    print("\n| score > | recall@0.5 | FP / face-free canvas | FP / canvas |\n|---|---|---|---|")
    for thr in (0.7, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995):
        boxes = [[cal.apply(d.box, d.left_eye, d.right_eye) for d in ds if d.score > thr] for ds in dets]
        recall = sum(len(match_boxes(b, g, 0.5)) for b, g in zip(boxes, ts.boxes)) / n_faces
        fps = [sum(is_false_positive(b, ts.boxes[i]) for b in bs) for i, bs in enumerate(boxes)]
        print(f"| {thr} | {recall:.3f} | {sum(fps[i] for i in empty) / len(empty):.3f} | {sum(fps) / len(fps):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=cd.DEFAULT_ZIP)
    ap.add_argument("--canvases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--synthetic", action="store_true", help="cartoon demo faces even when the datasets are present")
    ap.add_argument("--fit-calibration", action="store_true")
    args = ap.parse_args()
    fit(args) if args.fit_calibration else bench(args)


if __name__ == "__main__":
    main()
