"""Source confound findings (a planted one-class-one-source confound is flagged, a single source
is not) and leave-one-source-out (tiny real training on two sources; one source = not applicable)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fer_pipeline.analysis.confound import (
    confound_findings,
    per_source_metrics,
    source_share_matrix,
)
from fer_pipeline.analysis.cross_validation import TrainingRecipe
from fer_pipeline.analysis.generalisation import (
    MISSING,
    NOT_APPLICABLE_ONE_SOURCE,
    NOT_IN_DATA,
    LosoStore,
    collect_rows,
    eligibility,
    held_out_row,
    loso_table,
    run_leave_one_source_out,
)
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml import ArchConfig, TrainConfig
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline_tests.analysis.test_cross_validation import CountingTrainer, make_pool

TINY = ArchConfig(name="tiny", channels=(8, 16), dropout=0.1)
FAST = TrainConfig(epochs=1, batch_size=32, lr=5e-3, warmup_epochs=0, patience=0, num_threads=2)


def manifest_with_sources(angry_from_b: int, others_from_b: int, n: int = 50) -> pd.DataFrame:
    rows = []
    for c in CLASSES:
        from_b = angry_from_b if c == "Angry" else others_from_b
        rows += [{"label": c, "source": "b" if i < from_b else "a"} for i in range(n)]
    return pd.DataFrame(rows)


def test_planted_confound_is_flagged() -> None:
    kept = manifest_with_sources(angry_from_b=50, others_from_b=10)  # other classes 80% a, 20% b
    findings = confound_findings(kept, 0.9)
    assert list(findings["label"]) == ["Angry"] and findings.iloc[0]["source"] == "b"
    assert findings.iloc[0]["share"] == 1.0 and findings.iloc[0]["class_share_of_source"] == 50 / 80
    # Angry only from b, the rest (96%) from a: every class is separable by source; Angry first
    strict = confound_findings(manifest_with_sources(angry_from_b=50, others_from_b=2), 0.9)
    assert strict.iloc[0]["label"] == "Angry" and set(strict["label"]) == set(CLASSES)
    shares = source_share_matrix(kept)
    assert np.allclose(shares.sum(axis=1), 1.0) and shares.loc["Angry", "b"] == 1.0


def test_no_confound_for_one_source_or_a_source_dominating_every_class() -> None:
    one = pd.DataFrame({"label": list(CLASSES) * 10, "source": "demo"})
    assert confound_findings(one).empty
    everywhere = manifest_with_sources(angry_from_b=48, others_from_b=47)  # b is 94-96% of every class
    assert confound_findings(everywhere, 0.9).empty
    balanced = manifest_with_sources(angry_from_b=25, others_from_b=25)
    assert confound_findings(balanced).empty


def test_per_source_metrics() -> None:
    frame = pd.DataFrame({"source": ["a"] * 4 + ["b"] * 4})
    y = np.array([0, 1, 2, 3, 0, 0, 3, 3])
    pred = np.array([0, 1, 2, 3, 1, 1, 3, 3])
    table = per_source_metrics(frame, y, pred).set_index("source")
    assert table.loc["a", "accuracy"] == 1.0 and table.loc["b", "accuracy"] == 0.5
    assert table.loc["(all)", "n"] == 8 and table.loc["b", "classes"] == "Neutral, Angry"


def split_arrays(pool: SplitArrays) -> dict[str, SplitArrays]:
    split = np.array(["train", "train", "validation", "test"])[(np.arange(len(pool)) // 4) % 4]
    out = {}
    for name in ("train", "validation", "test"):
        rows = np.flatnonzero(split == name)
        out[name] = SplitArrays(pool.images[rows], pool.labels[rows], [pool.image_ids[i] for i in rows],
                                pool.frame.iloc[rows].reset_index(drop=True))
    return out


def test_leave_one_source_out_tiny_training() -> None:
    pool = make_pool(n=160)
    idx = np.arange(160)  # label = idx % 4, split = (idx // 4) % 4: independent of the source below
    block = (idx // 16) % 5
    src = np.where(block == 3, "b", "a").astype(object)  # b: every class, every split
    src[(block == 4) & (idx % 4 == 3)] = "c"  # c: Angry only
    pool.frame["source"] = src
    arrays = split_arrays(pool)
    status = eligibility(arrays)
    assert status["a"] == "eligible" and status["b"] == "eligible" and status["c"].startswith("skipped: covers 1")
    in_domain = arrays["test"].labels.copy()  # a perfect "main model"
    logs: list[str] = []
    result = run_leave_one_source_out(arrays, TINY, FAST, in_domain_pred=in_domain, log=logs.append)
    table = result.table.set_index("held_out_source")
    assert result.applicable and sorted(result.trained) == ["a", "b"]
    assert table.loc["a", "status"] == "evaluated" and table.loc["c", "status"].startswith("skipped")
    assert table.loc["a", "n_held_out"] == (src == "a").sum()
    assert table.loc["a", "in_domain_macro_f1"] == 1.0
    assert table.loc["b", "gap_macro_f1_pts"] == 100 * (table.loc["b", "loso_macro_f1"] - 1.0)
    assert 0 <= table.loc["b", "loso_macro_f1"] <= 1


def test_leave_one_source_out_not_applicable_with_one_source() -> None:
    arrays = split_arrays(make_pool(n=40))
    calls = []
    result = run_leave_one_source_out(arrays, TINY, FAST, train_fn=lambda *a, **k: calls.append(1))
    assert not result.applicable and calls == []
    assert result.table.iloc[0]["status"] == NOT_APPLICABLE_ONE_SOURCE


def test_held_out_rows_stored_and_collected_like_one_run(tmp_path) -> None:
    """What the partitions do (one row per source, stored with its recipe) and the aggregate
    (collect the rows of the current recipe) gives the table of one run over every source; rows
    of another data version are refused, sources never run are marked missing."""
    pool = make_pool(n=160)
    idx = np.arange(160)
    pool.frame["source"] = np.where((idx // 16) % 5 == 3, "b", "a").astype(object)
    pool.frame.loc[idx >= 150, "source"] = "odd/name with spaces"  # any name a catalogue allows
    arrays = split_arrays(pool)
    status = eligibility(arrays)
    in_domain = arrays["test"].labels.copy()
    fake = CountingTrainer()
    recipe = TrainingRecipe.of("v1", TINY, FAST)
    store = LosoStore(tmp_path)
    assert set(status.values()) == {"eligible"}
    for source in sorted(status, reverse=True):  # any order, as partitions finish
        store.save(held_out_row(arrays, source, TINY, FAST, run_id=f"run-{source}", train_fn=fake), recipe)
    assert store.path("odd/name with spaces").name.startswith("odd_name_with_spaces-")
    collected = collect_rows(store, status, recipe)
    assert collected.complete
    expected = run_leave_one_source_out(arrays, TINY, FAST, in_domain_pred=in_domain, train_fn=CountingTrainer())
    table = loso_table(collected.rows, arrays["test"], in_domain)
    pd.testing.assert_frame_equal(table.drop(columns="run_id"), expected.table.drop(columns="run_id"))
    assert table.set_index("held_out_source").loc["a", "run_id"] == "run-a"
    # the data changed: the stored rows are refused, an unknown source is not in the data
    later = collect_rows(store, status, TrainingRecipe.of("v2", TINY, FAST))
    assert later.refused == {s: "trained on data version v1, the published data is v2" for s in status}
    assert later.rows[0]["status"] == "refused: trained on data version v1, the published data is v2"
    store.path("b").unlink()
    assert collect_rows(store, {"a": "eligible", "b": "eligible"}, recipe).missing == ["b"]
    assert collect_rows(store, {"b": "eligible"}, recipe).rows == [{"held_out_source": "b", "status": MISSING}]
    assert held_out_row(arrays, "nowhere", TINY, FAST, train_fn=fake)["status"] == NOT_IN_DATA
