"""Data checks between stages: great-expectations validations run as Dagster asset checks.

Blocking checks stop downstream assets in the same run when they fail (training on a
manifest with foreign labels or leaked duplicate groups would be meaningless); warnings are
reported but let the run continue. Each GX check says ``blocking`` and ``warn`` once, in its
:func:`_gx_check` decorator, which feeds both Dagster's check spec and the result's severity;
each result carries GX's findings as check metadata.
"""

from collections.abc import Callable

import dagster as dg
import pandas as pd

from fer_pipeline.dataset import validation
from fer_pipeline.defs.assets.data import faces, manifest, raw_sources, splits
from fer_pipeline.defs.resources import FerSettings

_Validate = Callable[[FerSettings], validation.ValidationOutcome]


def _gx_check(asset: dg.AssetsDefinition, description: str, *, blocking: bool = False,
              warn: bool = False) -> Callable[[_Validate], dg.AssetChecksDefinition]:
    """Turn ``validate(fer) -> ValidationOutcome`` into an asset check named after it.

    ``blocking`` and ``warn`` (severity WARN instead of ERROR) are the one statement of how a
    failure is treated: the spec, the severity, the description and the metadata follow them.
    """
    severity = dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR
    description = f"GX{' (warning)' if warn else ''}: {description}"

    def decorate(validate: _Validate) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=asset, name=validate.__name__, blocking=blocking, description=description)
        def check(fer: FerSettings) -> dg.AssetCheckResult:
            outcome = validate(fer)
            return dg.AssetCheckResult(passed=outcome.success, severity=severity,
                                       metadata={**outcome.to_metadata(), "blocking": blocking})

        return check

    return decorate


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


@_gx_check(manifest, "labels in the four classes, no nulls in key columns, unique image_id.", blocking=True)
def manifest_schema(fer: FerSettings) -> validation.ValidationOutcome:
    return validation.validate_manifest_schema(pd.read_parquet(fer.paths.manifest))


@_gx_check(manifest, "every processed face has the configured size.", blocking=True)
def manifest_image_size(fer: FerSettings) -> validation.ValidationOutcome:
    kept = pd.read_parquet(fer.paths.manifest)
    return validation.validate_image_size(kept, (fer.image_size, fer.image_size))


@_gx_check(manifest, "each class has at least the minimum count.", blocking=True)
def manifest_class_counts(fer: FerSettings) -> validation.ValidationOutcome:
    return validation.validate_class_counts(pd.read_parquet(fer.paths.manifest), fer.min_images_per_class)


@_gx_check(manifest, "largest/smallest class ratio within the limit.", warn=True)
def manifest_class_balance(fer: FerSettings) -> validation.ValidationOutcome:
    return validation.validate_class_balance(pd.read_parquet(fer.paths.manifest), fer.max_imbalance_ratio)


@_gx_check(manifest, "inputs = kept + not kept; no file kept and excluded, none listed twice.", blocking=True)
def manifest_accounting(fer: FerSettings) -> validation.ValidationOutcome:
    paths = fer.paths
    inv = pd.read_parquet(paths.raw_inventory, columns=["source", "source_path"])
    return validation.validate_accounting(inv, pd.read_parquet(paths.manifest), pd.read_parquet(paths.excluded))


def _splits_with_labels(fer: FerSettings) -> pd.DataFrame:
    paths = fer.paths
    kept = pd.read_parquet(paths.manifest, columns=["image_id", "label", "dup_group"])
    return pd.read_parquet(paths.splits).merge(kept, on="image_id", how="left")


@_gx_check(splits, "split shares within tolerance of the targets.")
def split_proportions(fer: FerSettings) -> validation.ValidationOutcome:
    return validation.validate_split_proportions(_splits_with_labels(fer), fer.split_proportions,
                                                 fer.split_tolerance)


@_gx_check(splits, "no duplicate group spans two splits.", blocking=True)
def split_no_group_leakage(fer: FerSettings) -> validation.ValidationOutcome:
    return validation.validate_no_group_leakage(_splits_with_labels(fer))


@_gx_check(splits, "folds 0..k-1 on train+validation, -1 on test.", blocking=True)
def split_folds(fer: FerSettings) -> validation.ValidationOutcome:
    return validation.validate_folds(_splits_with_labels(fer), fer.n_folds)


DATA_CHECKS = [sources_have_images, rejection_rate, manifest_schema, manifest_image_size, manifest_class_counts,
               manifest_class_balance, manifest_accounting, split_proportions, split_no_group_leakage, split_folds]
