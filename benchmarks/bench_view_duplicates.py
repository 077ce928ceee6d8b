"""Re-cropped copies that pHash misses: a multi-view descriptor with a margin test (issue 20, item 2).

A copy of a face that was re-cropped (window shifted 8 %, scaled 0.9), rotated 5°, brightened and
re-saved as JPEG quality 40 is the same picture to a person, but its pHash is far from the
original's, and the pretrained backbone's features (trained on expressions) put two different
people with the same expression closer than the copy and its original (issue 20's first
measurement: recall 0.01). This benchmark measures a model-free alternative that cannot leak (no
label, no split, no training): each face is described by its blurred, contrast-normalised
12 x 12 centre at 54 *views* (shifts of -9/0/+9 % both ways x zoom 1/1.11 x rotation -5/0/+5°);
the similarity of two faces is the best cosine of a view of one with the plain other (both ways);
a pair is a duplicate when its similarity beats every other face's similarity to either of them
by the *margin* (a nearest-neighbour ratio test, as for SIFT matches).

Protocol (real faces, ``../shared/datasets/affectnet-4class.zip``; skipped when absent):

* faces decoded as the pipeline does (48x48 grayscale); exact pixel twins and what the manifest's
  pHash rule links are dropped; the rest cut at random into a *calibration* and an *evaluation*
  half; in each, 200 originals get a planted copy (the transform above, applied to the original
  file, decoded like every file);
* the margin threshold is the lowest with at most 1 % false pairs (pairs among distinct faces over
  the number of distinct faces) on the calibration half, then applied unchanged to the evaluation
  half: recall (planted pairs found) and false pairs there are the figures. pHash's recall (the
  manifest's rule: distance <= 4, mirrored, correlation >= 0.95) on the same plants beside it;
* a second plant family *outside* the views (shift 12 %, scale 0.85, rotation 8°) shows how far
  the views reach;
* the evaluation pairs counted false are listed by archive member with their margins: AffectNet
  itself holds re-cropped copies of one photograph that pHash does not link, and they count as
  false here.

Brute force (54 x N^2 dot products): fine for the two halves here, not for a pipeline of 10^5
faces; wiring it into the de-duplication stage needs an approximate nearest-neighbour index.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_view_duplicates.py
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import write_result
from fer_pipeline.dedup.groups import deduplicate
from fer_pipeline.faces.phash import phashes, to_hex
from fer_pipeline.faces.preprocess import preprocess_image

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
N_PLANTS = 200
MAX_FALSE = 0.01
SIDE = 48
VIEWS = list(itertools.product([-0.09, 0.0, 0.09], [-0.09, 0.0, 0.09], [1.0, 1.11], [-5, 0, 5]))
DESCRIPTOR_SIDE, BLUR_SIGMA, BORDER = 12, 1.5, 6


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return preprocess_image(im, (SIDE, SIDE))


def read_affectnet() -> tuple[list[bytes], list[str]]:
    with zipfile.ZipFile(DATASETS / "affectnet-4class.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png"))
                       and "__MACOSX" not in n and not n.split("/")[-1].startswith("._") and "Gender" not in n)
        return [zf.read(n) for n in names], names


def plant_copy(data: bytes, rng: np.random.Generator, shift: float = 0.08, scale: float = 0.9,
               degrees: float = 5.0) -> bytes:
    """Crop window shifted by ``shift`` of the width, scaled ``scale``, brightness +20, rotated
    ``degrees`` (either way), JPEG quality 40."""
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    img = img.rotate(degrees * rng.choice([-1, 1]), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
    cw, ch = scale * w, scale * h
    dx, dy = shift * w * rng.choice([-1, 1]), shift * h * rng.choice([-1, 0, 1])
    left, top = (w - cw) / 2 + dx, (h - ch) / 2 + dy
    img = img.crop((round(left), round(top), round(left + cw), round(top + ch)))
    arr = np.clip(np.asarray(img, np.int16) + 20, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=40)
    return out.getvalue()


def view(face: np.ndarray, dx: float, dy: float, zoom: float, degrees: float) -> np.ndarray:
    """``face`` shifted by (dx, dy) of its side, rotated, zoomed about its centre, cropped back."""
    im = Image.fromarray(face).rotate(degrees, resample=Image.Resampling.BILINEAR,
                                      translate=(-dx * SIDE, -dy * SIDE))
    z = round(SIDE * zoom)
    im = im.resize((z, z), Image.Resampling.BILINEAR)
    o = (z - SIDE) // 2
    return np.asarray(im.crop((o, o, o + SIDE, o + SIDE)))


def descriptors(faces: np.ndarray) -> np.ndarray:
    """(N, D) unit vectors: blurred centre, box-reduced, mean removed (brightness does not count)."""
    blurred = ndimage.gaussian_filter(faces.astype(np.float32), (0, BLUR_SIGMA, BLUR_SIGMA))
    centre = blurred[:, BORDER:SIDE - BORDER, BORDER:SIDE - BORDER]
    small = np.stack([np.asarray(Image.fromarray(c).resize((DESCRIPTOR_SIDE,) * 2, Image.Resampling.BOX))
                      for c in centre]).reshape(len(faces), -1).astype(np.float64)
    small -= small.mean(axis=1, keepdims=True)
    return small / np.maximum(np.linalg.norm(small, axis=1, keepdims=True), 1e-9)


def view_similarity(faces: np.ndarray) -> np.ndarray:
    """(N, N): the best cosine of any view of one face with the other face (both ways), -inf on
    the diagonal."""
    plain = descriptors(faces)
    sim = np.full((len(faces), len(faces)), -np.inf)
    for v in VIEWS:
        m = descriptors(np.stack([view(f, *v) for f in faces])) @ plain.T
        np.maximum(sim, np.maximum(m, m.T), out=sim)
    np.fill_diagonal(sim, -np.inf)
    return sim


def margins(sim: np.ndarray) -> np.ndarray:
    """(N, N): each pair's similarity minus the best similarity either face has to any third face."""
    top2 = -np.sort(-sim, axis=1)[:, :2]
    best = sim.argmax(axis=1)
    n = len(sim)
    other = np.where(best[:, None] == np.arange(n)[None, :], top2[:, 1:2], top2[:, 0:1])  # (i, j): i's best but j
    return sim - np.maximum(other, other.T)


