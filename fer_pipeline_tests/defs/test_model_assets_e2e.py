"""Models through real Dagster materializations: tiny training on a small generated source, then
the checkpoint, the evaluation report and the predict command on files, a folder and a zip."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from fer_pipeline.classes import CLASSES
from fer_pipeline.definitions import defs
from fer_pipeline.ml.checkpoint import load_checkpoint
from fer_pipeline.ml.predict import predict_images

pytestmark = pytest.mark.slow

MODEL_KEYS = ["model_cnn4", "model_cnn3", "model_cnn4_k5", "model_evaluation"]
DATA_KEYS = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits"]
MIN_SIDE = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models")
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 240, "seed": 5}]}))
    mp = pytest.MonkeyPatch()
    mp.setenv("FER_DATA_DIR", str(root))
    try:
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            asset_selection=[dg.AssetKey(k) for k in DATA_KEYS + MODEL_KEYS],
            # min_side 40 (default 32): a non-default preprocessing setting the checkpoints must carry
            run_config={"resources": {"training": {"config": {"epochs": 2, "patience": 2}},
                                      "fer": {"config": {"min_side": MIN_SIDE}}}},
            raise_on_error=False)
    finally:
        mp.undo()
    return root, result


def test_models_materialize_with_checks(trained) -> None:
    root, result = trained
    assert result.success
    done = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert set(MODEL_KEYS) <= done
    checks = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
    for key in MODEL_KEYS[:3]:
        assert checks[(key, "weights_finite")].passed
        assert (key, "beats_majority_baseline") in checks
    assert ("model_evaluation", "test_macro_f1_floor") in checks


def test_checkpoint_loads_and_predicts(trained) -> None:
    root, _ = trained
    loaded = load_checkpoint(root / "models" / "cnn4.safetensors")
    assert loaded.classes == CLASSES and loaded.input_size == (48, 48)
    assert loaded.metadata["data_version"] and loaded.metadata["normalization"]
    faces = np.random.default_rng(0).integers(0, 255, (5, 48, 48), dtype=np.uint8)
    probs = loaded.predict_proba(faces)
    assert probs.shape == (5, 4) and np.allclose(probs.sum(axis=1), 1.0)


def test_prediction_prepares_inputs_with_the_training_settings(trained, tmp_path: Path) -> None:
    """The run trained with min_side 40: the checkpoint records it and predict applies it (the
    default, 32, would accept a 36×36 image)."""
    root, _ = trained
    loaded = load_checkpoint(root / "models" / "cnn4.safetensors")
    assert loaded.preprocess.min_side == MIN_SIDE and loaded.preprocess.image_size == (48, 48)
    small = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (36, 36), dtype=np.uint8)).save(small)
    (pred,) = predict_images([small], loaded)
    assert pred.error == f"too small (36x36 < {MIN_SIDE}px)"


def test_metrics_in_range_and_consistent_with_confusion(trained) -> None:
    root, _ = trained
    report = json.loads((root / "reports" / "metrics.json").read_text())
    assert report["best_model"] in {"cnn4", "cnn3", "cnn4_k5"} and report["split"] == "test"
    for name, m in report["models"].items():
        cm = np.array(m["confusion_matrix"])
        assert cm.sum() == report["n_test"] == m["n"]
        assert m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        for avg in ("macro", "micro", "weighted"):
            assert 0.0 <= m["f1"][avg] <= 1.0
        assert m["f1"]["micro"] == pytest.approx(m["accuracy"])  # single-label: micro-F1 = accuracy
        assert (root / "reports" / f"confusion_{name}.png").stat().st_size > 1000
    assert (root / "reports" / "metrics.csv").exists()


def test_predict_command_on_files_folder_and_zip(trained, tmp_path: Path) -> None:
    root, _ = trained
    kept = pd.read_parquet(root / "manifest" / "manifest.parquet")
    paths = sorted(kept.loc[kept["label"] == "Angry", "source_path"])[:3]
    faces = [root / "raw" / "demo" / p for p in paths]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in faces:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in faces:
            zf.write(f, f"sub/{f.name}")
        zf.writestr("__MACOSX/sub/._x.png", b"junk")
    cmd = [sys.executable, "-m", "fer_pipeline.cli", "predict", "--format", "json", str(faces[0]), str(folder),
           str(archive)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={"FER_DATA_DIR": str(root), "PATH": ""})
    assert out.returncode == 1, out.stderr  # one input failed
    rows = json.loads(out.stdout)
    ok = [r for r in rows if r["error"] is None]
    assert len(ok) == 1 + 3 + 3 and all(r["label"] in CLASSES for r in ok)
    assert [r for r in rows if r["error"]][0]["input"].endswith("broken.png")
    # the same function from Python
    preds = predict_images([faces[0]], root / "models" / "cnn3.safetensors")
    assert preds[0].ok and abs(sum(preds[0].probabilities.values()) - 1) < 1e-6
