"""Content-addressed store of processed faces.

Processed faces are kept per preprocessing-settings fingerprint under
``<data root>/faces/<settings_key>/``:

* ``index.parquet``: one row per *raw content hash* (SHA-256 of the source file bytes) and
  framing with the decode outcome (accepted or the rejection reason), original size, hashes and
  intensity statistics, and where the face's pixels are. A face crop has one row (framing
  ``crop``); a photo framed by the face detector has one row per face found (``face_index``,
  with its box and score; framing ``detect-<fingerprint of the detector settings and margin>``),
  or one row saying why there is none (e.g. ``no face found``). Detection is therefore cached by
  content hash + detector settings like decoding;
* ``shards/<id>.npy``: uint8 arrays of shape (N, H, W) holding the accepted faces.

A face is referred to by ``faces/<key>/shards/<id>.npy#<row>`` (relative to the data root).
The same bytes under the same settings are never decoded twice, whatever source or file name
they come under, and a change of settings lands in a new folder instead of overwriting faces.
Shards instead of one PNG per face: writing tens of thousands of tiny files costs more than
decoding them, and training loads a shard with one read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_pipeline.atomic import atomic_path, write_parquet
from fer_pipeline.paths import FACES_DIR

INDEX_COLUMNS = ["sha256", "reason", "width", "height", "face_ref", "pixel_sha",
                 "phash", "phash_mirror", "mean_intensity", "std_intensity",
                 "framing", "face_index", "faces_found", "box_left", "box_top", "box_right", "box_bottom",
                 "detector_score"]
ITEM_KEY = ["sha256", "framing"]  # one decoding unit: these bytes framed this way (one or more rows)
_DEFAULTS = {"framing": "crop", "face_index": 0}  # what an index written before detection existed means


class FaceStore:
    """The face cache of one preprocessing-settings fingerprint."""

    def __init__(self, data_root: Path, settings_key: str) -> None:
        self.data_root = Path(data_root)
        self.settings_key = settings_key
        self.dir = self.data_root / FACES_DIR / settings_key
        self.index_path = self.dir / "index.parquet"

    def load_index(self) -> pd.DataFrame:
        if self.index_path.exists():
            index = pd.read_parquet(self.index_path)
            for col in INDEX_COLUMNS:  # an index from before face detection: all crops
                if col not in index.columns:
                    index[col] = _DEFAULTS.get(col)
            return index
        return pd.DataFrame({c: pd.Series(dtype="object") for c in INDEX_COLUMNS})

    def save_index(self, index: pd.DataFrame) -> None:
        write_parquet(self.index_path, index[INDEX_COLUMNS].reset_index(drop=True))

    def write_shard(self, shard_id: str, faces: np.ndarray) -> list[str]:
        """Write a shard atomically; return the face refs of its rows."""
        rel = f"{FACES_DIR}/{self.settings_key}/shards/{shard_id}.npy"
        with atomic_path(self.data_root / rel) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(faces, dtype=np.uint8))
        return [f"{rel}#{i}" for i in range(len(faces))]


def _split_ref(ref: str) -> tuple[str, int | None]:
    path, sep, row = ref.partition("#")
    return path, (int(row) if sep else None)


def load_face(path: str | Path) -> np.ndarray:
    """Load one face: a shard reference ``....npy#row`` or a plain image file; uint8 (H, W)."""
    file, row = _split_ref(str(path))
    if row is not None:
        return np.asarray(np.load(file, mmap_mode="r")[row], dtype=np.uint8)
    with Image.open(file) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def load_faces(root: str | Path, refs: Sequence[str]) -> np.ndarray:
    """Load faces (refs relative to ``root``) into one uint8 array (N, H, W), in the given order.

    Rows of the same shard are gathered with one memory-mapped read per shard.
    """
    root = Path(root)
    refs = list(refs)
    if not refs:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    parsed = [_split_ref(r) for r in refs]
    first = load_face(root / refs[0]) if parsed[0][1] is None else None
    shards: dict[str, np.ndarray] = {}
    out: np.ndarray | None = None
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for i, (file, row) in enumerate(parsed):
        if row is not None:
            by_shard.setdefault(file, []).append((i, row))
    for file, pairs in by_shard.items():
        shards[file] = np.load(root / file, mmap_mode="r")
        if out is None:
            out = np.empty((len(refs), *shards[file].shape[1:]), dtype=np.uint8)
        idx = np.array([p[0] for p in pairs])
        rows = np.array([p[1] for p in pairs])
        order = np.argsort(rows)
        out[idx[order]] = shards[file][rows[order]]
    if out is None:
        assert first is not None
        out = np.empty((len(refs), *first.shape), dtype=np.uint8)
    for i, (file, row) in enumerate(parsed):
        if row is None:
            out[i] = load_face(root / file)
    return out
