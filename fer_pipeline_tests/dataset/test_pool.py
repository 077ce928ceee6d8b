"""The pretraining pool (issue #13): catalogue fields, routing, accounting, the leakage guard and
its blocking check, through real Dagster materializations of the data half.

One catalogue the test draws is run twice: first without pool labels (the four-class tables it
publishes are the reference), then with pool sources added: a folder source whose `joy` files
now go to the pool as `happy`, a `role: pretrain` folder holding planted copies of a test image
(brightened), a validation image (mirrored) and a train image (exact), an exact twin, a broken
file and junk, and the demo generator's pool of other expressions."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageOps

from fer_pipeline.atomic import read_parquet_meta, write_parquet
from fer_pipeline.dataset import pool as pool_core
from fer_pipeline.sources.catalog import CatalogError, parse_catalog
from fer_pipeline.faces.store import load_faces
from fer_pipeline.dataset.manifest import accounting_items
from fer_pipeline.publish import (
    MixedSetError,
    manifest_version,
    pool_content_version,
    pool_version,
    read_pool,
    read_published,
)
from fer_pipeline.demo.synthetic_faces import POOL_EXPRESSIONS
from fer_pipeline.definitions import defs
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import EXCLUDED_COLUMNS, POOL_COLUMNS
from fer_pipeline_tests.conftest import asset_metadata, face_png, run_data_pipeline, write, write_catalogue

# view_duplicates off: the re-cropped-copy rule, calibrated on real faces, links a few of these blob patterns
# and synthetic faces to one another (fer_pipeline_tests/dedup/test_views.py tests it, the guard across included)
RUN_CONFIG = {"resources": {"fer": {"config": {"min_images_per_class": 5, "view_duplicates": False}}}}
TABLES = ("manifest", "excluded", "splits", "pool")
ITEM = ["source", "source_path", "face_index"]
DEMO = {"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 240, "seed": 3}
MIXED = {"name": "mixed", "kind": "image_folders", "path": "raw/mixed", "label_map": {"angry": "Angry"}}


def _tables(paths: DataPaths) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(getattr(paths, t)) for t in TABLES}


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@dataclass
class World:
    paths: DataPaths
    before: dict[str, pd.DataFrame]  # published by the catalogue without pool labels
    first: dg.ExecuteInProcessResult
    second: dg.ExecuteInProcessResult
    picked: dict[str, str]  # split -> the image id whose copy was planted in the pool


def _pick(tables: dict[str, pd.DataFrame], split: str) -> pd.Series:
    """A 64×64 demo crop of ``split`` (its mirror image is then exactly the mirrored face)."""
    rows = tables["manifest"].merge(tables["splits"], on="image_id")
    rows = rows[(rows["split"] == split) & (rows["source"] == "demo") & (rows["width"] == 64) & (rows["height"] == 64)]
    return rows.sort_values("image_id").iloc[0]


def _plant(root: Path, tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """The `planted` pool source: distinct faces, copies of held-out and train images, a twin, a broken file."""
    folder = root / "raw" / "planted"
    for i in range(6):
        write(folder / "happy" / f"blob_{i}.png", face_png(300 + i))
        write(folder / "sad" / f"blob_{i}.png", face_png(400 + i))
    twin = face_png(500)
    write(folder / "happy" / "twin.png", twin)
    write(folder / "sad" / "twin.png", twin)
    write(folder / "sad" / "broken.png", face_png(501)[:200])
    write(folder / ".DS_Store", b"junk")
    test, val, train = (_pick(tables, s) for s in ("test", "validation", "train"))
    with Image.open(root / "raw" / "demo" / test["source_path"]) as im:
        ImageEnhance.Brightness(im.convert("RGB")).enhance(1.08).save(folder / "happy" / "leak_test.png")
    with Image.open(root / "raw" / "demo" / val["source_path"]) as im:
        ImageOps.mirror(im.convert("RGB")).save(folder / "sad" / "leak_validation.png")
    shutil.copyfile(root / "raw" / "demo" / train["source_path"], folder / "happy" / "train_copy.png")
    return {"test": test["image_id"], "validation": val["image_id"], "train": train["image_id"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("pool")
    for i in range(6):
        write(root / "raw" / "mixed" / "angry" / f"a{i}.png", face_png(100 + i))
    for i in range(4):
        write(root / "raw" / "mixed" / "joy" / f"j{i}.png", face_png(200 + i))
    write_catalogue(root, [DEMO, MIXED])
    first = run_data_pipeline(root, RUN_CONFIG)
    assert first.success
    paths = DataPaths(root)
    before = _tables(paths)
    picked = _plant(root, before)
    write_catalogue(root, [DEMO, {**MIXED, "pretrain_labels": {"joy": "Happy"}},
                      {"name": "planted", "kind": "image_folders", "path": "raw/planted", "role": "pretrain"},
                      {"name": "demo_pool", "kind": "synthetic", "path": "raw/demo_pool", "role": "pretrain",
                       "n_images": 30, "seed": 2}])
    second = run_data_pipeline(root, RUN_CONFIG)
    assert second.success, [e.check_name for e in second.get_asset_check_evaluations() if not e.passed]
    return World(paths, before, first, second, picked)


def test_a_catalogue_without_pool_labels_publishes_an_empty_pool(world: World) -> None:
    before = world.before
    assert len(before["pool"]) == 0 and list(before["pool"].columns) == list(POOL_COLUMNS)
    excluded = before["excluded"]
    joy = excluded[excluded["source_path"].str.startswith("joy/")]
    assert len(joy) == 4 and set(joy["stage"]) == {"label_mapping"} and set(joy["reason"]) == {"unmapped label: joy"}
    assert not excluded["stage"].isin(["pool", "leakage_guard"]).any()
    # the set's version is the content hash it was before the pool existed (kept + excluded only)
    assert asset_metadata(world.first, "splits")["manifest_version"] == manifest_version(before["manifest"], excluded)
    assert _checks(world.first)["pool_no_heldout_duplicates"].passed


def test_adding_pool_sources_changes_nothing_of_the_four_classes(world: World) -> None:
    after = _tables(world.paths)
    pd.testing.assert_frame_equal(after["manifest"], world.before["manifest"])
    pd.testing.assert_frame_equal(after["splits"], world.before["splits"])
    old = world.before["excluded"]
    old = old[~old["source_path"].str.startswith("joy/")].reset_index(drop=True)  # now pool items
    new = after["excluded"]
    new = new[new["source"].isin(["demo", "mixed"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(new, old)


def test_every_file_is_accounted_once_across_manifest_excluded_and_pool(world: World) -> None:
    paths = world.paths
    items = accounting_items(pd.read_parquet(paths.raw_inventory), pd.read_parquet(paths.faces_table))
    tables = _tables(paths)
    seen = pd.concat([tables[t][ITEM].assign(table=t) for t in ("manifest", "excluded", "pool")], ignore_index=True)
    assert not seen.duplicated(ITEM).any()
    assert set(map(tuple, seen[ITEM].to_numpy())) == set(map(tuple, items[ITEM].to_numpy()))
    per_table = seen.groupby(["source", "table"]).size().unstack(fill_value=0)
    # planted: 12 blobs + one twin stay; three leaks (test, validation, train), the other twin, the broken file,
    # junk go
    assert per_table.loc["planted"].to_dict() == {"excluded": 6, "manifest": 0, "pool": 13}
    assert per_table.loc["mixed"].to_dict() == {"excluded": 0, "manifest": 6, "pool": 4}
    assert per_table.loc["demo_pool", "manifest"] == 0 and per_table.loc["demo_pool", "pool"] == 30
    meta = asset_metadata(world.second, "manifest")
    assert meta["accounting_balanced"] and _checks(world.second)["manifest_accounting"].passed


def test_the_guard_drops_copies_of_four_class_images_and_names_them(world: World) -> None:
    tables = _tables(world.paths)
    guard = tables["excluded"][tables["excluded"]["stage"] == "leakage_guard"].set_index("source_path")
    # a train copy goes too: cross-validation and leave-one-source-out hold train images out
    assert sorted(guard.index) == ["happy/leak_test.png", "happy/train_copy.png", "sad/leak_validation.png"]
    for path, split in (("happy/leak_test.png", "test"), ("sad/leak_validation.png", "validation"),
                        ("happy/train_copy.png", "train")):
        assert guard.loc[path, "duplicate_of"] == world.picked[split]
        assert f"duplicates {split} image {world.picked[split]}" in guard.loc[path, "reason"]
        assert guard.loc[path, "source"] == "planted" and guard.loc[path, "raw_label"] == path.split("/")[0]
    assert "happy/train_copy.png" not in set(tables["pool"]["source_path"])
    meta = asset_metadata(world.second, "splits")
    assert meta["pool_dropped_by_leakage_guard"] == 3
    check = _checks(world.second)["pool_no_heldout_duplicates"]
    assert check.passed and check.metadata["details"].value["duplicating_heldout"] == 0
    assert check.metadata["details"].value["pool_images"] == len(tables["pool"])


def test_the_pool_table_its_labels_and_readers(world: World) -> None:
    paths = world.paths
    pool = read_pool(paths)
    pd.testing.assert_frame_equal(pool, pd.read_parquet(paths.pool))
    assert list(pool.columns) == list(POOL_COLUMNS) and pool["image_id"].is_unique
    assert set(pool["pool_label"]) == {"happy", "sad", *POOL_EXPRESSIONS}
    joy = pool[pool["source"] == "mixed"]
    assert set(joy["original_label"]) == {"joy"} and set(joy["pool_label"]) == {"happy"}  # synonyms merged
    assert pool_version(paths) == pool_content_version(pool) == asset_metadata(world.second, "splits")["pool_version"]
    faces = load_faces(paths.root, pool["face_path"].tolist())
    assert faces.shape == (len(pool), 48, 48)
    excluded = pd.read_parquet(paths.excluded)
    twin = excluded[(excluded["source"] == "planted") & (excluded["stage"] == "pool")]
    kept_twin = pool[(pool["source"] == "planted") & pool["source_path"].str.endswith("twin.png")]
    assert len(twin) == 1 and len(kept_twin) == 1
    assert twin["duplicate_of"].iloc[0] == kept_twin["image_id"].iloc[0]
    assert twin["reason"].iloc[0].startswith(f"duplicate of {kept_twin['image_id'].iloc[0]} (planted/")
    broken = excluded[excluded["source_path"] == "sad/broken.png"]
    assert broken["stage"].tolist() == ["faces"] and broken["reason"].iloc[0].startswith("rejected:")
    demo_pool = excluded[excluded["source"] == "demo_pool"]
    assert (demo_pool["stage"] == "pool").sum() == 2 and (demo_pool["stage"] == "faces").sum() == 1


def test_a_pool_from_another_set_is_refused(world: World, tmp_path: Path) -> None:
    copy = DataPaths(tmp_path)
    shutil.copytree(world.paths.manifest_dir, copy.manifest_dir, ignore=shutil.ignore_patterns("candidates"))
    meta = read_parquet_meta(copy.pool)
    write_parquet(copy.pool, pd.read_parquet(copy.pool), {**meta, "data_version": "0123456789abcdef"})
    with pytest.raises(MixedSetError, match="guarded against splits of data version 0123456789abcdef"):
        read_pool(copy)
    write_parquet(copy.pool, pd.read_parquet(copy.pool), {**meta, "manifest_version": "0123456789abcdef"})
    with pytest.raises(MixedSetError, match="not one set"):
        read_published(copy)
    copy.pool.unlink()  # a data root from before the pool: an empty pool
    assert len(read_pool(copy)) == 0 and list(read_pool(copy).columns) == list(POOL_COLUMNS)


def test_a_bypassed_guard_fails_the_blocking_check_and_publishes_nothing(world: World,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    paths = world.paths
    published = {t: getattr(paths, t).read_bytes() for t in TABLES}

    def keep_everything(pool, manifest, splits, data_root, rule) -> pool_core.GuardResult:
        matches = pd.DataFrame(columns=["source", "source_path", "pool_label", *pool_core.MATCH_COLUMNS])
        return pool_core.GuardResult(pool.reset_index(drop=True), pd.DataFrame(columns=list(EXCLUDED_COLUMNS)),
                                     matches)

    monkeypatch.setattr(pool_core, "leakage_guard", keep_everything)
    result = run_data_pipeline(paths.root, RUN_CONFIG)
    assert not result.success
    check = _checks(result)["pool_no_heldout_duplicates"]
    assert not check.passed and check.metadata["blocking"].value is True
    assert check.metadata["details"].value["duplicating_heldout"] == 3
    (failure,) = check.metadata["failures"].value
    assert {e["duplicate_of"] for e in failure["examples"]} == {world.picked[s] for s in ("test", "validation", "train")}
    assert {t: getattr(paths, t).read_bytes() for t in TABLES} == published  # byte for byte
    candidate = pd.read_parquet(paths.candidates_dir / result.run_id / "pool.parquet")
    leaks = ["happy/leak_test.png", "sad/leak_validation.png", "happy/train_copy.png"]
    assert candidate["source_path"].isin(leaks).sum() == 3


def test_splits_alone_guards_the_published_pool_against_the_new_splits(world: World, tmp_path: Path) -> None:
    """A new split seed, `splits` materialized alone: it starts from the published set and guards
    the published pool again; what an earlier guard dropped stays excluded (conservative)."""
    root = tmp_path / "data"
    shutil.copytree(world.paths.root, root, ignore=shutil.ignore_patterns("candidates"))
    config = {"resources": {"fer": {"config": {"min_images_per_class": 5, "split_seed": 1, "view_duplicates": False}}}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DATA_DIR", str(root))
        result = defs.resolve_job_def("data_pipeline").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), run_config=config, raise_on_error=False,
            asset_selection=[dg.AssetKey("splits")])
    assert result.success and _checks(result)["pool_no_heldout_duplicates"].passed
    paths = DataPaths(root)
    tables = _tables(paths)
    before = _tables(world.paths)
    assert not tables["splits"]["split"].equals(before["splits"]["split"])  # really re-split
    guard = tables["excluded"][tables["excluded"]["stage"] == "leakage_guard"]
    assert {"happy/leak_test.png", "sad/leak_validation.png", "happy/train_copy.png"} <= set(guard["source_path"])
    seen = pd.concat([tables[t][ITEM] for t in ("manifest", "excluded", "pool")], ignore_index=True)
    assert not seen.duplicated().any() and len(seen) == sum(len(before[t]) for t in ("manifest", "excluded", "pool"))
    assert read_pool(paths)["image_id"].tolist() == tables["pool"]["image_id"].tolist()


# --------------------------------------------------------------------------------------------
# catalogue
# --------------------------------------------------------------------------------------------

def _parse(entry: dict, tmp_path: Path):
    (tmp_path / "src").mkdir(exist_ok=True)
    return parse_catalog({"sources": [{"name": "s", "kind": "image_folders", "path": "src", **entry}]},
                         tmp_path).sources[0]


def test_pool_labels_in_the_catalogue(tmp_path: Path) -> None:
    spec = _parse({"label_map": {"angry": "Angry"}, "pretrain_labels": ["Happy", "SAD"]}, tmp_path)
    assert spec.pool_label("HAPPY") == "happy" and spec.pool_label("angry") is None and spec.pool_label("fear") is None
    spec = _parse({"label_map": {"angry": "Angry"}, "pretrain_labels": "all"}, tmp_path)
    assert spec.pool_label("Fear") == "fear" and spec.pool_label("Angry") is None
    spec = _parse({"label_map": {"angry": "Angry"}, "pretrain_labels": {"joy": "Happy", "happy": "happy"}}, tmp_path)
    assert spec.pool_label("Joy") == spec.pool_label("happy") == "happy"
    spec = _parse({"role": "pretrain"}, tmp_path)  # the pool only: every label, no label_map
    assert spec.role == "pretrain" and spec.label_map == {} and spec.pool_label("anything") == "anything"
    assert _parse({"label_map": {"angry": "Angry"}}, tmp_path).pool_label("happy") is None  # as before
    fer = parse_catalog({"sources": [{"name": "f", "kind": "fer2013_csv", "path": "fer.csv", "label_map": {0: "Angry"},
                                      "pretrain_labels": [3, "sad"]}]}, _with_csv(tmp_path)).sources[0]
    assert fer.pool_label("happy") == "happy" and fer.pool_label("sad") == "sad"  # code 3 names happy


def _with_csv(root: Path) -> Path:
    (root / "fer.csv").write_text("emotion,pixels,Usage\n")
    return root


@pytest.mark.parametrize("entry, field, message", [
    ({"label_map": {"angry": "Angry"}, "pretrain_labels": ["Angry"]}, "pretrain_labels.Angry",
     "is also in label_map (as Angry): a label goes to the four classes or to the pretraining pool, not both"),
    ({"label_map": {"angry": "Angry"}, "pretrain_labels": [7]}, "pretrain_labels.7", "label names must be text"),
    ({"label_map": {"angry": "Angry"}, "pretrain_labels": {"joy": " "}}, "pretrain_labels.joy", "empty pool label"),
    ({"label_map": {"angry": "Angry"}, "pretrain_labels": {"joy": 1}}, "pretrain_labels.joy",
     "the pool label must be text, not 1"),
    ({"label_map": {"angry": "Angry"}, "pretrain_labels": ["joy", "JOY"]}, "pretrain_labels.JOY",
     "is the same label as 'joy'"),
    ({"label_map": {"angry": "Angry"}, "pretrain_labels": []}, "pretrain_labels", "is empty"),
    ({"label_map": {"angry": "Angry"}, "pretrain_labels": "every"}, "pretrain_labels", "must be 'all', a list"),
    ({"role": "pretrain", "label_map": {"angry": "Angry"}}, "label_map", "a 'role: pretrain' source feeds only"),
    ({"role": "pretraining"}, "role", "must be 'train', 'pretrain' or 'unlabelled', not 'pretraining'"),
    ({"label_map": {"angry": "Angry"}, "role": None}, "role", "must be 'train', 'pretrain' or 'unlabelled', not None"),
])
def test_bad_pool_configuration_fails_fast_naming_source_and_field(tmp_path: Path, entry: dict, field: str,
                                                                   message: str) -> None:
    with pytest.raises(CatalogError, match=re.escape(f"source 's', field '{field}': ") + ".*" + re.escape(message)):
        _parse(entry, tmp_path)


def test_a_bad_pool_entry_stops_the_run_before_any_image(tmp_path: Path) -> None:
    write(tmp_path / "raw" / "x" / "angry" / "a.png", face_png(1))
    write_catalogue(tmp_path, [{**MIXED, "path": "raw/x", "pretrain_labels": {"ANGRY": "anger"}}])
    result = run_data_pipeline(tmp_path, RUN_CONFIG)
    assert not result.success
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    message = error.cause.message if error.cause else error.message
    assert "source 'mixed', field 'pretrain_labels.ANGRY': is also in label_map" in message
    assert not DataPaths(tmp_path).raw_inventory.exists() and not DataPaths(tmp_path).manifest.exists()
