"""Data checks between stages: great-expectations validations run as Dagster asset checks.

Blocking checks stop downstream assets in the same run when they fail (training on a manifest
with foreign labels or leaked duplicate groups would be meaningless); warnings are reported but
let the run continue. Each check states ``blocking`` and ``warn`` once, in its :class:`GxCheck`
entry, which gives both Dagster's check spec and the result's severity.

The manifest and splits checks audit the run's *candidate* tables inside their asset, before
anything is published (write, audit, publish: :mod:`fer_pipeline.publish`), so they are
declared as the assets' check specs rather than as separate check functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg
import pandas as pd

from fer_pipeline.dataset import pool as pool_core
from fer_pipeline.quality import validation
from fer_pipeline.faces.stage import framing_shares
from fer_pipeline.sources.inventory import DECODED
from fer_pipeline.publish import empty_pool
from fer_pipeline.defs.metadata import md_table
from fer_pipeline.defs.resources import FerSettings


@dataclass(frozen=True)
class Tables:
    """What the checks of one stage look at: the run's candidate tables (and the inventory)."""

    kept: pd.DataFrame
    excluded: pd.DataFrame | None = None
    inventory: pd.DataFrame | None = None
    splits: pd.DataFrame | None = None
    pool: pd.DataFrame | None = None  # the pretraining pool (None: not this stage's concern)
    unlabelled: pd.DataFrame | None = None  # images with no class yet (role: unlabelled sources)

    def splits_with_labels(self) -> pd.DataFrame:
        assert self.splits is not None
        return self.splits.merge(self.kept[["image_id", "label", "dup_group"]], on="image_id", how="left")


Validate = Callable[[Tables, FerSettings], validation.ValidationOutcome]


def duplicate_rule(fer: FerSettings) -> pool_core.DuplicateRule:
    """The manifest's de-duplication settings, as the pool's leakage guard applies them."""
    return pool_core.DuplicateRule(fer.phash_max_distance, fer.match_mirrored, fer.min_correlation, fer.view_rule)


def _pool_leakage(t: Tables, fer: FerSettings) -> validation.ValidationOutcome:
    """Recompute, from the candidate pool, manifest and splits, which pool images duplicate a
    four-class image (any split): the guard's own output is not trusted."""
    assert t.splits is not None
    pool = t.pool if t.pool is not None else empty_pool()
    rule = duplicate_rule(fer)
    matches = pool_core.find_heldout_duplicates(pool, t.kept, t.splits, fer.paths.root, rule)
    return validation.validate_pool_leakage(matches, {"heldout_images": int(t.splits["split"].isin(
        pool_core.HELDOUT_SPLITS).sum()), "phash_max_distance": rule.max_distance,
        "match_mirrored": rule.match_mirrored, "min_correlation": rule.min_correlation})


@dataclass(frozen=True)
class GxCheck:
    """One GX validation as a Dagster check: how a failure is treated is stated here only."""

    name: str
    description: str
    validate: Validate
    blocking: bool = False
    warn: bool = False  # severity WARN instead of ERROR

    def spec(self, asset: str) -> dg.AssetCheckSpec:
        prefix = "GX (warning)" if self.warn else "GX"
        return dg.AssetCheckSpec(self.name, asset=asset, blocking=self.blocking,
                                 description=f"{prefix}: {self.description}")

    def evaluate(self, tables: Tables, fer: FerSettings) -> dg.AssetCheckResult:
        outcome = self.validate(tables, fer)
        return dg.AssetCheckResult(
            check_name=self.name, passed=outcome.success,
            severity=dg.AssetCheckSeverity.WARN if self.warn else dg.AssetCheckSeverity.ERROR,
            metadata={**outcome.to_metadata(), "blocking": self.blocking})


MANIFEST_CHECKS: tuple[GxCheck, ...] = (
    GxCheck("manifest_schema", "labels in the four classes, no nulls in key columns, unique image_id.",
            lambda t, fer: validation.validate_manifest_schema(t.kept), blocking=True),
    GxCheck("manifest_image_size", "every processed face has the configured size.",
            lambda t, fer: validation.validate_image_size(t.kept, (fer.image_size, fer.image_size)), blocking=True),
    GxCheck("manifest_class_counts", "each class has at least the minimum count.",
            lambda t, fer: validation.validate_class_counts(t.kept, fer.min_images_per_class), blocking=True),
    GxCheck("manifest_class_balance", "largest/smallest class ratio within the limit.",
            lambda t, fer: validation.validate_class_balance(t.kept, fer.max_imbalance_ratio), warn=True),
    GxCheck("manifest_accounting", "inputs = kept + not kept + pretraining pool + unlabelled; no file in two "
            "tables, none listed twice.",
            lambda t, fer: validation.validate_accounting(t.inventory, t.kept, t.excluded, t.pool, t.unlabelled),
            blocking=True),
)

