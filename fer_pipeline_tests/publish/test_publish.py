"""Write, audit, publish through real Dagster runs: a run whose blocking check fails leaves the
published set byte-for-byte as it was and keeps its candidate for inspection; a mixed set is
refused; a run killed during the faces stage is simply run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from fer_pipeline.atomic import read_parquet_meta, write_parquet
from fer_pipeline.quality import validation
from fer_pipeline.publish import MixedSetError, read_published
from fer_pipeline.demo.synthetic_faces import generate_demo_source
from fer_pipeline.definitions import defs
from fer_pipeline.ml.workflow import load_pipeline_data
from fer_pipeline.paths import DataPaths

PUBLISHED = ("manifest", "excluded", "splits")


def _catalogue(root: Path, n_images: int = 240, seed: int = 11) -> DataPaths:
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": n_images, "seed": seed}]}))
    return DataPaths(root)


def _run(root: Path, monkeypatch: pytest.MonkeyPatch, fer_config: dict | None = None):
    monkeypatch.setenv("FER_DATA_DIR", str(root))
    config = {"resources": {"fer": {"config": fer_config}}} if fer_config else None
    return defs.resolve_job_def("data_pipeline").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), run_config=config, raise_on_error=False)


def _published_bytes(paths: DataPaths) -> dict[str, bytes]:
    return {t: getattr(paths, t).read_bytes() for t in PUBLISHED}


def _grow(paths: DataPaths) -> None:
    """New files in the source, so the next candidate differs from the published set."""
    extra = generate_demo_source(paths.root / "extra", n_images=40, seed=77)
    for i, png in enumerate(sorted((extra.root / "Angry").glob("*.png"))[:5]):
        shutil.copyfile(png, paths.root / "raw" / "demo" / "Angry" / f"grown_{i}.png")


@pytest.fixture()
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataPaths:
    paths = _catalogue(tmp_path)
    assert _run(tmp_path, monkeypatch).success
    return paths


def test_published_tables_carry_one_version(published: DataPaths) -> None:
    metas = {t: read_parquet_meta(getattr(published, t)) for t in PUBLISHED}
    assert len({m["manifest_version"] for m in metas.values()}) == 1
    current = read_published(published)
    assert metas["splits"]["data_version"] == current.data_version
    assert not published.candidates_dir.exists() or not any(published.candidates_dir.iterdir())


def test_failed_manifest_check_publishes_nothing(published: DataPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _published_bytes(published)
    _grow(published)
    result = _run(published.root, monkeypatch, {"min_images_per_class": 10_000})
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["manifest_class_counts"].passed
    assert "splits" not in {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert _published_bytes(published) == before  # byte for byte
    # the rejected candidate and its check results stay for inspection
    (candidate,) = [p for p in published.candidates_dir.iterdir() if p.is_dir()]
    assert candidate.name == result.run_id
    kept = pd.read_parquet(candidate / "manifest.parquet")
    assert kept["source_path"].str.startswith("Angry/grown_").any()
    judged = json.loads((candidate / "checks_manifest.json").read_text())
    assert judged["manifest_class_counts"]["passed"] is False and judged["manifest_schema"]["passed"] is True
    # the next good run publishes the grown set; only the rejected candidate is left behind
    assert _run(published.root, monkeypatch).success
    assert pd.read_parquet(published.manifest)["source_path"].str.startswith("Angry/grown_").any()
    assert [p.name for p in published.candidates_dir.iterdir()] == [result.run_id]


def test_failed_split_check_keeps_the_previous_manifest(published: DataPaths,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest checks pass, a blocking splits check fails: the new manifest is not
    published either, since manifest, excluded and splits are one set."""
    before = _published_bytes(published)
    _grow(published)
    real = validation.validate_no_group_leakage

    def leaking(splits: pd.DataFrame) -> validation.ValidationOutcome:
        outcome = real(splits)
        broken = [{**outcome.expectations[0], "success": False}]
        return validation.ValidationOutcome(outcome.name, broken, outcome.details)

    monkeypatch.setattr(validation, "validate_no_group_leakage", leaking)
    result = _run(published.root, monkeypatch)
    assert not result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["manifest_class_counts"] and not checks["split_no_group_leakage"]
    assert _published_bytes(published) == before
    candidate = published.candidates_dir / result.run_id
    assert {"manifest.parquet", "excluded.parquet", "splits.parquet", "checks_splits.json"} <= \
        {p.name for p in candidate.iterdir()}


