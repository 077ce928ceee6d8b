"""Faces that are not faces: the ``no_face`` quality flag.

Pixel statistics (:mod:`fer_pipeline.quality.flags`) catch blur, darkness and blank images, and
the backbone's embedding outliers catch little (``benchmarks/bench_bad_faces.py``): a clutter crop
or a face cut into shuffled blocks has ordinary statistics and an ordinary place among
expressions. The pipeline's face detector (MTCNN, :mod:`fer_pipeline.faces.detect`) answers the
question itself: each stored face, upscaled to ``side`` pixels, should hold a face the detector
scores at ``min_score`` or more. On 2,362 real AffectNet faces with 50 planted non-faces, every
non-face and 0.3 % of the real faces were flagged at 0.8 (the benchmark, also at 0.6 and 0.9).

It costs about 13 ms a face on one CPU thread, so scores are cached by face reference (the face
store is content-addressed per preprocessing fingerprint) and detector settings: a rerun checks
only faces not seen before. Off unless ``fer.face_check`` is set (or ``no_face`` is in
``fer.exclude_flags``): drawn faces, such as the demo's synthetic ones, are often not faces to a
detector trained on photographs. Plain Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_pipeline.atomic import write_parquet

NO_FACE = "no_face"
CACHE_COLUMNS = ["face_ref", "best_score"]


@dataclass(frozen=True)
class FaceCheck:
    """A stored face is flagged when MTCNN finds no face scoring ``min_score`` in it, upscaled to
    ``side`` px (faces down to ``min_face_size`` px searched)."""

    min_score: float = 0.8
    side: int = 96
    min_face_size: float = 24.0

    def detector_settings(self) -> dict[str, object]:
        from fer_pipeline.faces.detect import MTCNNDetector

        return MTCNNDetector.describe(min_face_size=self.min_face_size, score_threshold=0.6, max_side=None)

    def cache_name(self) -> str:
        """Scores do not depend on ``min_score`` (the best score is stored), so one cache serves all."""
        payload = json.dumps({"side": self.side, "detector": self.detector_settings()}, sort_keys=True)
        return f"face_check-{hashlib.sha1(payload.encode()).hexdigest()[:12]}.parquet"


def best_face_scores(faces: np.ndarray, check: FaceCheck = FaceCheck(),
                     detector: object | None = None) -> np.ndarray:
    """The best detection score in each uint8 face (N, H, W), 0.0 where the detector finds none."""
    from fer_pipeline.faces.detect import MTCNNDetector

    det = detector or MTCNNDetector(min_face_size=check.min_face_size, score_threshold=0.6, max_side=None)
    out = np.zeros(len(faces), np.float64)
    for k, face in enumerate(np.asarray(faces)):
        img = Image.fromarray(face).resize((check.side, check.side), Image.Resampling.BILINEAR).convert("RGB")
        out[k] = max((d.score for d in det.detect(img)), default=0.0)  # type: ignore[attr-defined]
    return out


class ScoreCache:
    """Best scores by face reference, read once, extended, written back atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.scores: dict[str, float] = {}
        if path is not None and path.is_file():
            try:
                table = pd.read_parquet(path, columns=CACHE_COLUMNS)
                self.scores = dict(zip(table["face_ref"].astype(str), table["best_score"].astype(float)))
            except (OSError, ValueError, KeyError):
                self.scores = {}  # unreadable: everything is checked again, and the cache rewritten
        self.computed = 0

    def scores_for(self, refs: list[str], load: Callable[[list[int]], np.ndarray], check: FaceCheck,
                   detector: object | None = None) -> np.ndarray:
        """Scores of faces ``refs``; ``load(rows)`` gives the pixels of the rows not cached."""
        missing = [k for k, r in enumerate(refs) if r not in self.scores]
        if missing:
            found = best_face_scores(load(missing), check, detector)
            self.scores.update({refs[k]: float(s) for k, s in zip(missing, found)})
            self.computed += len(missing)
        return np.array([self.scores[r] for r in refs], np.float64)

    def save(self) -> None:
        if self.path is not None and self.computed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(self.path, pd.DataFrame({"face_ref": list(self.scores),
                                                   "best_score": list(self.scores.values())}))


def no_face_rows(scores: np.ndarray, check: FaceCheck) -> pd.DataFrame:
    """``FLAG_COLUMNS`` rows (``row``, ``flag``, ``score``, ``reason``) for the faces under ``min_score``."""
    hit = np.flatnonzero(scores < check.min_score)
    return pd.DataFrame({
        "row": hit.astype(int), "flag": NO_FACE,
        "score": np.clip(1 - scores[hit] / check.min_score, 1e-3, 1.0),
        "reason": [f"no face: the face detector finds none in it (best score {scores[k]:.2f} < {check.min_score})"
                   for k in hit]}, columns=["row", "flag", "score", "reason"])
