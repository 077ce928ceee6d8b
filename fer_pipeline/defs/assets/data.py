"""The data half as software-defined assets: sources → faces → de-duplicated → manifest →
splits → plots. Each asset reads its upstream's Parquet file under the data root, calls one
core module, writes its own file atomically and reports what a user would look at. The
pretraining pool rides along: its files are decoded by `faces`, built by `manifest`, guarded
against the validation and test images and published by `splits`."""


import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
import pandas as pd

from fer_pipeline.atomic import write_parquet
from fer_pipeline.dataset import dedup as dedup_core
from fer_pipeline.dataset import plots
from fer_pipeline.dataset import pool as pool_core
from fer_pipeline.dataset import source_watch
from fer_pipeline.dataset.catalog import CatalogError
from fer_pipeline.dataset.face_store import FaceStore, load_faces
from fer_pipeline.dataset.faces import SourceFraming, framing_shares, process_faces
from fer_pipeline.dataset.inventory import POOL, UNMAPPED, build_inventory
from fer_pipeline.dataset.manifest import (
    ITEM,
    accounting_items,
    apply_relabels,
    build_manifest,
    candidates_for_decoding,
    check_accounting,
    dedup_input,
    read_relabels,
)
from fer_pipeline.dataset.publish import POOL as POOL_TABLE
from fer_pipeline.dataset.publish import (
    Candidate,
    data_version,
    manifest_version,
    pool_content_version,
    prune_rejected,
    publish,
)
from fer_pipeline.dataset.source_readers import SourceBytes
from fer_pipeline.dataset.splits import assign_splits, split_summary
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
from fer_pipeline.defs.jobs import SOURCE_OBSERVATION
from fer_pipeline.defs.metadata import SYNTHETIC_NOTE, counts, frame_version, md_image, md_table
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.defs.resources import FerSettings
from fer_pipeline.schema import DEMOGRAPHIC_ATTRIBUTES, SPLIT_COLUMNS

GROUP = "data"


