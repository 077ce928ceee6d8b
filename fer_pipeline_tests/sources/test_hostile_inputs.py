"""Unattended on hostile data (issue #10, ingestion): nothing lost, nothing silent, nothing stops
the flow.

Each case writes a small hostile source into tmp_path (no binary fixtures), runs the core of
the data half as the assets do (inventory -> faces -> de-duplication -> manifest, tables written
as Parquet), and asserts the *exact* outcome of every input file: kept, or excluded at a named
stage with a reason that says what is wrong. The accounting (every inventory row in exactly one
of manifest/excluded) is asserted for every case. Catalogue cases must fail fast instead,
naming the source and the field.
"""

from __future__ import annotations

import os
import shutil
import socket
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from fer_pipeline.sources import readers as source_readers
from fer_pipeline.sources.catalog import (
    CatalogError,
    SourceSpec,
    load_catalog,
    parse_catalog,
)
from fer_pipeline.sources.inventory import build_inventory
from fer_pipeline.sources.readers import (
    DEFAULT_MAX_FILE_BYTES,
    FolderReader,
    Member,
    MemberError,
    ZipReader,
)
from fer_pipeline_tests import hostile
from fer_pipeline_tests.conftest import face_png, write
from fer_pipeline_tests.hostile import KEPT, run_core

LABELS = {"angry": "Angry", "neutral": "Neutral"}
OK = {"angry/ok.png": face_png(1000)}  # a good file in every folder/zip case: the source stays usable
OK_KEPT = {"angry/ok.png": KEPT}
BIG = face_png(15, size=400)  # ~19 KB


