"""Perceptual hashes, batched: bit-for-bit the ``imagehash.phash`` algorithm, but the DCT of a
whole batch is one matrix product instead of two SciPy calls per image.

The mirrored image's hash comes for free: flipping a row reverses it, which multiplies DCT
coefficient ``k`` by ``(-1)**k``. Comparing against mirrored hashes catches the flipped copies
some publishers use to enlarge a class (FER2013's ``disgust``), which would otherwise leak
between splits once training augmentation flips images too.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4
_N = HASH_SIZE * HIGHFREQ_FACTOR


def _dct_matrix(n: int, k: int) -> np.ndarray:
    """Rows 0..k-1 of the unnormalised DCT-II matrix (``scipy.fftpack.dct`` default)."""
    i = np.arange(n)
    return 2.0 * np.cos(np.pi * np.arange(k)[:, None] * (2 * i[None, :] + 1) / (2 * n))


_D = _dct_matrix(_N, HASH_SIZE)
_MIRROR_SIGN = np.array([(-1.0) ** k for k in range(HASH_SIZE)])[None, None, :]
_POWERS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def hash_input(face: np.ndarray) -> np.ndarray:
    """The 32×32 grayscale thumbnail that phash transforms (same resampling as imagehash)."""
    thumb = Image.fromarray(face, "L").resize((_N, _N), Image.Resampling.LANCZOS)
    return np.asarray(thumb, dtype=np.float64)


def _bits_to_uint64(bits: np.ndarray) -> np.ndarray:
    flat = bits.reshape(len(bits), HASH_SIZE * HASH_SIZE).astype(np.uint64)
    return (flat * _POWERS).sum(axis=1, dtype=np.uint64)


def phash_batch(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of a batch of 32×32 thumbnails: (phash, phash of the mirrored image) as uint64."""
    if len(thumbs) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    low = np.einsum("ki,nij,lj->nkl", _D, thumbs, _D, optimize=True)  # DCT on both axes, low block
    mirrored = low * _MIRROR_SIGN  # horizontal flip: coefficient k along the row axis * (-1)**k
    bits = low > np.median(low.reshape(len(low), -1), axis=1)[:, None, None]
    mbits = mirrored > np.median(mirrored.reshape(len(low), -1), axis=1)[:, None, None]
    return _bits_to_uint64(bits), _bits_to_uint64(mbits)


def to_hex(values: np.ndarray) -> list[str]:
    """uint64 hashes as 16-char hex strings (the same text ``str(imagehash.phash(...))`` gives)."""
    return [f"{int(v):016x}" for v in values]


def from_hex(values: list[str] | np.ndarray) -> np.ndarray:
    return np.array([int(v, 16) for v in values], dtype=np.uint64)
