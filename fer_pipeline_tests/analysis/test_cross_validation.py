"""Cross-validation core: fold plans, per-fold table with consistent mean/std, out-of-fold
coverage, folds trained one at a time (as partitions) aggregating to the same table, and folds
of another data version or recipe refused. Training is faked (a deterministic linear model)
except in one real tiny run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fer_pipeline.analysis.cross_validation import (
    METRIC_COLUMNS,
    PROB_COLUMNS,
    CVResult,
    FoldRecipe,
    FoldStore,
    collect_folds,
    plan_folds,
    run_cross_validation,
    summarize_folds,
    train_fold,
)
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml import ArchConfig, TrainConfig
from fer_pipeline.ml.data import Normalization, SplitArrays

TINY = ArchConfig(name="tiny", channels=(8, 16), dropout=0.1)
FAST = TrainConfig(epochs=1, batch_size=32, lr=5e-3, warmup_epochs=0, patience=0, num_threads=2)


def make_pool(n: int = 120, n_stored_folds: int = 10, size: int = 16, seed: int = 0) -> SplitArrays:
    """Pattern faces (4 learnable classes) with round-robin stored folds, like splits.parquet."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([(yy // 2 % 2) * 140.0, (xx // 2 % 2) * 140.0,
                     (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2) * 160.0, np.zeros((size, size))])
    images = np.clip(base[y] + 50 + rng.normal(0, 20, (n, size, size)), 0, 255).astype(np.uint8)
    ids = [f"img{i:04d}" for i in range(n)]
    frame = pd.DataFrame({"image_id": ids, "label": [CLASSES[c] for c in y], "fold": (np.arange(n) // 4) % n_stored_folds,
                          "source": "demo"})
    return SplitArrays(images, y.astype(np.int64), ids, frame)


@dataclass
class FakeResult:
    model: nn.Module
    normalization: Normalization
    best_epoch: int = 1
    history: tuple = (1,)

    def build(self) -> nn.Module:
        return self.model


class CountingTrainer:
    """Stands in for train_model: records calls, returns a fixed linear model (no training)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x_tr, y_tr, x_va, y_va, arch, config, *, sample_weights=None, log=None):
        self.calls.append(len(y_tr))
        torch.manual_seed(len(y_tr))
        model = nn.Sequential(nn.Flatten(), nn.Linear(x_tr.shape[1] * x_tr.shape[2], len(CLASSES)))
        return FakeResult(model.eval(), Normalization.fit(x_tr))


def test_plan_uses_stored_folds_and_next_fold_for_early_stopping() -> None:
    stored = np.repeat(np.arange(10), 5)
    plans = plan_folds(stored)
    assert len(plans) == 10
    for p in plans:
        assert p.held_out_stored_folds == (p.fold,) and p.inner_stored_fold == (p.fold + 1) % 10
        assert set(stored[p.test_rows]) == {p.fold} and set(stored[p.inner_rows]) == {(p.fold + 1) % 10}
        parts = [set(p.train_rows), set(p.inner_rows), set(p.test_rows)]
        assert sum(map(len, parts)) == len(stored) and set().union(*parts) == set(range(len(stored)))
    # every row is held out exactly once across the folds
    assert sorted(np.concatenate([p.test_rows for p in plans])) == list(range(len(stored)))


def test_plan_merges_stored_folds_for_fewer_cv_folds() -> None:
    stored = np.repeat(np.arange(10), 3)
    plans = plan_folds(stored, 3)
    assert [p.held_out_stored_folds for p in plans] == [(0, 3, 6, 9), (1, 4, 7), (2, 5, 8)]
    for p in plans:
        assert p.inner_stored_fold % 3 != p.fold  # early stopping never on the held-out fold
        assert not set(p.test_rows) & (set(p.train_rows) | set(p.inner_rows))
    with pytest.raises(ValueError, match="between 2 and the 10 folds"):
        plan_folds(stored, 11)
    with pytest.raises(ValueError, match="fold -1"):
        plan_folds(np.array([0, 1, -1]))


def test_fold_table_shape_and_consistent_means() -> None:
    pool = make_pool()
    trainer = CountingTrainer()
    cv = run_cross_validation(pool, TINY, FAST, n_cv_folds=5, train_fn=trainer)
    table = cv.table
    assert list(table["fold"]) == ["0", "1", "2", "3", "4", "mean", "std"]
    assert set(METRIC_COLUMNS) <= set(table.columns)
    folds = table.iloc[:5]
    for col in METRIC_COLUMNS:
        assert table.loc[table["fold"] == "mean", col].item() == pytest.approx(folds[col].astype(float).mean())
        assert table.loc[table["fold"] == "std", col].item() == pytest.approx(folds[col].astype(float).std(ddof=1))
        assert folds[col].between(0, 1).all()
    # micro P = R = F1 = accuracy for single-label data
    assert np.allclose(folds["micro_f1"], folds["accuracy"])
    # out-of-fold: every pool image exactly once, probabilities sum to 1
    oof = cv.oof
    assert sorted(oof["image_id"]) == sorted(pool.image_ids)
    assert np.allclose(oof[list(PROB_COLUMNS)].sum(axis=1), 1.0)
    assert folds["n_test"].sum() == len(pool) and len(trainer.calls) == 5


def test_folds_trained_one_by_one_aggregate_to_the_same_table(tmp_path: Path) -> None:
    """What the partitions do (train one fold, store it) and the aggregate (collect the stored
    folds) gives the table of a run over all folds at once."""
    pool = make_pool()
    recipe = FoldRecipe.of("v1", TINY, FAST, n_cv_folds=4)
    store = FoldStore(tmp_path)
    for fold in (3, 1, 0, 2):  # any order, as partitions finish
        store.save(train_fold(pool, fold, TINY, FAST, n_cv_folds=4, run_id=f"run{fold}", train_fn=CountingTrainer()),
                   recipe)
    collected = collect_folds(store, recipe)
    assert collected.complete and [r.fold for r in collected.used] == [0, 1, 2, 3]
    assert [r.run_id for r in collected.used] == ["run0", "run1", "run2", "run3"]
    together = run_cross_validation(pool, TINY, FAST, n_cv_folds=4, train_fn=CountingTrainer())
    aggregated = CVResult(collected.used, 4)
    columns = [c for c in together.table.columns if c not in ("train_seconds", "run_id")]
    pd.testing.assert_frame_equal(aggregated.table[columns], together.table[columns])
    pd.testing.assert_frame_equal(aggregated.oof, together.oof)
    assert store.stored_identity(2) == recipe.identity(2) != recipe.identity(3)


def test_folds_of_another_data_version_or_recipe_are_refused(tmp_path: Path) -> None:
    pool = make_pool()
    store = FoldStore(tmp_path)
    old = FoldRecipe.of("v1", TINY, FAST, n_cv_folds=4)
    for fold in (0, 1, 2):
        store.save(train_fold(pool, fold, TINY, FAST, n_cv_folds=4, train_fn=CountingTrainer()), old)
    current = FoldRecipe.of("v2", TINY, FAST, n_cv_folds=4)
    store.save(train_fold(pool, 1, TINY, FAST, n_cv_folds=4, train_fn=CountingTrainer()), current)
    store.paths(2)[0].write_text("{ truncated")  # a damaged result is refused, not trusted
    collected = collect_folds(store, current)
    assert [r.fold for r in collected.used] == [1] and collected.missing == [3] and not collected.complete
    assert collected.refused[0] == "trained on data version v1, the published data is v2"
    assert collected.refused[2].startswith("unreadable stored result (JSONDecodeError")
    # another fold count or recipe is another cross-validation; execution settings are not
    assert "trained with n_cv_folds 4, now 5" in collect_folds(store, FoldRecipe.of("v2", TINY, FAST,
                                                                                     n_cv_folds=5)).refused[1]
    refused = collect_folds(store, FoldRecipe.of("v2", TINY, replace(FAST, lr=1e-3), n_cv_folds=4)).refused[1]
    assert refused == "trained with another recipe (lr 0.005, now 0.001)"
    same = collect_folds(store, FoldRecipe.of("v2", TINY, replace(FAST, num_threads=1, device="cpu"), n_cv_folds=4))
    assert [r.fold for r in same.used] == [1]


def test_subset_of_folds_and_bad_fold() -> None:
    pool = make_pool()
    cv = run_cross_validation(pool, TINY, FAST, n_cv_folds=3, folds=[1], train_fn=CountingTrainer())
    assert list(cv.table["fold"]) == ["1", "mean", "std"] and cv.table["accuracy"].iloc[2] != cv.table["accuracy"].iloc[2]
    with pytest.raises(ValueError, match="folds \\[5\\] do not exist"):
        run_cross_validation(pool, TINY, FAST, n_cv_folds=3, folds=[5], train_fn=CountingTrainer())
    with pytest.raises(ValueError, match="fold 3 does not exist: the cross-validation has folds 0..2"):
        train_fold(pool, 3, TINY, FAST, n_cv_folds=3, train_fn=CountingTrainer())


def test_summarize_single_fold_std_is_nan() -> None:
    rows = pd.DataFrame([{"fold": 0, "n_test": 10, **{c: 0.5 for c in METRIC_COLUMNS}}])
    table = summarize_folds(rows)
    assert table["fold"].tolist() == ["0", "mean", "std"]
    assert table.loc[1, "accuracy"] == 0.5 and np.isnan(table.loc[2, "accuracy"])


def test_real_tiny_training_run() -> None:
    pool = make_pool(n=96)
    logs: list[str] = []
    cv = run_cross_validation(pool, TINY, FAST, n_cv_folds=2, log=logs.append)
    assert [r.fold for r in cv.folds] == [0, 1] and len(cv.oof) == len(pool)
    assert any("fold 1 of 2 done" in line for line in logs)
    assert (cv.table.iloc[:2]["epochs_run"] == 1).all()
