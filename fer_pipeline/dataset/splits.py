"""Train/validation/test splits, stratified by class, whole duplicate groups on one side, plus
stratified cross-validation folds over train+validation.

Deterministic *and stable*: within each class, groups are ordered by a seeded hash of their
group key (not by a random permutation), then cut at the target proportions. The same inputs
give the same splits, and adding images to a source moves only a handful of existing images
across a boundary instead of reshuffling everything.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from fer_pipeline.schema import SPLITS, TEST_FOLD


def _stable_rank(keys: pd.Series, seed: int) -> np.ndarray:
    return np.array([int(hashlib.sha1(f"{seed}:{k}".encode()).hexdigest()[:15], 16) for k in keys])


def assign_splits(manifest: pd.DataFrame, proportions: dict[str, float] | None = None, n_folds: int = 10,
                  seed: int = 0, group_column: str = "dup_group_key") -> pd.DataFrame:
    """Return ``image_id, split, fold, label, dup_group`` for every manifest row.

    ``group_column`` (default: derived from ``dup_group``'s members' image ids) keeps a group
    together; a group's class is its first member's class (groups are single-label by then).
    """
    proportions = proportions or {"train": 0.70, "validation": 0.15, "test": 0.15}
    if set(proportions) != set(SPLITS) or abs(sum(proportions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split proportions must give train, validation, test summing to 1: {proportions}")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    df = manifest[["image_id", "label", "dup_group"]].copy()
    # a group key that does not depend on the arbitrary dup_group numbering: its smallest image id
    if group_column == "dup_group_key":
        df["dup_group_key"] = df.groupby("dup_group")["image_id"].transform("min")
    groups = df.groupby(group_column).agg(label=("label", "first"), size=("image_id", "size")).reset_index()
    groups["rank"] = _stable_rank(groups[group_column], seed)
    groups = groups.sort_values(["label", "rank"], kind="mergesort")
    cut_train = proportions["train"]
    cut_val = cut_train + proportions["validation"]
    split_of: dict[object, str] = {}
    fold_of: dict[object, int] = {}
    for _, g in groups.groupby("label", sort=True):
        total = g["size"].sum()
        # position of each group's centre in the class's cumulative image count
        centre = (g["size"].cumsum() - g["size"] / 2) / total
        labels = np.where(centre < cut_train, "train", np.where(centre < cut_val, "validation", "test"))
        k = 0
        for key, split in zip(g[group_column], labels):
            split_of[key] = str(split)
            if split == "test":
                fold_of[key] = TEST_FOLD
            else:
                fold_of[key] = k % n_folds  # round-robin over the hash order: stratified folds
                k += 1
    df["split"] = df[group_column].map(split_of)
    df["fold"] = df[group_column].map(fold_of).astype("int64")
    return df[["image_id", "split", "fold", "label", "dup_group"]].reset_index(drop=True)


def split_summary(splits: pd.DataFrame) -> pd.DataFrame:
    """Counts per class and split (a table for the UI)."""
    table = splits.pivot_table(index="label", columns="split", values="image_id", aggfunc="count", fill_value=0)
    return table.reindex(columns=list(SPLITS), fill_value=0)
