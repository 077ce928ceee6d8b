"""How an image frames its face: the framing vocabulary and a detecting source's settings.

The catalogue parses them (``faces:`` and ``detect:``), so they live here, below every room that
uses them: the faces stage and its workers (:mod:`fer_pipeline.faces.framing` adds the face-store
key), the manifest's ``framing`` column and the checkpoints' recorded framing all speak this one
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CROP = "crop"  # the image is a face crop: centre-cropped and resized
DETECT = "detect"  # the image is a photo: faces are found, aligned and cut out
MIXED = "mixed"  # a model trained on both (prediction detects)
SOURCE_FRAMINGS = (CROP, DETECT)  # how a source's images frame a face (its `faces:`, a manifest row's `framing`)
MODEL_FRAMINGS = (*SOURCE_FRAMINGS, MIXED)  # how a model's training faces were framed (its checkpoint)
KEEP_LARGEST, KEEP_ALL = "largest", "all"
KEEP = (KEEP_LARGEST, KEEP_ALL)


@dataclass(frozen=True)
class DetectSpec:
    """How a ``faces: detect`` source's photos become faces (the ``detect:`` mapping).

    ``keep``: ``largest`` (one face per image, the largest) or ``all`` (every face is its own
    item, with its face index); ``margin``: extra border on each side of the detector's
    dataset-style box, as a fraction of its width/height; ``min_score``: the detector score a
    face must exceed (0.99 suits real photos; drawn faces score lower); ``min_face_size``:
    the smallest face searched, in pixels; ``detector``: which detector (the catalogue has one)."""

    keep: str = KEEP_LARGEST
    margin: float = 0.0
    min_score: float = 0.99
    min_face_size: int = 40
    detector: str = "mtcnn"

    @property
    def keep_all(self) -> bool:
        return self.keep == KEEP_ALL

    def detector_options(self) -> dict[str, Any]:
        """The detector's constructor options these settings give."""
        return {"score_threshold": float(self.min_score), "min_face_size": float(self.min_face_size)}
