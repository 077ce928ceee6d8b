"""Choosing the shipped model without the test split: fold models are calibrated on their own
held-out rows only, judged by their out-of-fold predictions, and the ensemble ships only when
that estimate beats the single model's validation score."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fer_pipeline.analysis.cross_validation import plan_folds, train_fold
from fer_pipeline.analysis.shipping import Candidate, decide, oof_scores
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.calibration import fit_temperature, softmax
from fer_pipeline.ml.inference import predict_logits
from fer_pipeline.ml.shipped import ShippedMember
from fer_pipeline.schema import SELECTED_BY_OOF, SELECTED_BY_VALIDATION
from fer_pipeline_tests.analysis.test_cross_validation import FAST, TINY, make_pool

TRAINED = replace(FAST, epochs=8, lr=1e-2)  # enough to learn the patterns: a temperature away from its bounds


@pytest.fixture(scope="module")
def folds():
    pool = make_pool(n=120, n_stored_folds=4)
    return pool, [train_fold(pool, f, TINY, TRAINED, n_cv_folds=4) for f in range(4)]


def test_fold_temperature_is_fitted_on_its_held_out_rows_only(folds) -> None:
    pool, results = folds
    plans = plan_folds(pool.frame["fold"].to_numpy(), 4)
    for plan, r in zip(plans, results):
        held_out = set(r.oof["image_id"])
        seen = {pool.image_ids[i] for i in np.concatenate([plan.train_rows, plan.inner_rows])}
        assert held_out == {pool.image_ids[i] for i in plan.test_rows} and not held_out & seen
        assert r.calibration["n"] == len(plan.test_rows) == r.n_test
        assert r.calibration["fitted_on"].startswith("out-of-fold") and not r.calibration["at_bound"]
        model = r.trained.build()
        logits = predict_logits(model, pool.images[plan.test_rows], r.trained.normalization,
                                tta_flip=TRAINED.tta_flip).double().numpy()
        assert r.calibration["temperature"] == pytest.approx(fit_temperature(logits, pool.labels[plan.test_rows]),
                                                             rel=1e-6)
        np.testing.assert_allclose(r.oof[[f"p_{c}" for c in CLASSES]].to_numpy(), softmax(logits), atol=1e-6)
        # fitted on the rows it trained on, the temperature would differ
        seen_rows = plan.train_rows
        seen_logits = predict_logits(model, pool.images[seen_rows], r.trained.normalization,
                                     tta_flip=TRAINED.tta_flip).double().numpy()
        assert fit_temperature(seen_logits, pool.labels[seen_rows]) != pytest.approx(r.calibration["temperature"],
                                                                                      rel=1e-3)


def test_oof_scores_pool_every_fold_and_restrict_to_validation_images(folds) -> None:
    pool, results = folds
    validation_ids = set(pool.image_ids[::3])
    scores = oof_scores(results, validation_ids)
    assert scores["oof_n"] == len(pool.image_ids)
    assert scores["oof_validation_images_n"] == len(validation_ids)
    assert 0.0 <= scores["oof_validation_images_macro_f1"] <= 1.0
    assert set(scores["per_fold_macro_f1"]) == {"0", "1", "2", "3"}


def _cand(name: str, kind: str, estimate: float) -> Candidate:
    return Candidate(name, kind, estimate, "x", [ShippedMember(name, f"{name}.safetensors", 1.0)])


def test_ensemble_ships_only_when_its_estimate_is_higher() -> None:
    single = _cand("cnn4", "single", 0.70)
    better = decide(single, _cand("cv_fold_ensemble", "ensemble", 0.72))
    assert better.chosen.kind == "ensemble" and better.selected_by == SELECTED_BY_OOF
    tie = decide(single, _cand("cv_fold_ensemble", "ensemble", 0.70))
    assert tie.chosen is single and tie.selected_by == SELECTED_BY_VALIDATION
    none = decide(single, None, "cross-validation incomplete")
    assert none.chosen is single and none.notes == ["cross-validation incomplete"]
