"""The audited half of the data stages as software-defined assets: manifest → splits → plots.
``manifest`` and ``splits`` write the run's tables as a candidate, audit it with their checks and
publish the set only when every blocking check passed (the protocol is :mod:`fer_pipeline.publish`).
The pretraining pool rides along: built by ``manifest``, guarded against every four-class image
and published by ``splits``; so do the unlabelled images (``role: unlabelled`` sources: no class
yet) that no review has labelled, which the review queue ranks. The stages before (sources → faces → de-duplicated) are
:mod:`.ingest`."""


import time
from collections.abc import Sequence

import dagster as dg
import pandas as pd

from fer_pipeline.dataset import pool as pool_core
from fer_pipeline.dataset.manifest import (
    ITEM,
    accounting_items,
    apply_relabels,
    apply_reviews,
    build_manifest,
    build_unlabelled,
    check_accounting,
    exclude_flagged,
    read_relabels,
    split_unlabelled,
)
from fer_pipeline.dataset.splits import assign_splits, split_summary
from fer_pipeline.atomic import write_csv
from fer_pipeline.defs.assets.ingest import GROUP, INGEST_ASSETS, deduplicated_faces, faces, raw_sources
from fer_pipeline.defs.assets.review import label_studio_annotations, label_studio_reviews
from fer_pipeline.defs.checks import (
    MANIFEST_CHECKS,
    SPLIT_CHECKS,
    GxCheck,
    Tables,
    blocking_failures,
    check_specs,
    duplicate_rule,
    results_json,
    run_checks,
)
from fer_pipeline.defs.metadata import counts, md_image, md_table
from fer_pipeline.defs.resources import FerSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.publish import POOL as POOL_TABLE
from fer_pipeline.publish import UNLABELLED as UNLABELLED_TABLE
from fer_pipeline.publish import (
    Candidate,
    data_version,
    manifest_version,
    pool_content_version,
    publish_unless_rejected,
    record_audit,
)
from fer_pipeline.quality import plots
from fer_pipeline.quality.flags import flag_stored_faces
from fer_pipeline.schema import DEMOGRAPHIC_ATTRIBUTES, SPLIT_COLUMNS


def _audit(context: dg.AssetExecutionContext, fer: FerSettings, candidate: Candidate, stage: str,
           checks: Sequence[GxCheck], tables: Tables) -> tuple[list[dg.AssetCheckResult], list[str]]:
    """Run a stage's checks on the run's candidate (the audit of write-audit-publish, whose
    protocol is :mod:`fer_pipeline.publish`); returns the results and the names of the failed
    blocking checks (then nothing may be published)."""
    results = run_checks(checks, tables, fer)
    failed = blocking_failures(checks, results)
    record_audit(candidate, stage, results_json(results), failed)
    if failed:
        context.log.error(f"{stage} candidate rejected ({', '.join(failed)}): nothing is published; the candidate "
                          f"and its check results stay in {candidate.dir}")
    return results, failed


@fer_asset(group_name=GROUP, deps=[deduplicated_faces, label_studio_reviews],
          description="The run's candidate manifest (kept images), excluded table (every file not kept, with "
                      "reason) and unlabelled table (images with no class yet), with the reviewers' decisions applied (reviews/reviews.parquet), audited by the manifest checks; `splits` publishes them once every blocking check "
                      "has passed.",
          check_specs=check_specs(MANIFEST_CHECKS, "manifest"))
