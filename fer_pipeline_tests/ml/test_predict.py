"""Checkpoint round trip (safetensors, no pickle), predict on files/folders/zips, and the CLI."""

from __future__ import annotations

import csv
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fer_pipeline.classes import CLASSES
from fer_pipeline.cli import main
from fer_pipeline.ml import ArchConfig, TrainConfig, train_model
from fer_pipeline.ml.checkpoint import (
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from fer_pipeline.ml.inference import predict_proba
from fer_pipeline.ml.predict import is_junk, predict_images

SIZE = 16


def _faces(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([(yy // 2 % 2) * 140.0, (xx // 2 % 2) * 140.0, ((yy - 8) ** 2 + (xx - 8) ** 2 < 16) * 160.0, np.zeros((SIZE, SIZE))])
    return np.clip(base[y] + 50 + rng.normal(0, 20, (n, SIZE, SIZE)), 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def trained():
    x_tr, y_tr = _faces(128, 0)
    x_va, y_va = _faces(32, 1)
    cfg = TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, num_threads=2)
    return train_model(x_tr, y_tr, x_va, y_va, ArchConfig("tiny", (8, 16)), cfg), x_va


@pytest.fixture(scope="module")
def ckpt(trained, tmp_path_factory) -> Path:
    result, _ = trained
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_checkpoint(path, result, data_version="abc123", metrics={"test": {"macro_f1": 0.5}})
    return path


def test_checkpoint_is_plain_safetensors_with_metadata(ckpt: Path, trained) -> None:
    result, _ = trained
    raw = ckpt.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # a JSON header, then raw tensor bytes: no pickle
    assert "__metadata__" in header
    tensors = load_file(str(ckpt))
    assert set(tensors) == set(result.state_dict)
    meta = read_checkpoint_metadata(ckpt)
    assert meta["classes"] == list(CLASSES)
    assert meta["input_size"] == [SIZE, SIZE]
    assert meta["data_version"] == "abc123"
    assert meta["architecture"]["channels"] == [8, 16]
    assert meta["normalization"] == result.normalization.to_dict()
    assert meta["metrics"]["test"]["macro_f1"] == 0.5
    assert meta["torch_version"] == torch.__version__
    assert meta["train_config"]["epochs"] == 1
    assert not list(ckpt.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_checkpoint_round_trip_reproduces_predictions(ckpt: Path, trained) -> None:
    result, x_va = trained
    loaded = load_checkpoint(ckpt)
    assert not loaded.model.training and loaded.classes == CLASSES and loaded.input_size == (SIZE, SIZE)
    expected = predict_proba(result.build(), x_va, result.normalization, tta_flip=result.config.tta_flip)
    np.testing.assert_allclose(loaded.predict_proba(x_va), expected, atol=1e-6)
    with pytest.raises(ValueError):
        loaded.predict_proba(np.zeros((2, 48, 48), np.uint8))


def test_load_rejects_foreign_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a fer-pipeline checkpoint"):
        load_checkpoint(path)


def _png(face: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(face).resize((40, 40), Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    faces, _ = _faces(6, 3)
    single = tmp_path / "single.png"
    single.write_bytes(_png(faces[0]))
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png(faces[1]))
    (folder / "sub" / "b.jpg").write_bytes(_png(faces[2]))  # PNG bytes, .jpg name: still decodes
    (folder / "notes.txt").write_text("not an image")  # ignored inside folders
    (folder / ".DS_Store").write_bytes(b"\0\1junk")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("faces/c.png", _png(faces[3]))
        zf.writestr("faces/d.png", _png(faces[4]))
        zf.writestr("__MACOSX/faces/._c.png", b"resource fork")
        zf.writestr("faces/._d.png", b"resource fork")
        zf.writestr("faces/.DS_Store", b"junk")
        zf.writestr("Thumbs.db", b"junk")
    return {"single": single, "folder": folder, "corrupt": corrupt, "zip": archive}


def test_predict_files_folder_zip_and_corrupt(inputs: dict[str, Path], ckpt: Path) -> None:
    preds = predict_images([inputs["single"], inputs["folder"], inputs["zip"], inputs["corrupt"]], ckpt)
    names = [p.input for p in preds]
    assert len(preds) == 6
    assert names[0] == str(inputs["single"])
    assert names[1:3] == [str(inputs["folder"] / "a.png"), str(inputs["folder"] / "sub" / "b.jpg")]
    assert names[3:5] == [f"{inputs['zip']}::faces/c.png", f"{inputs['zip']}::faces/d.png"]
    ok, bad = preds[:5], preds[5]
    for p in ok:
        assert p.ok and p.label in CLASSES
        assert list(p.probabilities) == list(CLASSES)
        assert sum(p.probabilities.values()) == pytest.approx(1.0)
    assert not bad.ok and bad.label is None and bad.error


def test_predict_missing_path_and_empty_folder(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "empty").mkdir()
    preds = predict_images([tmp_path / "nope.png", tmp_path / "empty"], ckpt)
    assert [p.ok for p in preds] == [False, False]
    assert "no such file" in preds[0].error and "no images" in preds[1].error


def test_is_junk() -> None:
    assert is_junk("__MACOSX/x/y.png") and is_junk("a/._y.png") and is_junk("a/.DS_Store") and is_junk("Thumbs.db")
    assert not is_junk("a/face.png")


def test_cli_csv_json_table_and_exit_status(inputs: dict[str, Path], ckpt: Path, capsys) -> None:
    args = [str(inputs["folder"]), str(inputs["corrupt"]), "--model", str(ckpt)]
    assert main(["predict", *args, "--format", "csv"]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and rows[2]["error"] and not rows[0]["error"]
    assert rows[0]["prediction"] in CLASSES
    assert sum(float(rows[0][f"p_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-5)

    assert main(["predict", str(inputs["zip"]), "--model", str(ckpt), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 2 and all(d["error"] is None and d["label"] in CLASSES for d in data)

    assert main(["predict", *args]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "2 of 3 inputs classified" in out


def test_cli_default_model_and_usage_errors(inputs: dict[str, Path], ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    root = tmp_path / "data"
    monkeypatch.setenv("FER_DATA_DIR", str(root))
    assert main(["predict", str(inputs["single"])]) == 2
    assert "train" in capsys.readouterr().err

    (root / "reports").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "reports" / "metrics.json").write_text(json.dumps({"best_model": "tiny"}))
    (root / "models" / "tiny.safetensors").write_bytes(ckpt.read_bytes())
    assert main(["predict", str(inputs["single"]), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in CLASSES

    assert main(["predict", str(inputs["single"]), "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["predict"]) == 2  # argparse: PATH is required
    assert main([]) == 2
    assert main(["predict", "x", "--format", "xml"]) == 2


def test_evaluate_model_matches_metrics(ckpt: Path, trained) -> None:
    from fer_pipeline.ml.evaluate import evaluate_model

    _, x_va = trained
    y = np.arange(len(x_va)) % 4
    ev = evaluate_model(load_checkpoint(ckpt), x_va, y)
    assert ev.metrics.n == len(y)
    assert ev.metrics.accuracy == pytest.approx(float((ev.y_pred == y).mean()))
    frame = ev.predictions_frame([f"id{i}" for i in range(len(y))])
    assert list(frame.columns[:4]) == ["image_id", "true", "predicted", "correct"]
    assert frame["correct"].mean() == pytest.approx(ev.metrics.accuracy)


def test_prediction_applies_the_checkpoints_preprocessing(trained, tmp_path: Path) -> None:
    """Every preprocessing setting travels in the checkpoint and prediction applies exactly it:
    a 12×12 image is accepted by a model trained with min_side 8 and rejected by one trained
    with min_side 64, although the defaults (min_side 32) would reject / accept the opposite."""
    from fer_pipeline.faces.preprocess import PreprocessSettings

    result, _ = trained
    small, mid = tmp_path / "small.png", tmp_path / "mid.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(small)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(mid)
    lenient = PreprocessSettings(image_size=(SIZE, SIZE), min_side=8, min_std=0.5)
    strict = PreprocessSettings(image_size=(SIZE, SIZE), min_side=64)
    for name, settings in (("lenient", lenient), ("strict", strict)):
        save_checkpoint(tmp_path / f"{name}.safetensors", result, data_version="v", preprocess=settings)
    loaded = load_checkpoint(tmp_path / "lenient.safetensors")
    assert loaded.preprocess == lenient and loaded.preprocess.key == lenient.key
    assert read_checkpoint_metadata(tmp_path / "strict.safetensors")["preprocess"]["min_side"] == 64

    ok, too_big = predict_images([small, mid], loaded)
    assert ok.ok and too_big.ok
    rejected_small, rejected_mid = predict_images([small, mid], tmp_path / "strict.safetensors")
    assert rejected_small.error == "too small (12x12 < 64px)"
    assert rejected_mid.error == "too small (40x40 < 64px)"
    with pytest.raises(ValueError, match="the model takes"):
        save_checkpoint(tmp_path / "bad.safetensors", result, data_version="v",
                        preprocess=PreprocessSettings(image_size=(48, 48)))


def test_checkpoint_saved_without_settings_records_the_defaults(ckpt: Path) -> None:
    from fer_pipeline.faces.preprocess import PreprocessSettings

    assert load_checkpoint(ckpt).preprocess == PreprocessSettings(image_size=(SIZE, SIZE))


def test_folders_and_archives_take_images_by_content_like_the_inventory(ckpt: Path, tmp_path: Path) -> None:
    """Issue 19's one format policy in predict's walk: a PNG named .ico and a JPEG named .jfif are
    faces, an EPS named .png is one row refused in the inventory's words (never decoded), a real
    ICO icon and a text file are not images and are skipped."""
    from fer_pipeline_tests.faces.test_format_policy import EPS, REFUSED_FILES

    faces, _ = _faces(2, 9)
    buf = io.BytesIO()
    Image.fromarray(faces[1]).resize((40, 40)).save(buf, format="JPEG")
    files = {"face.ico": _png(faces[0]), "face.jfif": buf.getvalue(), "bad.png": EPS,
             "icon.ico": REFUSED_FILES["ICO"], "notes.txt": b"hello"}
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    refused = "not an image file (format EPS is not accepted)"
    for rows, prefix in ((predict_images([folder], ckpt), f"{folder}/"), (predict_images([archive], ckpt), f"{archive}::")):
        got = {p.input.removeprefix(prefix): p.error for p in rows}
        assert got == {"bad.png": refused, "face.ico": None, "face.jfif": None}
