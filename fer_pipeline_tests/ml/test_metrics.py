"""Metrics against hand-computed values (no scikit-learn in the loop)."""

from __future__ import annotations

import numpy as np
import pytest

from fer_pipeline.ml.metrics import (
    best_model_name,
    compare_models,
    confusion_matrix,
    evaluate_predictions,
    macro_f1,
    majority_baseline,
    normalize_confusion,
)

CLASSES3 = ("a", "b", "c")

# y_true: a a a b b c      y_pred: a a b b c c
#   confusion (rows true):  a: [2 1 0]   b: [0 1 1]   c: [0 0 1]
#   precision: a 2/2=1, b 1/2=.5, c 1/2=.5 ; recall: a 2/3, b 1/2, c 1
#   F1: a 2*(1*2/3)/(1+2/3)=0.8, b 0.5, c 2*(.5*1)/1.5=2/3
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def test_confusion_matrix_by_hand() -> None:
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_allclose(normalize_confusion(cm), [[2 / 3, 1 / 3, 0], [0, 0.5, 0.5], [0, 0, 1]])


def test_metrics_by_hand() -> None:
    m = evaluate_predictions(Y_TRUE, Y_PRED, classes=CLASSES3)
    assert m.n == 6
    assert m.accuracy == pytest.approx(4 / 6)
    np.testing.assert_allclose(m.per_class["precision"], [1, 0.5, 0.5])
    np.testing.assert_allclose(m.per_class["recall"], [2 / 3, 0.5, 1])
    np.testing.assert_allclose(m.per_class["f1"], [0.8, 0.5, 2 / 3])
    assert list(m.per_class["support"]) == [3, 2, 1]
    assert m.precision["macro"] == pytest.approx(2 / 3)
    assert m.recall["macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m.f1["macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m.f1["weighted"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m.precision["weighted"] == pytest.approx((3 * 1 + 2 * 0.5 + 0.5) / 6)
    # single-label multi-class: every micro average equals accuracy
    for avg in (m.precision, m.recall, m.f1):
        assert avg["micro"] == pytest.approx(4 / 6)
    assert macro_f1(np.array(Y_TRUE), np.array(Y_PRED), 3) == pytest.approx(m.macro_f1)


def test_zero_division_and_absent_class() -> None:
    # class c is never predicted and never true: precision/recall/F1 0, weight 0
    m = evaluate_predictions([0, 1, 1], [0, 1, 0], classes=CLASSES3)
    np.testing.assert_allclose(m.per_class["precision"], [0.5, 1, 0])
    np.testing.assert_allclose(m.per_class["recall"], [1, 0.5, 0])
    assert m.f1["macro"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m.f1["weighted"] == pytest.approx((1 * 2 / 3 + 2 * 2 / 3) / 3)


def test_log_loss() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    m = evaluate_predictions([0, 1], [0, 1], probs, classes=CLASSES3)
    assert m.log_loss == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)


def test_confusion_consistency_random() -> None:
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    m = evaluate_predictions(t, p)
    assert m.confusion.sum() == 500
    assert np.trace(m.confusion) / m.confusion.sum() == pytest.approx(m.accuracy)
    np.testing.assert_array_equal(m.confusion.sum(1), np.bincount(t, minlength=4))
    np.testing.assert_array_equal(m.confusion.sum(0), np.bincount(p, minlength=4))
    np.testing.assert_allclose(m.confusion_normalized.sum(1), 1.0)
    d = m.to_dict()
    assert d["confusion_matrix"] == m.confusion.tolist() and d["macro_f1"] == m.macro_f1


def test_majority_baseline_uses_training_distribution() -> None:
    # most frequent in training is class 2, even though test is mostly class 0
    base = majority_baseline([2, 2, 2, 0, 1], [0, 0, 0, 2], classes=CLASSES3)
    assert base.accuracy == pytest.approx(0.25)
    np.testing.assert_array_equal(base.confusion[:, 2], [3, 0, 1])
    assert base.f1["macro"] == pytest.approx((0 + 0 + 2 * 0.25 * 1 / 1.25) / 3)


def test_compare_models_names_best() -> None:
    good = evaluate_predictions([0, 1, 2], [0, 1, 2], classes=CLASSES3)
    bad = evaluate_predictions([0, 1, 2], [0, 0, 0], classes=CLASSES3)
    table = compare_models({"bad": bad, "good": good.to_dict()})
    assert list(table["model"]) == ["good", "bad"]
    assert list(table["is_best"]) == [True, False]
    assert best_model_name(table) == "good"
    assert table.loc[0, "macro_f1"] == pytest.approx(1.0)


def test_group_metrics_averages_present_classes() -> None:
    from fer_pipeline.ml.metrics import group_metrics

    y_true, y_pred = np.array([0, 1, 0, 0]), np.array([0, 1, 1, 0])
    groups = np.array(["f", "f", "m", "unknown"])
    by_group = {g: group_metrics(y_true[groups == g], y_pred[groups == g], CLASSES3) for g in ("f", "m", "unknown")}
    assert [by_group[g]["n"] for g in ("f", "m", "unknown")] == [2, 1, 1]
    assert by_group["f"]["macro_f1"] == pytest.approx(1.0)  # class c absent from group f: not counted
    assert by_group["m"]["accuracy"] == 0.0


def test_plots_write_pngs(tmp_path) -> None:
    from fer_pipeline.ml.plots import plot_confusion_matrix, plot_training_curves

    history = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_accuracy": 0.3 + e / 10, "val_macro_f1": 0.2 + e / 10}
        for e in range(1, 4)
    ]
    curves = plot_training_curves(history, tmp_path / "curves.png", title="t", best_epoch=2)
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    both = plot_confusion_matrix(cm, CLASSES3, tmp_path / "cm.png")
    counts = plot_confusion_matrix(cm, CLASSES3, tmp_path / "cm_counts.png", normalize=False)
    for png in (curves, both, counts):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
