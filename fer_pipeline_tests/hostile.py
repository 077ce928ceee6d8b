"""Builders of hostile inputs for the tests: every file is made in the test's tmp_path from
these functions (no binary fixtures), plus the core of the data half run as the assets run it.

Zip entries are crafted by patching the headers ``zipfile`` writes (encrypted flag, CRC, sizes,
magic numbers), PNG headers are written chunk by chunk, so each case is a few lines.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_pipeline.sources.catalog import Catalog
from fer_pipeline.dedup.groups import deduplicate_incremental, link_cache_name
from fer_pipeline.faces.batch import ChunkResult, process_chunk
from fer_pipeline.faces.store import FaceStore, load_faces
from fer_pipeline.faces.stage import process_faces
from fer_pipeline.sources.inventory import build_inventory
from fer_pipeline.dataset.manifest import (
    build_manifest,
    candidates_for_decoding,
    check_accounting,
    dedup_input,
)
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.sources.readers import DEFAULT_MAX_FILE_BYTES, SourceBytes
from fer_pipeline_tests.conftest import blob_pattern as pattern

# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` 8-bit grayscale pixels and holds almost none."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_16bit(seed: int) -> bytes:
    return encode(Image.fromarray(pattern(seed).astype(np.uint16) * 257), "PNG")


def cmyk_jpeg(seed: int) -> bytes:
    return encode(Image.fromarray(pattern(seed), "L").convert("CMYK"), "JPEG", quality=90)


def palette_with_transparency(seed: int) -> bytes:
    img = Image.fromarray(pattern(seed), "L").convert("P")
    return encode(img, "PNG", transparency=0)


def animated_gif(seed: int) -> bytes:
    frames = [Image.fromarray(pattern(seed + k), "L").convert("P") for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def jpeg_with_exif_orientation(seed: int, orientation: int) -> bytes:
    img = Image.fromarray(pattern(seed), "L")
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=90)


def jpeg_with_garbage_exif(seed: int) -> bytes:
    """A JPEG whose APP1 'Exif' segment holds random bytes instead of a TIFF structure."""
    data = encode(Image.fromarray(pattern(seed), "L"), "JPEG", quality=90)
    payload = b"Exif\x00\x00" + bytes(np.random.default_rng(seed).integers(0, 256, 200, dtype=np.uint8))
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def png_with_bad_chunk_crc(seed: int) -> bytes:
    data = bytearray(encode(Image.fromarray(pattern(seed), "L"), "PNG"))
    idat = data.find(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    crc_at = idat + 4 + length
    data[crc_at:crc_at + 4] = bytes(4)
    return bytes(data)


def lab_tiff(seed: int) -> bytes:
    """A TIFF in CIE L*a*b*, a mode Pillow cannot convert to grayscale."""
    rgb = Image.fromarray(np.stack([pattern(seed)] * 3, axis=-1), "RGB")
    return encode(rgb.convert("LAB"), "TIFF")


def blank_png(value: int = 128, size: int = 64) -> bytes:
    return encode(Image.new("L", (size, size), value), "PNG")


# --------------------------------------------------------------------------------------------
# zip archives
# --------------------------------------------------------------------------------------------

LOCAL, CENTRAL = b"PK\x03\x04", b"PK\x01\x02"
# field offsets (flags, method, crc, compressed size, size) in a local header / a central record
_LOCAL_FIELDS = {"flags": 6, "method": 8, "crc": 14, "compress_size": 18, "file_size": 22}
_CENTRAL_FIELDS = {"flags": 8, "method": 10, "crc": 16, "compress_size": 20, "file_size": 24}
_WIDTH = {"flags": "<H", "method": "<H", "crc": "<I", "compress_size": "<I", "file_size": "<I"}


def zip_bytes(entries: list[tuple[str, bytes]] | dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive of (name, data) entries; duplicate names are written as given."""
    buf = io.BytesIO()
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(buf, "w", method) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": written on purpose
        for name, data in items:
            if name.endswith("/"):
                zf.mkdir(name.rstrip("/")) if hasattr(zf, "mkdir") else zf.writestr(name, b"")
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def _records(data: bytes, name: str) -> tuple[int, int]:
    """Offsets of the local header and the central record of entry ``name``."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        local = zf.getinfo(name).header_offset
    pos = data.find(CENTRAL)
    while pos >= 0:
        n = struct.unpack("<H", data[pos + 28:pos + 30])[0]
        if data[pos + 46:pos + 46 + n].decode("utf-8", "replace") == name:
            return local, pos
        pos = data.find(CENTRAL, pos + 4)
    raise KeyError(name)


def patch_entry(data: bytes, name: str, *, local: bool = True, central: bool = True, **fields: int) -> bytes:
    """Overwrite header fields (flags, method, crc, compress_size, file_size) of one entry."""
    out = bytearray(data)
    local_at, central_at = _records(data, name)
    for field_name, value in fields.items():
        width = _WIDTH[field_name]
        if local:
            struct.pack_into(width, out, local_at + _LOCAL_FIELDS[field_name], value)
        if central:
            struct.pack_into(width, out, central_at + _CENTRAL_FIELDS[field_name], value)
    return bytes(out)


def raw_entry_name(data: bytes, name: str, raw: bytes, *, utf8_flag: bool = True) -> bytes:
    """Give entry ``name`` the name bytes ``raw`` (same length) in both its headers, with the
    UTF-8 flag (bit 0x800) set or cleared: names ``zipfile`` would never write (not UTF-8)."""
    assert len(raw) == len(name.encode("utf-8")), "raw name must have the placeholder's length"
    out = bytearray(data)
    local_at, central_at = _records(data, name)
    out[local_at + 30:local_at + 30 + len(raw)] = raw
    out[central_at + 46:central_at + 46 + len(raw)] = raw
    for at in (local_at + _LOCAL_FIELDS["flags"], central_at + _CENTRAL_FIELDS["flags"]):
        flags = struct.unpack_from("<H", out, at)[0]
        struct.pack_into("<H", out, at, flags | 0x800 if utf8_flag else flags & ~0x800)
    return bytes(out)


def zip_dir_with_data(entries: dict[str, bytes], name: str, payload: bytes) -> bytes:
    """A zip of ``entries`` plus a directory entry ``name`` (ending ``/``) that carries ``payload``:
    ``zipfile`` writes none, so a file entry is written and its name's last byte made ``/``."""
    assert name.endswith("/")
    placeholder = name[:-1] + "_"
    archive = zip_bytes([(placeholder, payload), *entries.items()])
    return raw_entry_name(archive, placeholder, name.encode(), utf8_flag=False)


