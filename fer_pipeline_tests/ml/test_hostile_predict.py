"""``fer-pipeline predict`` unattended on hostile data (issue #10): every per-input fault is one
error row saying what is wrong, the other inputs are still classified, exit codes and output
formats stay valid, and broken models are refused. Every hostile file is made by the test."""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import math
import os
import socket
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fer_pipeline import cli
from fer_pipeline.classes import CLASSES
from fer_pipeline.cli import (
    EXIT_INPUT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    format_predictions,
    main,
)
from fer_pipeline.ml.checkpoint import load_checkpoint, save_checkpoint
from fer_pipeline.ml.data import Normalization
from fer_pipeline.ml.predict import MAX_INPUT_BYTES, Prediction, predict_images
from fer_pipeline_tests.ml.test_predict import _faces, _png, trained  # noqa: F401 -- the tiny model fixture


@pytest.fixture(scope="module")
def ckpt(trained, tmp_path_factory) -> Path:  # noqa: F811
    result, _ = trained
    return save_checkpoint(tmp_path_factory.mktemp("models") / "tiny.safetensors", result, data_version="v")


@pytest.fixture(scope="module")
def png() -> bytes:
    return _png(_faces(1, 7)[0][0])


@pytest.fixture()
def good(tmp_path: Path, png: bytes) -> Path:
    """One valid face next to each hostile input: it must still be classified."""
    path = tmp_path / "good.png"
    path.write_bytes(png)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], ckpt: Path, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args, "--model", str(ckpt)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], ckpt: Path, *args: str) -> tuple[int, list[dict]]:
    code, out, _ = run_cli(capsys, ckpt, *args, "--format", "json")
    return code, json.loads(out)


def assert_one_error(rows: list[dict], good: Path, name: str, reason: str) -> None:
    """The good input classified, the hostile one a single error row with ``reason``."""
    by_name = {r["input"]: r for r in rows}
    assert by_name[str(good)]["label"] in CLASSES and by_name[str(good)]["error"] is None
    bad = [r for r in rows if r["error"] is not None]
    assert [r["input"] for r in bad] == [name], bad
    assert reason in bad[0]["error"], bad[0]["error"]
    assert bad[0]["label"] is None and bad[0]["probabilities"] is None


