"""Calibrated probabilities: ECE and the reliability table on cases with a known answer,
temperature scaling on planted over-/under-confident models, the temperature a trained model
stores (fitted on its validation logits), old checkpoints (T = 1), broken temperatures refused,
and ``fer-pipeline predict`` printing calibrated probabilities and answering "uncertain" below
``--min-confidence`` with a real tiny checkpoint."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fer_pipeline.classes import CLASSES
from fer_pipeline.cli import EXIT_OK, EXIT_USAGE, main
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.ml import ArchConfig, TrainConfig, workflow
from fer_pipeline.ml.calibration import (
    N_BINS,
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability_table,
    softmax,
)
from fer_pipeline.ml.checkpoint import (
    METADATA_KEY,
    load_checkpoint,
    read_checkpoint_metadata,
)
from fer_pipeline.ml.predict import UNCERTAIN
from fer_pipeline.paths import DataPaths

SIZE = 16


def planted(n: int, scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is calibrated at ``scale`` 1 (labels drawn from its own softmax),
    multiplied by ``scale``: > 1 over-confident, < 1 under-confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, len(CLASSES)))
    p = softmax(logits)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits * scale, labels


# ---------------------------------------------------------------------------- the core


def test_ece_of_a_known_case() -> None:
    """Every answer 90 % sure, half of them right: ECE 0.4; 1.0 falls in the last bin."""
    p = np.tile([0.9, 0.05, 0.03, 0.02], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(p, labels) == pytest.approx(0.4)
    table = reliability_table(p, labels)
    assert len(table) == N_BINS and table["n"].sum() == 10
    (used,) = table.index[table["n"] > 0]
    assert table.loc[used, "confidence"] == pytest.approx(0.9) and table.loc[used, "accuracy"] == pytest.approx(0.5)
    sure = np.eye(4)[[0, 1, 2, 3]]  # confidence exactly 1.0, all right
    assert reliability_table(sure, np.arange(4))["n"].iloc[-1] == 4
    assert expected_calibration_error(sure, np.arange(4)) == 0.0


def test_temperature_scaling_fixes_a_planted_over_confident_model() -> None:
    val_logits, val_labels = planted(3000, scale=4.0, seed=1)
    test_logits, test_labels = planted(3000, scale=4.0, seed=2)
    t = fit_temperature(val_logits, val_labels)
    assert t == pytest.approx(4.0, rel=0.1)  # undoes the planted factor
    effect = apply_temperature(test_logits, test_labels, t)
    assert effect.ece_before > 0.15  # over-confident
    assert effect.ece_after < effect.ece_before / 3 and effect.ece_after < 0.04
    assert effect.nll_after < effect.nll_before
    same = softmax(test_logits).argmax(1) == softmax(test_logits, t).argmax(1)
    assert same.all()  # no prediction changes


def test_under_confident_model_is_sharpened_and_a_calibrated_one_left_alone() -> None:
    logits, labels = planted(3000, scale=0.3, seed=3)
    assert fit_temperature(logits, labels) == pytest.approx(0.3, rel=0.1)
    logits, labels = planted(4000, scale=1.0, seed=4)
    fit = calibrate(logits, labels)
    assert fit.temperature == pytest.approx(1.0, abs=0.08)
    assert abs(fit.ece_after - fit.ece_before) < 0.01 and fit.nll_after <= fit.nll_before + 1e-12
    assert fit_temperature(logits, labels) == fit.temperature  # deterministic
    assert calibrate(np.zeros((0, 4)), np.zeros(0, int)).temperature == 1.0
    diverged = calibrate(np.full((5, 4), np.nan), np.arange(5) % 4)  # never published, but must not crash training
    assert diverged.temperature == 1.0 and math.isnan(diverged.ece_before) and diverged.to_dict()["ece_before"] is None


# ---------------------------------------------------------------------------- a real tiny model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, split_arrays):
    """A tiny model trained and saved by the model assets' own ``train_and_save``."""
    paths = DataPaths(tmp_path_factory.mktemp("calibrated"))
    arrays = {"train": split_arrays(96, 0, size=SIZE), "validation": split_arrays(40, 1, size=SIZE)}
    done = workflow.train_and_save("tiny", ArchConfig("tiny", (8, 16)),
                                   TrainConfig(epochs=2, batch_size=32, warmup_epochs=0, num_threads=2), arrays,
                                   paths, "v1", PreprocessSettings(image_size=(SIZE, SIZE), min_side=8))
    return done, arrays


def test_trained_model_stores_the_temperature_fitted_on_its_validation_logits(trained) -> None:
    done, arrays = trained
    meta = read_checkpoint_metadata(done.checkpoint)["calibration"]
    val = arrays["validation"]
    loaded = load_checkpoint(done.checkpoint)
    refit = fit_temperature(loaded.predict_logits(val.images), val.labels)
    assert meta["fitted_on"] == "validation" and meta["n"] == len(val)
    assert loaded.temperature == pytest.approx(refit, rel=1e-6) and meta["temperature"] == loaded.temperature
    assert meta["nll_after"] <= meta["nll_before"] + 1e-12
    np.testing.assert_allclose(loaded.predict_proba(val.images),
                               softmax(loaded.predict_logits(val.images), loaded.temperature), atol=1e-12)


