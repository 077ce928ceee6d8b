"""End to end: real Dagster materializations of every data asset on a small generated source,
with real GX checks, then assertions on the files other tools rely on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from fer_pipeline.classes import CLASSES
from fer_pipeline.demo.synthetic_faces import generate_demo_source
from fer_pipeline.definitions import defs

DATA_ASSETS = ["label_studio_reviews", "raw_sources", "faces", "deduplicated_faces", "manifest", "splits", "data_plots",
               "data_quality_flags"]


def run_data_job(root: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance | None = None,
                 run_config: dict | None = None):
    monkeypatch.setenv("FER_DATA_DIR", str(root))
    job = defs.resolve_job_def("data_pipeline")
    return job.execute_in_process(instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False,
                                  run_config=run_config)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 320, "seed": 3}]}))
    return root


@pytest.fixture(scope="module")
def first_run(small_demo: Path):
    mp = pytest.MonkeyPatch()
    try:
        result = run_data_job(small_demo, mp)
    finally:
        mp.undo()
    return result


def test_every_data_asset_materializes_and_checks_pass(first_run) -> None:
    assert first_run.success
    materialized = {e.asset_key.path[-1] for e in first_run.get_asset_materialization_events()}
    assert materialized == set(DATA_ASSETS)
    evaluations = {e.check_name: e for e in first_run.get_asset_check_evaluations()}
    expected = {"sources_have_images", "rejection_rate", "manifest_schema", "manifest_image_size",
                "manifest_class_counts", "manifest_class_balance", "manifest_accounting",
                "split_proportions", "split_no_group_leakage", "split_folds"}
    assert expected <= set(evaluations)
    failed = {name for name, e in evaluations.items() if not e.passed}
    assert not failed, failed
    meta = evaluations["manifest_schema"].metadata
    assert "evaluated" in meta and meta["failed"].value == 0


def test_manifest_excluded_and_accounting(first_run, small_demo: Path) -> None:
    manifest = pd.read_parquet(small_demo / "manifest" / "manifest.parquet")
    excluded = pd.read_parquet(small_demo / "manifest" / "excluded.parquet")
    inventory = pd.read_parquet(small_demo / "manifest" / "raw_inventory.parquet")
    for col in ["image_id", "source", "source_path", "original_label", "label", "split_hint", "width", "height",
                "phash", "dup_group", "mean_intensity", "std_intensity", "gender", "age_group", "race"]:
        assert col in manifest.columns
    assert manifest["image_id"].is_unique and set(manifest["label"]) == set(CLASSES)
    assert {"source", "source_path", "stage", "reason"} <= set(excluded.columns)
    # every input file is in exactly one of the two tables
    key = lambda df: set(map(tuple, df[["source", "source_path"]].to_numpy()))  # noqa: E731
    assert key(manifest) | key(excluded) == key(inventory)
    assert not key(manifest) & key(excluded)
    assert len(manifest) + len(excluded) == len(inventory)
    # the generator's planted defects are all caught, each with its reason
    reasons = excluded["reason"]
    assert reasons.str.startswith("duplicate of").sum() >= 5
    assert reasons.str.startswith("label conflict").sum() >= 2
    assert reasons.str.startswith("rejected: unreadable or truncated").sum() >= 1
    assert reasons.str.startswith("rejected: not an image").sum() >= 1
    # duplicates name a kept image
    dup_of = excluded.loc[reasons.str.startswith("duplicate of"), "duplicate_of"]
    assert dup_of.isin(manifest["image_id"]).all()
    # demographics came from the generator's CSV
    assert manifest["gender"].notna().mean() > 0.9 and manifest["race"].isna().all()


def test_splits_file(first_run, small_demo: Path) -> None:
    splits = pd.read_parquet(small_demo / "manifest" / "splits.parquet")
    manifest = pd.read_parquet(small_demo / "manifest" / "manifest.parquet")
    assert list(splits.columns) == ["image_id", "split", "fold"]
    assert set(splits["image_id"]) == set(manifest["image_id"])
    shares = splits["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.04) and shares["test"] == pytest.approx(0.15, abs=0.04)
    joined = splits.merge(manifest[["image_id", "dup_group"]], on="image_id")
    assert (joined.groupby("dup_group")["split"].nunique() == 1).all()
    for name in ("class_distribution", "sample_faces", "intensity_histograms", "exclusions"):
        assert (small_demo / "reports" / f"{name}.png").stat().st_size > 1000


def test_rerun_after_source_grows_processes_only_new_files(first_run, small_demo: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = small_demo / "raw" / "demo"
    before = {hashlib.sha256(p.read_bytes()).digest() for p in src.rglob("*") if p.is_file()}
    extra = generate_demo_source(small_demo / "extra", n_images=40, seed=99)
    added = sorted((extra.root / "Angry").glob("*.png"))[:6]
    for i, path in enumerate(added):
        (src / "Angry" / f"new_{i}.png").write_bytes(path.read_bytes())
    result = run_data_job(small_demo, monkeypatch)
    assert result.success
    faces_meta = next(e for e in result.get_asset_materialization_events()
                      if e.asset_key.path[-1] == "faces").materialization.metadata
    new_contents = {hashlib.sha256(p.read_bytes()).digest() for p in added} - before
    assert len(new_contents) >= 4
    assert faces_meta["decoded_this_run"].value == len(new_contents)
    assert faces_meta["reused_from_cache"].value > 200
    manifest = pd.read_parquet(small_demo / "manifest" / "manifest.parquet")
    excluded = pd.read_parquet(small_demo / "manifest" / "excluded.parquet")
    new_paths = {f"Angry/new_{i}.png" for i in range(len(added))}
    assert new_paths <= set(manifest["source_path"]) | set(excluded["source_path"])
    # removing a file removes it from the manifest on the next run
    (src / "Angry" / "new_0.png").unlink()
    assert run_data_job(small_demo, monkeypatch).success
    manifest = pd.read_parquet(small_demo / "manifest" / "manifest.parquet")
    excluded = pd.read_parquet(small_demo / "manifest" / "excluded.parquet")
    assert "Angry/new_0.png" not in set(manifest["source_path"]) | set(excluded["source_path"])


def test_bad_catalogue_fails_fast_naming_source_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "broken", "kind": "image_folders", "path": "missing_dir", "label_map": {"a": "Angry"}}]}))
    result = run_data_job(tmp_path, monkeypatch)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.cause.message if failure.step_failure_data.error.cause else \
        failure.step_failure_data.error.message
    assert "source 'broken', field 'path'" in message
    assert not (tmp_path / "manifest" / "manifest.parquet").exists()


def test_quality_flags_name_the_planted_dark_and_blurred_faces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder source with a darkened and a blurred copy of two drawn faces beside the demo: the
    data job's ``data_quality_flags`` flags exactly those files with their reasons (faces stay in
    the manifest), and its warning check reports the planted source's share."""
    from PIL import Image, ImageFilter

    from fer_pipeline.paths import DataPaths
    drawn = tmp_path / "drawn"
    generate_demo_source(drawn, n_images=40, seed=5)
    faces = sorted((drawn / "Angry").glob("*.png"))[:3]
    planted = tmp_path / "data" / "raw" / "planted" / "Angry"
    planted.mkdir(parents=True)
    with Image.open(faces[0]) as im:
        im.convert("L").point(lambda v: v * 0.1).save(planted / "dark.png")
    with Image.open(faces[1]) as im:
        im.convert("L").filter(ImageFilter.GaussianBlur(4)).save(planted / "blurred.png")
    with Image.open(faces[2]) as im:
        im.convert("L").save(planted / "plain.png")
    root = tmp_path / "data"
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 200, "seed": 3},
        {"name": "planted", "kind": "image_folders", "path": "raw/planted", "label_map": {"Angry": "Angry"}}]}))
    result = run_data_job(root, monkeypatch)
    assert result.success
    flags = pd.read_parquet(DataPaths(root).report("quality_flags"))
    mine = flags[flags["source"] == "planted"]
    assert set(mine["source_path"]) == {"Angry/dark.png", "Angry/blurred.png"}, mine
    assert "dark" in set(mine.loc[mine["source_path"] == "Angry/dark.png", "flag"])  # (and low contrast)
    assert "blurred" in set(mine.loc[mine["source_path"] == "Angry/blurred.png", "flag"])
    assert mine["reason"].str.contains(": ").all()
    manifest = pd.read_parquet(DataPaths(root).manifest)
    assert {"Angry/dark.png", "Angry/blurred.png"} <= set(manifest["source_path"])  # flagged, still kept
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["flag_shares"]
    assert not check.passed and check.metadata["sources_over"].value == ["planted"]  # 2 of 3 flagged
    assert check.severity == dg.AssetCheckSeverity.WARN

    # fer.exclude_flags (here a launchpad override of one run): the dark face moves to the excluded
    # table with its flag's reason; the blurred one (flag not named) stays; every file still accounted
    again = run_data_job(root, monkeypatch, run_config={"resources": {"fer": {"config": {"exclude_flags": ["dark"]}}}})
    assert again.success
    manifest = pd.read_parquet(DataPaths(root).manifest)
    excluded = pd.read_parquet(DataPaths(root).excluded)
    assert "Angry/dark.png" not in set(manifest["source_path"])
    assert "Angry/blurred.png" in set(manifest["source_path"])
    row = excluded[excluded["source_path"] == "Angry/dark.png"].iloc[0]
    assert row["stage"] == "quality" and row["reason"].startswith("quality flag: dark: 90th percentile"), row
    evaluations = {e.check_name: e for e in again.get_asset_check_evaluations()}
    assert evaluations["manifest_accounting"].passed
    meta = next(e for e in again.get_asset_materialization_events() if e.asset_key.path[-1] == "manifest")
    assert meta.materialization.metadata["excluded_by_quality_flags"].value >= 1
