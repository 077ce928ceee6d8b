"""Model selection reads validation only: with two real checkpoints whose validation and test
rankings disagree, ``best_model`` is the validation winner, metrics.json and metrics.csv show
both scores and how the choice was made, and the shipped model and predict's default follow it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import nn

from fer_pipeline.analysis.shipping import (
    decide,
    shipped_spec,
    single_candidate,
    single_test_scores,
)
from fer_pipeline.classes import CLASSES
from fer_pipeline.cli import default_model
from fer_pipeline.ml import ArchConfig, TrainConfig
from fer_pipeline.ml.architectures import build_model
from fer_pipeline.ml.checkpoint import save_checkpoint
from fer_pipeline.ml.data import Normalization, SplitArrays
from fer_pipeline.ml.evaluate import compare_checkpoints, write_comparison
from fer_pipeline.ml.shipped import load_shipped
from fer_pipeline.ml.train import TrainResult
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import SELECTED_BY_VALIDATION, MetricsReport

TINY = ArchConfig(name="tiny", channels=(8, 16), dropout=0.0)
SIZE = (16, 16)


def constant_model(path: Path, cls: int, name: str) -> Path:
    """A real checkpoint of a network that answers class ``cls`` for every face."""
    model = build_model(TINY, len(CLASSES), input_size=SIZE)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.constant_(last.bias, 0.0)
    last.bias.data[cls] = 5.0
    result = TrainResult(TINY, TrainConfig(epochs=1, tta_flip=False), model.state_dict(), 1, 0.0, 0.0, [],
                         Normalization(mean=0.5, std=0.25), SIZE, len(CLASSES), False, 0.0)
    return save_checkpoint(path, result, data_version="v1", model_name=name,
                           calibration={"temperature": 1.5, "fitted_on": "validation"})


def split(labels: list[int], prefix: str) -> SplitArrays:
    images = np.random.default_rng(len(labels)).integers(0, 255, (len(labels), *SIZE), dtype=np.uint8)
    ids = [f"{prefix}{i}" for i in range(len(labels))]
    return SplitArrays(images, np.asarray(labels, np.int64), ids, pd.DataFrame({"image_id": ids}))


@pytest.fixture
def disagreeing(tmp_path: Path):
    """'says_neutral' wins on validation (mostly Neutral), 'says_focused' on test (mostly Focused)."""
    paths = DataPaths(tmp_path)
    constant_model(paths.checkpoint("says_neutral"), 0, "says_neutral")
    constant_model(paths.checkpoint("says_focused"), 1, "says_focused")
    train = split([0, 1, 2, 3] * 5, "tr")
    validation = split([0] * 12 + [1] * 4 + [2, 3], "va")
    test = split([1] * 12 + [0] * 4 + [2, 3], "te")
    comparison = compare_checkpoints(paths, ["says_neutral", "says_focused"], train, test, "v1",
                                     validation=validation)
    return paths, comparison


def test_validation_winner_is_best_although_test_disagrees(disagreeing) -> None:
    paths, comparison = disagreeing
    test_f1 = {n: e.metrics.macro_f1 for n, e in comparison.evaluations.items()}
    val_f1 = {n: e.metrics.macro_f1 for n, e in comparison.validation.items()}
    assert test_f1["says_focused"] > test_f1["says_neutral"]  # the test split would pick the other one
    assert val_f1["says_neutral"] > val_f1["says_focused"]
    assert comparison.best == "says_neutral"

    write_comparison(paths, comparison)
    report = MetricsReport.read(paths.metrics_json)
    assert report.best_model == "says_neutral" and report.selected_by == SELECTED_BY_VALIDATION
    assert report.validation["says_neutral"]["macro_f1"] == pytest.approx(val_f1["says_neutral"])
    assert report.validation["says_neutral"]["n"] == 18
    assert report.models["says_focused"]["f1"]["macro"] == pytest.approx(test_f1["says_focused"])
    raw = json.loads(paths.metrics_json.read_text())
    assert raw["best_model"] == "says_neutral" and raw["selected_by"] == SELECTED_BY_VALIDATION

    table = pd.read_csv(paths.report("metrics_csv"))
    assert {"model", "accuracy", "macro_f1", "is_best", "val_macro_f1", "val_accuracy", "selected_by"} <= set(table)
    best_row = table[table["is_best"]]
    assert list(best_row["model"]) == ["says_neutral"]
    assert best_row["val_macro_f1"].item() == pytest.approx(val_f1["says_neutral"])
    assert best_row["macro_f1"].item() == pytest.approx(test_f1["says_neutral"])


def test_shipped_model_and_predict_default_follow_the_validation_winner(disagreeing) -> None:
    paths, comparison = disagreeing
    write_comparison(paths, comparison)
    report = MetricsReport.read(paths.metrics_json)
    # an old data root (no shipped.json): predict falls back to metrics.json's best_model
    chosen, origin = default_model(paths.root)
    assert chosen == paths.checkpoint("says_neutral")

    single = single_candidate(report, paths)
    decision = decide(single, None, "no folds in this test")
    spec = shipped_spec(decision, {single.name: single_test_scores(report, single.name)}, "v1")
    paths.shipped_json.parent.mkdir(parents=True, exist_ok=True)
    paths.shipped_json.write_text(json.dumps(spec.to_json()))
    assert spec.name == "says_neutral" and spec.kind == "single" and spec.selected_by == SELECTED_BY_VALIDATION
    assert spec.scores["test"]["macro_f1"] == pytest.approx(comparison.evaluations["says_neutral"].metrics.macro_f1)
    assert spec.members[0].checkpoint == "models/says_neutral.safetensors"  # relative: the root can move

    chosen, origin = default_model(paths.root)
    assert origin == str(paths.shipped_json)
    faces = np.random.default_rng(1).integers(0, 255, (3, *SIZE), dtype=np.uint8)
    assert (chosen.predict_proba(faces).argmax(1) == 0).all()  # says_neutral's answer

    # a shipped.json that names a checkpoint outside its data root is refused before anything is read
    outside = paths.root.parent / "elsewhere.safetensors"
    outside.write_bytes(paths.checkpoint("says_neutral").read_bytes())  # a loadable model: only the place is wrong
    (paths.models_dir / "link.safetensors").symlink_to(outside)
    for named in ("../elsewhere.safetensors", str(outside), "models/link.safetensors"):
        data = spec.to_json()
        data["members"][0]["checkpoint"] = named
        paths.shipped_json.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="outside the data root"):
            load_shipped(paths)