def _with_metadata(src: Path, dst: Path, change) -> Path:
    """A copy of a checkpoint with its JSON description edited (an older or damaged file)."""
    meta = read_checkpoint_metadata(src)
    change(meta)
    dst.write_bytes(st_save(st_load(src.read_bytes()), metadata={METADATA_KEY: json.dumps(meta)}))
    return dst


def test_checkpoint_without_calibration_loads_with_temperature_one(trained, tmp_path: Path) -> None:
    done, arrays = trained
    old = _with_metadata(done.checkpoint, tmp_path / "old.safetensors", lambda m: m.pop("calibration"))
    loaded = load_checkpoint(old)
    assert "calibration" not in loaded.metadata and loaded.temperature == 1.0
    faces = arrays["validation"].images
    np.testing.assert_allclose(loaded.predict_proba(faces), loaded.predict_proba(faces, calibrated=False))


@pytest.mark.parametrize("temperature", [0, -1.5, "warm", None, True])
def test_a_broken_temperature_is_refused(trained, tmp_path: Path, temperature, capsys) -> None:
    done, _ = trained
    bad = _with_metadata(done.checkpoint, tmp_path / "bad.safetensors",
                         lambda m: m["calibration"].update(temperature=temperature))
    with pytest.raises(ValueError, match="broken model: calibration temperature is"):
        load_checkpoint(bad)
    assert main(["predict", str(tmp_path), "--model", str(bad)]) == EXIT_USAGE
    assert "calibration temperature" in capsys.readouterr().err


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["predict", *args])
    return code, capsys.readouterr().out


def test_predict_prints_calibrated_probabilities_and_answers_uncertain(trained, tmp_path: Path, capsys) -> None:
    done, arrays = trained
    faces = tmp_path / "faces"
    faces.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(arrays["validation"].images[i]).save(faces / f"{i}.png")
    stored = load_checkpoint(done.checkpoint).temperature  # as fitted (this tiny model is under-confident: T < 1)
    raw = _with_metadata(done.checkpoint, tmp_path / "raw.safetensors", lambda m: m.update(calibration={}))
    soft = _with_metadata(done.checkpoint, tmp_path / "soft.safetensors",  # T = 20: near-uniform probabilities
                          lambda m: m["calibration"].update(temperature=20.0))

    def run(model: Path, *args: str) -> list[dict]:
        code, out = _cli(capsys, str(faces), "--model", str(model), "--format", "json", *args)
        assert code == EXIT_OK
        return json.loads(out)

    uncalibrated = run(raw)
    for model, t in ((done.checkpoint, stored), (soft, 20.0)):
        for a, b in zip(uncalibrated, run(model), strict=True):
            assert a["label"] == b["label"] in CLASSES  # a temperature never changes the answer
            p1 = np.array([a["probabilities"][c] for c in CLASSES])
            expected = softmax(np.log(p1)[None], t)[0]  # p_T ∝ p_1^(1/T)
            np.testing.assert_allclose([b["probabilities"][c] for c in CLASSES], expected, atol=1e-6)
            assert (max(b["probabilities"].values()) > max(p1)) == (t < 1)

    rows = run(soft, "--min-confidence", "0.5")
    assert [r["label"] for r in rows] == [UNCERTAIN] * 4
    assert all(r["error"] is None and math.isclose(sum(r["probabilities"].values()), 1.0) for r in rows)
    code, out = _cli(capsys, str(faces), "--model", str(soft), "--format", "csv", "--min-confidence", "0.5")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == EXIT_OK and [r["prediction"] for r in table] == [UNCERTAIN] * 4 and all(r["p_Angry"] for r in table)
    code, out = _cli(capsys, str(faces), "--model", str(soft), "--min-confidence", "0.5")
    assert code == EXIT_OK and out.count(UNCERTAIN) == 4 and "4 of 4 inputs classified" in out
    # the threshold splits the calibrated answers where their confidence says
    calibrated = run(done.checkpoint)
    confidences = sorted(max(r["probabilities"].values()) for r in calibrated)
    threshold = f"{(confidences[1] + confidences[2]) / 2:.6f}"
    labels = [r["label"] for r in run(done.checkpoint, "--min-confidence", threshold)]
    assert labels.count(UNCERTAIN) == 2
    assert [lab for lab in labels if lab != UNCERTAIN] == [r["label"] for r in calibrated
                                                           if max(r["probabilities"].values()) >= float(threshold)]
    assert [r["label"] for r in run(raw, "--min-confidence", "0")] == [r["label"] for r in uncalibrated]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "sure"])
def test_min_confidence_must_be_a_probability(value: str, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(tmp_path), "--min-confidence", value]) == EXIT_USAGE
    assert "--min-confidence" in capsys.readouterr().err
