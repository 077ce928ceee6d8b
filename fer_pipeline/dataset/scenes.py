"""Faces in larger scenes: box overlap, one-to-one matching of detections to known faces, and
scrambled-face decoys (hard negatives). Shared by the detector tests and benchmarks so they
score alike. numpy and Pillow only: the detector comparison imports it from venvs without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

Box = Sequence[float]  # (x0, y0, x1, y1) in pixels


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_boxes(found: Sequence[Box], truth: Sequence[Box], threshold: float) -> dict[int, int]:
    """Greedy one-to-one matching by IoU (highest first, at least ``threshold``):
    {index in ``truth``: index in ``found``}."""
    pairs = sorted(((box_iou(d, t), i, j) for j, d in enumerate(found) for i, t in enumerate(truth)), reverse=True)
    got: dict[int, int] = {}
    used: set[int] = set()
    for v, i, j in pairs:
        if v < threshold:
            break
        if i not in got and j not in used:
            got[i] = j
            used.add(j)
    return got


def is_false_positive(box: Box, truth: Sequence[Box]) -> bool:
    """Away from every known face: IoU < 0.3 with each, and its centre inside none."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return not any(box_iou(box, t) >= 0.3 or (t[0] <= cx <= t[2] and t[1] <= cy <= t[3]) for t in truth)


def scrambled_face(face: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Hard negative: a real face cut into 4x4 blocks and shuffled (eyes and skin, no face layout)."""
    a = np.asarray(face.resize((96, 96), Image.LANCZOS))
    blocks = [a[i:i + 24, j:j + 24] for i in range(0, 96, 24) for j in range(0, 96, 24)]
    order = rng.permutation(16)
    rows = [np.concatenate([blocks[order[r * 4 + c]] for c in range(4)], axis=1) for r in range(4)]
    return Image.fromarray(np.concatenate(rows, axis=0)).resize((size, size), Image.LANCZOS)
