"""Issue 19, part 5: one format policy. The inventory and the decoder judge a file by its content,
through one list of accepted formats; the name is only a hint. Every file is built here."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import EpsImagePlugin, Image

from fer_pipeline.faces.preprocess import PreprocessSettings, decode_face
from fer_pipeline.sources.catalog import parse_catalog
from fer_pipeline.sources.formats import ACCEPTED_FORMATS, SNIFF_BYTES, sniff_format
from fer_pipeline.sources.inventory import build_inventory
from fer_pipeline.sources.readers import FolderReader
from fer_pipeline_tests.conftest import blob_pattern, face_png, write

SETTINGS = PreprocessSettings()
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n" + b"0 0 moveto 64 64 lineto stroke\n" * 20
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def _encoded(fmt: str, mode: str = "L", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(blob_pattern(3, 64), "L").convert(mode).save(buf, format=fmt, **save)
    return buf.getvalue()


ACCEPTED_FILES = {"JPEG": _encoded("JPEG"), "PNG": _encoded("PNG"), "BMP": _encoded("BMP"), "GIF": _encoded("GIF"),
                  "WEBP": _encoded("WEBP"), "TIFF": _encoded("TIFF"), "PPM": _encoded("PPM", "RGB"),
                  "PGM": _encoded("PPM")}
REFUSED_FILES = {"ICO": _encoded("ICO", sizes=[(64, 64)]), "EPS": EPS, "PDF": PDF, "PSD": b"8BPS\x00\x01" + b"\0" * 40}


@pytest.mark.parametrize("name", sorted(ACCEPTED_FILES))
def test_every_accepted_format_is_recognised_and_decoded(name: str) -> None:
    data = ACCEPTED_FILES[name]
    fmt = "PPM" if name == "PGM" else name
    assert sniff_format(data[:SNIFF_BYTES]) == fmt == Image.open(io.BytesIO(data)).format
    assert decode_face(data, SETTINGS).reason is None


@pytest.mark.parametrize("fmt", sorted(REFUSED_FILES))
def test_another_format_is_refused_before_any_decoder(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(self: object) -> None:
        raise AssertionError("an EPS reached Pillow's decoder")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    assert fmt not in ACCEPTED_FORMATS
    decoded = decode_face(REFUSED_FILES[fmt], SETTINGS)
    assert decoded.reason == f"not an image file (format {fmt} is not accepted)"


# the same bytes, under names the old extension rule judged differently
NAMES = ["face.png", "face.ico", "face.avif", "face.jfif", "face", "face.dat"]


def _inventory(root: Path, files: dict[str, bytes], zipped: bool = False) -> dict[str, tuple[str, str | None]]:
    if zipped:
        with zipfile.ZipFile(root / "set.zip", "w") as zf:
            for rel, data in files.items():
                zf.writestr(rel, data)
        path = "set.zip"
    else:
        for rel, data in files.items():
            write(root / "set" / rel, data)
        path = "set"
    cat = parse_catalog({"sources": [{"name": "s", "kind": "image_folders", "path": path,
                                      "label_map": {"angry": "Angry"}}]}, root)
    table = build_inventory(cat, root).table
    return {p: (s, r if isinstance(r, str) else None)
            for p, s, r in table[["source_path", "status", "reason"]].itertuples(index=False, name=None)}


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_the_same_bytes_get_the_same_verdict_whatever_their_name(data_root: Path, zipped: bool) -> None:
    png, jpeg = face_png(1), face_png(2, fmt="JPEG")
    files = {**{f"angry/png/{n}": png for n in NAMES}, **{f"angry/jpeg/{n}": jpeg for n in NAMES},
             **{f"angry/eps/{n}": EPS for n in NAMES}, **{f"angry/pdf/{n}": PDF for n in NAMES}}
    rows = _inventory(data_root, files, zipped)
    for n in NAMES:
        assert rows[f"angry/png/{n}"] == ("candidate", None)
        assert rows[f"angry/jpeg/{n}"] == ("candidate", None)
        assert rows[f"angry/eps/{n}"] == ("not_image", "not an image file (format EPS is not accepted)")
        assert rows[f"angry/pdf/{n}"] == ("not_image", "not an image file (format PDF is not accepted)")


def test_a_real_ico_is_refused_and_a_png_named_ico_is_kept(data_root: Path) -> None:
    rows = _inventory(data_root, {"angry/real.ico": REFUSED_FILES["ICO"], "angry/png.ico": face_png(4)})
    assert rows == {"angry/real.ico": ("not_image", "not an image file (format ICO is not accepted)"),
                    "angry/png.ico": ("candidate", None)}


def test_unrecognised_content_takes_the_hint_of_its_name(data_root: Path) -> None:
    rows = _inventory(data_root, {"angry/broken.png": b"this is no image", "angry/empty.jpg": b"",
                                  "angry/notes.txt": b"this is no image", "angry/README": b"# readme"})
    assert rows == {"angry/broken.png": ("candidate", None),  # a damaged image: decoding says why
                    "angry/empty.jpg": ("candidate", None),
                    "angry/notes.txt": ("not_image", "not an image file (extension .txt)"),
                    "angry/README": ("not_image", "not an image file (extension (none))")}
    assert decode_face(b"this is no image", SETTINGS).reason == "not an image (unrecognised format)"
    assert decode_face(b"", SETTINGS).reason == "empty file (0 bytes)"


def test_the_inventory_reads_only_the_first_bytes_of_a_file_it_refuses(data_root: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    heads: list[int] = []
    hashed: list[str] = []
    head, sha256 = FolderReader.head, FolderReader.sha256
    monkeypatch.setattr(FolderReader, "head", lambda self, m, n: heads.append(n) or head(self, m, n))
    monkeypatch.setattr(FolderReader, "sha256", lambda self, m: hashed.append(m.path) or sha256(self, m))
    rows = _inventory(data_root, {"angry/big.eps": EPS * 20_000, "angry/big.bin": b"\0" * 2_000_000,
                                  "angry/ok.jfif": face_png(5, fmt="JPEG")})
    assert rows["angry/big.eps"][0] == rows["angry/big.bin"][0] == "not_image"
    assert rows["angry/ok.jfif"] == ("candidate", None)
    assert heads == [SNIFF_BYTES] * 3
    assert hashed == ["angry/ok.jfif"]  # the refused files are never read whole


def test_a_jfif_decodes_like_the_jpeg_it_is() -> None:
    jpeg = face_png(6, fmt="JPEG")
    assert decode_face(jpeg, SETTINGS).reason is None
    assert (decode_face(jpeg, SETTINGS).face == decode_face(bytes(jpeg), SETTINGS).face).all()
