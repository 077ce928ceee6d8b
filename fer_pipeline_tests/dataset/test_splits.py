import pandas as pd
import pytest

from fer_pipeline.dataset.splits import assign_splits


def _manifest(n_per_class: dict[str, int], group_size: int = 1) -> pd.DataFrame:
    rows = []
    g = 0
    for label, n in n_per_class.items():
        for i in range(n):
            rows.append({"image_id": f"{label}_{i:04d}", "label": label, "dup_group": g})
            if (i + 1) % group_size == 0:
                g += 1
        g += 1
    return pd.DataFrame(rows)


def test_stratified_proportions_and_folds() -> None:
    m = _manifest({"Angry": 400, "Neutral": 300, "Tired": 200, "Focused": 100})
    s = assign_splits(m, n_folds=10, seed=0)
    for label, grp in s.groupby("label"):
        shares = grp["split"].value_counts(normalize=True)
        assert shares["train"] == pytest.approx(0.70, abs=0.02)
        assert shares["validation"] == pytest.approx(0.15, abs=0.02)
        assert shares["test"] == pytest.approx(0.15, abs=0.02)
    assert (s.loc[s["split"] == "test", "fold"] == -1).all()
    folds = s.loc[s["split"] != "test"].groupby(["label", "fold"]).size().unstack()
    assert folds.shape[1] == 10 and (folds.max(axis=1) - folds.min(axis=1) <= 1).all()  # stratified


def test_duplicate_groups_stay_together() -> None:
    m = _manifest({"Angry": 300, "Neutral": 300}, group_size=3)
    s = assign_splits(m)
    assert (s.groupby("dup_group")["split"].nunique() == 1).all()
    assert (s.groupby("dup_group")["fold"].nunique() == 1).all()


def test_deterministic_and_stable_when_data_grows() -> None:
    m = _manifest({"Angry": 500, "Neutral": 500})
    a = assign_splits(m, seed=0)
    assert a.equals(assign_splits(m.sample(frac=1, random_state=1), seed=0).set_index("image_id")
                    .loc[a["image_id"]].reset_index()[a.columns])
    grown = pd.concat([m, _manifest({"Angry": 5}).assign(image_id=lambda d: "new_" + d["image_id"],
                                                          dup_group=lambda d: d["dup_group"] + 10_000)])
    b = assign_splits(grown, seed=0).set_index("image_id").loc[a["image_id"]]
    moved = (b["split"].to_numpy() != a["split"].to_numpy()).sum()
    assert moved <= 10  # adding 0.5% more images moves only boundary images
    assert not assign_splits(m, seed=1)["split"].equals(a["split"])  # the seed matters


def test_bad_proportions_rejected() -> None:
    with pytest.raises(ValueError, match="proportions"):
        assign_splits(_manifest({"Angry": 10}), {"train": 0.5, "validation": 0.5, "test": 0.5})
