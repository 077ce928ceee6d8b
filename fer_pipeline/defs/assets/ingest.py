"""The ingesting half of the data stages as software-defined assets: the observed source files →
``raw_sources`` (inventory) → ``faces`` (decoded, validated, content-addressed) →
``deduplicated_faces``. Each reads its upstream's Parquet file under the data root, calls one
core module, writes its own file atomically, reports what a user would look at, and returns
its table's content as Dagster's data version."""


import hashlib
import warnings
from collections.abc import Callable
from typing import Any

import dagster as dg
import pandas as pd

from fer_pipeline.atomic import write_parquet
from fer_pipeline.dataset.manifest import (
    candidates_for_decoding,
    dedup_input,
    published_framing,
)
from fer_pipeline.dedup import groups as dedup_core
from fer_pipeline.dedup.views import descriptor_cache_name
from fer_pipeline.defs.jobs import SOURCE_OBSERVATION
from fer_pipeline.defs.metadata import SYNTHETIC_NOTE, counts, frame_version, md_table
from fer_pipeline.defs.resources import FerSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.faces.framing import SourceFraming
from fer_pipeline.faces.stage import framing_shares, process_faces
from fer_pipeline.faces.store import FaceStore, load_faces
from fer_pipeline.quality import plots
from fer_pipeline.schema import DEMOGRAPHIC_ATTRIBUTES
from fer_pipeline.sources import watch as source_watch
from fer_pipeline.sources.catalog import CatalogError
from fer_pipeline.sources.inventory import POOL, UNLABELLED, UNMAPPED, build_inventory
from fer_pipeline.sources.readers import SourceBytes

GROUP = "data"


def beta_api_ok(decorator: Callable[..., Any]) -> Callable[..., Any]:
    """``decorator`` without Dagster's "currently in beta" warning (observable source assets are)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)
            return decorator(*args, **kwargs)
    return call


def _prepare_synthetic(settings: FerSettings, log: dg.DagsterLogManager) -> list[str]:
    """Generate the demo source(s) the first time (deterministic, so re-running is a no-op)."""
    from fer_pipeline.demo.synthetic_faces import (
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


@beta_api_ok(dg.observable_source_asset)(
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


def _conflicts(notes: dict[str, dict[str, object]], context: dg.AssetExecutionContext) -> dict[str, object]:
    """Files whose demographics rows disagree, per source (their attribute is left empty, not
    guessed), with a few examples; warned in the run log, since coverage silently drops."""
    out: dict[str, object] = {}
    for source, note in sorted(notes.items()):
        n = int(note.get("csv_conflicting_files") or 0)  # type: ignore[call-overload]
        if n:
            examples = list(note.get("csv_conflict_examples") or [])  # type: ignore[call-overload]
            out[source] = {"files": n, "examples": examples}
            context.log.warning(f"source '{source}': demographics CSV rows disagree for {n} file(s); their "
                                f"attribute is left empty (e.g. {'; '.join(examples[:3])})")
    return out


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
        "unlabelled_files": int((inv["status"] == UNLABELLED).sum()),
        "junk_skipped": {str(k): int(v) for k, v in report.junk.items()},
        "unreadable_examples": md_table(inv.loc[inv["status"].isin(["unreadable", "too_large", "source_error"]),
                                                ["source", "source_path", "status", "reason"]], 20),
        "demographics_coverage": md_table(coverage.reset_index()),
        "demographics_csv_notes": report.demographics_notes,
        "demographics_conflicts": _conflicts(report.demographics_notes, context),
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
                               log=context.log.info, ignore_cache=fer.rebuild, framings=framings,
                               max_bytes_in_flight=fer.max_bytes_in_flight)
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
            "faces_by_framing": counts(pd.Series(published_framing(table.loc[table["reason"].isna(), "framing"]))),
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
    cache_dir = FaceStore(paths.root, fer.preprocess.key).dir / "dedup"
    cache = cache_dir / dedup_core.link_cache_name(fer.preprocess.key, fer.phash_max_distance, fer.match_mirrored)
    report, stats = dedup_core.deduplicate_incremental(
        accepted, fer.phash_max_distance, fer.match_mirrored,
        lambda rows: load_faces(paths.root, refs[rows].tolist()), fer.min_correlation,
        cache_path=cache, ignore_cache=fer.rebuild, view_rule=fer.view_rule,
        view_cache_path=cache_dir / descriptor_cache_name(fer.preprocess.key))
    write_parquet(paths.dedup_table, report.table)
    df = report.table
    pairs = report.view_pairs if report.view_pairs is not None else pd.DataFrame(columns=["a", "b"])
    view_examples = pd.DataFrame({
        "source_path": df["source_path"].to_numpy()[pairs["a"].to_numpy(int)],
        "copy_of": df["source_path"].to_numpy()[pairs["b"].to_numpy(int)],
        "similarity": pairs.get("similarity", pd.Series(dtype=float)).round(3).to_numpy(),
        "margin": pairs.get("margin", pd.Series(dtype=float)).round(3).to_numpy()})
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
        "near_candidates_given_up": report.n_given_up,
        "view_links": report.n_view_links,
        "view_duplicate_examples": md_table(view_examples, 10),
        "view_rule": (f"margin >= {fer.view_margin}, similarity >= {fer.view_min_similarity}"
                      if fer.view_duplicates else "off (view_duplicates: false)"),
        "view_descriptors_computed_this_run": report.n_view_described,
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


INGEST_ASSETS = [source_files, raw_sources, faces, deduplicated_faces]
