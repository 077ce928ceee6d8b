"""Find faces in photos and cut them out level, the way the datasets' crops look (issue #11).

Plain Python (torch, numpy, Pillow); nothing here knows about Dagster. The pieces:

* :class:`DetectedFace`: one face, with its box **calibrated to a dataset-style crop** (the
  square a face dataset such as AffectNet would have cut, a little margin around the face),
  the detector's score, and the two eye centres when the detector gives them.
* :class:`FaceDetector`: the protocol, ``detect(image) -> list[DetectedFace]``, largest face
  first. :data:`DETECTORS` maps names to implementations (today ``"mtcnn"``), so a second
  detector is a class with a ``detect`` method and one line in the registry.
* :class:`MTCNNDetector`: MTCNN (vendored cascade in :mod:`fer_pipeline.faces._vendor.mtcnn`,
  weights from the ``facenet-pytorch==2.6.0`` wheel, SHA-256 checked). Chosen by the
  evaluation in ``benchmarks/DETECTORS.md``.
* :func:`align_face`: rotate about the eyes' midpoint so the eyes are level, cut the box (plus a
  margin) and resize. Grayscale and the final normalisation stay with
  :func:`fer_pipeline.faces.preprocess.preprocess_image`, which takes the returned RGB crop as
  it is (its resize is a no-op when the crop already has the target size).

Coordinates are pixels of the image *after* EXIF orientation (:func:`to_rgb` applies it), x to
the right, y down; boxes are ``(x0, y0, x1, y1)`` and may reach past the image border (a face
at the edge keeps a dataset-style box; :func:`align_face` fills the outside with the face's mean
colour).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, ImageStat

Box = tuple[float, float, float, float]
Point = tuple[float, float]

DEFAULT_MAX_SIDE = 1024


@dataclass(frozen=True)
class DetectedFace:
    """One face: box (x0, y0, x1, y1, pixels, calibrated to a dataset-style crop), detector
    score (0..1 for MTCNN), and the eye centres: ``left_eye`` is the eye on the image's left
    in an upright face (the person's right eye). Eyes are ``None`` for detectors without
    landmarks; :func:`align_face` then crops without rotating."""

    box: Box
    score: float
    left_eye: Point | None = None
    right_eye: Point | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    @property
    def roll_degrees(self) -> float | None:
        """In-plane head roll from the eyes, degrees counter-clockwise (None without eyes)."""
        if self.left_eye is None or self.right_eye is None:
            return None
        (lx, ly), (rx, ry) = self.left_eye, self.right_eye
        return math.degrees(math.atan2(-(ry - ly), rx - lx))


@runtime_checkable
class FaceDetector(Protocol):
    """What the pipeline needs from a detector."""

    name: str

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Every face found in ``image`` (any Pillow mode), largest box first."""
        ...


@dataclass(frozen=True)
class BoxCalibration:
    """Maps a detector's own box (and eyes) onto the dataset-style crop square.

    A detector's box has its own tightness (MTCNN's is narrow and tall), so the crop's size is
    the detector box divided by ``width_ratio``/``height_ratio`` (median ratios of detector box
    to crop box, fitted on real faces pasted at known boxes: :func:`fit_calibration`).

    The crop's centre comes from the eyes when there are eyes: ``eye_dx``/``eye_dy`` place it
    relative to the midpoint between the eyes, along the eye line and its downward normal, in
    crop widths/heights. This follows the face when it is rolled, and on the fitting set it put
    the crop closer to the dataset's than the box centre did (median IoU 0.85 against 0.79).
    Without eyes, ``dx``/``dy`` (the detector box centre's offset from the crop centre, in
    detector-box widths/heights) place it."""

    width_ratio: float = 1.0
    height_ratio: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    eye_dx: float | None = None
    eye_dy: float | None = None

    def apply(self, box: Box, left_eye: Point | None = None, right_eye: Point | None = None) -> Box:
        bw, bh = box[2] - box[0], box[3] - box[1]
        w, h = bw / self.width_ratio, bh / self.height_ratio
        if self.eye_dx is not None and self.eye_dy is not None and left_eye is not None and right_eye is not None:
            c, s = _eye_frame(left_eye, right_eye)
            u, v = self.eye_dx * w, self.eye_dy * h
            mx, my = (left_eye[0] + right_eye[0]) / 2, (left_eye[1] + right_eye[1]) / 2
            cx, cy = mx + c * u - s * v, my + s * u + c * v
        else:
            cx = (box[0] + box[2]) / 2 - self.dx * bw
            cy = (box[1] + box[3]) / 2 - self.dy * bh
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _eye_frame(left_eye: Point, right_eye: Point) -> tuple[float, float]:
    """cos and sin of the eye line's angle (image coordinates, y down); (1, 0) if the eyes coincide."""
    dx, dy = right_eye[0] - left_eye[0], right_eye[1] - left_eye[1]
    n = math.hypot(dx, dy)
    return (1.0, 0.0) if n == 0 else (dx / n, dy / n)


def fit_calibration(pairs: Iterable[tuple[Box, Point | None, Point | None, Box]]) -> BoxCalibration:
    """Medians over (raw detector box, left eye, right eye, true crop box) of matched faces."""
    sx, sy, ox, oy, eu, ev = [], [], [], [], [], []
    for d, le, re, g in pairs:
        dw, dh, gw, gh = d[2] - d[0], d[3] - d[1], g[2] - g[0], g[3] - g[1]
        gcx, gcy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
        sx.append(dw / gw)
        sy.append(dh / gh)
        ox.append(((d[0] + d[2]) / 2 - gcx) / dw)
        oy.append(((d[1] + d[3]) / 2 - gcy) / dh)
        if le is not None and re is not None:
            c, s = _eye_frame(le, re)
            px, py = gcx - (le[0] + re[0]) / 2, gcy - (le[1] + re[1]) / 2
            eu.append((c * px + s * py) / gw)
            ev.append((-s * px + c * py) / gh)
    if not sx:
        raise ValueError("no matched faces to fit a calibration on")
    med = statistics.median
    return BoxCalibration(med(sx), med(sy), med(ox), med(oy), med(eu) if eu else None, med(ev) if ev else None)


# Fitted by `benchmarks/bench_detect.py --fit-calibration` on the evaluation set of
# benchmarks/compare_detectors.py (seed 11, fingerprint 6641abcd9a8a1386: 200 AffectNet faces,
# 60-250 px, rotated up to +-15 deg, in 640x480 clutter; MTCNN min_face_size 40, faces matched at
# IoU >= 0.3): the raw box is 0.64 x 0.85 of the crop square (DETECTORS.md), and the crop's centre
# lies a little below the eyes. fer_pipeline_tests/faces/test_detect.py scores it on a different set.
MTCNN_CALIBRATION = BoxCalibration(width_ratio=0.645, height_ratio=0.852, dx=0.008, dy=0.030,
                                   eye_dx=-0.009, eye_dy=0.076)


# --------------------------------------------------------------------------------------------
# image preparation
# --------------------------------------------------------------------------------------------

_EXIF_ORIENTATION = 0x0112


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with EXIF orientation applied: what the detector sees and what boxes refer to.

    Alpha is composited on white and 16-bit/32-bit/float images are rescaled to their range,
    as :func:`fer_pipeline.faces.preprocess.to_grayscale` does. An RGB image without an
    orientation tag is returned as it is (no copy), so calling this twice costs nothing."""
    from fer_pipeline.faces.preprocess import to_grayscale

    image.load()
    if image.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return to_grayscale(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:  # e.g. LAB, which Pillow cannot turn into RGB
        raise ValueError(f"cannot convert a {image.mode} image to RGB for face detection: {exc}") from exc


def downscale(image: Image.Image, max_side: int | None) -> tuple[Image.Image, float, float]:
    """``image`` shrunk so that its longer side is at most ``max_side`` (never enlarged), and the
    factors (sx, sy) that map its pixel coordinates back onto ``image``'s."""
    w, h = image.size
    if not max_side or max(w, h) <= max_side:
        return image, 1.0, 1.0
    s = max_side / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = image.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return small, w / nw, h / nh


def scale_face(face: DetectedFace, sx: float, sy: float) -> DetectedFace:
    """``face`` with its box and eyes multiplied by (sx, sy)."""
    b = face.box
    eye = lambda p: None if p is None else (p[0] * sx, p[1] * sy)  # noqa: E731
    return replace(face, box=(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy),
                   left_eye=eye(face.left_eye), right_eye=eye(face.right_eye))


def largest_first(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Largest box first; ties by score, then position (a total, deterministic order)."""
    return sorted(faces, key=lambda f: (-f.area, -f.score, f.box[0], f.box[1]))


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with ``num_threads`` torch intra-op threads, then restore (None: leave as is)."""
    import torch

    old = torch.get_num_threads()
    if num_threads and num_threads != old:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# MTCNN
# --------------------------------------------------------------------------------------------

class MTCNNDetector:
    """MTCNN on CPU (or ``device``), with boxes calibrated to dataset-style crops.

    * ``score_threshold`` (default 0.99): the final-stage face probability a face must exceed.
      MTCNN's own cut (0.7) leaves 0.28 false positives per face-free clutter canvas in the
      evaluation (``benchmarks/DETECTORS.md``), nearly all on scrambled mosaics of real face
      parts; > 0.99 brings that to 0.02-0.05 while keeping 94-100% of the faces (docs/data.md's
      "Face detection" paragraph has the figures). Lower it (0.9-0.95) where a missed face
      costs more than a false one, or keep only the top face when an image holds one face.
    * ``min_face_size`` (default 40 px, as evaluated): the smallest face side searched, in
      pixels of the image given; never below MTCNN's 12 px window at the detection scale.
      Smaller means a deeper image pyramid (slower).
    * ``max_side`` (default 1024): larger images are shrunk for detection and boxes mapped back,
      bounding the cost; a face must still be about ``12 * side / max_side`` px to be found.
    * ``num_threads`` (default 1): torch threads while detecting, restored afterwards. One
      thread per process, like the faces stage's workers (``face_batch.init_worker``); parallel
      work comes from processes. ``None`` leaves torch's setting alone.
    * ``calibration``: raw MTCNN box -> dataset-style crop; ``None`` returns the raw boxes.
    * ``device``: ``"cuda"`` works (checked on an H100: the same faces as the CPU on 41 canvases,
      boxes within 1.4 px, scores within 0.03; TF32 is switched off for it) but is barely faster
      per image (34 against 52 ms): the cascade is many small steps. Batching images is what
      would make a GPU pay.

    Deterministic: the same image and settings give the same faces (no randomness; fixed
    thread count)."""

    name = "mtcnn"

    def __init__(
        self,
        *,
        device: str = "cpu",
        min_face_size: float = 40.0,
        score_threshold: float = 0.99,
        max_side: int | None = DEFAULT_MAX_SIDE,
        num_threads: int | None = 1,
        calibration: BoxCalibration | None = MTCNN_CALIBRATION,
        stage_thresholds: tuple[float, float] = (0.6, 0.7),
        factor: float = 0.709,
    ) -> None:
        import torch

        from fer_pipeline.faces._vendor import mtcnn
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
        if max_side is not None and max_side < 12:
            raise ValueError(f"max_side must be at least 12 px, got {max_side}")
        self.device = torch.device(device)
        self.min_face_size = float(min_face_size)
        self.score_threshold = float(score_threshold)
        self.max_side = max_side
        self.num_threads = num_threads
        self.calibration = calibration
        self.stage_thresholds = stage_thresholds
        self.factor = factor
        self._detect_faces = mtcnn.detect_faces
        with torch_threads(num_threads):
            self._nets = mtcnn.load_networks(self.device)

    def settings(self) -> dict[str, Any]:
        """What changes the output (for a cache key or a manifest)."""
        return self.describe(min_face_size=self.min_face_size, score_threshold=self.score_threshold,
                             max_side=self.max_side, calibration=self.calibration,
                             stage_thresholds=self.stage_thresholds, factor=self.factor)

    @classmethod
    def describe(cls, **options: Any) -> dict[str, Any]:
        """:meth:`settings` of ``MTCNNDetector(**options)``, without loading the networks (and
        without torch): what a cache key needs. Options not given take the constructor's defaults."""
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        o = {**defaults, **options}
        cal = o["calibration"]
        return {"detector": cls.name, "min_face_size": float(o["min_face_size"]),
                "score_threshold": float(o["score_threshold"]), "max_side": o["max_side"],
                "stage_thresholds": list(o["stage_thresholds"]), "factor": o["factor"],
                "calibration": None if cal is None else dataclasses.asdict(cal)}

    def _kernels(self) -> contextlib.AbstractContextManager[Any]:
        """On CUDA: full-precision, deterministic cuDNN convolutions (cuDNN's default TF32 moved
        scores by up to 0.03 against the CPU on an H100, enough to flip faces near the cut)."""
        import torch

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        import torch

        rgb = to_rgb(image)
        small, sx, sy = downscale(rgb, self.max_side)
        min_face = max(12.0, self.min_face_size / max(sx, sy))
        arr = np.asarray(small)
        with torch_threads(self.num_threads), torch.inference_mode(), self._kernels():
            boxes, points = self._detect_faces(
                arr, self._nets, min_face_size=min_face,
                thresholds=(*self.stage_thresholds, self.score_threshold),
                factor=self.factor, device=self.device)
        faces = []
        for b, p in zip(boxes.tolist(), points.tolist()):
            if not b[4] > self.score_threshold:
                continue
            box = (b[0], b[1], b[2], b[3])
            left_eye, right_eye = (p[0][0], p[0][1]), (p[1][0], p[1][1])
            if self.calibration is not None:
                box = self.calibration.apply(box, left_eye, right_eye)
            face = DetectedFace(box=box, score=float(b[4]), left_eye=left_eye, right_eye=right_eye)
            faces.append(scale_face(face, sx, sy) if (sx, sy) != (1.0, 1.0) else face)
        return largest_first(faces)


DETECTORS: dict[str, type] = {"mtcnn": MTCNNDetector}


def make_detector(name: str = "mtcnn", **options: Any) -> FaceDetector:
    """A detector from the registry, by name, with its options."""
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown face detector {name!r}; known: {', '.join(sorted(DETECTORS))}") from None
    return cls(**options)


# --------------------------------------------------------------------------------------------
# alignment
# --------------------------------------------------------------------------------------------

def align_face(image: Image.Image, face: DetectedFace, margin: float = 0.0,
               size: tuple[int, int] = (48, 48)) -> Image.Image:
    """The face cut out of ``image``, eyes level, as an RGB image of ``size`` (height, width,
    like ``PreprocessSettings.image_size``).

    The image is rotated about the midpoint between the eyes by the eyes' angle (no rotation
    without eyes); the crop is the face's box moved with that rotation (its centre is the same
    point of the face), widened by ``margin`` times its width/height on *each* side, then grown
    on one axis to the target aspect (never squashed). One affine resampling (bicubic) at up to
    4x the target size, then an antialiased resize to ``size``. Parts of the crop outside the
    image are filled with the mean colour of the face's box."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    th, tw = int(size[0]), int(size[1])
    if th < 1 or tw < 1:
        raise ValueError(f"size must be positive (height, width), got {size}")
    rgb = to_rgb(image)
    x0, y0, x1, y1 = face.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    cw, ch = (x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin)
    if cw <= 0 or ch <= 0:
        raise ValueError(f"empty face box {face.box}")
    if cw / ch < tw / th:
        cw = ch * tw / th
    else:
        ch = cw * th / tw
    theta = 0.0
    if face.left_eye is not None and face.right_eye is not None:
        (lx, ly), (rx, ry) = face.left_eye, face.right_eye
        if (rx, ry) != (lx, ly):
            theta = math.atan2(ry - ly, rx - lx)
    # Rotating the image about the eyes' midpoint and cutting the rotated box around the rotated
    # box centre is, in source coordinates, a cw x ch rectangle around the box centre whose axes
    # are the eye line and its normal: one affine map from the output back onto the source.
    ow = max(tw, min(round(cw), 4 * tw))
    oh = max(th, min(round(ch), 4 * th))
    kx, ky = cw / ow, ch / oh  # source pixels per intermediate pixel
    c, s = math.cos(theta), math.sin(theta)
    # source x = cx + c*u - s*v, source y = cy + s*u + c*v, with u = kx*xo - cw/2, v = ky*yo - ch/2
    coeffs = (c * kx, -s * ky, cx - c * cw / 2 + s * ch / 2,
              s * kx, c * ky, cy - s * cw / 2 - c * ch / 2)
    fill = _mean_colour(rgb, face.box)
    out = rgb.transform((ow, oh), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC,
                        fillcolor=fill)
    if (ow, oh) != (tw, th):
        out = out.resize((tw, th), Image.Resampling.BILINEAR)
    return out


def _mean_colour(rgb: Image.Image, box: Box) -> tuple[int, int, int]:
    w, h = rgb.size
    b = (max(0, math.floor(box[0])), max(0, math.floor(box[1])), min(w, math.ceil(box[2])), min(h, math.ceil(box[3])))
    if b[2] <= b[0] or b[3] <= b[1]:
        b = (0, 0, w, h)
    region = rgb.crop(b)
    if region.width * region.height > 256 * 256:
        region = region.reduce(max(1, int(math.sqrt(region.width * region.height / (256 * 256)))))
    return tuple(round(v) for v in ImageStat.Stat(region).mean[:3])  # type: ignore[return-value]


__all__ = [
    "DETECTORS",
    "MTCNN_CALIBRATION",
    "BoxCalibration",
    "DetectedFace",
    "FaceDetector",
    "MTCNNDetector",
    "align_face",
    "downscale",
    "fit_calibration",
    "largest_first",
    "make_detector",
    "scale_face",
    "to_rgb",
]
