"""Non-faces and damaged faces planted among real ones: how many the quality flags and the
embedding outliers catch (issue 20, item 2), and how many real faces they flag beside them.

Real faces: ``../shared/datasets/affectnet-4class.zip`` (2,462 AffectNet faces, decoded as the
pipeline decodes them: 48x48 grayscale); skipped when absent. Planted (made here, seeded):

* 50 **non-faces**: face-free clutter crops (value noise or gradients with shapes, lines and
  text: :func:`fer_pipeline.demo.scenes.clutter`) and *scrambled faces* (a real face cut into
  4x4 blocks and shuffled: eyes and skin, no face layout; the detector benchmarks' hard negatives);
* 50 **damaged faces** (other real faces than the kept ones): heavy blur, under-exposed,
  over-exposed, sensor noise, and half the picture lost (a partly decoded file padded grey).

Flags: :func:`fer_pipeline.quality.flags.quality_flags` with the pipeline's thresholds. Outliers:
the pipeline's embedding outlier rule (:mod:`fer_pipeline.review.embeddings`) on the embedding of a
backbone pretrained here the pipeline's way on FER2013's other expressions (happy, sad, surprise,
fear, disgust; ``--pool-images`` of them, ``--epochs`` epochs), the model the ``face_embeddings``
asset uses. Figures: caught per family, and the share of real faces flagged (what a reviewer wades
through besides). Beside them, the ``no_face`` flag's check (on with ``fer.face_check``): whether
the pipeline's face detector (MTCNN) still finds a face in the upscaled crop, at three scores.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_bad_faces.py
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import write_result
from fer_pipeline.demo.scenes import clutter, scrambled_face
from fer_pipeline.faces.preprocess import preprocess_image
from fer_pipeline.quality.flags import quality_flags

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
SIDE = 48
N_PLANTS = 50


def _decode_image(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return preprocess_image(im, (SIDE, SIDE))


def read_zip(name: str, keep: callable) -> tuple[list[bytes], list[str]]:  # type: ignore[valid-type]
    with zipfile.ZipFile(DATASETS / name) as zf:
        names = sorted(n for n in zf.namelist() if keep(n))
        return [zf.read(n) for n in names], names


def affectnet() -> list[Image.Image]:
    data, _ = read_zip("affectnet-4class.zip", lambda n: n.lower().endswith((".jpg", ".jpeg", ".png"))
                       and "__MACOSX" not in n and not n.split("/")[-1].startswith("._") and "Gender" not in n)
    out = []
    for d in data:
        with Image.open(io.BytesIO(d)) as im:
            out.append(im.convert("RGB"))
    return out


def non_faces(donors: list[Image.Image], rng: np.random.Generator) -> list[np.ndarray]:
    """25 clutter crops and 25 scrambled faces."""
    out = []
    for _ in range(N_PLANTS // 2):
        scene = clutter(rng, 320, 240)
        x, y, s = int(rng.integers(0, 160)), int(rng.integers(0, 80)), int(rng.integers(96, 160))
        out.append(_decode_image(scene.crop((x, y, x + s, y + s))))
    for k in range(N_PLANTS - N_PLANTS // 2):
        out.append(_decode_image(scrambled_face(donors[k], 96, rng)))
    return out


DAMAGE = ("blurred", "dark", "over_exposed", "noisy", "half_lost")


def damaged(donors: list[Image.Image], rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """10 faces per kind of damage in ``DAMAGE``."""
    out, kinds = [], []
    for k, img in enumerate(donors[:N_PLANTS]):
        kind = DAMAGE[k % len(DAMAGE)]
        a = np.asarray(img, np.float32)
        if kind == "blurred":
            b = np.asarray(img.filter(ImageFilter.GaussianBlur(4)), np.float32)
        elif kind == "dark":
            b = a * 0.15
        elif kind == "over_exposed":
            b = 150 + a * 0.4
        elif kind == "noisy":
            b = a + rng.normal(0, 60, a.shape)
        else:
            b = a.copy()
            b[a.shape[0] // 2:] = 128  # the bottom half never decoded
        out.append(_decode_image(Image.fromarray(np.clip(b, 0, 255).astype(np.uint8))))
        kinds.append(kind)
    return out, kinds


def backbone_embeddings(faces: np.ndarray, pool_images: int, epochs: int, threads: int) -> np.ndarray:
    """Embed ``faces`` with a backbone pretrained the pipeline's way on FER2013's other expressions."""
    import tempfile

    import torch

    from benchmarks.train_affectnet import POOL_ZIP, load_pool_zip
    from fer_pipeline.ml.architectures import MAIN_MODEL, get_architecture
    from fer_pipeline.ml.checkpoint import load_checkpoint, save_checkpoint
    from fer_pipeline.ml.pretrain import pretrain_backbone
    from fer_pipeline.ml.train import TrainConfig
    from fer_pipeline.review.embeddings import embed_faces

    torch.set_num_threads(threads)
    labels = ("fear", "happy", "sad", "surprise")
    pool, ys, _ = load_pool_zip(POOL_ZIP, labels, limit=pool_images)
    result, _ = pretrain_backbone(pool, ys, len(labels), get_architecture(MAIN_MODEL),
                                  TrainConfig(epochs=epochs, num_threads=threads), log=print)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / "backbone.safetensors", result, data_version="bench",
                               classes=labels, model_name="backbone")
        return embed_faces(load_checkpoint(path), faces)


DETECTOR_SCORES = (0.6, 0.8, 0.9)


def detector_check(faces: np.ndarray, n_real: int) -> dict[str, object]:
    """The ``no_face`` flag's check (:mod:`fer_pipeline.quality.face_check`): the pipeline's MTCNN
    detector on each 48 x 48 face upscaled to 96 px; a face is flagged when no detection reaches
    the score. Reported at three scores (the flag uses 0.8): real faces flagged, plants caught."""
    from fer_pipeline.quality.face_check import FaceCheck, best_face_scores

    t = time.perf_counter()
    best = best_face_scores(faces, FaceCheck())
    out: dict[str, object] = {"detector_ms_per_face": round((time.perf_counter() - t) / len(faces) * 1000, 1)}
    for score in DETECTOR_SCORES:
        miss = best < score
        key = f"detector_{int(score * 100)}"
        out[f"{key}_real_flagged_share"] = round(float(miss[:n_real].mean()), 4)
        out[f"{key}_non_faces_caught"] = int(miss[n_real:n_real + N_PLANTS].sum())
        out[f"{key}_damaged_caught"] = int(miss[n_real + N_PLANTS:].sum())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-images", type=int, default=12_000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (DATASETS / "affectnet-4class.zip").is_file():
        print(f"skipped: {DATASETS / 'affectnet-4class.zip'} is absent")
        return 0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    images = affectnet()
    order = rng.permutation(len(images))
    donors = [images[k] for k in order[:2 * N_PLANTS]]  # damaged / scrambled: not among the kept real faces
    real = np.stack([_decode_image(images[k]) for k in order[2 * N_PLANTS:]])
    bad_faces = np.stack(non_faces(donors[N_PLANTS:], rng))
    hurt, kinds = damaged(donors[:N_PLANTS], rng)
    faces = np.concatenate([real, bad_faces, np.stack(hurt)])
    n_real = len(real)
    family = np.array(["real"] * n_real + ["clutter"] * (N_PLANTS // 2)
                      + ["scrambled"] * (N_PLANTS - N_PLANTS // 2) + kinds)
    side = np.full(len(faces), 96)
    flags = quality_flags(faces, side, side)
    flagged = np.zeros(len(faces), bool)
    flagged[flags["row"].to_numpy(dtype=int)] = True
    figures: dict[str, object] = {"real_faces": n_real, "non_faces": N_PLANTS, "damaged_faces": N_PLANTS}
    figures["flags_non_faces_caught"] = int(flagged[n_real:n_real + N_PLANTS].sum())
    figures["flags_damaged_caught"] = int(flagged[n_real + N_PLANTS:].sum())
    figures["flags_real_flagged_share"] = round(float(flagged[:n_real].mean()), 4)
    for fam in ("clutter", "scrambled", *DAMAGE):
        figures[f"flags_caught_{fam}"] = f"{int(flagged[family == fam].sum())}/{int((family == fam).sum())}"
    import pandas as pd

    from fer_pipeline.review.embeddings import OutlierSettings, find_outliers

    emb = backbone_embeddings(faces, args.pool_images, args.epochs, args.threads)
    table = pd.DataFrame({"image_id": [f"{k:05d}" for k in range(len(faces))], "embedding": list(emb)})
    outliers, note = find_outliers(table, OutlierSettings())
    out = np.zeros(len(faces), bool)
    out[outliers["image_id"].astype(int).to_numpy()] = True
    figures["pool_images"], figures["pretrain_epochs"] = args.pool_images, args.epochs
    figures["outlier_rule"] = note
    figures["outliers_non_faces_caught"] = int(out[n_real:n_real + N_PLANTS].sum())
    figures["outliers_damaged_caught"] = int(out[n_real + N_PLANTS:].sum())
    figures["outliers_real_flagged_share"] = round(float(out[:n_real].mean()), 4)
    either = out | flagged
    figures["either_non_faces_caught"] = int(either[n_real:n_real + N_PLANTS].sum())
    figures["either_damaged_caught"] = int(either[n_real + N_PLANTS:].sum())
    for fam in ("clutter", "scrambled", *DAMAGE):
        figures[f"outliers_caught_{fam}"] = f"{int(out[family == fam].sum())}/{int((family == fam).sum())}"
    # how the planted faces rank by the outlier distance, whatever the threshold (1 = most atypical)
    from cleanlab.outlier import OutOfDistribution

    rel = -np.log(np.clip(OutOfDistribution(params={"k": OutlierSettings().k}).fit_score(
        features=emb.astype(np.float64)), 1e-300, 1.0))
    rank = np.empty(len(rel), int)
    rank[np.argsort(-rel, kind="stable")] = np.arange(1, len(rel) + 1)
    figures["non_faces_in_top_100_by_distance"] = int((rank[n_real:n_real + N_PLANTS] <= 100).sum())
    figures["damaged_in_top_100_by_distance"] = int((rank[n_real + N_PLANTS:] <= 100).sum())
    figures.update(detector_check(faces, n_real))
    print({k: v for k, v in figures.items()})
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_result("bench_bad_faces", figures)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
