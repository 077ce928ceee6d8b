"""Issue 21, part 3: the shipped model exported as ONNX. Parity with PyTorch (largest probability
difference <= 1e-4) on faces the demo generator draws and on real faces, one model and an
ensemble; the metadata a deployment needs; ``fer-pipeline export`` and ``predict`` on onnxruntime
(the same output, without importing torch)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from fer_pipeline.classes import CLASSES
from fer_pipeline.cli import main
from fer_pipeline.demo.synthetic_faces import generate_demo_source
from fer_pipeline.faces.preprocess import PreprocessSettings, decode_face
from fer_pipeline.ml import ArchConfig, TrainConfig, train_model
from fer_pipeline.ml.checkpoint import load_checkpoint, save_checkpoint
from fer_pipeline.ml.export import export_models, file_sha256
from fer_pipeline.ml.exported import PARITY_TOLERANCE, load_onnx
from fer_pipeline_tests.conftest import REPO, shared_dataset

SIZE = 48  # the recipe's input size: real and demo faces decode to it
SETTINGS = PreprocessSettings(image_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def checkpoints(split_arrays, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two briefly trained models of the recipe's shape (cnn4-like: conv-BN blocks, GAP head,
    flip averaging), with different normalisations and temperatures: one ships alone, both
    make an ensemble."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed, channels, temperature in (("a", 0, (8, 16, 32, 32), 0.8), ("b", 1, (8, 16, 16), 1.7)):
        tr, va = split_arrays(96, seed, size=SIZE), split_arrays(32, seed + 10, size=SIZE)
        cfg = TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, num_threads=2, seed=seed, tta_flip=True)
        result = train_model(tr.images, tr.labels, va.images, va.labels, ArchConfig(name, channels), cfg)
        out[name] = save_checkpoint(folder / f"{name}.safetensors", result, data_version="v42", model_name=name,
                                    calibration={"temperature": temperature})
    return out


@pytest.fixture(scope="module")
def demo_faces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The demo generator's crops (40 clean faces plus its defects) and the faces they decode to."""
    folder = tmp_path_factory.mktemp("demo") / "demo_faces"
    generate_demo_source(folder, n_images=40, seed=3)
    decoded = [decode_face(p.read_bytes(), SETTINGS) for p in sorted(folder.rglob("*.*")) if p.suffix in (".png", ".jpg")]
    faces = np.stack([d.face for d in decoded if d.ok])
    assert len(faces) >= 40
    return folder, faces


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """"a" exported alone and "a+b" as an ensemble (each export costs seconds: made once)."""
    folder = tmp_path_factory.mktemp("exported")
    a, b = load_checkpoint(checkpoints["a"]), load_checkpoint(checkpoints["b"])
    return {"a": export_models([a], folder / "a.onnx"), "a+b": export_models([a, b], folder / "e.onnx", name="ensemble")}


def _largest_difference(onnx_path: Path, members: list[Path], faces: np.ndarray) -> float:
    want = np.mean([load_checkpoint(c).predict_proba(faces) for c in members], axis=0)
    got = load_onnx(onnx_path).predict_proba(faces)
    assert got.shape == want.shape == (len(faces), len(CLASSES))
    return float(np.max(np.abs(got - want)))


@pytest.mark.parametrize("members", [["a"], ["a", "b"]])
def test_onnx_matches_pytorch_on_demo_faces(checkpoints: dict[str, Path], exported: dict[str, Path], demo_faces,
                                            members: list[str]) -> None:
    _, faces = demo_faces
    paths = [checkpoints[m] for m in members]
    out = exported["+".join(members)]
    assert _largest_difference(out, paths, faces) <= PARITY_TOLERANCE
    model = load_onnx(out)
    assert model.predict_proba(faces[:1]).shape == (1, 4)  # the batch axis is dynamic
    np.testing.assert_allclose(model.predict_proba(faces[:7]), model.predict_proba(faces)[:7], atol=1e-6)


@pytest.mark.realdata
def test_onnx_matches_pytorch_on_real_faces(checkpoints: dict[str, Path], exported: dict[str, Path]) -> None:
    archive = shared_dataset("affectnet-4class.zip")
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg") and "__MACOSX" not in n
                       and not n.startswith("Gender"))[::10][:240]
        decoded = [decode_face(zf.read(n), SETTINGS) for n in names]
    faces = np.stack([d.face for d in decoded if d.ok])
    assert len(faces) >= 200
    paths = [checkpoints["a"], checkpoints["b"]]
    assert _largest_difference(exported["a+b"], paths, faces) <= PARITY_TOLERANCE
    assert _largest_difference(exported["a"], paths[:1], faces) <= PARITY_TOLERANCE


