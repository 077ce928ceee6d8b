"""Every name is its own row (issue #19): a file's ``source_path`` is one-to-one and reversible
(a name that is not UTF-8 never shares a path with the ASCII name spelling its escape), and an
archive entry whose name is flagged UTF-8 but is not, a directory entry that carries data and an
entry named like the generated duplicate-entry suffix are each one row of their own.

Names are made as bytes (``os.fsencode``, raw zip headers); cases run through the real
inventory and data stage (:func:`fer_pipeline_tests.hostile.run_core`), accounting asserted."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from fer_pipeline.sources.catalog import parse_catalog
from fer_pipeline.sources.names import fs_name, unescape_name
from fer_pipeline.sources.readers import SourceBytes
from fer_pipeline_tests import hostile
from fer_pipeline_tests.conftest import face_png, run_data_pipeline, write_catalogue
from fer_pipeline_tests.hostile import KEPT, run_core

LABELS = {"angry": "Angry", "neutral": "Neutral", "focused": "Focused", "tired": "Tired"}
LATIN1 = b"angry/caf\xe9.png"  # not UTF-8: shown as angry/caf\xe9.png
SPELLED = "angry/caf\\xe9.png"  # an ASCII name that spells that escape
FACE, BLANK = face_png(40), hostile.blank_png()  # a kept face, a rejected blank: different outcomes


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


# --------------------------------------------------------------------------------------------
# the encoding itself
# --------------------------------------------------------------------------------------------


def test_ordinary_names_are_unchanged() -> None:
    for name in ["angry/ok.png", "a\\b.png", "é/ü 漢字.jpg", "tab\there.png", "end\\", "x\\y\\z"]:
        assert fs_name(name) == name and unescape_name(name) == name


def test_encoding_is_one_to_one_and_reversible_over_every_short_name() -> None:
    alphabet = ["\\", "x", "e", "9", "a", _name(b"\xe9"), _name(b"\x80"), "/"]
    seen: dict[str, str] = {}
    for n in range(6):
        for letters in itertools.product(alphabet, repeat=n):
            name = "".join(letters)
            path = fs_name(name)
            path.encode("utf-8")  # valid UTF-8 (a Parquet string)
            assert unescape_name(path) == name, (name, path)
            assert seen.setdefault(path, name) == name, f"{name!r} and {seen[path]!r} share {path!r}"
    assert len(seen) == sum(len(alphabet) ** n for n in range(6))


def test_the_undecodable_name_and_its_spelling_differ() -> None:
    assert fs_name(_name(LATIN1)) == "angry/caf\\xe9.png"
    assert fs_name(SPELLED) == "angry/caf\\\\xe9.png"
    assert os.fsencode(unescape_name(fs_name(_name(LATIN1)))) == LATIN1


# --------------------------------------------------------------------------------------------
# through the inventory and the data stage
# --------------------------------------------------------------------------------------------


def _folder(root: Path, files: dict[bytes, bytes]) -> list[dict]:
    src = os.fsencode(root / "src")
    for rel, data in files.items():
        path = os.path.join(src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    return [{"name": "s", "kind": "image_folders", "path": "src", "label_map": LABELS}]


def _run(root: Path, sources: list[dict]) -> tuple[hostile.CoreRun, dict[str, tuple[str, str]]]:
    catalog = parse_catalog({"sources": sources}, root)
    run = run_core(catalog, root)
    return run, run.outcomes()  # outcomes() asserts the accounting


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_folder_undecodable_name_beside_its_spelling_is_two_rows_each_reading_its_own_bytes(tmp_path: Path) -> None:
    sources = _folder(tmp_path, {LATIN1: BLANK, SPELLED.encode(): FACE, b"angry/caf\\\\xe9.png": face_png(41),
                                 b"angry/ok.png": face_png(42)})
    run, outcomes = _run(tmp_path, sources)
    latin, spelled, double = "angry/caf\\xe9.png", "angry/caf\\\\xe9.png", "angry/caf\\\\\\\\xe9.png"
    assert set(outcomes) == {latin, spelled, double, "angry/ok.png"}
    assert outcomes[latin][0] == "faces" and "near-constant/blank" in outcomes[latin][1]  # its own bytes: blank
    assert outcomes[spelled] == (KEPT, "") and outcomes[double] == (KEPT, "")
    sha = run.inventory.set_index("source_path")["sha256"]
    assert sha[latin] == _sha(BLANK) and sha[spelled] == _sha(FACE) and sha[double] == _sha(face_png(41))
    with SourceBytes({"s": parse_catalog({"sources": sources}, tmp_path).sources[0]}) as read:
        assert read("s", latin) == BLANK and read("s", spelled) == FACE


def test_folder_undecodable_folder_name_is_read_under_it(tmp_path: Path) -> None:
    """An undecodable byte in a folder of the path, not only in the file name."""
    sources = _folder(tmp_path, {b"angry/sub\xff/a.png": FACE, b"angry/sub\\xff/a.png": BLANK})
    _, outcomes = _run(tmp_path, sources)
    assert outcomes["angry/sub\\xff/a.png"] == (KEPT, "")
    assert "near-constant/blank" in outcomes["angry/sub\\\\xff/a.png"][1]


def _archive(root: Path, data: bytes) -> list[dict]:
    (root / "src.zip").write_bytes(data)
    return [{"name": "s", "kind": "image_folders", "path": "src.zip", "label_map": LABELS}]


def test_zip_entry_flagged_utf8_but_not_is_one_rejected_row(tmp_path: Path) -> None:
    data = hostile.zip_bytes({"angry/cafX.png": face_png(43), "angry/ok.png": face_png(44),
                              "angry/caf\\xe9.png": FACE})  # written with '\\': read as angry/caf/xe9.png
    data = hostile.raw_entry_name(data, "angry/cafX.png", LATIN1)
    with pytest.raises(UnicodeDecodeError):  # what zipfile alone does with the whole archive
        zipfile.ZipFile(io.BytesIO(data))
    run, outcomes = _run(tmp_path, _archive(tmp_path, data))
    assert outcomes["angry/caf\\xe9.png"][0] == "inventory"
    assert "entry name is flagged UTF-8 but is not valid UTF-8" in outcomes["angry/caf\\xe9.png"][1]
    assert outcomes["angry/ok.png"] == (KEPT, "") and outcomes["angry/caf/xe9.png"] == (KEPT, "")
    assert set(outcomes) == {"angry/caf\\xe9.png", "angry/ok.png", "angry/caf/xe9.png"}
    assert (run.inventory["status"] != "source_error").all()


def test_zip_directory_entry_carrying_data_is_its_own_row(tmp_path: Path) -> None:
    data = hostile.zip_dir_with_data({"angry/ok.png": face_png(45), "angry/empty/": b""}, "angry/d/", FACE)
    _, outcomes = _run(tmp_path, _archive(tmp_path, data))
    reason = f"directory entry that carries data ({len(FACE)} bytes): not a file, not read"
    assert outcomes == {"angry/ok.png": (KEPT, ""), "angry/d/": ("inventory", reason)}


def test_zip_entry_named_like_a_generated_duplicate_keeps_its_name(tmp_path: Path) -> None:
    lookalike = "angry/d.png [duplicate entry 1 of 2]"
    data = hostile.zip_bytes([("angry/d.png", face_png(46)), (lookalike, face_png(47)), ("angry/d.png", face_png(48))])
    run, outcomes = _run(tmp_path, _archive(tmp_path, data))
    generated = "angry/d.png [duplicate entry 1 of 2, #2]"
    assert set(outcomes) == {"angry/d.png", lookalike, generated}
    assert outcomes["angry/d.png"] == (KEPT, "") and outcomes[lookalike] == (KEPT, "")
    assert outcomes[generated][0] == "inventory" and "only the last entry named 'angry/d.png'" in outcomes[generated][1]
    sha = run.inventory.set_index("source_path")["sha256"]
    assert sha["angry/d.png"] == _sha(face_png(48)) and sha[lookalike] == _sha(face_png(47))


# --------------------------------------------------------------------------------------------
# the data pipeline publishes
# --------------------------------------------------------------------------------------------


def test_data_pipeline_publishes_with_every_hostile_name(tmp_path: Path) -> None:
    """Before: the two names shared one source_path, accounting failed and nothing was published."""
    files = {f"{label}/{k}.png".encode(): face_png(100 + 10 * i + k) for i, label in enumerate(LABELS)
             for k in range(8)}
    sources = _folder(tmp_path, {LATIN1: face_png(60), SPELLED.encode(): face_png(61), **files})
    zdata = hostile.zip_dir_with_data({"angry/cafX.png": face_png(62), "neutral/z.png": face_png(63)},
                                      "angry/d/", b"data")
    sources += [{**s, "name": "z"} for s in _archive(tmp_path, hostile.raw_entry_name(zdata, "angry/cafX.png", LATIN1))]
    write_catalogue(tmp_path, sources)
    # view_duplicates off: the re-cropped-copy rule, calibrated on real faces, links a few of these generated
    # blob patterns (fer_pipeline_tests/dedup/test_views.py tests it)
    result = run_data_pipeline(tmp_path, {"resources": {"fer": {"config": {"min_images_per_class": 1, "n_folds": 2,
                                                                           "view_duplicates": False}}}})
    assert result.success
    manifest = pd.read_parquet(tmp_path / "manifest" / "manifest.parquet")
    excluded = pd.read_parquet(tmp_path / "manifest" / "excluded.parquet")
    kept = set(zip(manifest["source"], manifest["source_path"]))
    assert {("s", "angry/caf\\xe9.png"), ("s", "angry/caf\\\\xe9.png"), ("z", "neutral/z.png")} <= kept
    reasons = dict(zip(zip(excluded["source"], excluded["source_path"]), excluded["reason"]))
    assert "flagged UTF-8" in reasons[("z", "angry/caf\\xe9.png")]
    assert "directory entry that carries data" in reasons[("z", "angry/d/")]
    assert len(manifest) + len(excluded) == 4 * 8 + 2 + 3
