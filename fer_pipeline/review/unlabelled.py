"""The shipped model's probabilities for the unlabelled images, so the review queue can put the
least certain first (:func:`fer_pipeline.review.queue.rank_unlabelled`). Plain Python + torch,
no Dagster: the ``review_queue`` asset calls it.

Why the shipped model: it is what ``predict`` uses, calibrated, so its top-2 margin is the
pipeline's own best estimate of how torn it is about an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer_pipeline.classes import CLASSES
from fer_pipeline.faces.store import load_faces
from fer_pipeline.paths import DataPaths
from fer_pipeline.review.queue import PROB_COLUMNS, UNLABELLED_UNSCORED_REASON


@dataclass
class UnlabelledScores:
    """The probabilities (``image_id``, ``p_<class>``, ``probabilities``), or None with the reason
    the images stay unscored."""

    probabilities: pd.DataFrame | None
    unscored_reason: str = UNLABELLED_UNSCORED_REASON


def score_unlabelled(unlabelled: pd.DataFrame, paths: DataPaths, device: str = "cpu") -> UnlabelledScores:
    """The shipped model's calibrated probabilities for the faces of ``unlabelled`` (its
    ``image_id`` and ``face_path``). No shipped model, or one that cannot read these faces (another
    face size, or its record no longer matches its checkpoints): unscored, saying why."""
    if not len(unlabelled) or not paths.shipped_json.is_file():
        return UnlabelledScores(None)
    # torch: imported only when there is a model to run
    from fer_pipeline.ml.shipped import load_shipped

    try:
        shipped = load_shipped(paths, device)
        model = shipped.model
    except (ValueError, FileNotFoundError) as exc:
        return UnlabelledScores(None, f"unlabelled: not scored (the shipped model cannot be loaded: {exc})")
    if set(model.classes) != set(CLASSES):
        return UnlabelledScores(None, f"unlabelled: not scored (the shipped model's classes {list(model.classes)} "
                                      f"are not {list(CLASSES)})")
    faces = load_faces(paths.root, unlabelled["face_path"].astype(str).tolist())
    if tuple(faces.shape[1:]) != tuple(model.input_size):
        return UnlabelledScores(None, f"unlabelled: not scored (the shipped model takes {tuple(model.input_size)} "
                                      f"faces, the face store holds {tuple(faces.shape[1:])}: retrain it)")
    p = np.asarray(model.predict_proba(faces), dtype=np.float64)
    order = [list(model.classes).index(c) for c in CLASSES]  # the queue's class order
    table = pd.DataFrame(p[:, order], columns=PROB_COLUMNS)
    table.insert(0, "image_id", unlabelled["image_id"].to_numpy())
    table["probabilities"] = f"calibrated (shipped model {shipped.spec.name})"
    return UnlabelledScores(table)