def test_the_file_describes_what_a_deployment_needs(checkpoints: dict[str, Path], exported: dict[str, Path]) -> None:
    proto = onnx.load(str(exported["a+b"]))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["format"] == "fer-pipeline-onnx" and meta["model_name"] == "ensemble"
    assert meta["classes"] == list(CLASSES) and meta["data_version"] == "v42"
    assert meta["temperature"] == [0.8, 1.7]
    pre = meta["preprocessing"]
    assert pre["input"] == "faces" and pre["dtype"] == "uint8" and pre["grayscale"] is True
    assert pre["image_size"] == [SIZE, SIZE] and pre["settings"]["key"] == SETTINGS.key
    a, b = load_checkpoint(checkpoints["a"]), load_checkpoint(checkpoints["b"])
    assert pre["normalization"] == [a.normalization.to_dict(), b.normalization.to_dict()]
    assert [m["name"] for m in meta["members"]] == ["a", "b"]
    assert [m["tta_flip"] for m in meta["members"]] == [True, True]
    assert meta["members"][0]["checkpoint_sha256"] == file_sha256(checkpoints["a"])
    assert meta["framing"]["mode"] == "crop"
    graph_input = proto.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "faces" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert any(o.domain in ("", "ai.onnx") and 13 <= o.version for o in proto.opset_import)


def test_members_that_disagree_cannot_make_one_file(checkpoints: dict[str, Path], split_arrays,
                                                    tmp_path: Path) -> None:
    tr = split_arrays(32, 5, size=32)
    result = train_model(tr.images, tr.labels, tr.images, tr.labels, ArchConfig("small", (8, 16)),
                         TrainConfig(epochs=1, batch_size=32, warmup_epochs=0, num_threads=2))
    other = save_checkpoint(tmp_path / "small.safetensors", result, data_version="v42")
    with pytest.raises(ValueError, match="disagree on input size"):
        export_models([load_checkpoint(checkpoints["a"]), load_checkpoint(other)], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_foreign_onnx_file_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(exported["a"]))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    with pytest.raises(ValueError, match="not a fer-pipeline ONNX export"):
        load_onnx(foreign)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")
    whole = exported["a"].read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        load_onnx(tmp_path / "truncated.onnx")


def test_an_export_reading_weights_from_outside_its_folder_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    """A hostile file whose weights point at external data beyond its folder (``../``, or a link
    in the folder to a file elsewhere) must not read that file."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4096, dtype=np.float32).tobytes())
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "link.bin").symlink_to(secret)
    for location in ("../secret.bin", "link.bin"):
        proto = onnx.load(str(exported["a"]))
        weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        size = len(weight.raw_data)
        weight.ClearField("raw_data")
        weight.data_location = onnx.TensorProto.EXTERNAL
        del weight.external_data[:]
        for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        hostile = folder / "hostile.onnx"
        hostile.write_bytes(proto.SerializeToString())
        with pytest.raises(ValueError, match="not a loadable ONNX model.*escapes model directory"):
            load_onnx(hostile)


def _data_root(tmp_path: Path, ckpt: Path) -> Path:
    """A data root whose metrics.json ships ``ckpt`` (what the pipeline's evaluation writes)."""
    root = tmp_path / "data"
    (root / "models").mkdir(parents=True)
    (root / "reports").mkdir()
    target = root / "models" / "a.safetensors"
    target.write_bytes(ckpt.read_bytes())
    (root / "reports" / "metrics.json").write_text(json.dumps({"best_model": "a", "checkpoints": {"a": "models/a.safetensors"}}))
    return root


def test_export_and_predict_on_onnxruntime_through_the_cli(checkpoints: dict[str, Path], demo_faces, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = demo_faces
    root = _data_root(tmp_path, checkpoints["a"])
    assert main(["export", "--data-root", str(root)]) == 0  # the shipped model, to models/<name>.onnx
    written = Path(capsys.readouterr().out.strip())
    assert written == root / "models" / "a.onnx" and load_onnx(written).name == "a"

    assert main(["predict", str(folder), "--data-root", str(root), "--format", "json"]) == 1  # defects fail
    torch_rows = json.loads(capsys.readouterr().out)
    assert main(["predict", str(folder), "--data-root", str(root), "--format", "json", "--engine", "onnx"]) == 1
    out, err = capsys.readouterr()
    onnx_rows = json.loads(out)
    assert "exporting" not in err  # the export on disk was made from this checkpoint: used as it is
    assert [list(r) for r in onnx_rows] == [list(r) for r in torch_rows]  # the same columns
    assert [(r["input"], r["label"], r["error"]) for r in onnx_rows] == [
        (r["input"], r["label"], r["error"]) for r in torch_rows]
    assert sum(r["error"] is None for r in onnx_rows) >= 40
    for a, b in zip(onnx_rows, torch_rows):
        if a["probabilities"]:
            assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in CLASSES) <= PARITY_TOLERANCE

    (root / "models" / "a.safetensors").write_bytes(checkpoints["b"].read_bytes())  # retrained: the export is stale
    assert main(["predict", str(folder), "--data-root", str(root), "--format", "csv", "--engine", "onnx"]) == 1
    assert "exporting" in capsys.readouterr().err  # made afresh for this run, not the stale file


def test_the_cli_refuses_what_it_cannot_run(exported: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(tmp_path), "--model", str(exported["a"]), "--engine", "torch"]) == 2
    assert "cannot run an exported model" in capsys.readouterr().err
    assert main(["export", "--model", "nonesuch", "--data-root", str(tmp_path)]) == 2
    assert "not a checkpoint file nor a model recorded" in capsys.readouterr().err


