"""Cross-validation core: fold plans, per-fold table with consistent mean/std, out-of-fold
coverage, subsets and resume (a cached fold is never retrained). Training is faked (a
deterministic linear model) except in one real tiny run."""

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
    plan_folds,
    run_cross_validation,
    summarize_folds,
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


def test_fold_table_shape_and_consistent_means(tmp_path: Path) -> None:
    pool = make_pool()
    trainer = CountingTrainer()
    cv = run_cross_validation(pool, TINY, FAST, data_version="v1", n_cv_folds=5, cache_dir=tmp_path, train_fn=trainer)
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


def test_resume_does_not_retrain_cached_folds(tmp_path: Path) -> None:
    pool = make_pool()
    first = CountingTrainer()
    run_cross_validation(pool, TINY, FAST, data_version="v1", n_cv_folds=4, folds=[0, 2], cache_dir=tmp_path,
                         train_fn=first)
    assert len(first.calls) == 2
    second = CountingTrainer()
    logs: list[str] = []
    cv = run_cross_validation(pool, TINY, FAST, data_version="v1", n_cv_folds=4, cache_dir=tmp_path,
                              train_fn=second, log=logs.append)
    assert len(second.calls) == 2  # only folds 1 and 3 were trained
    assert cv.from_cache == [0, 2] and cv.trained == [1, 3]
    assert sum("reused from cache" in line for line in logs) == 2
    third = CountingTrainer()
    again = run_cross_validation(pool, TINY, FAST, data_version="v1", n_cv_folds=4, cache_dir=tmp_path,
                                 train_fn=third)
    assert third.calls == [] and again.table["from_cache"].iloc[:4].all()
    pd.testing.assert_frame_equal(again.oof, cv.oof)
    # other inputs -> other cache key -> retrained
    fourth = CountingTrainer()
    run_cross_validation(pool, TINY, replace(FAST, lr=1e-3), data_version="v1", n_cv_folds=4, folds=[0],
                         cache_dir=tmp_path, train_fn=fourth)
    run_cross_validation(pool, TINY, FAST, data_version="v2", n_cv_folds=4, folds=[0], cache_dir=tmp_path,
                         train_fn=fourth)
    assert len(fourth.calls) == 2


def test_subset_of_folds_and_bad_fold() -> None:
    pool = make_pool()
    cv = run_cross_validation(pool, TINY, FAST, data_version="v", n_cv_folds=3, folds=[1], train_fn=CountingTrainer())
    assert list(cv.table["fold"]) == ["1", "mean", "std"] and cv.table["accuracy"].iloc[2] != cv.table["accuracy"].iloc[2]
    with pytest.raises(ValueError, match="folds \\[5\\] do not exist"):
        run_cross_validation(pool, TINY, FAST, data_version="v", n_cv_folds=3, folds=[5], train_fn=CountingTrainer())


def test_summarize_single_fold_std_is_nan() -> None:
    rows = pd.DataFrame([{"fold": 0, "n_test": 10, **{c: 0.5 for c in METRIC_COLUMNS}}])
    table = summarize_folds(rows)
    assert table["fold"].tolist() == ["0", "mean", "std"]
    assert table.loc[1, "accuracy"] == 0.5 and np.isnan(table.loc[2, "accuracy"])


def test_real_tiny_training_run(tmp_path: Path) -> None:
    pool = make_pool(n=96)
    logs: list[str] = []
    cv = run_cross_validation(pool, TINY, FAST, data_version="v", n_cv_folds=2, cache_dir=tmp_path, log=logs.append)
    assert cv.trained == [0, 1] and len(cv.oof) == len(pool)
    assert any("fold 1 (2/2) done" in line for line in logs)
    assert (cv.table.iloc[:2]["epochs_run"] == 1).all()