def _beta_api_ok(decorator: Callable[..., Any]) -> Callable[..., Any]:
    """``decorator`` without Dagster's "currently in beta" warning (observable source assets are)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)
            return decorator(*args, **kwargs)
    return call


def _prepare_synthetic(settings: FerSettings, log: dg.DagsterLogManager) -> list[str]:
    """Generate the demo source(s) the first time (deterministic, so re-running is a no-op)."""
    from fer_pipeline.dataset.synthetic_faces import (
        generate_demo_pool,
        generate_demo_scenes,
        generate_demo_source,
    )

    names = []
    for spec in settings.catalog().sources:
        if spec.kind == "synthetic":
            options = dict(spec.options)
            if spec.role == "pretrain":  # other expressions than the four classes, for the pretraining pool
                report = generate_demo_pool(spec.path, **options)
            elif "scenes" in options:  # faces drawn into larger cluttered scenes, for `faces: detect`
                report = generate_demo_scenes(spec.path, n_scenes=options.pop("scenes"), **options)
            else:
                report = generate_demo_source(spec.path, **options)
            log.info(f"synthetic source '{spec.name}': {report.n_written} files at {spec.path}")
            names.append(spec.name)
    return names


@_beta_api_ok(dg.observable_source_asset)(
    name=SOURCE_OBSERVATION, group_name=GROUP, required_resource_keys={"fer"},
    description="The files of every source in sources.yaml, observed by their names, sizes, dates and inodes (no "
                "image is read). A new observation with another data version marks raw_sources and everything "
                "downstream unsynced; the sources sensor observes them and runs the data job on a change.")
def source_files(context: dg.OpExecutionContext) -> dg.ObserveResult:
    root = context.resources.fer.paths.root
    try:
        fingerprint = source_watch.fingerprint_sources(root)
    except (CatalogError, source_watch.UnreadableSourceError, OSError) as exc:
        # raw_sources says what is wrong, naming the source and field; the observation records it
        context.log.warning(f"sources not fingerprinted: {exc}")
        digest = hashlib.sha256(str(exc).encode()).hexdigest()[:16]
        return dg.ObserveResult(data_version=dg.DataVersion(f"unreadable-{digest}"),
                                metadata={"problem": str(exc)[:500]})
    return dg.ObserveResult(data_version=dg.DataVersion(fingerprint.digest[:16]),
                            metadata={"sources": len(fingerprint.sources), "files": fingerprint.files})


@fer_asset(group_name=GROUP, deps=[SOURCE_OBSERVATION],
           description="Inventory of every file of every source in sources.yaml.")
def raw_sources(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    synthetic = _prepare_synthetic(fer, context.log)
    catalog = fer.catalog()
    # rebuild (the scheduled safety net): hash every file again instead of reusing previous hashes
    previous = pd.read_parquet(paths.raw_inventory) if paths.raw_inventory.exists() and not fer.rebuild else None
    report = build_inventory(catalog, paths.root, previous, max_file_bytes=fer.max_file_bytes)
    inv = report.table
    write_parquet(paths.raw_inventory, inv)
    per_source = inv.pivot_table(index="source", columns="status", values="source_path", aggfunc="count",
                                 fill_value=0)
    unmapped = inv[inv["status"] == UNMAPPED].groupby(["source", "raw_label"]).size().rename("files").reset_index()
    pool_files = inv[inv["status"] == POOL].groupby(["source", "raw_label", "pool_label"]).size().rename("files")
    coverage = inv[inv["status"] == "candidate"].groupby("source")[list(DEMOGRAPHIC_ATTRIBUTES)].count()
    metadata: dict[str, object] = {
        "files": len(inv),
        "candidates": int((inv["status"] == "candidate").sum()),
        "by_status": counts(inv["status"]),
        "per_source": md_table(per_source.reset_index()),
        "unmapped_labels": md_table(unmapped),
        "pool_files": int((inv["status"] == POOL).sum()),
        "pool_labels": md_table(pool_files.reset_index()),
        "junk_skipped": {str(k): int(v) for k, v in report.junk.items()},
        "unreadable_examples": md_table(inv.loc[inv["status"].isin(["unreadable", "too_large", "source_error"]),
                                                ["source", "source_path", "status", "reason"]], 20),
        "demographics_coverage": md_table(coverage.reset_index()),
        "demographics_csv_notes": report.demographics_notes,
        "hashed_this_run": report.hashed,
        "hash_reused_from_previous": report.reused,
        "seconds": round(report.seconds, 2),
        "path": dg.MetadataValue.path(str(paths.raw_inventory)),
    }
    if synthetic:
        metadata["synthetic_data"] = dg.MetadataValue.md(f"**{', '.join(synthetic)}**: {SYNTHETIC_NOTE}")
    # the content (not the stat fingerprints, which differ between two copies of the same files)
    return dg.MaterializeResult(metadata=metadata, data_version=frame_version(inv.drop(columns=["fingerprint"])))


@fer_asset(group_name=GROUP, deps=[raw_sources],
          description="Decoded, validated, grayscale faces at the configured size (content-addressed cache).")
def faces(context: dg.AssetExecutionContext, fer: FerSettings) -> dg.MaterializeResult:
    paths = fer.paths
    inv = pd.read_parquet(paths.raw_inventory)
    candidates = candidates_for_decoding(inv)
    settings = fer.preprocess
    store = FaceStore(paths.root, settings.key)
    specs = {s.name: s for s in fer.catalog().sources}
    framings = {name: SourceFraming.of(spec) for name, spec in specs.items()}
    with SourceBytes(specs, max_file_bytes=fer.max_file_bytes) as read:
        report = process_faces(candidates, read, store, settings, workers=fer.workers or None,
                               log=context.log.info, ignore_cache=fer.rebuild, framings=framings)
    table = report.table
    write_parquet(paths.faces_table, table)
    reasons = table.loc[table["reason"].notna(), "reason"].map(plots.reason_category)  # no sizes, paths
    rate = report.processed / report.seconds if report.seconds > 0 and report.processed else 0.0
    detection: dict[str, object] = {}
    if any(f.detection is not None for f in framings.values()):
        detection = {
            "detected_this_run": report.detected,
            "detection_reused_from_cache": report.detect_reused,
            "framing_by_source": md_table(framing_shares(table)),
            "faces_by_framing": counts(table.loc[table["reason"].isna(), "framing"].map(
                lambda f: "crop" if f == "crop" else "detect")),
        }
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
        **detection,
    }, data_version=frame_version(table))


@fer_asset(group_name=GROUP, deps=[faces],
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
    }, data_version=frame_version(df))


def _audit(context: dg.AssetExecutionContext, fer: FerSettings, candidate: Candidate, stage: str,
           checks: Sequence[GxCheck], tables: Tables) -> tuple[list[dg.AssetCheckResult], list[str]]:
    """Run a stage's checks on the run's candidate and keep the results beside it; returns the
    results and the names of the failed blocking checks (then nothing may be published)."""
    results = run_checks(checks, tables, fer)
    candidate.record_checks(stage, results_json(results))
    failed = blocking_failures(checks, results)
    if failed:
        context.log.error(f"{stage} candidate rejected ({', '.join(failed)}): nothing is published; the candidate "
                          f"and its check results stay in {candidate.dir}")
        prune_rejected(fer.paths)
    return results, failed


@fer_asset(group_name=GROUP, deps=[deduplicated_faces],
          description="The run's candidate manifest (kept images) and excluded table (every file not kept, with "
                      "reason), audited by the manifest checks; `splits` publishes them once every blocking check "
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
    pool, pool_excluded = pool_core.build_pool(inv, faces_table, size)  # guarded by `splits`, once splits exist
    if len(pool_excluded):
        excluded = pd.concat([excluded, pool_excluded], ignore_index=True).sort_values(ITEM, kind="mergesort")
        excluded = excluded.reset_index(drop=True)
    # user corrections (e.g. from the label_issues report); recorded in column relabelled_from
    kept, relabels = apply_relabels(kept, read_relabels(paths.relabels))
    items = accounting_items(inv, faces_table)  # each file, and each further face of a `keep: all` photo
    accounting = check_accounting(items, kept, excluded, pool)
    version = manifest_version(kept, excluded, pool)
    candidate = Candidate(paths, context.run.run_id)
    candidate.write("manifest", kept, {"manifest_version": version, "run_id": context.run.run_id})
    candidate.write("excluded", excluded, {"manifest_version": version, "run_id": context.run.run_id})
    candidate.write(POOL_TABLE, pool, {"manifest_version": version, "run_id": context.run.run_id})
    tables = Tables(kept, excluded, items, pool=pool)
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
        "relabels": md_table(relabels, 50),
        "manifest_version": version,
        "candidate": dg.MetadataValue.path(str(candidate.dir)),
        "publication": ("rejected: " + ", ".join(failed)) if failed else "pending: splits publishes the set when "
                                                                         "its checks pass",
        "manifest_path": dg.MetadataValue.path(str(paths.manifest)),
        "excluded_path": dg.MetadataValue.path(str(paths.excluded)),
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
    if failed:
        publication = "rejected: " + ", ".join(failed)
    else:
        publish(candidate)
        publication = f"published manifest version {version}"
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


DATA_ASSETS = [source_files, raw_sources, faces, deduplicated_faces, manifest, splits, data_plots]
