"""The shipped-model file and its loader: an ensemble's probability is the mean of its members'
calibrated probabilities; a record its members no longer match is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fer_pipeline.ml.calibration import softmax
from fer_pipeline.ml.shipped import (
    EnsembleModel,
    ShippedMember,
    ShippedSpec,
    load_shipped,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline_tests.ml.test_evaluate import SIZE, constant_model


def write_spec(paths: DataPaths, members: list[ShippedMember], kind: str = "ensemble") -> None:
    spec = ShippedSpec(kind=kind, name="ens", members=tuple(members), selected_by="test", data_version="v1")
    paths.shipped_json.parent.mkdir(parents=True, exist_ok=True)
    paths.shipped_json.write_text(json.dumps(spec.to_json()))


def test_ensemble_is_the_mean_of_calibrated_member_probabilities(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path)
    a = constant_model(paths.fold_checkpoint(0), 0, "a")
    b = constant_model(paths.fold_checkpoint(1), 2, "b")
    write_spec(paths, [ShippedMember("a", str(a.relative_to(tmp_path)), 1.5),
                       ShippedMember("b", str(b.relative_to(tmp_path)), 1.5)])
    shipped = load_shipped(paths)
    assert shipped.temperatures == [1.5, 1.5] and len(shipped.members) == 2
    model = shipped.model
    assert isinstance(model, EnsembleModel) and model.temperature == 1.0
    faces = np.random.default_rng(0).integers(0, 255, (4, *SIZE), dtype=np.uint8)
    expected = np.mean([softmax(m.predict_logits(faces), 1.5) for m in shipped.members], axis=0)
    np.testing.assert_allclose(model.predict_proba(faces), expected, rtol=1e-12)
    np.testing.assert_allclose(softmax(model.predict_logits(faces)), expected, rtol=1e-9)
    # each constant member puts s[0] = softmax([5,0,0,0]/1.5)[0] on its class and s[1] on each other one
    s = softmax(np.array([[5.0, 0, 0, 0]]), 1.5)[0]
    assert expected[0, 0] == pytest.approx(expected[0, 2]) == pytest.approx((s[0] + s[1]) / 2)
    assert expected[0, 1] == pytest.approx(s[1])


def test_a_record_its_members_do_not_match_is_refused(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path)
    a = constant_model(paths.fold_checkpoint(0), 0, "a")
    write_spec(paths, [ShippedMember("a", str(a), 2.0)], kind="single")  # the checkpoint records 1.5
    with pytest.raises(ValueError, match="temperature"):
        load_shipped(paths)
    write_spec(paths, [ShippedMember("gone", "models/gone.safetensors", 1.5)], kind="single")
    with pytest.raises(ValueError, match="no checkpoint"):
        load_shipped(tmp_path)
    paths.shipped_json.write_text(json.dumps({"format": "fer-pipeline-shipped", "kind": "single"}))
    with pytest.raises(ValueError, match="records no 'members'"):
        load_shipped(paths)
    with pytest.raises(ValueError, match="kind"):
        ShippedSpec(kind="bagged", name="x", members=(ShippedMember("a", "a", 1.0),), selected_by="", data_version="")