def test_mixed_set_is_refused(published: DataPaths) -> None:
    splits = pd.read_parquet(published.splits)
    meta = read_parquet_meta(published.splits)
    write_parquet(published.splits, splits, {**meta, "manifest_version": "0123456789abcdef"})
    with pytest.raises(MixedSetError, match="not one set"):
        read_published(published)
    with pytest.raises(MixedSetError):
        load_pipeline_data(published, with_images=False)


def test_run_killed_during_faces_stage_reruns_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _catalogue(tmp_path, n_images=1500, seed=5)
    generate_demo_source(tmp_path / "raw" / "demo", n_images=1500, seed=5)
    env = {**os.environ, "FER_DATA_DIR": str(tmp_path), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "fer_pipeline.definitions", "-j",
           "data_pipeline"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = False
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # type: ignore[union-attr]
            if "STEP_START" in line and '"faces"' in line:
                time.sleep(0.3)
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            assert time.monotonic() < deadline, "the run never reached the faces stage"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed and proc.returncode == -signal.SIGKILL
    assert not paths.manifest.exists()  # killed before anything was published
    assert _run(tmp_path, monkeypatch).success
    first = read_published(paths)
    # the caches the killed run left behind changed nothing: a from-scratch rebuild agrees
    assert _run(tmp_path, monkeypatch, {"rebuild": True}).success
    assert read_published(paths).manifest_version == first.manifest_version
    excluded = pd.read_parquet(paths.excluded)
    inventory = pd.read_parquet(paths.raw_inventory)
    assert len(first.manifest) + len(excluded) == len(inventory)


@pytest.mark.parametrize("make_empty", ["empty_folder", "header_only_csv", "only_junk"])
def test_a_source_without_candidates_fails_the_blocking_source_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     make_empty: str) -> None:
    """An empty folder, a header-only FER2013 CSV or a folder of junk: the blocking check names
    the source, nothing downstream runs and nothing is published."""
    _catalogue(tmp_path, n_images=120)
    if make_empty == "header_only_csv":
        (tmp_path / "fer.csv").write_text("emotion,pixels,Usage\n")
        spec = {"name": "hollow", "kind": "fer2013_csv", "path": "fer.csv", "label_map": {"angry": "Angry"}}
    else:
        folder = tmp_path / "raw" / "hollow"
        folder.mkdir(parents=True)
        if make_empty == "only_junk":
            (folder / ".DS_Store").write_bytes(b"junk")
            (folder / "Thumbs.db").write_bytes(b"junk")
        spec = {"name": "hollow", "kind": "image_folders", "path": "raw/hollow", "label_map": {"angry": "Angry"}}
    catalogue = yaml.safe_load((tmp_path / "sources.yaml").read_text())
    catalogue["sources"].append(spec)
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump(catalogue))
    result = _run(tmp_path, monkeypatch)
    assert not result.success
    (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "sources_have_images"]
    assert not check.passed and check.metadata["sources_without_candidates"].value == ["hollow"]
    assert "manifest" not in {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert not DataPaths(tmp_path).manifest.exists()


def test_truncated_published_table_is_refused_naming_it(published: DataPaths) -> None:
    data = published.splits.read_bytes()
    published.splits.write_bytes(data[: len(data) // 2])
    with pytest.raises(MixedSetError, match="splits.parquet is not a readable Parquet table"):
        read_published(published)