def phash_pairs(faces: np.ndarray) -> set[tuple[int, int]]:
    """Pairs the manifest's rule links (distance <= 4, mirrored, correlation >= 0.95)."""
    h, m = phashes(faces)
    n = len(faces)
    ids = [f"{i:06d}" for i in range(n)]
    df = pd.DataFrame({"image_id": ids, "source": "s", "source_path": ids, "label": "x", "width": SIDE,
                       "height": SIDE, "bytes": 1, "pixel_sha": [faces[i].tobytes().hex() for i in range(n)],
                       "phash": to_hex(h), "phash_mirror": to_hex(m)})
    groups = deduplicate(df, 4, True, faces, 0.95).table["dup_group"].to_numpy()
    out: set[tuple[int, int]] = set()
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        out |= {(int(a), int(b)) for k, a in enumerate(members) for b in members[k + 1:]}
    return out


def planted_half(files: list[bytes], faces: np.ndarray, rows: np.ndarray, rng: np.random.Generator,
                 **transform: float) -> tuple[np.ndarray, int, dict[int, int]]:
    """The half's distinct faces then one planted copy of 200 of them; plant row -> original row."""
    chosen = rng.choice(len(rows), N_PLANTS, replace=False)
    copies = np.stack([decode(plant_copy(files[rows[c]], rng, **transform)) for c in chosen])
    return np.concatenate([faces[rows], copies]), len(rows), {len(rows) + k: int(c) for k, c in enumerate(chosen)}


def scores(score: np.ndarray, n: int, plants: dict[int, int], threshold: float) -> dict[str, float]:
    found = np.array([score[p, o] >= threshold for p, o in plants.items()])
    iu = np.triu_indices(n, 1)
    false = int((score[:n, :n][iu] >= threshold).sum())
    return {"recall": float(found.mean()), "false_pairs": false, "false_pair_rate": false / n}


