"""Data checks between stages: great-expectations validations run as Dagster asset checks.

Blocking checks stop downstream assets in the same run when they fail (training on a
manifest with foreign labels or leaked duplicate groups would be meaningless); warnings are
reported but let the run continue. Each result carries GX's findings as check metadata.
"""


import dagster as dg
import pandas as pd

from fer_pipeline import validation
from fer_pipeline.assets.data import faces, manifest, raw_sources, splits
from fer_pipeline.resources import FerSettings


def _result(outcome: validation.ValidationOutcome, warn: bool = False, **extra: object) -> dg.AssetCheckResult:
    severity = dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR
    return dg.AssetCheckResult(passed=outcome.success, severity=severity,
                               metadata={**outcome.to_metadata(), **extra})


@dg.asset_check(asset=raw_sources, blocking=True, description="Sources hold at least one image to decode.")
def sources_have_images(fer: FerSettings) -> dg.AssetCheckResult:
    inv = pd.read_parquet(fer.paths.raw_inventory)
    per_source = inv[inv["status"] == "candidate"].groupby("source").size()
    empty = sorted(set(inv["source"]) - set(per_source.index))
    return dg.AssetCheckResult(passed=len(per_source) > 0 and not empty,
                               metadata={"candidates_per_source": {k: int(v) for k, v in per_source.items()},
                                         "sources_without_candidates": empty})


@dg.asset_check(asset=faces, description="Warn when more than 20% of the candidates are rejected.")
def rejection_rate(fer: FerSettings) -> dg.AssetCheckResult:
    table = pd.read_parquet(fer.paths.faces_table)
    rate = float(table["reason"].notna().mean()) if len(table) else 0.0
    return dg.AssetCheckResult(passed=rate <= 0.20, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"rejected_share": round(rate, 4)})


@dg.asset_check(asset=manifest, blocking=True,
                description="GX: labels in the four classes, no nulls in key columns, unique image_id.")
def manifest_schema(fer: FerSettings) -> dg.AssetCheckResult:
    return _result(validation.validate_manifest_schema(pd.read_parquet(fer.paths.manifest)))


@dg.asset_check(asset=manifest, blocking=True, description="GX: every processed face has the configured size.")
def manifest_image_size(fer: FerSettings) -> dg.AssetCheckResult:
    kept = pd.read_parquet(fer.paths.manifest)
    return _result(validation.validate_image_size(kept, (fer.image_size, fer.image_size)))


@dg.asset_check(asset=manifest, blocking=True, description="GX: each class has at least the minimum count.")
def manifest_class_counts(fer: FerSettings) -> dg.AssetCheckResult:
    kept = pd.read_parquet(fer.paths.manifest)
    return _result(validation.validate_class_counts(kept, fer.min_images_per_class))


@dg.asset_check(asset=manifest, description="GX (warning): largest/smallest class ratio within the limit.")
def manifest_class_balance(fer: FerSettings) -> dg.AssetCheckResult:
    kept = pd.read_parquet(fer.paths.manifest)
    return _result(validation.validate_class_balance(kept, fer.max_imbalance_ratio), warn=True)


@dg.asset_check(asset=manifest, blocking=True,
                description="GX: inputs = kept + not kept; no file kept and excluded, none listed twice.")
def manifest_accounting(fer: FerSettings) -> dg.AssetCheckResult:
    paths = fer.paths
    inv = pd.read_parquet(paths.raw_inventory, columns=["source", "source_path"])
    kept = pd.read_parquet(paths.manifest)
    excluded = pd.read_parquet(paths.excluded)
    return _result(validation.validate_accounting(inv, kept, excluded))


def _splits_with_labels(fer: FerSettings) -> pd.DataFrame:
    paths = fer.paths
    kept = pd.read_parquet(paths.manifest, columns=["image_id", "label", "dup_group"])
    return pd.read_parquet(paths.splits).merge(kept, on="image_id", how="left")


@dg.asset_check(asset=splits, description="GX: split shares within tolerance of the targets.")
def split_proportions(fer: FerSettings) -> dg.AssetCheckResult:
    return _result(validation.validate_split_proportions(_splits_with_labels(fer), fer.split_proportions,
                                                         fer.split_tolerance))


@dg.asset_check(asset=splits, blocking=True, description="GX: no duplicate group spans two splits.")
def split_no_group_leakage(fer: FerSettings) -> dg.AssetCheckResult:
    return _result(validation.validate_no_group_leakage(_splits_with_labels(fer)))


@dg.asset_check(asset=splits, blocking=True, description="GX: folds 0..k-1 on train+validation, -1 on test.")
def split_folds(fer: FerSettings) -> dg.AssetCheckResult:
    return _result(validation.validate_folds(_splits_with_labels(fer), fer.n_folds))


DATA_CHECKS = [sources_have_images, rejection_rate, manifest_schema, manifest_image_size, manifest_class_counts,
               manifest_class_balance, manifest_accounting, split_proportions, split_no_group_leakage, split_folds]