def manifest(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    start = time.perf_counter()
    inv = pd.read_parquet(paths.raw_inventory)
    faces_table = pd.read_parquet(paths.faces_table)
    dedup_table = pd.read_parquet(paths.dedup_table)
    size = (fer.image_size, fer.image_size)
    kept, excluded = build_manifest(inv, faces_table, dedup_table, size)
    unlabelled = build_unlabelled(dedup_table, size)  # images with no class yet: review may give them one
    pool, pool_excluded = pool_core.build_pool(inv, faces_table, size)  # guarded by `splits`, once splits exist
    if len(pool_excluded):
        excluded = pd.concat([excluded, pool_excluded], ignore_index=True).sort_values(ITEM, kind="mergesort")
        excluded = excluded.reset_index(drop=True)
    # people's reviews (Label Studio, pulled by label_studio_reviews): relabels and exclusions, with provenance
    reviews = pd.read_parquet(paths.reviews) if paths.reviews.is_file() else None
    # (a class decision on an unlabelled image moves it into the manifest, an exclusion to excluded)
    rows = pd.concat([kept, unlabelled], ignore_index=True) if len(unlabelled) else kept
    rows, excluded, review_report = apply_reviews(rows, excluded, reviews)
    kept, unlabelled = split_unlabelled(rows)
    if len(review_report) or paths.report("review_outcomes").is_file():
        write_csv(paths.report("review_outcomes"), review_report)
    stale = review_report[~review_report["applied"]] if len(review_report) else review_report
    for outcome, n in stale["outcome"].value_counts().items():
        context.log.warning(f"{n} review(s) {outcome} (see {paths.report('review_outcomes')})")
    # user corrections (e.g. from the label_issues report); recorded in column relabelled_from (applied last: wins)
    kept, relabels = apply_relabels(kept, read_relabels(paths.relabels))
    # image-quality flags the settings exclude (fer.exclude_flags; none by default: flags go to review)
    quality_moved = kept.iloc[:0]
    if fer.exclude_flags:
        found = flag_stored_faces(paths.root, kept, face_check=fer.face_check_rule,
                                  face_check_cache=fer.face_check_cache())
        kept, excluded, quality_moved = exclude_flagged(kept, excluded, found, fer.exclude_flags)
    items = accounting_items(inv, faces_table)  # each file, and each further face of a `keep: all` photo
    accounting = check_accounting(items, kept, excluded, pool, unlabelled)
    version = manifest_version(kept, excluded, pool, unlabelled)
    candidate = Candidate(paths, context.run.run_id)
    candidate.write("manifest", kept, {"manifest_version": version, "run_id": context.run.run_id})
    candidate.write("excluded", excluded, {"manifest_version": version, "run_id": context.run.run_id})
    candidate.write(POOL_TABLE, pool, {"manifest_version": version, "run_id": context.run.run_id})
    candidate.write(UNLABELLED_TABLE, unlabelled, {"manifest_version": version, "run_id": context.run.run_id})
    tables = Tables(kept, excluded, items, pool=pool, unlabelled=unlabelled)
    results, failed = _audit(context, fer, candidate, "manifest", MANIFEST_CHECKS, tables)
    by_class_source = kept.pivot_table(index="label", columns="source", values="image_id", aggfunc="count",
                                       fill_value=0)
    coverage = {attr: int(kept[attr].notna().sum()) for attr in DEMOGRAPHIC_ATTRIBUTES}
    excl_reasons = excluded["reason"].map(plots.reason_category)
    metadata: dict[str, object] = {
        "dagster/row_count": len(kept),
        "kept": len(kept),
        "excluded": len(excluded),
        "pool_before_guard": len(pool),
        "pool_by_source_and_label": md_table(pool_core.pool_summary(pool)),
        "unlabelled": len(unlabelled),
        "unlabelled_by_source": counts(unlabelled["source"]),
        "inputs": accounting["n_inputs"],
        "input_files": len(inv),
        "by_framing": counts(kept["framing"]),
        "accounting_balanced": bool(accounting["balanced"]),
        "by_class": counts(kept["label"]),
        "by_class_and_source": md_table(by_class_source.reset_index()),
        "excluded_by_stage": counts(excluded["stage"]),
        "excluded_by_reason": counts(excl_reasons),
        "demographics_coverage": coverage,
        "preview": md_table(kept[["image_id", "source", "source_path", "label", "gender", "age_group"]], 10),
        "relabels_applied": int(relabels["applied"].sum()),
        "reviewed_images": int(kept["review_source"].notna().sum()) + int((excluded["stage"] == "review").sum()),
        "reviews_by_outcome": counts(review_report["outcome"]),
        "reviews_not_applied": md_table(stale, 30),
        "exclude_flags": ", ".join(fer.exclude_flags) or "none (flagged faces stay; see data_quality_flags)",
        "excluded_by_quality_flags": len(quality_moved),
        "relabels": md_table(relabels, 50),
        "manifest_version": version,
        "candidate": dg.MetadataValue.path(str(candidate.dir)),
        "publication": ("rejected: " + ", ".join(failed)) if failed else "pending: splits publishes the set when "
                                                                         "its checks pass",
        "manifest_path": dg.MetadataValue.path(str(paths.manifest)),
        "excluded_path": dg.MetadataValue.path(str(paths.excluded)),
        "unlabelled_path": dg.MetadataValue.path(str(paths.unlabelled)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return dg.MaterializeResult(metadata=metadata, check_results=results, data_version=dg.DataVersion(version))


# Splits depend on every earlier stage directly (they are a function of the whole data half),
# so `dagster asset materialize --select '+splits'` rebuilds the data half from the sources.
@fer_asset(group_name=GROUP, deps=[manifest, deduplicated_faces, faces, raw_sources],
          description="Stratified train/validation/test split (duplicate groups kept together) + CV folds; "
                      "audited, then publishes manifest, excluded and splits together.",
          check_specs=check_specs(SPLIT_CHECKS, "splits"))
def splits(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    candidate = Candidate(paths, context.run.run_id)
    if not candidate.has("manifest"):  # splits materialized alone: re-split the published manifest
        candidate.adopt_published()
    kept = candidate.read("manifest")
    version = candidate.meta("manifest")["manifest_version"]
    table = assign_splits(kept, fer.split_proportions, fer.n_folds, fer.split_seed)[list(SPLIT_COLUMNS)]
    split_version = data_version(kept, table)
    run_meta = {"manifest_version": version, "run_id": context.run.run_id}
    # leakage guard: pool images that duplicate a four-class image move to excluded
    guard = pool_core.leakage_guard(candidate.read(POOL_TABLE), kept, table, paths.root, duplicate_rule(fer))
    if len(guard.excluded):
        excluded = pd.concat([candidate.read("excluded"), guard.excluded], ignore_index=True)
        candidate.write("excluded", excluded.sort_values(ITEM, kind="mergesort").reset_index(drop=True), run_meta)
    pool = guard.pool
    pool_version = pool_content_version(pool)
    candidate.write(POOL_TABLE, pool, {**run_meta, "data_version": split_version, "pool_version": pool_version})
    candidate.write("splits", table, {**run_meta, "data_version": split_version})
    results, failed = _audit(context, fer, candidate, "splits", SPLIT_CHECKS, Tables(kept, splits=table, pool=pool))
    publication = publish_unless_rejected(candidate, failed)
    summary = split_summary(table.merge(kept[["image_id", "label"]], on="image_id"))
    hints = kept[["image_id", "split_hint"]].merge(table[["image_id", "split"]], on="image_id")
    hints = hints[hints["split_hint"].notna()]
    agreement = float((hints["split_hint"] == hints["split"]).mean()) if len(hints) else None
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(table),
        "by_split": counts(table["split"]),
        "class_by_split": md_table(summary.reset_index()),
        "folds": counts(table.loc[table["fold"] >= 0, "fold"]),
        "seed": fer.split_seed,
        "images_with_source_split_hint": len(hints),
        "share_matching_source_split_hint": agreement,
        "manifest_version": version,
        "data_version": split_version,
        "pool_images": len(pool),
        "pool_by_source_and_label": md_table(pool_core.pool_summary(pool)),
        "pool_version": pool_version,
        "pool_dropped_by_leakage_guard": len(guard.excluded),
        "pool_dropped_examples": md_table(guard.matches[["source", "source_path", "pool_label", "duplicate_of",
                                                         "duplicate_split"]], 10),
        "publication": publication,
        "path": dg.MetadataValue.path(str(paths.splits)),
        "pool_path": dg.MetadataValue.path(str(paths.pool)),
    }, check_results=results,
        # the data version as Dagster's (four-class data and pool): downstream goes stale only when it changes
        data_version=dg.DataVersion(f"{split_version}-{pool_version}"))


@fer_asset(group_name=GROUP, deps=[manifest, splits],
          description="Class distribution, sample faces, intensity histograms and exclusions, as PNG.")
def data_plots(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    kept = pd.read_parquet(paths.manifest)
    excluded = pd.read_parquet(paths.excluded)
    files = {
        "class_distribution": plots.plot_class_distribution(kept, paths.report("class_distribution")),
        "sample_faces": plots.plot_sample_grid(kept, paths.root, paths.report("sample_faces")),
        "intensity_histograms": plots.plot_intensity_histograms(kept, paths.root, paths.report("intensity_histograms")),
        "exclusions": plots.plot_exclusions(excluded, paths.report("exclusions")),
    }
    metadata: dict[str, object] = {name: md_image(path, name) for name, path in files.items()}
    metadata["files"] = dg.MetadataValue.json({k: str(v) for k, v in files.items()})
    return dg.MaterializeResult(metadata=metadata)


DATA_ASSETS = [*INGEST_ASSETS, label_studio_annotations, label_studio_reviews, manifest, splits, data_plots]
