"""Decode, validate and normalise one face image: the single preprocessing path used for
training data *and* for prediction, so a model always sees inputs prepared the same way.

Aspect ratio is kept by a **centre crop** to the target aspect before resizing (faces in
datasets are roughly centred; padding would add borders the model could learn from).

Only the formats of :mod:`fer_pipeline.sources.formats` are decoded, judged by content as the
inventory judges them: another format (EPS, ICO, AVIF...) is refused before Pillow parses it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_pipeline.sources.formats import (
    ACCEPTED_FORMATS,
    SNIFF_BYTES,
    format_refusal,
    sniff_format,
)

PREPROCESS_VERSION = 2  # bump when the algorithm changes, so cached faces are recomputed (2: big images reduced first)


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes a processed face; its fingerprint keys the face cache."""

    image_size: tuple[int, int] = (48, 48)  # (height, width)
    min_side: int = 32  # reject images smaller than this on either side (pixels)
    max_pixels: int = 40_000_000  # larger images are treated as decompression bombs
    min_std: float = 3.0  # processed faces with a lower pixel std are near-constant / blank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSettings":
        """Settings from :meth:`to_dict` (unknown keys, such as a stored ``key``, are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "image_size" in values:
            values["image_size"] = tuple(int(v) for v in values["image_size"])
        return cls(**values)

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


REDUCE_ABOVE = 4_000_000
"""Decoded images with more pixels than this are first shrunk by an integer box average
(``Image.reduce``) to at least twice the target size, so grayscale conversion, alpha compositing
and cropping work on a small copy instead of several full-size ones (a 40-megapixel RGBA PNG
peaked at ~790 MB). JPEGs are already decoded at a reduced scale (``draft``) and stay below it."""
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")  # the modes Image.reduce accepts


def _reduced(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` box-averaged by the largest integer factor that keeps it at least twice ``size``
    on both sides (either orientation); ``img`` itself when small or of a mode reduce refuses."""
    if img.width * img.height <= REDUCE_ABOVE or img.mode not in _REDUCIBLE:
        return img
    factor = min(img.width, img.height) // (2 * max(size))
    return img.reduce(factor) if factor >= 2 else img  # keeps info (EXIF): orientation still applies


def preprocess_image(img: Image.Image, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """EXIF orientation (applied to ``img`` in place when it is small), grayscale, centre crop to
    the target aspect, resize; uint8 (H, W)."""
    img.load()  # PNG chunks after the pixels (eXIf) are only known once loaded
    small = _reduced(img, size)
    if small is not img:
        img = small  # a copy without the file's format: its EXIF is read from info below
    if _may_carry_orientation(img):
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to rotate
    gray = to_grayscale(img)
    h, w = size
    if gray.size != (w, h):
        gray = ImageOps.fit(gray, (w, h), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    # frombuffer(tobytes) is the cheapest copy out of Pillow for small images (asarray goes
    # through the array interface and costs more than the decode of a 48×48 JPEG)
    return np.frombuffer(bytearray(gray.tobytes()), dtype=np.uint8).reshape(h, w)


_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")


def _may_carry_orientation(img: Image.Image) -> bool:
    """False only when the file certainly has no EXIF/XMP orientation (JPEG/PNG without those
    blocks): reading an empty EXIF costs more than decoding a small face."""
    return img.format not in ("JPEG", "PNG") or any(k in img.info for k in _ORIENTATION_KEYS)


def _decode_one(data: bytes, settings: PreprocessSettings) -> DecodedFace:
    """Decode, validate and normalise one file, before the blank check (done per batch).

    Never raises: whatever a hostile file makes Pillow raise is that file's reason. The pixel
    count is checked from the header, before the pixels are decoded."""
    try:
        return _decode_checked(data, settings)
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not stop a batch
        return DecodedFace(None, None, None, f"unreadable or truncated ({type(exc).__name__}: {exc})")


@dataclass(frozen=True)
class OpenedImage:
    """A file's image, loaded and checked (pixel bomb, readable, not too small), or why not."""

    image: Image.Image | None
    width: int | None  # original size, before orientation
    height: int | None
    reason: str | None  # None when ``image`` is usable


def open_checked(data: bytes, settings: PreprocessSettings, draft: tuple[str, tuple[int, int]] | None = None
                 ) -> OpenedImage:
    """Open and load ``data`` with the checks every file gets; never raises for bad input.

    The pixel count is checked from the header, before the pixels are decoded. ``draft`` (mode,
    size) lets a JPEG decode at a reduced scale no smaller than ``size`` (width, height)."""
    if not data:
        return OpenedImage(None, None, None, "empty file (0 bytes)")
    fmt = sniff_format(data[:SNIFF_BYTES])
    if fmt is not None and fmt not in ACCEPTED_FORMATS:  # never handed to a decoder (EPS runs Ghostscript)
        return OpenedImage(None, None, None, format_refusal(fmt))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # the one format policy
            width, height = img.size
            if width * height > settings.max_pixels:
                return OpenedImage(None, width, height,
                                   f"decompression bomb ({width}x{height} > {settings.max_pixels} pixels)")
            if img.format == "JPEG" and draft is not None:
                img.draft(*draft)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return OpenedImage(None, None, None, f"decompression bomb ({exc})")
    except UnidentifiedImageError:
        return OpenedImage(None, None, None, "not an image (unrecognised format)")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return OpenedImage(None, None, None, f"unreadable or truncated ({exc})")
    if min(width, height) < settings.min_side:
        return OpenedImage(None, width, height, f"too small ({width}x{height} < {settings.min_side}px)")
    return OpenedImage(img, width, height, None)


def _decode_checked(data: bytes, settings: PreprocessSettings) -> DecodedFace:
    h, w = settings.image_size
    opened = open_checked(data, settings, ("L", (max(w, settings.min_side), max(h, settings.min_side))))
    if opened.image is None:
        return DecodedFace(None, opened.width, opened.height, opened.reason)
    img, width, height = opened.image, opened.width, opened.height
    try:
        face = preprocess_image(img, settings.image_size)
    except OSError as exc:
        return DecodedFace(None, width, height, f"unreadable or truncated ({exc})")
    except ValueError as exc:  # a mode Pillow cannot turn into grayscale (e.g. LAB)
        return DecodedFace(None, width, height, f"cannot convert to grayscale ({img.mode}: {exc})")
    return DecodedFace(face, width, height, None)


def decode_faces(datas: Sequence[bytes], settings: PreprocessSettings) -> list[DecodedFace]:
    """Decode and validate a batch of raw files; never raises for bad input, returns reasons.

    The near-constant check runs once over the whole batch (a vectorised standard deviation
    per face instead of one NumPy call per image)."""
    return reject_blank([_decode_one(data, settings) for data in datas], settings)


def reject_blank(out: list[DecodedFace], settings: PreprocessSettings) -> list[DecodedFace]:
    """``out`` with near-constant faces (pixel std below ``min_std``) turned into rejections."""
    ok = [i for i, d in enumerate(out) if d.ok]
    if ok:
        stack = np.stack([out[i].face for i in ok])  # type: ignore[misc]
        stds = stack.reshape(len(ok), -1).std(axis=1)
        for i, std in zip(ok, stds.tolist()):
            if std < settings.min_std:
                d = out[i]
                out[i] = DecodedFace(None, d.width, d.height,
                                     f"near-constant/blank (pixel std {std:.2f} < {settings.min_std})")
    return out


def decode_face(data: bytes, settings: PreprocessSettings) -> DecodedFace:
    """Decode and validate one file's bytes; never raises for bad input, returns a reason instead."""
    return decode_faces([data], settings)[0]