def lowest_threshold(score: np.ndarray, n: int) -> float:
    """The lowest threshold with at most MAX_FALSE x n pairs among the n distinct faces."""
    upper = np.sort(score[:n, :n][np.triu_indices(n, 1)])[::-1]
    return float(upper[int(np.floor(MAX_FALSE * n))]) + 1e-9


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    if not (DATASETS / "affectnet-4class.zip").is_file():
        print(f"skipped: {DATASETS / 'affectnet-4class.zip'} is absent")
        return 0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    files, names = read_affectnet()
    faces = np.stack([decode(d) for d in files])
    _, first = np.unique(faces.reshape(len(faces), -1), axis=0, return_index=True)
    first = np.sort(first)
    linked = phash_pairs(faces[first])
    drop = {j for _, j in linked}
    distinct = rng.permutation(np.array([r for k, r in enumerate(first) if k not in drop]))
    halves = {"calibration": distinct[: len(distinct) // 2], "evaluation": distinct[len(distinct) // 2:]}
    print(f"{len(faces)} AffectNet faces, {len(distinct)} distinct (pixel twins and pHash-linked dropped)")

    cal_faces, cal_n, cal_plants = planted_half(files, faces, halves["calibration"], rng)
    cal_sim = view_similarity(cal_faces)
    cal_margin = margins(cal_sim)
    t_margin, t_sim = lowest_threshold(cal_margin, cal_n), lowest_threshold(cal_sim, cal_n)

    figures: dict[str, object] = {"distinct_faces": len(distinct), "planted_pairs_per_half": N_PLANTS,
                                  "views": len(VIEWS), "margin_threshold": round(t_margin, 4),
                                  "similarity_threshold": round(t_sim, 4),
                                  "calibration_view_recall": round(scores(cal_margin, cal_n, cal_plants, t_margin)
                                                                   ["recall"], 4)}
    families = {"": {}, "outside_views_": {"shift": 0.12, "scale": 0.85, "degrees": 8.0}}
    for prefix, transform in families.items():
        ev_faces, ev_n, ev_plants = planted_half(files, faces, halves["evaluation"], np.random.default_rng(1),
                                                 **transform)
        sim = view_similarity(ev_faces)
        by_margin = scores(margins(sim), ev_n, ev_plants, t_margin)
        by_sim = scores(sim, ev_n, ev_plants, t_sim)
        if not prefix:  # the pairs counted false, strongest first, by archive member: look at them
            score = margins(sim)[:ev_n, :ev_n]
            iu = np.triu_indices(ev_n, 1)
            top = np.argsort(-score[iu])[:by_margin["false_pairs"]]
            rows = halves["evaluation"]
            figures["false_pairs_listed"] = [[names[rows[iu[0][k]]], names[rows[iu[1][k]]],
                                              round(float(score[iu][k]), 4)] for k in top]
        figures[f"{prefix}view_recall"] = round(by_margin["recall"], 4)
        figures[f"{prefix}view_false_pair_rate"] = round(by_margin["false_pair_rate"], 5)
        figures[f"{prefix}view_false_pairs"] = by_margin["false_pairs"]
        figures[f"{prefix}similarity_only_recall"] = round(by_sim["recall"], 4)
        figures[f"{prefix}similarity_only_false_pair_rate"] = round(by_sim["false_pair_rate"], 5)
        linked = phash_pairs(ev_faces)
        figures[f"{prefix}phash_recall"] = round(
            sum((min(o, p), max(o, p)) in linked for p, o in ev_plants.items()) / len(ev_plants), 4)
        label = prefix.rstrip("_") or "the issue's plants"
        print(f"{label}: margin recall {by_margin['recall']:.3f} at "
              f"{by_margin['false_pair_rate']:.4f} false pairs per face; similarity alone "
              f"{by_sim['recall']:.3f} at {by_sim['false_pair_rate']:.4f}; pHash {figures[f'{prefix}phash_recall']}")
    figures["evaluated_distinct_faces"] = len(halves["evaluation"])
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_result("bench_view_duplicates", figures,
                        targets={"view_recall": ">= 0.9", "view_false_pair_rate": "<= 0.01"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