def test_predict_on_onnxruntime_never_imports_torch(exported: dict[str, Path], demo_faces) -> None:
    """What makes it start fast: importing torch alone takes seconds on a small machine."""
    folder, _ = demo_faces
    out = exported["a"]
    code = ("import sys, io, contextlib; from fer_pipeline.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): status = main(sys.argv[1:])\n"
            "print(status, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "predict", str(folder), "--model", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
                          check=False)
    assert proc.stdout.split() == ["1", "False"], proc.stderr  # 1: the demo's defect files are error rows


def test_an_exported_crop_model_reads_the_same_faces_as_its_checkpoint(checkpoints: dict[str, Path],
                                                                       exported: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """A JPEG and its PNG twin decode to the faces the checkpoint's own pipeline makes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64), np.uint8))
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        (tmp_path / f"x.{fmt.lower()}").write_bytes(buf.getvalue())
    out = exported["a"]
    from fer_pipeline.ml.predict import predict_images

    got = predict_images([tmp_path / "x.png", tmp_path / "x.jpeg"], out)
    want = predict_images([tmp_path / "x.png", tmp_path / "x.jpeg"], checkpoints["a"])
    for g, w in zip(got, want):
        assert g.label == w.label and max(abs(g.probabilities[c] - w.probabilities[c]) for c in CLASSES) <= 1e-4


def test_the_shipped_fold_ensemble_is_exported_and_predicted_as_one(checkpoints: dict[str, Path], demo_faces,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """models/shipped.json names an ensemble: export writes one graph of both members, and predict
    on onnxruntime answers what predict on PyTorch (the shipped ensemble loaded) answers."""
    from fer_pipeline.schema import ShippedMember, ShippedSpec

    folder, _ = demo_faces
    root = _data_root(tmp_path, checkpoints["a"])
    (root / "models" / "b.safetensors").write_bytes(checkpoints["b"].read_bytes())
    spec = ShippedSpec(kind="ensemble", name="folds", selected_by="out-of-fold", data_version="v42",
                       members=(ShippedMember("a", "models/a.safetensors", 0.8),
                                ShippedMember("b", "models/b.safetensors", 1.7)))
    (root / "models" / "shipped.json").write_text(json.dumps(spec.to_json()))
    assert main(["export", "--data-root", str(root)]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written == root / "models" / "folds.onnx"
    exported = load_onnx(written)
    assert [m["name"] for m in exported.metadata["members"]] == ["a", "b"] and exported.temperature == [0.8, 1.7]

    assert main(["predict", str(folder), "--data-root", str(root), "--format", "json"]) == 1
    torch_rows = json.loads(capsys.readouterr().out)
    assert main(["predict", str(folder), "--data-root", str(root), "--format", "json", "--engine", "onnx"]) == 1
    out, err = capsys.readouterr()
    assert "exporting" not in err
    for a, b in zip(json.loads(out), torch_rows, strict=True):
        assert a["input"] == b["input"] and a["label"] == b["label"]
        if a["probabilities"]:
            assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in CLASSES) <= PARITY_TOLERANCE

    spec_bad = ShippedSpec(kind="ensemble", name="folds", selected_by="out-of-fold", data_version="v42",
                           members=(ShippedMember("a", "models/a.safetensors", 0.5),))  # not what a records
    (root / "models" / "shipped.json").write_text(json.dumps(spec_bad.to_json()))
    assert main(["export", "--data-root", str(root), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "re-materialize shipped_model" in capsys.readouterr().err