def _permissions_ignored() -> bool:
    """True when this process reads files it has no permission for (root, CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.NamedTemporaryFile() as fh:
        os.chmod(fh.name, 0)
        try:
            open(fh.name, "rb").close()
            return True
        except PermissionError:
            return False


PERMISSIONS_IGNORED = _permissions_ignored()
GiB = 1 << 30

Sources = list[dict]


@dataclass
class Case:
    """A hostile source and the exact outcome of each of its files ("kept" or "stage: reason")."""

    name: str
    build: Callable[[Path], Sources]
    expected: dict[str, str]
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    after_catalog: Callable[[Path], None] | None = None  # the source changes after sources.yaml was read
    between: Callable[[Path], None] | None = None  # ... or between the inventory and the faces stage
    marks: list = field(default_factory=list)
    check: Callable[[hostile.CoreRun], None] | None = None  # more to assert than the outcomes


# --------------------------------------------------------------------------------------------
# source builders
# --------------------------------------------------------------------------------------------


def folder(files: dict[str | bytes, bytes], label_map: dict | None = None,
           **extra: object) -> Callable[[Path], Sources]:
    def build(root: Path) -> Sources:
        (root / "src").mkdir(exist_ok=True)
        for rel, data in files.items():
            if isinstance(rel, bytes):  # a name that is not valid UTF-8
                path = os.path.join(os.fsencode(root / "src"), rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data)
            else:
                write(root / "src" / rel, data)
        return [{"name": "s", "kind": "image_folders", "path": "src", "label_map": label_map or LABELS, **extra}]
    return build


def with_links(files: dict[str, bytes], links: dict[str, str], special: dict[str, str] | None = None,
               outside: dict[str, bytes] | None = None, label_map: dict | None = None) -> Callable[[Path], Sources]:
    """A folder source plus symbolic links (path in the source -> target) and special files."""
    def build(root: Path) -> Sources:
        sources = folder(files, label_map)(root)
        for rel, data in (outside or {}).items():
            write(root / rel, data)
        for rel, target in links.items():
            (root / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / "src" / rel)
        for rel, kind in (special or {}).items():
            path = root / "src" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "fifo":
                os.mkfifo(path)
            else:
                sock = socket.socket(socket.AF_UNIX)
                sock.bind(str(path))
                sock.close()
        return sources
    return build


def archive(data: bytes | Callable[[], bytes]) -> Callable[[Path], Sources]:
    def build(root: Path) -> Sources:
        (root / "src.zip").write_bytes(data() if callable(data) else data)
        return [{"name": "s", "kind": "image_folders", "path": "src.zip", "label_map": LABELS}]
    return build


def patched(entries: dict[str, bytes], name: str, patch: Callable[[bytes, str], bytes]) -> Callable[[], bytes]:
    return lambda: patch(hostile.zip_bytes({**entries, **OK}), name)


def fer_csv(lines: list[str] | bytes, label_map: dict | None = None) -> Callable[[Path], Sources]:
    def build(root: Path) -> Sources:
        data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode("utf-8")
        (root / "fer.csv").write_bytes(data)
        return [{"name": "s", "kind": "fer2013_csv", "path": "fer.csv", "label_map": label_map or LABELS}]
    return build


HEADER = "emotion,pixels,Usage"
PX = hostile.fer_pixels


def row(emotion: object, pixels: str, usage: str = "Training") -> str:
    return f"{emotion},{pixels},{usage}"


def replace_with_fifo(rel: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        os.remove(root / "src" / rel)
        os.mkfifo(root / "src" / rel)
    return change


def deflated_then(patch: Callable[[bytes, str], bytes], method: int = zipfile.ZIP_DEFLATED) -> Callable[[], bytes]:
    """An archive with angry/x.png whose headers ``patch`` then falsifies."""
    return lambda: patch(hostile.zip_bytes({"angry/x.png": face_png(7), **OK}, method=method), "angry/x.png")


def lie_about_size(factor: float) -> Callable[[bytes, str], bytes]:
    def patch(data: bytes, name: str) -> bytes:
        info = hostile.entry_info(data, name)
        sizes = {"file_size": int(info.file_size * factor)}
        if info.compress_type == zipfile.ZIP_STORED:
            sizes["compress_size"] = int(info.compress_size * factor)
        return hostile.patch_entry(data, name, **sizes)
    return patch


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------

IMAGE_CASES = [
    Case("truncated PNG", folder({"angry/t.png": face_png(1)[:200], **OK}),
         {"angry/t.png": "faces: rejected: unreadable or truncated", **OK_KEPT}),
    Case("truncated JPEG", folder({"angry/t.jpg": face_png(2, size=96, fmt="JPEG")[:900], **OK}),
         {"angry/t.jpg": "faces: rejected: unreadable or truncated (image file is truncated", **OK_KEPT}),
    Case("zero bytes", folder({"angry/z.png": b"", **OK}),
         {"angry/z.png": "faces: rejected: empty file (0 bytes)", **OK_KEPT}),
    Case("PNG named .jpg (decoded by content)", folder({"angry/p.jpg": face_png(3), **OK}),
         {"angry/p.jpg": KEPT, **OK_KEPT}),
    Case("text named .png", folder({"angry/t.png": b"hello, I am text", **OK}),
         {"angry/t.png": "faces: rejected: not an image (unrecognised format)", **OK_KEPT}),
    Case("pixel bomb: 100000x100000 declared", folder({"angry/b.png": hostile.png_header_only(100_000, 100_000), **OK}),
         {"angry/b.png": "faces: rejected: decompression bomb", **OK_KEPT}),
    Case("pixel count above max_pixels", folder({"angry/b.png": hostile.png_header_only(7000, 7000), **OK}),
         {"angry/b.png": "faces: rejected: decompression bomb (7000x7000 > 40000000 pixels)", **OK_KEPT}),
    Case("16-bit PNG", folder({"angry/x.png": hostile.png_16bit(4), **OK}), {"angry/x.png": KEPT, **OK_KEPT}),
    Case("CMYK JPEG", folder({"angry/x.jpg": hostile.cmyk_jpeg(5), **OK}), {"angry/x.jpg": KEPT, **OK_KEPT}),
    Case("palette with transparency", folder({"angry/x.png": hostile.palette_with_transparency(6), **OK}),
         {"angry/x.png": KEPT, **OK_KEPT}),
    Case("animated GIF (first frame)", folder({"angry/x.gif": hostile.animated_gif(7), **OK}),
         {"angry/x.gif": KEPT, **OK_KEPT}),
    Case("EXIF orientation 99", folder({"angry/x.jpg": hostile.jpeg_with_exif_orientation(8, 99), **OK}),
         {"angry/x.jpg": KEPT, **OK_KEPT}),
    Case("garbage EXIF block", folder({"angry/x.jpg": hostile.jpeg_with_garbage_exif(9), **OK}),
         {"angry/x.jpg": KEPT, **OK_KEPT}),
    Case("LAB TIFF (no grayscale conversion)", folder({"angry/x.tif": hostile.lab_tiff(10), **OK}),
         {"angry/x.tif": "faces: rejected: cannot convert to grayscale (LAB", **OK_KEPT}),
    Case("too small", folder({"angry/s.png": face_png(11, size=20), **OK}),
         {"angry/s.png": "faces: rejected: too small (20x20", **OK_KEPT}),
    Case("blank", folder({"angry/b.png": hostile.blank_png(), **OK}),
         {"angry/b.png": "faces: rejected: near-constant/blank", **OK_KEPT}),
    Case("byte-identical copy", folder({"angry/copy.png": OK["angry/ok.png"], **OK}),
         {"angry/copy.png": KEPT, "angry/ok.png": "deduplication: duplicate of"}),
    Case("non-UTF-8 file name", folder({b"angry/caf\xe9.png": face_png(12), **OK}),
         {"angry/caf\\xe9.png": KEPT, **OK_KEPT}),
    Case("control characters in the name", folder({"angry/a\x01\tb\nc.png": face_png(13), **OK}),
         {"angry/a\x01\tb\nc.png": KEPT, **OK_KEPT}),
    Case("very long file name", folder({"angry/" + "x" * 240 + ".png": face_png(14), **OK}),
         {"angry/" + "x" * 240 + ".png": KEPT, **OK_KEPT}),
    Case("file above max_file_bytes", folder({"angry/big.png": BIG, **OK}),
         {"angry/big.png": f"inventory: file larger than cap: {len(BIG)} bytes > 8000", **OK_KEPT},
         max_file_bytes=8_000),
    Case("hidden file", folder({"angry/.x.png": face_png(16), **OK}),
         {"angry/.x.png": "inventory: hidden file (.x.png)", **OK_KEPT}),
    Case("no extension", folder({"angry/README": b"notes", **OK}),
         {"angry/README": "inventory: not an image file (extension (none))", **OK_KEPT}),
    Case("outside a class folder", folder({"loose.png": face_png(17), **OK}),
         {"loose.png": "inventory: no label: the file is not inside a class folder", **OK_KEPT}),
    Case("unmapped class folder", folder({"happy/h.png": face_png(18), **OK}),
         {"happy/h.png": "label_mapping: unmapped label: happy", **OK_KEPT}),
    Case("removed between inventory and faces", folder({"angry/gone.png": face_png(19), **OK}),
         {"angry/gone.png": "faces: rejected: file not found", **OK_KEPT},
         between=lambda root: os.remove(root / "src" / "angry" / "gone.png")),
    Case("grew past the cap between inventory and faces", folder({"angry/grow.png": face_png(20), **OK}),
         {"angry/grow.png": "faces: rejected: file larger than cap: 30000 bytes > 8000", **OK_KEPT},
         max_file_bytes=8_000, between=lambda root: (root / "src/angry/grow.png").write_bytes(bytes(30_000))),
    Case("replaced by a FIFO between inventory and faces", folder({"angry/f.png": face_png(21), **OK}),
         {"angry/f.png": "faces: rejected: not a regular file (FIFO)", **OK_KEPT},
         between=replace_with_fifo("angry/f.png")),
    Case("demographics CSV with a byte-order mark",
         folder({"demo.csv": "\ufefffile,sex\nangry/ok.png,F\n".encode(), **OK},
                demographics={"csv": "demo.csv", "key": "file", "columns": {"gender": "sex"}}),
         {"demo.csv": "inventory: not an image file (extension .csv)", **OK_KEPT},
         check=lambda run: run.manifest["gender"].tolist() == ["female"] or pytest.fail("BOM column not read")),
]

ZIP_CASES = [
    Case("encrypted entry", archive(deflated_then(lambda d, n: hostile.patch_entry(d, n, flags=1))),
         {"angry/x.png": "inventory: encrypted entry", **OK_KEPT}),
    Case("bad CRC", archive(deflated_then(lambda d, n: hostile.patch_entry(d, n, crc=0))),
         {"angry/x.png": "inventory: corrupt entry (CRC)", **OK_KEPT}),
    Case("corrupt deflate data", archive(deflated_then(hostile.corrupt_compressed_data)),
         {"angry/x.png": "inventory: corrupt entry (CRC)", **OK_KEPT}),
    Case("bad local header magic", archive(deflated_then(hostile.corrupt_local_magic)),
         {"angry/x.png": "inventory: unreadable archive member (Bad magic number", **OK_KEPT}),
    Case("truncated archive", archive(lambda: hostile.zip_bytes({"angry/x.png": face_png(22), **OK})[:900]),
         {"src.zip": "inventory: src.zip is not a readable zip archive (BadZipFile"}),
    Case("not a zip at all", archive(b"this is not an archive"),
         {"src.zip": "inventory: src.zip is not a readable zip archive"}),
    Case("empty archive", archive(lambda: hostile.zip_bytes({})),
         {"src.zip": "inventory: empty source: the archive has no files"}),
    Case("zip inside zip", archive(lambda: hostile.zip_bytes({"angry/inner.zip": hostile.zip_bytes(OK), **OK})),
         {"angry/inner.zip": "inventory: not an image file (extension .zip)", **OK_KEPT}),
    Case("entry with ../ path", archive(lambda: hostile.zip_bytes({"../angry/evil.png": face_png(23), **OK})),
         {"../angry/evil.png": "inventory: unsafe path in archive", **OK_KEPT}),
    Case("entry with an absolute path", archive(lambda: hostile.zip_bytes({"/angry/abs.png": face_png(24), **OK})),
         {"/angry/abs.png": "inventory: unsafe path in archive", **OK_KEPT}),
    Case("duplicate entry names (the last is read)",
         archive(lambda: hostile.zip_bytes([("angry/d.png", face_png(25)), ("angry/d.png", face_png(26)),
                                            *OK.items()])),
         {"angry/d.png [duplicate entry 1 of 2]": "inventory: duplicate entry name in archive", "angry/d.png": KEPT,
          **OK_KEPT}),
    Case("names equal after \\ -> / (the last is read)",
         archive(lambda: hostile.zip_bytes([("angry/e.png", face_png(27)), ("angry\\e.png", face_png(28)),
                                            *OK.items()])),
         {"angry/e.png [duplicate entry 1 of 2]": "inventory: duplicate entry name in archive", "angry/e.png": KEPT,
          **OK_KEPT}),
    Case("directory entries", archive(lambda: hostile.zip_bytes({"angry/": b"", "angry/sub/": b"", **OK})), OK_KEPT),
    Case("backslash separators", archive(lambda: hostile.zip_bytes({"angry\\b.png": face_png(29), **OK})),
         {"angry/b.png": KEPT, **OK_KEPT}),
    Case("header declares fewer bytes than the entry holds", archive(deflated_then(lie_about_size(0.5))),
         {"angry/x.png": "inventory: corrupt entry (CRC)", **OK_KEPT}),
    Case("header declares more bytes than a deflated entry holds (its data and CRC are whole)",
         archive(deflated_then(lie_about_size(2))), {"angry/x.png": KEPT, **OK_KEPT}),
    Case("header declares more bytes than a stored entry holds (it reads into the next entry)",
         archive(deflated_then(lie_about_size(2), method=zipfile.ZIP_STORED)),
         {"angry/x.png": "inventory: corrupt entry (CRC)", **OK_KEPT}),
    Case("last stored entry declares more bytes than the archive holds",
         archive(lambda: lie_about_size(4)(hostile.zip_bytes([*OK.items(), ("angry/x.png", face_png(7))],
                                                             method=zipfile.ZIP_STORED), "angry/x.png")),
         {"angry/x.png": "inventory: unreadable archive member (data ends before its declared size)", **OK_KEPT}),
    Case("entry declares 1 GiB (decompression bomb)",
         archive(deflated_then(lambda d, n: hostile.patch_entry(d, n, file_size=GiB))),
         {"angry/x.png": f"inventory: decompression bomb: entry declares {GiB} bytes > cap {DEFAULT_MAX_FILE_BYTES}",
          **OK_KEPT}),
    Case("stored entry above the cap",
         archive(lambda: hostile.zip_bytes({"angry/big.png": BIG, **OK}, method=zipfile.ZIP_STORED)),
         {"angry/big.png": f"inventory: file larger than cap: entry declares {len(BIG)} bytes > cap 8000", **OK_KEPT},
         max_file_bytes=8_000),
    Case("bzip2 entry", archive(deflated_then(lambda d, n: d, method=zipfile.ZIP_BZIP2)),
         {"angry/x.png": "inventory: unreadable archive member (compression method bzip2",
          "angry/ok.png": "inventory: unreadable archive member (compression method bzip2"}),
    Case("__MACOSX junk", archive(lambda: hostile.zip_bytes({"__MACOSX/angry/._ok.png": b"\x00\x05\x16\x07", **OK})),
         {"__MACOSX/angry/._ok.png": "inventory: archive junk (__MACOSX)", **OK_KEPT}),
    Case("archive replaced by garbage between inventory and faces", archive(lambda: hostile.zip_bytes(OK)),
         {"angry/ok.png": "faces: rejected: src.zip is not a readable zip archive"},
         between=lambda root: (root / "src.zip").write_bytes(b"garbage")),
]

FER_CASES = [
    Case("byte-order mark before the header",
         fer_csv("\ufeffemotion,pixels,Usage\n".encode() + f"{row(0, PX(1))}\n".encode()),
         {"Training/000000.png": KEPT}),
    Case("header only", fer_csv([HEADER]), {"fer.csv": "inventory: empty source: the CSV has no data rows"}),
    Case("wrong pixel count", fer_csv([HEADER, row(0, PX(1)), row(0, "1 2 3")]),
         {"Training/000000.png": KEPT, "Training/000001.png": "inventory: pixels has 3 values, expected 2304"}),
    Case("extra token among the pixels", fer_csv([HEADER, row(0, PX(1)), row(0, PX(2).replace(" ", " x ", 1))]),
         {"Training/000000.png": KEPT, "Training/000001.png": "inventory: pixels has 2305 values, expected 2304"}),
    Case("non-integer pixel (count right)", fer_csv([HEADER, row(0, PX(1)), row(0, "x " + PX(2).split(" ", 1)[1])]),
         {"Training/000000.png": KEPT, "Training/000001.png": "inventory: non-integer pixel value 'x'"}),
    Case("pixel out of range", fer_csv([HEADER, row(0, PX(1)), row(0, "300 " + PX(2).split(" ", 1)[1])]),
         {"Training/000000.png": KEPT, "Training/000001.png": "inventory: pixel value 300 out of range"}),
    Case("emotion -1", fer_csv([HEADER, row(0, PX(1)), row(-1, PX(2))]),
         {"Training/000000.png": KEPT, "Training/000001.png": "inventory: emotion -1 is not a FER2013 code"}),
    Case("emotion 7", fer_csv([HEADER, row(0, PX(1)), row(7, PX(2))]),
         {"Training/000000.png": KEPT, "Training/000001.png": "inventory: emotion 7 is not a FER2013 code"}),
    Case("emotion 'x'", fer_csv([HEADER, row(0, PX(1)), row("x", PX(2))]),
         {"Training/000000.png": KEPT, "Training/000001.png": "inventory: emotion 'x' is not a FER2013 code"}),
    Case("emotion and pixels both wrong", fer_csv([HEADER, row(0, PX(1)), row(-1, "1 2")]),
         {"Training/000000.png": KEPT,
          "Training/000001.png": "inventory: emotion -1 is not a FER2013 code; pixels has 2 values"}),
    Case("missing Usage column", fer_csv(["emotion,pixels", f"0,{PX(1)}"]), {"rows/000000.png": KEPT}),
    Case("oversized field (csv.field_size_limit)",
         fer_csv([HEADER, row(0, PX(1)), row(0, "1 " * 100_000), row(6, PX(2))]),
         {"Training/000000.png": KEPT, "rows/000001.png": "inventory: CSV field too large (line 3)",
          "Training/000002.png": KEPT}),
    Case("line over 1 MiB", fer_csv([HEADER, row(0, PX(1)), row(0, "7" * 1_200_000), row(6, PX(2))]),
         {"Training/000000.png": KEPT, "rows/000001.png": "inventory: CSV field too large",
          "Training/000002.png": KEPT}),
    Case("blank lines", fer_csv([HEADER, row(0, PX(1)), "", "   ", row(6, PX(2), "PublicTest"), ""]),
         {"Training/000000.png": KEPT, "PublicTest/000001.png": KEPT}),
    Case("quoted fields", fer_csv([HEADER, f'"0","{PX(1)}","Training"']), {"Training/000000.png": KEPT}),
    Case("header with other case and spaces", fer_csv([" Emotion , Pixels ,usage", row(0, PX(1))]),
         {"Training/000000.png": KEPT}),
    Case("missing pixels column", fer_csv(["emotion,Usage", "0,Training"]),
         {"fer.csv": "inventory: fer.csv lacks column(s) ['pixels']"}),
    Case("unmapped emotion", fer_csv([HEADER, row(0, PX(1)), row(3, PX(2))]),
         {"Training/000000.png": KEPT, "Training/000001.png": "label_mapping: unmapped label: happy"}),
    Case("bytes that are not UTF-8", fer_csv(f"{HEADER},note\n{row(0, PX(1))},caf\xe9\n".encode("latin-1")),
         {"Training/000000.png": KEPT}),
    Case("duplicate rows", fer_csv([HEADER, row(0, PX(1)), row(0, PX(1))]),
         {"Training/000000.png": KEPT, "Training/000001.png": "deduplication: duplicate of"}),
    Case("CSV removed between inventory and faces", fer_csv([HEADER, row(0, PX(1))]),
         {"Training/000000.png": "faces: rejected: cannot open "},
         between=lambda root: os.remove(root / "fer.csv"),
         check=lambda run: run.excluded["reason"].str.contains("fer.csv: file not found").all() or pytest.fail()),
]

LINK_CASES = [
    Case("symlink loop (link to the parent)", with_links(OK, {"angry/up": ".."}),
         {"angry/up": "inventory: symlink loop", **OK_KEPT}),
    Case("symlink loop (link to its own folder)", with_links(OK, {"angry/self": "."}),
         {"angry/self": "inventory: symlink loop", **OK_KEPT}),
    Case("symlink loop (link above the source)", with_links(OK, {"angry/root": "../.."}),
         {"angry/root": "inventory: symlink loop", **OK_KEPT}),
    Case("link cycle between two files", with_links(OK, {"angry/a.png": "b.png", "angry/b.png": "a.png"}),
         {"angry/a.png": "inventory: symlink loop", "angry/b.png": "inventory: symlink loop", **OK_KEPT}),
    Case("dangling link", with_links(OK, {"angry/d.png": "nowhere.png"}),
         {"angry/d.png": "inventory: dangling link (to 'nowhere.png')", **OK_KEPT}),
    Case("symlinked class folder", with_links({"neutral/ok.png": face_png(30)}, {"angry": "../elsewhere"},
                                              outside={"elsewhere/x.png": face_png(31)}),
         {"angry/x.png": KEPT, "neutral/ok.png": KEPT}),
    Case("symlinked file", with_links(OK, {"angry/l.png": "../../other/x.png"}, outside={"other/x.png": face_png(32)}),
         {"angry/l.png": KEPT, **OK_KEPT}),
    Case("two paths to one folder", with_links(OK, {"neutral": "angry"}),
         {"neutral": "inventory: symlink to a folder already listed as 'angry'", **OK_KEPT}),
    Case("FIFO", with_links(OK, {}, special={"angry/p.png": "fifo"}),
         {"angry/p.png": "inventory: not a regular file (FIFO)", **OK_KEPT}),
    Case("socket", with_links(OK, {}, special={"angry/s.png": "socket"}),
         {"angry/s.png": "inventory: not a regular file (socket)", **OK_KEPT}),
    Case("source root is a link", lambda root: (write(root / "real" / "angry" / "ok.png", OK["angry/ok.png"]),
                                               os.symlink("real", root / "src"),
                                               [{"name": "s", "kind": "image_folders", "path": "src",
                                                 "label_map": LABELS}])[-1],
         OK_KEPT),
    Case("permission denied", folder({"angry/locked.png": face_png(33), **OK}),
         {"angry/locked.png": "inventory: permission denied", **OK_KEPT},
         after_catalog=lambda root: os.chmod(root / "src/angry/locked.png", 0),
         marks=[pytest.mark.skipif(PERMISSIONS_IGNORED, reason="this process reads any file (root)")]),
    Case("folder that cannot be listed", folder({"angry/closed/x.png": face_png(34), **OK}),
         {"angry/closed": "inventory: cannot list folder: permission denied", **OK_KEPT},
         after_catalog=lambda root: os.chmod(root / "src/angry/closed", 0),
         marks=[pytest.mark.skipif(PERMISSIONS_IGNORED, reason="this process lists any folder (root)")]),
    Case("source removed after sources.yaml was read", folder(OK),
         {"src": "inventory: source path does not exist"}, after_catalog=lambda root: shutil.rmtree(root / "src")),
    Case("folder with no files", folder({}), {"src": "inventory: empty source: the folder has no files"}),
]

ALL_CASES = IMAGE_CASES + ZIP_CASES + FER_CASES + LINK_CASES


def _unlock(folder: Path) -> None:
    """Give back the permissions a case took away, so pytest can clean up."""
    for dirpath, dirnames, filenames in os.walk(folder):  # top-down: a folder is opened before it is listed
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)


def _outcome_matches(got: tuple[str, str], expected: str) -> bool:
    if expected == KEPT:
        return got[0] == KEPT
    stage, _, reason = expected.partition(": ")
    return got[0] == stage and reason in got[1]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in ALL_CASES])
def test_every_file_has_its_exact_outcome(case: Case, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    catalog = parse_catalog({"sources": case.build(root)}, root)
    if case.after_catalog:
        case.after_catalog(root)
    try:
        run = run_core(catalog, root, max_file_bytes=case.max_file_bytes,
                       between=(lambda: case.between(root)) if case.between else None)
    finally:
        _unlock(root / "src")
    outcomes = run.outcomes()
    assert set(outcomes) == set(case.expected), outcomes
    wrong = {p: outcomes[p] for p, want in case.expected.items() if not _outcome_matches(outcomes[p], want)}
    assert not wrong, wrong
    if case.check:
        case.check(run)


def test_corpus_has_at_least_45_cases() -> None:
    assert len(ALL_CASES) + len(CATALOGUE_CASES) >= 45


# --------------------------------------------------------------------------------------------
# catalogues: fail fast, naming the source and the field
# --------------------------------------------------------------------------------------------

CATALOGUE_CASES = [
    ("labels equal after case-folding", "label_map: {angry: Angry, ANGRY: Neutral}",
     "source 's', field 'label_map.ANGRY': is the same label as 'angry'"),
    ("labels equal after case-folding, same class", "label_map: {Angry: Angry, angry: Angry}",
     "source 's', field 'label_map.angry'"),
    ("label key YAML reads as an integer", "label_map: {1: Angry}",
     "source 's', field 'label_map.1': label names must be text"),
    ("label key YAML reads as a boolean", "label_map: {yes: Angry}", "source 's', field 'label_map.True'"),
    ("label key YAML reads as null", "label_map: {~: Angry}", "source 's', field 'label_map.None'"),
    ("label key YAML reads as a float", "label_map: {1.5: Angry}", "source 's', field 'label_map.1.5'"),
    ("empty label name", "label_map: {'': Angry}", "source 's', field 'label_map.': empty label name"),
    ("class that is not text", "label_map: {angry: 1}", "source 's', field 'label_map.angry': maps to '1'"),
    ("key repeated in one mapping", "label_map:\n      angry: Angry\n      angry: Neutral",
     "key 'angry' appears twice"),
    ("demographics columns collide",
     "label_map: {angry: Angry}\n    demographics: {csv: d.csv, key: f, columns: {gender: G, age_group: G}}",
     "source 's', field 'demographics.columns.age_group': column 'G' is already read as 'gender'"),
    ("unknown demographic attribute",
     "label_map: {angry: Angry}\n    demographics: {csv: d.csv, key: f, columns: {height: H}}",
     "source 's', field 'demographics.columns.height'"),
    ("demographics column not text",
     "label_map: {angry: Angry}\n    demographics: {csv: d.csv, key: f, columns: {gender: ~}}",
     "source 's', field 'demographics.columns.gender'"),
    ("demographics csv null", "label_map: {angry: Angry}\n    demographics: {csv: ~, key: f, columns: {gender: G}}",
     "source 's', field 'demographics.csv'"),
    ("unknown kind", "label_map: {angry: Angry}", "source 's', field 'kind': unknown kind 'tarball'"),
    ("missing path", "label_map: {angry: Angry}", "source 's', field 'path': is required"),
    ("path does not exist", "label_map: {angry: Angry}", "source 's', field 'path': does not exist"),
    ("FER2013 code out of range", "label_map: {7: Angry}", "source 's', field 'label_map.7'"),
    ("FER2013 code and name for one emotion", "label_map: {0: Angry, angry: Neutral}",
     "source 's', field 'label_map.angry': is the same label as '0'"),
]


def _catalogue_yaml(name: str, body: str) -> str:
    kind = "fer2013_csv" if name.startswith("FER2013") else "tarball" if name == "unknown kind" else "image_folders"
    path = {"missing path": "", "path does not exist": "path: nowhere\n    ",
            }.get(name, "path: fer.csv\n    " if kind == "fer2013_csv" else "path: src\n    ")
    return f"sources:\n  - name: s\n    kind: {kind}\n    {path}{body}\n"


@pytest.mark.parametrize(("name", "body", "fragment"), CATALOGUE_CASES, ids=[c[0] for c in CATALOGUE_CASES])
def test_bad_catalogue_fails_fast_naming_source_and_field(name: str, body: str, fragment: str, data_root: Path) -> None:
    (data_root / "src").mkdir()
    (data_root / "fer.csv").write_text(HEADER + "\n")
    (data_root / "sources.yaml").write_text(_catalogue_yaml(name, body))
    with pytest.raises(CatalogError) as err:
        load_catalog(data_root / "sources.yaml")
    assert fragment in str(err.value)


def test_demographics_csv_without_its_columns_fails_before_any_image_is_read(
        data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(data_root / "src" / "angry" / "a.png", face_png(1))
    (data_root / "src" / "demo.csv").write_text("file,sex\n")
    catalog = parse_catalog({"sources": [{"name": "s", "kind": "image_folders", "path": "src", "label_map": LABELS,
                                          "demographics": {"csv": "demo.csv", "key": "file",
                                                           "columns": {"gender": "Gender"}}}]}, data_root)

    def no_reading(*args: object) -> str:
        raise AssertionError("an image was read before the catalogue was validated")

    monkeypatch.setattr(FolderReader, "sha256", no_reading)
    with pytest.raises(CatalogError, match=r"source 's', field 'demographics.columns': column\(s\) \['Gender'\]"):
        build_inventory(catalog, data_root)


# --------------------------------------------------------------------------------------------
# the faces stage: one failing file in a worker is that file's reason
# --------------------------------------------------------------------------------------------


def _hostile_folder(root: Path, n_good: int, extra: dict[str, bytes]) -> dict[str, str]:
    good = {f"angry/{i:03d}.png": face_png(i) for i in range(n_good)}
    folder({**good, **extra})(root)
    return {p: KEPT for p in good}


FAILING_FILES = {
    "angry/raise.png": b"RAISE: the chunk function raises on this file",
    "angry/truncated.png": face_png(999)[:150],
    "angry/text.png": b"plain text",
    "angry/empty.png": b"",
}
FAILING_EXPECTED = {
    "angry/raise.png": "faces: rejected: decoder error (RuntimeError: decoder blew up)",
    "angry/truncated.png": "faces: rejected: unreadable or truncated",
    "angry/text.png": "faces: rejected: not an image",
    "angry/empty.png": "faces: rejected: empty file (0 bytes)",
}


def _run_faces(root: Path, workers: int, parallel_min: int) -> dict[str, tuple[str, str]]:
    catalog = parse_catalog({"sources": [{"name": "s", "kind": "image_folders", "path": "src", "label_map": LABELS}]},
                            root)
    return run_core(catalog, root, workers=workers, parallel_min=parallel_min, chunk_fn=hostile.flaky_chunk).outcomes()


def test_worker_pool_survives_a_raising_and_a_crashing_file(tmp_path: Path) -> None:
    """The pool path (forced): a file that makes the decoder raise, and one that kills its worker
    process, are one rejected row each; the other files of their chunks are decoded."""
    good = _hostile_folder(tmp_path, 300, {**FAILING_FILES, "angry/crash.png": b"CRASH: kills the worker"})
    outcomes = _run_faces(tmp_path, workers=2, parallel_min=0)
    expected = {**FAILING_EXPECTED, "angry/crash.png": "faces: rejected: decoder crashed (its worker process died)"}
    assert set(outcomes) == set(good) | set(expected)
    wrong = {p: outcomes[p] for p, want in expected.items() if not _outcome_matches(outcomes[p], want)}
    assert not wrong, wrong
    assert all(outcomes[p][0] in (KEPT, "deduplication") for p in good)


def test_serial_path_isolates_a_raising_file(tmp_path: Path) -> None:
    good = _hostile_folder(tmp_path, 20, FAILING_FILES)
    outcomes = _run_faces(tmp_path, workers=1, parallel_min=10**9)
    assert {p: o for p, o in outcomes.items() if p in FAILING_EXPECTED} and \
        all(_outcome_matches(outcomes[p], want) for p, want in FAILING_EXPECTED.items())
    assert all(outcomes[p][0] in (KEPT, "deduplication") for p in good)


# --------------------------------------------------------------------------------------------
# memory stays bounded
# --------------------------------------------------------------------------------------------


def test_gigabyte_zero_entry_is_rejected_by_its_declared_size_without_being_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    root.mkdir()
    hostile.write_zero_entry_zip(root / "bomb.zip", "angry/x.png", GiB, extra=OK)
    assert (root / "bomb.zip").stat().st_size < 8 << 20  # ~4.5 MB at compression level 1
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: object, *args: object, **kwargs: object) -> object:
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    catalog = parse_catalog({"sources": [{"name": "s", "kind": "image_folders", "path": "bomb.zip",
                                          "label_map": LABELS}]}, root)
    tracemalloc.start()
    try:
        outcomes = run_core(catalog, root).outcomes()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcomes["angry/x.png"] == (
        "inventory", f"decompression bomb: entry declares {GiB} bytes > cap {DEFAULT_MAX_FILE_BYTES}")
    assert outcomes["angry/ok.png"] == (KEPT, "")
    assert "angry/x.png" not in opened and "angry/ok.png" in opened
    assert peak < 64 << 20, f"peak Python allocations {peak / 2**20:.0f} MiB"


def test_a_lying_zip_header_is_never_inflated_past_its_declared_size(tmp_path: Path) -> None:
    data = hostile.zip_bytes({"angry/x.png": bytes(4 << 20)})  # 4 MiB of zeros, ~4 KB compressed
    data = hostile.patch_entry(data, "angry/x.png", file_size=1000)  # ... that says it is 1000 bytes
    (tmp_path / "lie.zip").write_bytes(data)
    reader = ZipReader(SourceSpec("s", "image_folders", tmp_path / "lie.zip", LABELS), max_file_bytes=10_000)
    (member,) = list(reader.members())
    assert member.problem is None and member.size == 1000
    tracemalloc.start()
    try:
        for read in (reader.read, reader.sha256):
            with pytest.raises(MemberError, match=r"corrupt entry \(CRC\)"):
                read(member)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_reads_stop_at_the_cap_when_the_file_is_larger_than_stat_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "src" / "angry" / "x.png", bytes(100_000))
    reader = FolderReader(SourceSpec("s", "image_folders", tmp_path / "src", LABELS), max_file_bytes=10_000)
    real_fstat = os.fstat

    def small_fstat(fd: int) -> os.stat_result:  # a file still growing, or a size the file system reports wrong
        st = tuple(real_fstat(fd))
        return os.stat_result(st[:6] + (10,) + st[7:])

    monkeypatch.setattr(source_readers.os, "fstat", small_fstat)
    member = Member("angry/x.png", 10, "")
    for read in (reader.read, reader.sha256):
        with pytest.raises(MemberError, match="file larger than cap: 10001 bytes > 10000|file larger than cap"):
            read(member)


# --------------------------------------------------------------------------------------------
# through Dagster: the raw_sources and faces assets on a hostile data root
# --------------------------------------------------------------------------------------------


def test_assets_materialize_on_hostile_sources(tmp_path: Path) -> None:
    from fer_pipeline.defs.assets.data import faces, raw_sources
    from fer_pipeline.defs.resources import FerSettings

    root = tmp_path / "data"
    root.mkdir()
    sources = with_links({**OK, "angry/t.png": face_png(2)[:100], "angry/z.png": b""},
                         {"angry/d.png": "nowhere.png", "angry/up": ".."}, special={"angry/p.png": "fifo"})(root)
    sources += [{**s, "name": "z"} for s in archive(deflated_then(lambda d, n: hostile.patch_entry(d, n, crc=0)))(root)]
    sources += [{**s, "name": "fer"} for s in fer_csv([HEADER, row(0, PX(1)), row(-1, PX(2)), row(0, "1 2")])(root)]
    sources += [{"name": "gone", "kind": "image_folders", "path": "gone.zip", "label_map": LABELS}]
    (root / "gone.zip").write_bytes(b"not a zip")
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": sources}))
    result = dg.materialize([raw_sources, faces], resources={"fer": FerSettings(data_root=str(root), workers=1)},
                            raise_on_error=False)
    assert result.success
    inv = pd.read_parquet(root / "manifest" / "raw_inventory.parquet").set_index(["source", "source_path"])
    status = inv["status"].to_dict()
    assert status[("s", "angry/d.png")] == "unreadable" and status[("s", "angry/p.png")] == "unreadable"
    assert status[("s", "angry/up")] == "unreadable" and status[("z", "angry/x.png")] == "unreadable"
    assert status[("fer", "Training/000001.png")] == "no_label"
    assert status[("gone", "gone.zip")] == "source_error"
    table = pd.read_parquet(root / "manifest" / "faces.parquet").set_index(["source", "source_path"])
    assert table.loc[("s", "angry/z.png"), "reason"] == "empty file (0 bytes)"
    assert pd.isna(table.loc[("s", "angry/ok.png"), "reason"]) and pd.isna(table.loc[("z", "angry/ok.png"), "reason"])
    meta = next(e for e in result.get_asset_materialization_events()
                if e.asset_key.path[-1] == "raw_sources").materialization.metadata
    assert "symlink loop" in meta["unreadable_examples"].value