def entry_info(data: bytes, name: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.getinfo(name)


def corrupt_local_magic(data: bytes, name: str) -> bytes:
    out = bytearray(data)
    local_at, _ = _records(data, name)
    out[local_at:local_at + 4] = b"XX\x03\x04"
    return bytes(out)


def corrupt_compressed_data(data: bytes, name: str) -> bytes:
    """Flip bytes in the middle of an entry's deflate stream (the headers stay valid)."""
    out = bytearray(data)
    local_at, _ = _records(data, name)
    n, m = struct.unpack("<HH", data[local_at + 26:local_at + 30])
    start = local_at + 30 + n + m
    size = entry_info(data, name).compress_size
    for k in range(start + size // 3, start + size // 3 + 8):
        out[k] ^= 0xFF
    return bytes(out)


def write_zero_entry_zip(path: Path, name: str, n_bytes: int, extra: dict[str, bytes] | None = None,
                         compresslevel: int = 1) -> Path:
    """A zip with one entry of ``n_bytes`` zeros written by streaming (never held in memory)."""
    block = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for other, data in (extra or {}).items():
            zf.writestr(other, data)
        with zf.open(name, "w", force_zip64=True) as f:
            left = n_bytes
            while left > 0:
                f.write(block[:min(left, len(block))])
                left -= len(block)
    return path


# --------------------------------------------------------------------------------------------
# FER2013 CSV
# --------------------------------------------------------------------------------------------


def fer_pixels(seed: int) -> str:
    """A FER2013 ``pixels`` field: 2304 space-separated values of a distinct picture."""
    return " ".join(map(str, pattern(seed, 48).ravel().tolist()))


# --------------------------------------------------------------------------------------------
# the faces stage, failing on purpose in a worker
# --------------------------------------------------------------------------------------------


def flaky_chunk(items: list[tuple[str, bytes]], settings: PreprocessSettings) -> ChunkResult:
    """:func:`process_chunk`, except that a file starting with ``RAISE`` makes it raise and one
    starting with ``CRASH`` kills the process (as a segfault or the OOM killer would)."""
    for _, data in items:
        if data.startswith(b"CRASH"):
            os._exit(3)
        if data.startswith(b"RAISE"):
            raise RuntimeError("decoder blew up")
    return process_chunk(items, settings)


# --------------------------------------------------------------------------------------------
# the core of the data half, as the assets call it
# --------------------------------------------------------------------------------------------

KEPT = "kept"


@dataclass
class CoreRun:
    inventory: pd.DataFrame
    faces: pd.DataFrame
    manifest: pd.DataFrame
    excluded: pd.DataFrame

    def outcomes(self) -> dict[str, tuple[str, str]]:
        """source_path -> ("kept", "") or (stage, reason); asserts every input is in exactly one table."""
        acc = check_accounting(self.inventory, self.manifest, self.excluded)
        assert acc["balanced"], acc
        out: dict[str, tuple[str, str]] = {}
        for path in self.manifest["source_path"]:
            out[path] = (KEPT, "")
        for path, stage, reason in self.excluded[["source_path", "stage", "reason"]].itertuples(index=False):
            assert path not in out, path
            out[path] = (stage, reason)
        return out


def run_core(catalog: Catalog, root: Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
             settings: PreprocessSettings | None = None, workers: int = 1, parallel_min: int = 10**9,
             between: object = None, chunk_fn: object = process_chunk) -> CoreRun:
    """raw_sources -> faces -> deduplicated_faces -> manifest, as the assets run them; the tables
    are written as Parquet (undecodable names or reasons would fail there)."""
    settings = settings or PreprocessSettings()
    inv = build_inventory(catalog, root, max_file_bytes=max_file_bytes).table
    inv.to_parquet(root / "inventory.parquet")
    if callable(between):
        between()
    store = FaceStore(root, settings.key)
    with SourceBytes({s.name: s for s in catalog.sources}, max_file_bytes=max_file_bytes) as read:
        faces = process_faces(candidates_for_decoding(inv), read, store, settings, workers=workers,
                              parallel_min=parallel_min, chunk_fn=chunk_fn).table  # type: ignore[arg-type]
    accepted = dedup_input(inv, faces)
    refs = accepted["face_ref"].to_numpy()
    cache = root / "dedup" / link_cache_name(settings.key, 4, True)
    dedup, _ = deduplicate_incremental(accepted, 4, True, lambda rows: load_faces(root, refs[rows].tolist()), 0.95,
                                       cache_path=cache)
    manifest, excluded = build_manifest(inv, faces, dedup.table, settings.image_size)
    excluded.to_parquet(root / "excluded.parquet")
    manifest.to_parquet(root / "manifest.parquet")
    return CoreRun(inv, faces, manifest, excluded)
