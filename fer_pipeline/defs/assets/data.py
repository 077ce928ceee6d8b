"""The data half as software-defined assets: sources → faces → de-duplicated → manifest →
splits → plots. Each asset reads its upstream's Parquet file under the data root, calls one
core module, writes its own file atomically and reports what a user would look at."""


import time

import dagster as dg
import pandas as pd

from fer_pipeline.atomic import write_parquet
from fer_pipeline.dataset import dedup as dedup_core
from fer_pipeline.dataset import plots
from fer_pipeline.dataset.face_store import FaceStore, load_faces
from fer_pipeline.dataset.faces import process_faces
from fer_pipeline.dataset.inventory import build_inventory
from fer_pipeline.dataset.manifest import (
    apply_relabels,
    build_manifest,
    candidates_for_decoding,
    check_accounting,
    dedup_input,
    read_relabels,
)
from fer_pipeline.dataset.source_readers import SourceBytes
from fer_pipeline.dataset.splits import assign_splits, split_summary
from fer_pipeline.defs.metadata import SYNTHETIC_NOTE, counts, md_image, md_table
from fer_pipeline.defs.resources import FerSettings
from fer_pipeline.schema import DEMOGRAPHIC_ATTRIBUTES, SPLIT_COLUMNS

GROUP = "data"


def _prepare_synthetic(settings: FerSettings, log: dg.DagsterLogManager) -> list[str]:
    """Generate the demo source(s) the first time (deterministic, so re-running is a no-op)."""
    from fer_pipeline.dataset.synthetic_faces import generate_demo_source

    names = []
    for spec in settings.catalog().sources:
        if spec.kind == "synthetic":
            report = generate_demo_source(spec.path, **spec.options)
            log.info(f"synthetic source '{spec.name}': {report.n_written} files at {spec.path}")
            names.append(spec.name)
    return names


