"""Bias tables (counts add up, unknown and small groups marked, planted gap flagged) and the
mitigation plans (oversampling / re-weighting reach the target share) on given predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fer_pipeline.analysis.bias import (
    STATUS_GAP,
    STATUS_OK,
    STATUS_SMALL,
    STATUS_UNKNOWN,
    bias_report,
    group_metrics,
)
from fer_pipeline.analysis.mitigation import (
    choose_attribute,
    comparison_table,
    plan_mitigation,
    target_shares,
)


def planted(n: int = 400, seed: int = 0):
    """Predictions right 90% of the time, but only ~50% for gender=female; age has a tiny group
    and a few missing values; race absent."""
    rng = np.random.default_rng(seed)
    gender = rng.choice(["male", "female"], size=n, p=[0.7, 0.3]).astype(object)
    age = rng.choice(["young", "middle", "senior"], size=n, p=[0.6, 0.35, 0.05]).astype(object)
    age[:12] = None
    frame = pd.DataFrame({"gender": gender, "age_group": age, "race": [None] * n})
    y = rng.integers(0, 4, n)
    right = rng.random(n) < np.where(gender == "female", 0.5, 0.9)
    pred = np.where(right, y, (y + 1) % 4)
    return frame, y, pred


def test_group_counts_add_up_and_statuses() -> None:
    frame, y, pred = planted()
    report = bias_report(frame, y, pred, min_group_size=30, max_gap_points=5)
    assert set(report.tables) == {"gender", "age_group"} and report.absent == ["race"]
    for attr, table in report.tables.items():
        assert table["n"].sum() == len(y), attr
        assert table["share"].sum() == pytest.approx(1.0)
    age = report.tables["age_group"].set_index("group")
    assert age.loc["unknown", "status"] == STATUS_UNKNOWN and age.loc["unknown", "n"] == 12
    assert age.loc["senior", "n"] < 30 and age.loc["senior", "status"] == STATUS_SMALL
    gender = report.tables["gender"].set_index("group")
    assert gender.loc["female", "status"] == STATUS_GAP and gender.loc["male", "status"] == STATUS_OK
    assert gender.loc["female", "macro_f1_gap_pts"] < -5
    overall = group_metrics(y, pred)
    assert gender.loc["male", "macro_f1_gap_pts"] == pytest.approx(100 * (gender.loc["male", "macro_f1"] - overall["macro_f1"]))
    assert list(report.flagged["group"]) == ["female"]
    cov = report.coverage.set_index("attribute")
    assert cov.loc["gender", "coverage"] == 1.0 and cov.loc["age_group", "n_with_attribute"] == len(y) - 12
    assert cov.loc["race", "n_with_attribute"] == 0


def test_no_gap_when_groups_are_equal() -> None:
    frame, y, _ = planted()
    report = bias_report(frame, y, y.copy())
    assert report.flagged.empty and report.overall["macro_f1"] == 1.0


def test_target_shares_raise_small_groups() -> None:
    groups = np.array(["a"] * 80 + ["b"] * 15 + ["c"] * 5)
    t = target_shares(groups, 0.25).set_index("group")
    assert t.loc["b", "target_share"] == pytest.approx(0.25) and t.loc["c", "target_share"] == pytest.approx(0.25)
    assert t["target_share"].sum() == pytest.approx(1.0) and t.loc["a", "target_share"] == pytest.approx(0.5)
    # an impossible minimum is capped at an equal share
    t = target_shares(groups, 0.6).set_index("group")
    assert np.allclose(t["target_share"], 1 / 3)


@pytest.mark.parametrize("mode", ["oversample", "reweight", "both"])
def test_mitigation_reaches_target_share(mode: str) -> None:
    frame = pd.DataFrame({"age_group": ["young"] * 70 + ["middle"] * 22 + ["senior"] * 8})
    plan = plan_mitigation(frame, mode, "age_group", 0.25, seed=0)
    shares = plan.shares.set_index("group")
    assert shares.loc["senior", "effective_share"] == pytest.approx(0.25, abs=0.01)
    assert shares.loc["middle", "effective_share"] == pytest.approx(0.25, abs=0.01)
    assert shares["effective_share"].sum() == pytest.approx(1.0)
    assert set(range(100)) <= set(plan.rows.tolist())  # nothing dropped
    if mode == "reweight":
        assert len(plan.rows) == 100 and plan.weights is not None and plan.weights.mean() == pytest.approx(1.0)
    if mode == "oversample":
        assert plan.weights is None and len(plan.rows) > 100
        assert (frame["age_group"].to_numpy()[plan.rows[100:]] != "young").all()


def test_mitigation_off_and_auto_attribute() -> None:
    frame = pd.DataFrame({"gender": ["m"] * 60 + ["f"] * 40, "age_group": ["y"] * 90 + ["s"] * 10})
    assert choose_attribute(frame) == "age_group"
    plan = plan_mitigation(frame, "off", "age_group", 0.25)
    assert not plan.active and len(plan.rows) == 100 and plan.weights is None
    with pytest.raises(ValueError, match="mitigation mode"):
        plan_mitigation(frame, "magic", "age_group", 0.25)


def test_comparison_table_before_after() -> None:
    frame, y, pred = planted()
    table = comparison_table(frame, y, pred, y)
    assert table.iloc[0]["scope"] == "overall" and table.iloc[0]["n"] == len(y)
    assert (table["after_macro_f1"] == 1.0).all()
    g = table[table["scope"] == "gender"].set_index("group")
    assert g["n"].sum() == len(y) and g.loc["female", "delta_macro_f1_pts"] > 30
    off = comparison_table(frame, y, pred, None)
    assert off["after_macro_f1"].isna().all() and off["before_macro_f1"].notna().all()
