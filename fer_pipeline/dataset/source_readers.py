"""Uniform access to the files of a catalogued source: a folder, a .zip archive, or a FER2013 CSV.

Readers list *members* (a POSIX path inside the source plus a cheap fingerprint) and read their
bytes on demand, so the inventory can skip re-reading members whose fingerprint is unchanged and
nothing ever loads a whole dataset into memory.
"""

from __future__ import annotations

import csv
import io
import os
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fer_pipeline.dataset.catalog import FER2013_EMOTIONS, SourceSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
JUNK_NAMES = frozenset({"thumbs.db", ".ds_store", "desktop.ini", "ehthumbs.db"})


@dataclass(frozen=True)
class Member:
    """One file of a source. ``fingerprint`` changes whenever the content may have changed."""

    path: str  # POSIX path inside the source
    size: int
    fingerprint: str
    label: str | None = None  # set by readers that know the label (FER2013 CSV)
    split_hint: str | None = None


def junk_reason(path: str) -> str | None:
    """Why a member is operating-system or archive junk, or None when it is not."""
    parts = path.split("/")
    name = parts[-1]
    if any(p == "__MACOSX" for p in parts[:-1]):
        return "archive junk (__MACOSX)"
    if name.startswith("._"):
        return "archive junk (AppleDouble ._ file)"
    if name.lower() in JUNK_NAMES:
        return f"archive junk ({name})"
    if name.startswith("."):
        return f"hidden file ({name})"
    return None


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


class SourceReader:
    """Base class: list members and read their bytes."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec

    def members(self) -> Iterator[Member]:
        raise NotImplementedError

    def read(self, member: Member) -> bytes:
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderReader(SourceReader):
    """A directory tree; fingerprint = size + modification time."""

    def members(self) -> Iterator[Member]:
        root = self.spec.path
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                st = full.stat()
                rel = full.relative_to(root).as_posix()
                yield Member(rel, st.st_size, f"{st.st_size}:{st.st_mtime_ns}")

    def read(self, member: Member) -> bytes:
        return (self.spec.path / member.path).read_bytes()


class ZipReader(SourceReader):
    """A .zip archive; fingerprint = CRC-32 + size from the central directory (no decompression)."""

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        try:
            self._zip = zipfile.ZipFile(spec.path)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"source '{spec.name}': {spec.path} is not a readable zip archive: {exc}") from exc
        self._lock = threading.Lock()

    def members(self) -> Iterator[Member]:
        for info in sorted(self._zip.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            name = info.filename.replace("\\", "/")
            yield Member(name, info.file_size, f"{info.CRC:08x}:{info.file_size}")

    def read(self, member: Member) -> bytes:
        with self._lock:
            try:
                return self._zip.read(member.path)
            except KeyError:
                return self._zip.read(member.path.replace("/", "\\"))

    def names(self) -> list[str]:
        return [i.filename.replace("\\", "/") for i in self._zip.infolist() if not i.is_dir()]

    def close(self) -> None:
        self._zip.close()


class Fer2013CsvReader(SourceReader):
    """Kaggle FER2013 CSV (``emotion,pixels,Usage``): each row becomes a 48×48 PNG member.

    Rows are encoded as PNG in memory so they flow through the same decode/validate path as
    image files; a malformed row yields bytes that fail decoding with a clear reason.
    """

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self._rows: dict[str, bytes] = {}

    def members(self) -> Iterator[Member]:
        import hashlib

        with open(self.spec.path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"emotion", "pixels"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"source '{self.spec.name}': {self.spec.path} lacks column(s) {sorted(missing)}")
            for i, row in enumerate(reader):
                usage = (row.get("Usage") or "").strip() or None
                data = _fer_row_to_png(row.get("pixels") or "")
                try:
                    label = FER2013_EMOTIONS[int(row["emotion"])]
                except (ValueError, IndexError, TypeError):
                    label = f"invalid emotion {row.get('emotion')!r}"
                path = f"{usage or 'rows'}/{i:06d}.png"
                self._rows[path] = data
                yield Member(path, len(data), hashlib.sha1(data).hexdigest(), label=label, split_hint=usage)

    def read(self, member: Member) -> bytes:
        if not self._rows:  # rows are encoded while listing; list once when read first
            for _ in self.members():
                pass
        return self._rows[member.path]


def _fer_row_to_png(pixels: str) -> bytes:
    values = pixels.split()
    if len(values) != 48 * 48:
        return f"FER2013 row with {len(values)} pixel values, expected 2304".encode()
    try:
        arr = np.array([int(v) for v in values], dtype=np.int32)
    except ValueError:
        return b"FER2013 row with non-integer pixel values"
    if arr.min() < 0 or arr.max() > 255:
        return b"FER2013 row with pixel values outside 0..255"
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8).reshape(48, 48), "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def open_reader(spec: SourceSpec) -> SourceReader:
    """The reader for a source spec (synthetic sources are read as the folder they generate)."""
    if spec.kind == "fer2013_csv":
        return Fer2013CsvReader(spec)
    if spec.path.is_file() and spec.path.suffix.lower() == ".zip":
        return ZipReader(spec)
    if spec.path.is_dir():
        return FolderReader(spec)
    raise ValueError(f"source '{spec.name}': path {spec.path} is neither a folder nor a .zip archive")


class SourceBytes:
    """Read any (source, source_path) of a catalogue, keeping one open reader per source."""

    def __init__(self, specs: dict[str, SourceSpec]) -> None:
        self._specs = specs
        self._readers: dict[str, SourceReader] = {}

    def __call__(self, source: str, path: str) -> bytes:
        reader = self._readers.get(source)
        if reader is None:
            reader = self._readers[source] = open_reader(self._specs[source])
        return reader.read(Member(path, 0, ""))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> "SourceBytes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