@dg.asset(group_name=GROUP, description="Inventory of every file of every source in sources.yaml.")
def raw_sources(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    synthetic = _prepare_synthetic(fer, context.log)
    catalog = fer.catalog()
    # rebuild (the scheduled safety net): hash every file again instead of reusing previous hashes
    previous = pd.read_parquet(paths.raw_inventory) if paths.raw_inventory.exists() and not fer.rebuild else None
    report = build_inventory(catalog, paths.root, previous)
    inv = report.table
    write_parquet(paths.raw_inventory, inv)
    per_source = inv.pivot_table(index="source", columns="status", values="source_path", aggfunc="count",
                                 fill_value=0)
    unmapped = inv[inv["status"] == "unmapped"].groupby(["source", "raw_label"]).size().rename("files").reset_index()
    coverage = inv[inv["status"] == "candidate"].groupby("source")[list(DEMOGRAPHIC_ATTRIBUTES)].count()
    metadata: dict[str, object] = {
        "files": len(inv),
        "candidates": int((inv["status"] == "candidate").sum()),
        "by_status": counts(inv["status"]),
        "per_source": md_table(per_source.reset_index()),
        "unmapped_labels": md_table(unmapped),
        "junk_skipped": {str(k): int(v) for k, v in report.junk.items()},
        "demographics_coverage": md_table(coverage.reset_index()),
        "demographics_csv_notes": report.demographics_notes,
        "hashed_this_run": report.hashed,
        "hash_reused_from_previous": report.reused,
        "seconds": round(report.seconds, 2),
        "path": dg.MetadataValue.path(str(paths.raw_inventory)),
    }
    if synthetic:
        metadata["synthetic_data"] = dg.MetadataValue.md(f"**{', '.join(synthetic)}**: {SYNTHETIC_NOTE}")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(group_name=GROUP, deps=[raw_sources],
          description="Decoded, validated, grayscale faces at the configured size (content-addressed cache).")
def faces(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    inv = pd.read_parquet(paths.raw_inventory)
    candidates = candidates_for_decoding(inv)
    settings = fer.preprocess
    store = FaceStore(paths.root, settings.key)
    specs = {s.name: s for s in fer.catalog().sources}
    with SourceBytes(specs) as read:
        report = process_faces(candidates, read, store, settings, workers=fer.workers or None,
                               log=context.log.info, ignore_cache=fer.rebuild)
    table = report.table
    write_parquet(paths.faces_table, table)
    reasons = table.loc[table["reason"].notna(), "reason"].str.replace(r" \(.*", "", regex=True)
    rate = report.processed / report.seconds if report.seconds > 0 and report.processed else 0.0
    return dg.MaterializeResult(metadata={
        "candidates": len(table),
        "accepted": int(table["reason"].isna().sum()),
        "rejected": int(table["reason"].notna().sum()),
        "rejected_by_reason": counts(reasons),
        "rejected_examples": md_table(table.loc[table["reason"].notna(), ["source", "source_path", "reason"]], 10),
        "decoded_this_run": report.processed,
        "reused_from_cache": report.reused,
        "workers": report.workers,
        "images_per_second": round(rate, 1),
        "seconds": round(report.seconds, 2),
        "settings_key": settings.key,
        "store": dg.MetadataValue.path(str(store.dir)),
    })


@dg.asset(group_name=GROUP, deps=[faces],
          description="Exact and near-duplicate groups, one representative each; label conflicts flagged.")
def deduplicated_faces(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    inv = pd.read_parquet(paths.raw_inventory)
    table = pd.read_parquet(paths.faces_table)
    accepted = dedup_input(inv, table)
    refs = accepted["face_ref"].to_numpy()
    # incremental: only faces not seen before are compared (and their pixels loaded); the candidate
    # pairs are cached by content hash, per preprocessing/threshold settings, next to the face store
    cache = (FaceStore(paths.root, fer.preprocess.key).dir / "dedup"
             / dedup_core.link_cache_name(fer.preprocess.key, fer.phash_max_distance, fer.match_mirrored))
    report, stats = dedup_core.deduplicate_incremental(
        accepted, fer.phash_max_distance, fer.match_mirrored,
        lambda rows: load_faces(paths.root, refs[rows].tolist()), fer.min_correlation,
        cache_path=cache, ignore_cache=fer.rebuild)
    write_parquet(paths.dedup_table, report.table)
    df = report.table
    examples = df[~df["is_representative"]][["source", "source_path", "duplicate_of", "dup_group"]]
    conflicts = df[df["conflict"]][["dup_group", "source", "source_path", "label"]]
    return dg.MaterializeResult(metadata={
        "accepted_faces": len(df),
        "groups": int(df["dup_group"].nunique()),
        "groups_with_duplicates": report.n_groups_with_duplicates,
        "duplicates_dropped": int((~df["is_representative"] & ~df["conflict"]).sum()),
        "exact_links": report.n_exact_links,
        "near_links": report.n_near_links,
        "near_candidates_by_phash": report.n_near_candidates,
        "label_conflict_groups": report.n_conflict_groups,
        "label_conflict_images": int(df["conflict"].sum()),
        "duplicate_examples": md_table(examples, 10),
        "label_conflicts": md_table(conflicts, 20),
        "phash_max_distance": fer.phash_max_distance,
        "match_mirrored": fer.match_mirrored,
        "min_correlation": fer.min_correlation,
        "faces_compared_this_run": stats.faces_compared,
        "faces_pairs_from_cache": stats.faces_cached,
        "pairs_correlated_this_run": stats.pairs_correlated,
        "seconds": round(report.seconds, 2),
    })


@dg.asset(group_name=GROUP, deps=[deduplicated_faces],
          description="manifest.parquet (kept images) and excluded.parquet (every file not kept, with reason).")
def manifest(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    start = time.perf_counter()
    inv = pd.read_parquet(paths.raw_inventory)
    faces_table = pd.read_parquet(paths.faces_table)
    dedup_table = pd.read_parquet(paths.dedup_table)
    kept, excluded = build_manifest(inv, faces_table, dedup_table, (fer.image_size, fer.image_size))
    # user corrections (e.g. from the label_issues report); recorded in column relabelled_from
    kept, relabels = apply_relabels(kept, read_relabels(paths.relabels))
    accounting = check_accounting(inv, kept, excluded)
    write_parquet(paths.manifest, kept)
    write_parquet(paths.excluded, excluded)
    by_class_source = kept.pivot_table(index="label", columns="source", values="image_id", aggfunc="count",
                                       fill_value=0)
    coverage = {attr: int(kept[attr].notna().sum()) for attr in DEMOGRAPHIC_ATTRIBUTES}
    excl_reasons = excluded["reason"].map(plots.reason_category)
    metadata: dict[str, object] = {
        "dagster/row_count": len(kept),
        "kept": len(kept),
        "excluded": len(excluded),
        "inputs": accounting["n_inputs"],
        "accounting_balanced": bool(accounting["balanced"]),
        "by_class": counts(kept["label"]),
        "by_class_and_source": md_table(by_class_source.reset_index()),
        "excluded_by_stage": counts(excluded["stage"]),
        "excluded_by_reason": counts(excl_reasons),
        "demographics_coverage": coverage,
        "preview": md_table(kept[["image_id", "source", "source_path", "label", "gender", "age_group"]], 10),
        "relabels_applied": int(relabels["applied"].sum()),
        "relabels": md_table(relabels, 50),
        "manifest_path": dg.MetadataValue.path(str(paths.manifest)),
        "excluded_path": dg.MetadataValue.path(str(paths.excluded)),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return dg.MaterializeResult(metadata=metadata)


# Splits depend on every earlier stage directly (they are a function of the whole data half),
# so `dagster asset materialize --select '+splits'` rebuilds the data half from the sources.
@dg.asset(group_name=GROUP, deps=[manifest, deduplicated_faces, faces, raw_sources],
          description="Stratified train/validation/test split (duplicate groups kept together) + CV folds.")
def splits(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    kept = pd.read_parquet(paths.manifest)
    table = assign_splits(kept, fer.split_proportions, fer.n_folds, fer.split_seed)
    write_parquet(paths.splits, table[list(SPLIT_COLUMNS)])
    summary = split_summary(table)
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
        "path": dg.MetadataValue.path(str(paths.splits)),
    })


@dg.asset(group_name=GROUP, deps=[manifest, splits],
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


DATA_ASSETS = [raw_sources, faces, deduplicated_faces, manifest, splits, data_plots]
