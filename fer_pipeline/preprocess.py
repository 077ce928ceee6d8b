"""Decode, validate and normalise one face image: the single preprocessing path used for
training data *and* for prediction, so a model always sees inputs prepared the same way.

Aspect ratio is kept by a **centre crop** to the target aspect before resizing (faces in
datasets are roughly centred; padding would add borders the model could learn from).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PREPROCESS_VERSION = 1  # bump when the algorithm changes, so cached faces are recomputed


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes a processed face; its fingerprint keys the face cache."""

    image_size: tuple[int, int] = (48, 48)  # (height, width)
    min_side: int = 32  # reject images smaller than this on either side (pixels)
    max_pixels: int = 40_000_000  # larger images are treated as decompression bombs
    min_std: float = 3.0  # processed faces with a lower pixel std are near-constant / blank

    @property
    def key(self) -> str:
        """Short stable fingerprint of the settings (and algorithm version)."""
        payload = repr(sorted({**asdict(self), "version": PREPROCESS_VERSION}.items())).encode()
        h, w = self.image_size
        return f"{h}x{w}-{hashlib.sha1(payload).hexdigest()[:10]}"


@dataclass(frozen=True)
class DecodedFace:
    """Result of decoding one file: a face (uint8 H×W) or a rejection reason."""

    face: np.ndarray | None
    width: int | None  # original size, before orientation/resizing
    height: int | None
    reason: str | None  # None when accepted

    @property
    def ok(self) -> bool:
        return self.reason is None


def to_grayscale(img: Image.Image) -> Image.Image:
    """8-bit grayscale from any Pillow mode (alpha composited on white, 16-bit rescaled)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "L" else img.convert("L")


def preprocess_image(img: Image.Image, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """EXIF orientation (applied to ``img`` in place), grayscale, centre crop to the target aspect,
    resize; uint8 (H, W)."""
    ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to rotate
    gray = to_grayscale(img)
    h, w = size
    fitted = ImageOps.fit(gray, (w, h), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    return np.asarray(fitted, dtype=np.uint8)


def decode_face(data: bytes, settings: PreprocessSettings) -> DecodedFace:
    """Decode and validate raw file bytes; never raises for bad input, returns a reason instead."""
    h, w = settings.image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > settings.max_pixels:
                return DecodedFace(None, width, height,
                                   f"decompression bomb ({width}x{height} > {settings.max_pixels} pixels)")
            if img.format == "JPEG":
                img.draft("L", (max(w, settings.min_side), max(h, settings.min_side)))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return DecodedFace(None, None, None, f"decompression bomb ({exc})")
    except UnidentifiedImageError:
        return DecodedFace(None, None, None, "not an image (unrecognised format)")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return DecodedFace(None, None, None, f"unreadable or truncated ({exc})")
    if min(width, height) < settings.min_side:
        return DecodedFace(None, width, height, f"too small ({width}x{height} < {settings.min_side}px)")
    try:
        face = preprocess_image(img, settings.image_size)
    except (OSError, ValueError) as exc:
        return DecodedFace(None, width, height, f"unreadable or truncated ({exc})")
    std = float(face.std())
    if std < settings.min_std:
        return DecodedFace(None, width, height, f"near-constant/blank (pixel std {std:.2f} < {settings.min_std})")
    return DecodedFace(face, width, height, None)
