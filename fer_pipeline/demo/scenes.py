"""Faces in larger scenes: box overlap, one-to-one matching of detections to known faces,
scrambled-face decoys (hard negatives), and the one clutter generator with its face pasting.
Shared by the detector tests, the benchmarks and the demo's scene source
(:func:`fer_pipeline.demo.synthetic_faces.generate_demo_scenes`) so they score and draw alike.
numpy and Pillow only: the detector comparison imports it from venvs without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

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


def clutter(rng: np.random.Generator, w: int = 640, h: int = 480) -> Image.Image:
    """Face-free clutter: value noise or a gradient, then shapes, lines and text (RGB)."""
    if rng.random() < 0.5:
        acc = np.zeros((h, w, 3), np.float32)
        for cells, weight in ((4, 1.0), (12, 0.5), (40, 0.25), (120, 0.12)):
            grid = (rng.random((max(2, cells * h // w), cells, 3)) * 255).astype(np.uint8)
            acc += weight * np.asarray(Image.fromarray(grid, "RGB").resize((w, h), Image.BICUBIC), np.float32)
        base = acc / 1.87
    else:
        c0, c1, t = rng.random(3) * 255, rng.random(3) * 255, rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = xx / w * np.cos(t) + yy / h * np.sin(t)
        r = (r - r.min()) / (np.ptp(r) + 1e-6)
        base = c0 * (1 - r[..., None]) + c1 * r[..., None] + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 25))):
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(-50, w)), int(rng.integers(-50, h))
        x1, y1 = x0 + int(rng.integers(10, 220)), y0 + int(rng.integers(10, 220))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=col)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=col)
        elif kind == 2:
            draw.line((x0, y0, x1, y1), fill=col, width=int(rng.integers(1, 12)))
        else:
            draw.text((x0, y0), "".join(chr(int(c)) for c in rng.integers(65, 91, 8)), fill=col)
    return img


def place_square(rng: np.random.Generator, canvas: tuple[int, int], sizes: tuple[float, float],
                 max_angle: float, taken: list[Box], tries: int = 200) -> tuple[int, float, float, float]:
    """A random (size, angle, cx, cy) for a square of side in ``sizes`` (log-uniform) turned by up to
    ``max_angle`` degrees, inside ``canvas`` (w, h) and 8 px clear of the ``taken`` extents (the last
    try is used when none fits). Appends its extent to ``taken``."""
    w, h = canvas
    for _attempt in range(tries):
        size = round(math.exp(rng.uniform(math.log(sizes[0]), math.log(sizes[1]))))
        angle = float(rng.uniform(-max_angle, max_angle))
        ext = size * (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))) / 2
        cx, cy = float(rng.uniform(ext + 2, w - ext - 2)), float(rng.uniform(ext + 2, h - ext - 2))
        r = (cx - ext - 8, cy - ext - 8, cx + ext + 8, cy + ext + 8)
        if all(r[2] < p[0] or r[0] > p[2] or r[3] < p[1] or r[1] > p[3] for p in taken):
            break
    taken.append(r)
    return size, angle, cx, cy


def paste_face(canvas: Image.Image, face: Image.Image, size: int, angle: float, cx: float,
               cy: float) -> tuple[float, float, float, float]:
    """Paste ``face`` resized to ``size`` and turned by ``angle`` degrees, centred at (cx, cy);
    returns its upright box (x0, y0, x1, y1), the square a detector's box is scored against."""
    f = face if face.size == (size, size) else face.resize((size, size), Image.LANCZOS)
    f = f.convert("RGB").rotate(angle, Image.BICUBIC, expand=True)
    mask = Image.new("L", (size, size), 255).rotate(angle, Image.BICUBIC, expand=True)
    canvas.paste(f, (round(cx - f.width / 2), round(cy - f.height / 2)), mask)
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