SPLIT_CHECKS: tuple[GxCheck, ...] = (
    GxCheck("split_proportions", "split shares within tolerance of the targets.",
            lambda t, fer: validation.validate_split_proportions(t.splits_with_labels(), fer.split_proportions,
                                                                 fer.split_tolerance)),
    GxCheck("split_no_group_leakage", "no duplicate group spans two splits.",
            lambda t, fer: validation.validate_no_group_leakage(t.splits_with_labels()), blocking=True),
    GxCheck("split_folds", "folds 0..k-1 on train+validation, -1 on test.",
            lambda t, fer: validation.validate_folds(t.splits_with_labels(), fer.n_folds), blocking=True),
    GxCheck("pool_no_heldout_duplicates", "no pretraining-pool image duplicates (exactly, nearly or mirrored, by the "
            "manifest's de-duplication rule) a four-class image of any split.", _pool_leakage, blocking=True),
)


def check_specs(checks: Sequence[GxCheck], asset: str) -> list[dg.AssetCheckSpec]:
    return [c.spec(asset) for c in checks]


def run_checks(checks: Sequence[GxCheck], tables: Tables, fer: FerSettings) -> list[dg.AssetCheckResult]:
    return [c.evaluate(tables, fer) for c in checks]


def blocking_failures(checks: Sequence[GxCheck], results: Sequence[dg.AssetCheckResult]) -> list[str]:
    """Names of the blocking checks that failed (the candidate must not be published)."""
    blocking = {c.name for c in checks if c.blocking}
    return [r.check_name for r in results if r.check_name in blocking and not r.passed]


def results_json(results: Sequence[dg.AssetCheckResult]) -> dict[str, dict[str, object]]:
    """Check results as plain JSON, kept beside the candidate they judged."""
    return {r.check_name: {"passed": r.passed, "severity": r.severity.value,
                           "metadata": {k: getattr(v, "value", v) for k, v in (r.metadata or {}).items()}}
            for r in results}


# -- checks on stage tables that are not published (separate check functions) -------------------


@dg.asset_check(asset="raw_sources", blocking=True,
                description="Every catalogued source holds at least one image to decode (for the four classes, "
                            "the pretraining pool or review as unlabelled images).")
def sources_have_images(fer: FerSettings) -> dg.AssetCheckResult:
    inv = pd.read_parquet(fer.paths.raw_inventory)
    per_source = inv[inv["status"].isin(list(DECODED))].groupby("source").size()
    # the catalogue, not the inventory, says which sources exist: an empty folder has no rows at all
    names = [s.name for s in fer.catalog().sources]
    empty = [name for name in names if name not in per_source.index]
    return dg.AssetCheckResult(passed=len(per_source) > 0 and not empty,
                               metadata={"candidates_per_source": {k: int(v) for k, v in per_source.items()},
                                         "sources_without_candidates": empty})


@dg.asset_check(asset="faces", description="Warn when more than 20% of the candidates are rejected.")
def rejection_rate(fer: FerSettings) -> dg.AssetCheckResult:
    table = pd.read_parquet(fer.paths.faces_table)
    rate = float(table["reason"].notna().mean()) if len(table) else 0.0
    return dg.AssetCheckResult(passed=rate <= 0.20, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"rejected_share": round(rate, 4)})


@dg.asset_check(asset="faces", description="Warn when a 'faces: detect' source looks framed the wrong way: more "
                "than framing_max_share of its images with no face, with several faces (unless it keeps all "
                "faces), or with a face that fills the frame (crops configured as photos).")
def face_framing(fer: FerSettings) -> dg.AssetCheckResult:
    shares = framing_shares(pd.read_parquet(fer.paths.faces_table))
    limit = fer.framing_max_share
    keep_all = {s.name for s in fer.catalog().sources if s.detect is not None and s.detect.keep_all}
    columns = ["no_face_share", "several_faces_share", "fills_frame_share"]
    flagged = {row.source: {c: float(getattr(row, c)) for c in columns if getattr(row, c) > limit
                            and not (c == "several_faces_share" and row.source in keep_all)}  # expected there
               for row in shares.itertuples(index=False)}
    flagged = {source: over for source, over in flagged.items() if over}
    return dg.AssetCheckResult(passed=not flagged, severity=dg.AssetCheckSeverity.WARN, metadata={
        "sources_flagged": dg.MetadataValue.json(flagged),
        "per_source": md_table(shares),
        "detect_sources": len(shares),
        "framing_max_share": limit,
        "hint": "a flagged source is probably configured with the wrong framing: 'faces: crop' for face crops, "
                "'detect: {keep: all}' for photos of several people",
    })


DATA_CHECKS = [sources_have_images, rejection_rate, face_framing]