def deny(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` unreadable: chmod 000, and (root ignores modes) refuse it in os.open/scandir."""
    path.chmod(0)
    if os.geteuid() == 0:
        target = os.fspath(path)
        for name in ("open", "scandir"):
            real = getattr(os, name)

            def refuse(p, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
                if os.fspath(p) == target:
                    raise PermissionError(errno.EACCES, "Permission denied", target)
                return _real(p, *args, **kwargs)

            monkeypatch.setattr(os, name, refuse)


@pytest.fixture()
def restore_modes(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755)


# ---------------------------------------------------------------- not regular files, links, loops


def test_fifo_is_not_a_regular_file_and_never_opened(tmp_path: Path, good: Path, ckpt: Path, capsys) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block forever
    code, rows = run_json(capsys, ckpt, str(good), str(fifo))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, str(fifo), "not a regular file (FIFO)")


def test_fifo_inside_a_folder(tmp_path: Path, png: bytes, ckpt: Path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "a.png"
    good.write_bytes(png)
    os.mkfifo(folder / "b.png")
    code, rows = run_json(capsys, ckpt, str(folder))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, str(folder / "b.png"), "not a regular file (FIFO)")


def test_socket_and_device_are_not_regular_files(tmp_path: Path, good: Path, ckpt: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        code, rows = run_json(capsys, ckpt, str(good), str(sock_path), os.devnull)
    assert code == EXIT_INPUT_FAILED
    assert [r["error"] for r in rows] == [None, "not a regular file (socket)",
                                          "not a regular file (character device)"]


def test_dangling_link_says_so(tmp_path: Path, good: Path, ckpt: Path, capsys) -> None:
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "deleted.png")
    code, rows = run_json(capsys, ckpt, str(good), str(link), str(tmp_path / "never.png"))
    assert code == EXIT_INPUT_FAILED
    assert rows[1]["error"] == f"dangling link (to '{tmp_path / 'deleted.png'}')"
    assert rows[2]["error"] == "no such file or folder"


def test_symlink_loop_says_so(tmp_path: Path, good: Path, ckpt: Path, capsys) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    code, rows = run_json(capsys, ckpt, str(good), str(tmp_path / "a.png"))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, str(tmp_path / "a.png"), f"symlink loop (link to '{tmp_path / 'b.png'}')")


def test_folder_with_a_loop_does_not_recurse_forever(tmp_path: Path, png: bytes, ckpt: Path, capsys) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "face.png").write_bytes(png)
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # photos/sub/up -> photos
    (folder / "self").symlink_to(".", target_is_directory=True)  # photos/self -> photos
    (folder / "alias").symlink_to(folder / "sub", target_is_directory=True)  # same folder twice: listed once
    (folder / "x.png").symlink_to(folder / "x.png")  # a link to itself
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.png").write_bytes(png)
    (folder / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # linked folders are followed
    code, rows = run_json(capsys, ckpt, str(folder))
    assert code == EXIT_INPUT_FAILED
    by_name = {r["input"]: r["error"] for r in rows}
    assert list(by_name) == [str(folder / n) for n in ("more/linked.png", "self", "sub/face.png", "sub/up", "x.png")]
    assert by_name[str(folder / "self")] == "symlink loop: '.' is a folder that contains the link"
    assert by_name[str(folder / "sub" / "up")] == f"symlink loop: '{folder}' is a folder that contains the link"
    assert by_name[str(folder / "x.png")] == f"symlink loop (link to '{folder / 'x.png'}')"
    assert by_name[str(folder / "sub" / "face.png")] is None  # classified once, under its real name
    assert by_name[str(folder / "more" / "linked.png")] is None


def test_folder_reached_twice_is_listed_once_and_is_no_error(tmp_path: Path, png: bytes, ckpt: Path,
                                                              capsys) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "face.png").write_bytes(png)
    (folder / "alias").symlink_to(folder / "sub", target_is_directory=True)
    code, rows = run_json(capsys, ckpt, str(folder))
    assert code == EXIT_OK
    assert [(r["input"], r["error"]) for r in rows] == [(str(folder / "sub" / "face.png"), None)]


# ---------------------------------------------------------------- permissions and size caps


def test_unreadable_file(tmp_path: Path, good: Path, ckpt: Path, capsys, monkeypatch, restore_modes) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(good.read_bytes())
    deny(secret, monkeypatch)
    code, rows = run_json(capsys, ckpt, str(good), str(secret))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, str(secret), "permission denied")


def test_unreadable_subfolder_is_one_error(tmp_path: Path, png: bytes, ckpt: Path, capsys, monkeypatch,
                                           restore_modes) -> None:
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked" / "hidden.png").write_bytes(png)
    good = folder / "z.png"
    good.write_bytes(png)
    deny(folder / "locked", monkeypatch)
    code, rows = run_json(capsys, ckpt, str(folder))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, str(folder / "locked"), "cannot list folder: permission denied")


def test_file_above_max_bytes_is_not_read(tmp_path: Path, good: Path, ckpt: Path, capsys) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(good.read_bytes() + b"\0" * 5000)
    limit = good.stat().st_size + 100
    code, rows = run_json(capsys, ckpt, str(good), str(big), "--max-bytes", str(limit))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, str(big), f"file larger than cap: {big.stat().st_size} bytes > {limit}")
    assert cli.MAX_INPUT_BYTES == MAX_INPUT_BYTES == 64 * 1024 * 1024
    for bad in ("0", "-5", "lots"):
        assert main(["predict", str(good), "--model", str(ckpt), "--max-bytes", bad]) == EXIT_USAGE


# ---------------------------------------------------------------- hostile zip archives


def one_entry_zip(path: Path, name: str, data: bytes) -> tuple[bytearray, int]:
    """A stored single-entry zip's bytes and its central directory offset (local header at 0)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(name, data)
    raw = bytearray(path.read_bytes())
    (central,) = struct.unpack_from("<I", raw, len(raw) - 22 + 16)
    assert raw[:4] == b"PK\x03\x04" and raw[central:central + 4] == b"PK\x01\x02"
    return raw, central


def test_encrypted_zip_entry(tmp_path: Path, good: Path, png: bytes, ckpt: Path, capsys) -> None:
    archive = tmp_path / "locked.zip"
    raw, central = one_entry_zip(archive, "face.png", png)
    raw[6] |= 0x1  # general-purpose flag bit 0: encrypted, in the local header ...
    raw[central + 8] |= 0x1  # ... and in the central directory
    archive.write_bytes(raw)
    code, rows = run_json(capsys, ckpt, str(good), str(archive))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, f"{archive}::face.png", "encrypted entry")


def test_zip_entry_with_a_bad_crc(tmp_path: Path, good: Path, png: bytes, ckpt: Path, capsys) -> None:
    archive = tmp_path / "crc.zip"
    raw, central = one_entry_zip(archive, "face.png", png)
    for crc_at in (14, central + 16):  # local header, central directory
        raw[crc_at] ^= 0xFF
    archive.write_bytes(raw)
    code, rows = run_json(capsys, ckpt, str(good), str(archive))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, f"{archive}::face.png", "corrupt entry (CRC)")


def test_zip_entry_declaring_a_bomb_size_is_not_read(tmp_path: Path, good: Path, png: bytes, ckpt: Path,
                                                     capsys, monkeypatch) -> None:
    archive = tmp_path / "bomb.zip"
    raw, central = one_entry_zip(archive, "face.png", png)
    struct.pack_into("<I", raw, central + 24, 0x7FFF_FFFF)  # declared uncompressed size: 2 GiB
    archive.write_bytes(raw)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: (opened.append(name), real_open(self, name, *a, **k))[1])
    code, rows = run_json(capsys, ckpt, str(good), str(archive))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, f"{archive}::face.png",
                     f"decompression bomb: entry declares {0x7FFF_FFFF} bytes > cap {MAX_INPUT_BYTES}")
    assert opened == []  # refused from the central directory, never decompressed


def test_zip_entry_above_max_bytes_option(tmp_path: Path, png: bytes, ckpt: Path, capsys) -> None:
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("small.png", png)
        zf.writestr("large.png", png + b"\0" * 50_000)  # compresses to almost nothing
    limit = len(png) + 10
    code, rows = run_json(capsys, ckpt, str(archive), "--max-bytes", str(limit))
    assert code == EXIT_INPUT_FAILED
    assert [r["input"] for r in rows] == [f"{archive}::large.png", f"{archive}::small.png"]
    assert rows[0]["error"] == f"file larger than cap: entry declares {len(png) + 50_000} bytes > cap {limit}"
    assert rows[0]["label"] is None
    assert rows[1]["label"] in CLASSES


def test_bzip2_and_unsafe_path_zip_entries_are_not_read(tmp_path: Path, png: bytes, ckpt: Path, capsys) -> None:
    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("bz.png", png, compress_type=zipfile.ZIP_BZIP2)  # inflated without an output limit
        zf.writestr("../up.png", png)
        zf.writestr("ok.png", png)
    code, rows = run_json(capsys, ckpt, str(archive))
    assert code == EXIT_INPUT_FAILED
    assert [(r["input"], r["error"]) for r in rows] == [
        (f"{archive}::../up.png", "unsafe path in archive (absolute or '..'): not read"),
        (f"{archive}::bz.png", "unreadable archive member (compression method bzip2 is not read: "
                               "only stored and deflated entries)"),
        (f"{archive}::ok.png", None)]
    assert rows[2]["label"] in CLASSES


def test_truncated_zip(tmp_path: Path, good: Path, png: bytes, ckpt: Path, capsys) -> None:
    archive = tmp_path / "cut.zip"
    raw, _ = one_entry_zip(archive, "face.png", png)
    archive.write_bytes(raw[: len(raw) // 2])
    code, rows = run_json(capsys, ckpt, str(good), str(archive))
    assert code == EXIT_INPUT_FAILED
    assert_one_error(rows, good, str(archive), "cut.zip is not a readable zip archive (BadZipFile: ")


def test_zip_with_two_entries_of_the_same_name_is_two_inputs(tmp_path: Path, ckpt: Path, capsys) -> None:
    """As in the inventory (and what unzip leaves): the last entry of a name is classified, each
    earlier one is an error row of its own; neither is dropped."""
    faces, _ = _faces(2, 11)
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("face.png", _png(faces[0]))
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("face.png", _png(faces[1]))
    last = tmp_path / "last.png"
    last.write_bytes(_png(faces[1]))
    code, rows = run_json(capsys, ckpt, str(archive), str(last))
    assert code == EXIT_INPUT_FAILED
    assert [r["input"] for r in rows] == [f"{archive}::face.png", f"{archive}::face.png [duplicate entry 1 of 2]",
                                          str(last)]
    assert rows[0]["label"] in CLASSES and rows[0]["error"] is None
    assert rows[0]["probabilities"] == rows[2]["probabilities"]  # the last entry is the one read
    assert rows[1]["label"] is None and rows[1]["probabilities"] is None
    assert rows[1]["error"] == "duplicate entry name in archive: only the last entry named 'face.png' is read"


# ---------------------------------------------------------------- hostile names, valid outputs


HOSTILE_NAMES = ["fake\n0 of 9 inputs classified.png", "esc\x1b[2J\x1b[31mred.png", "cr\rover.png", "sep\u2028x.png"]


@pytest.fixture()
def hostile_folder(tmp_path: Path, png: bytes) -> Path:
    folder = tmp_path / "names"
    folder.mkdir()
    for name in HOSTILE_NAMES:
        (folder / name).write_bytes(png)
    with open(os.path.join(os.fsencode(folder), b"latin1-\xe9t\xe9.png"), "wb") as f:  # not UTF-8
        f.write(png)
    os.mkfifo(folder / "bad\nrow.png")
    return folder


def test_table_escapes_control_characters_in_names(hostile_folder: Path, ckpt: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, ckpt, str(hostile_folder))
    assert code == EXIT_INPUT_FAILED
    lines = out.split("\n")
    assert len(out.splitlines()) == 1 + 6 + 2  # header, 6 inputs, blank line, summary: no forged rows
    assert lines[-2] == "5 of 6 inputs classified, 1 failed"
    assert not any(ch in out for ch in "\x1b\r\u2028")
    for shown in ("fake\\n0 of 9", "esc\\x1b[2J\\x1b[31mred.png", "cr\\rover.png", "sep\\u2028x.png",
                  "latin1-\\xe9t\\xe9.png"):
        assert shown in out, shown
    (fifo_line,) = [line for line in lines if "bad\\nrow.png" in line]
    assert "ERROR: not a regular file (FIFO)" in fifo_line


def test_csv_and_json_carry_hostile_names_exactly(hostile_folder: Path, ckpt: Path, capsys) -> None:
    expected = sorted([*HOSTILE_NAMES, "bad\nrow.png", "latin1-\\xe9t\\xe9.png"])
    code, out, err = run_cli(capsys, ckpt, str(hostile_folder), "--format", "csv")
    assert code == EXIT_INPUT_FAILED
    rows = list(csv.reader(io.StringIO(out, newline="")))
    assert len(rows) == 1 + 6 and all(len(r) == len(rows[0]) for r in rows)
    assert sorted(Path(r[0]).name for r in rows[1:]) == expected
    assert err.count("\n") == 1 and "bad\\nrow.png" in err  # the stderr error line is escaped too

    code, data = run_json(capsys, ckpt, str(hostile_folder))
    assert code == EXIT_INPUT_FAILED
    assert sorted(Path(r["input"]).name for r in data) == expected


def test_json_never_holds_nan(ckpt: Path, good: Path, capsys, monkeypatch) -> None:
    nan_row = Prediction("x.png", "Angry", {c: math.nan for c in CLASSES})
    data = json.loads(format_predictions([nan_row], "json", CLASSES))  # allow_nan=False would raise on NaN
    assert data[0]["probabilities"] == {c: None for c in CLASSES}
    row = next(csv.DictReader(io.StringIO(format_predictions([nan_row], "csv", CLASSES))))
    assert row["p_Angry"] == ""

    from fer_pipeline.ml import checkpoint

    monkeypatch.setattr(checkpoint.LoadedModel, "predict_proba",
                        lambda self, faces: np.full((len(faces), len(self.classes)), np.nan))
    code, rows = run_json(capsys, ckpt, str(good))
    assert code == EXIT_INPUT_FAILED
    assert rows[0]["error"] == "the model produced non-finite probabilities (NaN or infinity)"


# ---------------------------------------------------------------- broken models are refused


def test_checkpoint_with_nan_weights_is_refused(trained, tmp_path: Path, good: Path, capsys) -> None:  # noqa: F811
    result, _ = trained
    state = {k: v.clone() for k, v in result.state_dict.items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = math.nan
    broken = save_checkpoint(tmp_path / "nan.safetensors", dataclasses.replace(result, state_dict=state),
                             data_version="v")
    with pytest.raises(ValueError, match=f"broken model: non-finite weights \\(NaN or infinity\\) in {first}"):
        load_checkpoint(broken)
    code, out, err = run_cli(capsys, broken, str(good), "--format", "json")
    assert code == EXIT_USAGE and out == ""
    assert "cannot load model" in err and "non-finite weights" in err

    loaded = load_checkpoint(save_checkpoint(tmp_path / "ok.safetensors", result, data_version="v"))
    with torch.no_grad():
        next(loaded.model.parameters()).view(-1)[0] = math.inf  # broken in memory: predict_images refuses too
    with pytest.raises(ValueError, match="non-finite weights"):
        predict_images([good], loaded)


@pytest.mark.parametrize("std", [0.0, -0.2, math.nan, math.inf])
def test_checkpoint_with_a_bad_normalisation_std_is_refused(trained, tmp_path: Path, good: Path, std: float,  # noqa: F811
                                                           capsys) -> None:
    result, _ = trained
    bad = dataclasses.replace(result, normalization=Normalization(mean=0.5, std=std))
    broken = save_checkpoint(tmp_path / "std.safetensors", bad, data_version="v")
    with pytest.raises(ValueError, match=f"normalisation std is {std!r} \\(must be a finite number > 0\\)"):
        predict_images([good], broken)
    code, _, err = run_cli(capsys, broken, str(good))
    assert code == EXIT_USAGE and "normalisation std" in err


@pytest.mark.parametrize("content, reason", [
    ('{"best_model": "tiny"', "is not a metrics report"),     # truncated JSON
    ("[1, 2]", "is not a metrics report"),                    # not an object
    ('{"models": {}}', "records no 'best_model'"),            # missing key
    ("\x00\xff binary", "is not a metrics report"),           # not text
])
def test_malformed_metrics_json_is_a_clear_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       content: str, reason: str) -> None:
    """Without --model, predict reads the best model from metrics.json: a broken one is exit 2
    with a message naming the file, never a traceback."""
    from fer_pipeline.cli import main

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_bytes(content.encode("latin-1"))
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    assert main(["predict", "--data-root", str(tmp_path), str(image)]) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and reason in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "preprocess_wrong_type", "preprocess_other_size", "not_json"])
def test_damaged_checkpoint_is_a_clear_usage_error(ckpt: Path, good: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], damage: str) -> None:
    """A checkpoint cut short, or whose description is malformed or contradicts its input size,
    is refused with exit 2 and a message naming it: never a traceback, never a guess."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fer_pipeline.cli import main
    from fer_pipeline.ml.checkpoint import METADATA_KEY

    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        data = ckpt.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        with safe_open(str(ckpt), framework="pt") as f:
            meta = json.loads(f.metadata()[METADATA_KEY])
        if damage == "preprocess_wrong_type":
            meta["preprocess"]["image_size"] = "large"
        elif damage == "preprocess_other_size":
            meta["preprocess"]["image_size"] = [meta["input_size"][0] + 8, meta["input_size"][1] + 8]
        raw = "{not json" if damage == "not_json" else json.dumps(meta)
        save_file(load_file(str(ckpt)), str(bad), metadata={METADATA_KEY: raw})
    assert main(["predict", "--model", str(bad), str(good)]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "bad.safetensors" in err and "Traceback" not in err
