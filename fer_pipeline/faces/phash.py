"""Perceptual hashes, batched: bit-for-bit the ``imagehash.phash`` algorithm, but a whole batch
goes through two matrix products instead of a Pillow resize and two SciPy DCT calls per image.

* The 32×32 thumbnail is Pillow's LANCZOS resize written as matrices: Pillow resamples each axis
  with fixed-point integer weights and rounds to 8 bits after each pass; the same integer
  weights in float64 products give the same integers exactly (the sums stay below 2**53).
  Pillow's pass order and weights are implementation details, so each (input size) is checked
  once against Pillow itself; if they ever differ, Pillow is used for that size.
* The mirrored image's hash comes for free: flipping a row reverses it, which multiplies DCT
  coefficient ``k`` by ``(-1)**k``. Comparing against mirrored hashes catches the flipped copies
  some publishers use to enlarge a class (FER2013's ``disgust``), which would otherwise leak
  between splits once training augmentation flips images too.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4
_N = HASH_SIZE * HIGHFREQ_FACTOR  # thumbnail side
_PRECISION_BITS = 22  # Pillow's 8-bit resampling precision (32 - 8 - 2)
_LANCZOS_SUPPORT = 3.0


def _dct_matrix(n: int, k: int) -> np.ndarray:
    """Rows 0..k-1 of the unnormalised DCT-II matrix (``scipy.fftpack.dct`` default)."""
    i = np.arange(n)
    return 2.0 * np.cos(np.pi * np.arange(k)[:, None] * (2 * i[None, :] + 1) / (2 * n))


_D = _dct_matrix(_N, HASH_SIZE)
_MIRROR_SIGN = np.array([(-1.0) ** k for k in range(HASH_SIZE)])[None, None, :]
_POWERS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _lanczos(x: float) -> float:
    def sinc(v: float) -> float:
        return 1.0 if v == 0.0 else math.sin(v * math.pi) / (v * math.pi)

    return sinc(x) * sinc(x / 3) if -_LANCZOS_SUPPORT <= x < _LANCZOS_SUPPORT else 0.0


@functools.lru_cache(maxsize=16)
def _weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) fixed-point LANCZOS weights, as Pillow computes them (Resample.c:
    ``precompute_coeffs`` then ``normalize_coeffs_8bpc``), stored as float64 integers."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    out = np.zeros((out_size, in_size))
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [_lanczos((x - center + 0.5) / filterscale) for x in range(lo, hi)]
        total = sum(w)
        for x, wx in zip(range(lo, hi), w):
            k = wx / total if total != 0.0 else wx
            out[o, x] = int(k * (1 << _PRECISION_BITS) + (-0.5 if k < 0 else 0.5))
    return out


def _round_pass(acc: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8``: add half, shift right by the precision, clamp to 0..255 (in place)."""
    acc += float(1 << (_PRECISION_BITS - 1))
    acc *= 1.0 / (1 << _PRECISION_BITS)  # a power of two: exact
    np.floor(acc, out=acc)
    return np.clip(acc, 0.0, 255.0, out=acc)


def _horizontal(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, h, _ = x.shape
    return _round_pass(x.reshape(n * h, -1) @ w.T).reshape(n, h, len(w))


def _vertical(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, _, cols = x.shape
    flat = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(x.shape[1], n * cols)  # one GEMM for the batch
    return _round_pass(w @ flat).reshape(len(w), n, cols).transpose(1, 0, 2)


def _resize_matrices(faces: np.ndarray, size: int) -> np.ndarray:
    n, h, w = faces.shape
    x = faces.astype(np.float64)
    # Pillow 13 runs the vertical pass first when the height shrinks much more than the width
    if (h - size) > 0 and (h - size) > (w - size) * 2:
        return _horizontal(_vertical(x, _weights(h, size)), _weights(w, size))
    return _vertical(_horizontal(x, _weights(w, size)), _weights(h, size))


def _resize_pillow(faces: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f), "L")
                                .resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64)
                     for f in faces])


@functools.lru_cache(maxsize=16)
def _matrices_match_pillow(h: int, w: int, size: int = _N) -> bool:
    """Whether the matrix resize reproduces this Pillow exactly for (h, w) inputs: random,
    black, white and checkerboard images (the clamping and rounding edge cases)."""
    rng = np.random.default_rng(0)
    probes = [rng.integers(0, 256, (8, h, w), dtype=np.uint8), np.zeros((1, h, w), np.uint8),
              np.full((1, h, w), 255, np.uint8), ((np.indices((h, w)).sum(axis=0) % 2) * 255).astype(np.uint8)[None]]
    batch = np.concatenate(probes)
    return bool(np.array_equal(_resize_matrices(batch, size), _resize_pillow(batch, size)))


def thumbnails(faces: np.ndarray) -> np.ndarray:
    """The 32×32 thumbnails phash transforms, (N, 32, 32) float64, from grayscale faces
    (N, H, W) uint8: exactly ``Image.resize((32, 32), LANCZOS)`` of each face."""
    faces = np.asarray(faces, dtype=np.uint8)
    if len(faces) == 0:
        return np.zeros((0, _N, _N))
    if _matrices_match_pillow(faces.shape[1], faces.shape[2]):
        return _resize_matrices(faces, _N)
    return _resize_pillow(faces, _N)


def _bits_to_uint64(bits: np.ndarray) -> np.ndarray:
    flat = bits.reshape(len(bits), HASH_SIZE * HASH_SIZE).astype(np.uint64)
    return (flat * _POWERS).sum(axis=1, dtype=np.uint64)


def phash_batch(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of a batch of 32×32 thumbnails: (phash, phash of the mirrored image) as uint64."""
    if len(thumbs) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    low = _D @ np.ascontiguousarray(thumbs) @ _D.T  # DCT on both axes, low-frequency block
    mirrored = low * _MIRROR_SIGN  # horizontal flip: coefficient k along the row axis * (-1)**k
    bits = low > np.median(low.reshape(len(low), -1), axis=1)[:, None, None]
    mbits = mirrored > np.median(mirrored.reshape(len(low), -1), axis=1)[:, None, None]
    return _bits_to_uint64(bits), _bits_to_uint64(mbits)


def phashes(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(phash, mirrored phash) as uint64 of grayscale faces (N, H, W) uint8."""
    return phash_batch(thumbnails(faces))


def to_hex(values: np.ndarray) -> list[str]:
    """uint64 hashes as 16-char hex strings (the same text ``str(imagehash.phash(...))`` gives)."""
    return [f"{int(v):016x}" for v in values]


def from_hex(values: list[str] | np.ndarray) -> np.ndarray:
    return np.array([int(v, 16) for v in values], dtype=np.uint64)
