"""The sources sensor, the nightly rebuild schedule, their fingerprint core (source_watch), the
rebuild switch, and incremental de-duplication (same groups as from scratch)."""

from __future__ import annotations

import builtins
import datetime
import io
import os
import time
import zipfile
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from fer_pipeline.sources import watch as source_watch
from fer_pipeline.sources.catalog import CatalogError, load_catalog
from fer_pipeline.dedup.groups import deduplicate_incremental
from fer_pipeline.sources.inventory import LISTINGS_ATTR, build_inventory
from fer_pipeline.defs import automation
from fer_pipeline.defs.resources import FerSettings
from fer_pipeline_tests.conftest import face_png, write, write_catalogue

IMAGE_SUFFIXES = (".png", ".jpg", ".zip")


FOLDER = {"name": "faces", "kind": "image_folders", "path": "raw/faces", "label_map": {"angry": "Angry", "calm": "Neutral"}}
ZIPPED = {"name": "z", "kind": "image_folders", "path": "set.zip", "label_map": {"angry": "Angry"}}


@pytest.fixture
def folder_root(data_root: Path) -> Path:
    for i in range(4):
        write(data_root / "raw" / "faces" / ("angry" if i % 2 else "calm") / f"{i}.png", face_png(i, size=40))
    write_catalogue(data_root, [FOLDER])
    return data_root


def touch_later(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


class Ticker:
    """Evaluates the sensor the way the daemon does: the cursor of one tick feeds the next."""

    def __init__(self, root: Path, sensor: dg.SensorDefinition | None = None) -> None:
        self.root = root
        self.sensor = sensor or automation.source_files_sensor
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursor: str | None = None

    def tick(self) -> dg.SensorExecutionData:
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor,  # fer has a setup/teardown
                                     resources={"fer": FerSettings(data_root=str(self.root))}) as ctx:
            data = self.sensor.evaluate_tick(ctx)
        if data.cursor is not None:
            self.cursor = data.cursor
        return data

    def one_run(self) -> dg.RunRequest:
        data = self.tick()
        assert data.skip_message is None, data.skip_message
        assert len(data.run_requests) == 1, data.run_requests
        request = data.run_requests[0]
        assert request.run_key and request.run_key.startswith("sources-")
        return request

    def nothing(self) -> str:
        data = self.tick()
        assert not data.run_requests, data.run_requests
        assert data.skip_message
        return data.skip_message


# ---------------------------------------------------------------- source_watch (plain Python)

def test_fingerprint_is_stable_and_sees_new_changed_and_removed_files(folder_root: Path) -> None:
    fp = source_watch.fingerprint_sources(folder_root)
    assert fp == source_watch.fingerprint_sources(folder_root)
    assert fp.sources["faces"].files == 4 and fp.files == 4
    new = write(folder_root / "raw" / "faces" / "angry" / "new.png", face_png(50, size=40))
    fp_new = source_watch.fingerprint_sources(folder_root)
    assert fp_new.digest != fp.digest and fp_new.sources["faces"].files == 5
    touch_later(new)  # same name and size, content rewritten later
    fp_touched = source_watch.fingerprint_sources(folder_root)
    assert fp_touched.digest != fp_new.digest
    new.unlink()
    assert source_watch.fingerprint_sources(folder_root).digest == fp.digest  # back to the first state
    write_catalogue(folder_root, [{**FOLDER, "label_map": {"angry": "Angry"}}])
    fp_cat = source_watch.fingerprint_sources(folder_root)
    assert fp_cat.digest != fp.digest and fp_cat.catalog_digest != fp.catalog_digest
    assert fp_cat.sources["faces"] == fp.sources["faces"]


def test_fingerprint_never_reads_images_or_archives(folder_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with zipfile.ZipFile(folder_root / "more.zip", "w") as zf:
        zf.writestr("angry/a.png", face_png(1, size=40))
    write_catalogue(folder_root, [FOLDER, {"name": "zipped", "kind": "image_folders", "path": "more.zip",
                                     "label_map": {"angry": "Angry"}}])
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).lower().endswith(IMAGE_SUFFIXES):
            raise AssertionError(f"the fingerprint opened {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    fp = source_watch.fingerprint_sources(folder_root)
    assert fp.sources["zipped"].files == 1 and fp.sources["faces"].files == 4


def test_zip_rewritten_as_a_whole_is_a_change(data_root: Path) -> None:
    archive = data_root / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("angry/a.png", face_png(1, size=40))
    write_catalogue(data_root, [ZIPPED])
    before = source_watch.fingerprint_sources(data_root)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("angry/b.png", face_png(2, size=40))
    assert source_watch.fingerprint_sources(data_root).digest != before.digest


def test_demographics_csv_outside_the_source_is_watched(folder_root: Path) -> None:
    csv = write(folder_root / "meta" / "people.csv", b"file,gender\n0.png,female\n")
    write_catalogue(folder_root, [{**FOLDER, "demographics": {"csv": "meta/people.csv", "key": "file",
                                                        "columns": {"gender": "gender"}}}])
    before = source_watch.fingerprint_sources(folder_root)
    csv.write_bytes(b"file,gender\n0.png,male\n1.png,female\n")
    assert source_watch.fingerprint_sources(folder_root).digest != before.digest


def test_broken_catalogue_raises_catalog_error(folder_root: Path) -> None:
    write_catalogue(folder_root, [{**FOLDER, "path": "raw/nowhere"}])
    with pytest.raises(CatalogError, match="source 'faces', field 'path'"):
        source_watch.fingerprint_sources(folder_root)


def test_cursor_round_trip_and_change_descriptions(folder_root: Path) -> None:
    fp = source_watch.fingerprint_sources(folder_root)
    state = source_watch.parse_cursor(fp.to_cursor(7))
    assert state is not None and state.digest == fp.digest and state.seq == 7
    assert state.sources["faces"][1:] == (4, fp.sources["faces"].bytes)
    assert len(fp.to_cursor(7)) < 400  # a small summary, not a file list
    for junk in (None, "", "not json", '{"v": 99, "digest": "x"}', "[1, 2]"):
        assert source_watch.parse_cursor(junk) is None
    write(folder_root / "raw" / "faces" / "angry" / "n1.png", face_png(60, size=40))
    write(folder_root / "raw" / "faces" / "angry" / "n2.png", face_png(61, size=40))
    later = source_watch.fingerprint_sources(folder_root)
    assert source_watch.describe_changes(state, later) == ["source 'faces': 4 -> 6 files (+2)"]
    assert source_watch.describe_changes(None, later)[0].startswith("first evaluation")
    assert source_watch.run_key(later, 8) != source_watch.run_key(later, 9)


# ---------------------------------------------------------------- the sensor

def test_sensor_one_run_per_change_and_none_without_change(folder_root: Path) -> None:
    t = Ticker(folder_root)
    first = t.one_run()  # no cursor yet: bring the data assets up to date once
    assert first.job_name == automation.source_files_sensor.job_name == "data_pipeline"
    assert "no change" in t.nothing()
    assert "no change" in t.nothing()

    write(folder_root / "raw" / "faces" / "angry" / "new.png", face_png(70, size=40))
    added = t.one_run()
    assert added.run_key != first.run_key
    assert added.tags["fer/changes"] == "source 'faces': 4 -> 5 files (+1)"
    assert added.tags["fer/trigger"] == "source_change"
    assert t.nothing()  # same state again: nothing

    write_catalogue(folder_root, [{**FOLDER, "label_map": {"angry": "Angry", "calm": "Neutral", "sad": "Tired"}}])
    changed_catalogue = t.one_run()
    assert "sources.yaml changed" in changed_catalogue.tags["fer/changes"]
    t.nothing()

    (folder_root / "raw" / "faces" / "angry" / "new.png").unlink()
    removed = t.one_run()
    assert "5 -> 4 files (-1)" in removed.tags["fer/changes"]
    t.nothing()
    keys = [first.run_key, added.run_key, changed_catalogue.run_key, removed.run_key]
    assert len(set(keys)) == 4


def test_sensor_returning_to_an_earlier_state_is_still_a_new_run(folder_root: Path) -> None:
    t = Ticker(folder_root)
    a = t.one_run()
    extra = write(folder_root / "raw" / "faces" / "calm" / "x.png", face_png(80, size=40))
    b = t.one_run()
    extra.unlink()
    c = t.one_run()  # same fingerprint as the first tick, but a new change: Dagster must not drop it
    assert len({a.run_key, b.run_key, c.run_key}) == 3
    assert a.run_key.split("-")[1] == c.run_key.split("-")[1]  # derived from the same fingerprint


def test_sensor_skips_with_the_catalogue_problem_and_keeps_its_cursor(folder_root: Path) -> None:
    t = Ticker(folder_root)
    t.one_run()
    good_cursor = t.cursor
    write_catalogue(folder_root, [{**FOLDER, "kind": "image_folder"}])
    message = t.nothing()
    assert "catalogue problem" in message and "source 'faces', field 'kind'" in message
    assert t.cursor == good_cursor
    (folder_root / "sources.yaml").write_text("sources: [unclosed")
    assert "not valid YAML" in t.nothing()
    (folder_root / "sources.yaml").unlink()
    assert "sources.yaml not found" in t.nothing()
    write_catalogue(folder_root, [FOLDER])  # fixed, back to the same content: nothing changed since the last run
    assert "no change" in t.nothing()


def test_sensor_zip_source(data_root: Path) -> None:
    archive = data_root / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("angry/a.png", face_png(1, size=40))
    write_catalogue(data_root, [ZIPPED])
    t = Ticker(data_root)
    t.one_run()
    t.nothing()
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("angry/b.png", face_png(2, size=40))
    assert "source 'z'" in t.one_run().tags["fer/changes"]
    t.nothing()


def test_sensor_data_root_from_environment(folder_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FER_DATA_DIR", str(folder_root))
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources={"fer": FerSettings()}) as ctx:
        data = automation.source_files_sensor.evaluate_tick(ctx)
    assert len(data.run_requests) == 1


def test_sensor_definition_defaults_and_switches(monkeypatch: pytest.MonkeyPatch, folder_root: Path) -> None:
    sensor = automation.source_files_sensor
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.minimum_interval_seconds == int(os.environ.get("FER_SENSOR_INTERVAL_SECONDS") or 30)
    # the sensor runs the data half; declarative automation takes it from there
    assert sensor.job_name == "data_pipeline"
    monkeypatch.setenv("FER_SENSOR_INTERVAL_SECONDS", "2")
    faster = automation.build_source_sensor()
    assert faster.minimum_interval_seconds == 2 and Ticker(folder_root, faster).one_run().job_name == "data_pipeline"
    assert automation.build_automation_sensor().minimum_interval_seconds == 2
    monkeypatch.setenv("FER_SENSOR_INTERVAL_SECONDS", "soon")
    with pytest.raises(ValueError, match="FER_SENSOR_INTERVAL_SECONDS"):
        automation.build_source_sensor()


def test_definitions_load_with_sensors_schedule_and_automation() -> None:
    from fer_pipeline.definitions import defs

    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("source_files_sensor")
    schedule = repo.get_schedule_def("full_rebuild_schedule")
    assert sensor.job_name == "data_pipeline" and schedule.job_name == "data_pipeline"
    data = {k.to_user_string() for k in repo.get_job("data_pipeline").asset_layer.selected_asset_keys}
    assert "source_files" in data and "splits" in data  # the data run observes the sources first
    assert repo.has_job("data_pipeline") and repo.has_job("main")
    # the training work: fold partitions (the settings file's cv_folds), held-out sources (the catalogue's)
    assert len(repo.get_job("cv_folds").partitions_def.get_partition_keys()) >= 2
    assert isinstance(repo.get_job("loso_folds").partitions_def, dg.StaticPartitionsDefinition)
    main = {k.to_user_string() for k in repo.get_job("main").asset_layer.executable_asset_keys}
    reports = {k.to_user_string() for k in repo.get_job("training_reports").asset_layer.executable_asset_keys}
    assert "held_out_sources" in main and not main & {"cv_fold", "loso_fold", "cross_validation", "label_issues"}
    assert {"cross_validation", "cross_source_generalisation", "label_issues"} <= reports
    automated = repo.get_sensor_def("fer_automation")
    assert automated.default_status == dg.DefaultSensorStatus.RUNNING
    assert "training_work_sensor" not in {s.name for s in repo.sensor_defs}


def test_fold_count_setting_fails_fast_naming_the_variable() -> None:
    from fer_pipeline.defs.jobs import PartitionSettingError, cv_fold_count

    assert cv_fold_count({}) == 10 and cv_fold_count({"FER_CV_FOLDS": " 3 "}) == 3
    assert cv_fold_count({}, default=4) == 4 and cv_fold_count({"FER_CV_FOLDS": "2"}, default=4) == 2
    for bad, why in (("three", "expected a whole number"), ("1", "must be at least 2 folds")):
        with pytest.raises(PartitionSettingError, match=f"FER_CV_FOLDS='{bad}': {why}"):
            cv_fold_count({"FER_CV_FOLDS": bad})


# ---------------------------------------------------------------- the schedule

def test_rebuild_schedule_requests_a_from_scratch_run(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = automation.full_rebuild_schedule
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.cron_schedule == (os.environ.get("FER_REBUILD_CRON") or "0 3 * * *")
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime.datetime(2026, 1, 2, 3, 0))
    data = schedule.evaluate_tick(ctx)
    assert len(data.run_requests) == 1
    request = data.run_requests[0]
    assert request.run_config == {"resources": {"fer": {"config": {"rebuild": True}}}}
    assert request.tags["fer/trigger"] == "scheduled_rebuild"
    from fer_pipeline.definitions import defs

    validated = dg.validate_run_config(defs.resolve_job_def("data_pipeline"), request.run_config)
    assert validated["resources"]["fer"]["config"]["rebuild"] is True
    monkeypatch.setenv("FER_REBUILD_CRON", "30 1 * * 0")
    assert automation.build_rebuild_schedule().cron_schedule == "30 1 * * 0"
    monkeypatch.setenv("FER_REBUILD_CRON", "every night")
    with pytest.raises(ValueError, match="FER_REBUILD_CRON"):
        automation.build_rebuild_schedule()


def test_rebuild_run_reprocesses_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fer_pipeline.definitions import defs

    root = tmp_path / "data"
    root.mkdir()
    write_catalogue(root, [{"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 120, "seed": 5}])
    monkeypatch.setenv("FER_DATA_DIR", str(root))
    job = defs.resolve_job_def("data_pipeline")
    instance = dg.DagsterInstance.ephemeral()
    small = {"min_images_per_class": 5}
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

    def run(**config: object) -> dict[str, dict[str, object]]:
        result = job.execute_in_process(instance=instance, raise_on_error=False,
                                        run_config={"resources": {"fer": {"config": {**small, **config}}}, **quiet})
        assert result.success
        return {e.asset_key.path[-1]: {k: v.value for k, v in e.materialization.metadata.items()}
                for e in result.get_asset_materialization_events()}

    first = run()
    manifest_first = pd.read_parquet(root / "manifest" / "manifest.parquet")
    again = run()
    assert again["faces"]["decoded_this_run"] == 0 and again["raw_sources"]["hashed_this_run"] == 0
    assert again["deduplicated_faces"]["faces_compared_this_run"] == 0
    rebuilt = run(rebuild=True)
    assert rebuilt["faces"]["decoded_this_run"] == first["faces"]["decoded_this_run"] > 100
    assert rebuilt["faces"]["reused_from_cache"] == 0
    assert rebuilt["raw_sources"]["hashed_this_run"] == first["raw_sources"]["hashed_this_run"]
    assert rebuilt["raw_sources"]["hash_reused_from_previous"] == 0
    assert rebuilt["deduplicated_faces"]["faces_pairs_from_cache"] == 0
    pd.testing.assert_frame_equal(pd.read_parquet(root / "manifest" / "manifest.parquet"), manifest_first)


# ---------------------------------------------------------------- incremental de-duplication

def _dedup_table(n: int = 600, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Faces with planted exact, near, mirrored and phash-only (pixel-different) duplicates."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64)
    mirrors = rng.integers(0, 2**63, n, dtype=np.uint64)
    bit = lambda: np.uint64(1) << np.uint64(rng.integers(0, 64))  # noqa: E731
    for k in range(0, 120, 4):  # near duplicates: close hash, nearly the same pixels
        hashes[k + 1] = hashes[k] ^ bit()
        pixels[k + 1] = np.clip(pixels[k].astype(int) + rng.integers(-3, 4, (12, 12)), 0, 255)
    for k in range(120, 200, 4):  # mirrored copies: hash close to the other's mirrored hash
        hashes[k + 1] = mirrors[k] ^ bit()
        mirrors[k + 1] = hashes[k]
        pixels[k + 1] = pixels[k][:, ::-1]
    for k in range(200, 260, 4):  # phash collisions between different faces: rejected by pixels
        hashes[k + 1] = hashes[k] ^ bit()
    shas = [f"{i:064x}" for i in rng.permutation(10**6)[:n]]
    df = pd.DataFrame({
        "sha256": shas, "source": "s", "source_path": [f"p{i:04d}.png" for i in range(n)],
        "image_id": [s[:16] for s in shas], "label": rng.choice(["Angry", "Neutral"], n, p=[0.9, 0.1]),
        "width": 48, "height": 48, "bytes": rng.integers(100, 200, n),
        "pixel_sha": shas, "phash": [f"{int(h):016x}" for h in hashes],
        "phash_mirror": [f"{int(h):016x}" for h in mirrors]})
    # two files with the same content (exact duplicate under another name)
    dup = df.iloc[[5]].assign(source_path="copy_of_p0005.png")
    return pd.concat([df, dup], ignore_index=True), np.concatenate([pixels, pixels[[5]]])


def _groups(report) -> set[frozenset[str]]:  # type: ignore[no-untyped-def]
    t = report.table
    return {frozenset(g["source_path"]) for _, g in t.groupby("dup_group")}


def _run(df: pd.DataFrame, pixels: np.ndarray, cache: Path | None, calls: list[int] | None = None):  # type: ignore[no-untyped-def]
    rows_pixels = pixels[df.index.to_numpy()]

    def load(rows: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(len(rows))
        return rows_pixels[rows]

    return deduplicate_incremental(df.reset_index(drop=True), 4, True, load, 0.95, cache_path=cache)


def test_incremental_dedup_matches_from_scratch(tmp_path: Path) -> None:
    df, pixels = _dedup_table()
    scratch, stats = _run(df, pixels, None)
    assert stats.faces_compared == 600 and stats.faces_cached == 0
    assert scratch.n_exact_links == 1 and scratch.n_near_links >= 30 + 20
    assert scratch.n_near_candidates >= scratch.n_near_links + 15  # pixel check rejected the collisions
    cache = tmp_path / "links.npz"
    rng = np.random.default_rng(1)
    first_part = df.iloc[np.sort(rng.permutation(len(df))[:450])]
    _run(first_part, pixels, cache)
    calls: list[int] = []
    grown, stats = _run(df, pixels, cache, calls)  # 151 rows arrive
    assert stats.faces_cached + stats.faces_compared == 600 and stats.faces_compared <= 151
    assert sum(calls) < 151  # only faces in new candidate pairs had their pixels loaded
    assert _groups(grown) == _groups(scratch)
    assert (grown.n_near_links, grown.n_near_candidates) == (scratch.n_near_links, scratch.n_near_candidates)
    cols = ["source_path", "is_representative", "conflict", "dup_group_size", "duplicate_of"]
    key = lambda r: r.table[cols].sort_values("source_path").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(key(grown), key(scratch))
    # nothing new: nothing compared, no pixels loaded
    calls.clear()
    same, stats = _run(df, pixels, cache, calls)
    assert stats.faces_compared == 0 and not calls and _groups(same) == _groups(scratch)
    # files removed: their pairs drop out, as if computed from scratch on what is left
    left = df.iloc[40:]
    shrunk, stats = _run(left, pixels, cache)
    assert stats.faces_compared == 0
    assert _groups(shrunk) == _groups(_run(left, pixels, None)[0])
    # a corrupt cache is ignored (everything compared again)
    cache.write_bytes(b"not a cache")
    _, stats = _run(df, pixels, cache)
    assert stats.faces_compared == 600


# ---------------------------------------------------------------- incremental inventory

def _inventory_round_trip(root: Path, previous: pd.DataFrame | None):  # type: ignore[no-untyped-def]
    report = build_inventory(load_catalog(root / "sources.yaml", root), root, previous)
    report.table.to_parquet(root / "inv.parquet", index=False)
    return report, pd.read_parquet(root / "inv.parquet")


def test_inventory_reuses_unchanged_sources_without_listing_them(folder_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with zipfile.ZipFile(folder_root / "more.zip", "w") as zf:
        zf.writestr("angry/a.png", face_png(1, size=40))
        zf.writestr("calm/b.png", face_png(2, size=40))
    zipped = {"name": "zipped", "kind": "image_folders", "path": "more.zip", "label_map": {"angry": "Angry"}}
    write_catalogue(folder_root, [FOLDER, zipped])
    first, stored = _inventory_round_trip(folder_root, None)
    assert first.hashed == 6 and set(stored.attrs[LISTINGS_ATTR]) == {"faces", "zipped"}

    import fer_pipeline.sources.inventory as inventory

    listed: list[str] = []
    real = inventory.inventory_source
    monkeypatch.setattr(inventory, "inventory_source",
                        lambda spec, *a, **k: (listed.append(spec.name), real(spec, *a, **k))[1])
    again, stored2 = _inventory_round_trip(folder_root, stored)
    assert listed == [] and again.hashed == 0 and again.reused == 6
    pd.testing.assert_frame_equal(stored2, stored)
    assert again.demographics_notes == first.demographics_notes

    write(folder_root / "raw" / "faces" / "angry" / "new.png", face_png(90, size=40))
    grown, stored3 = _inventory_round_trip(folder_root, stored2)
    assert listed == ["faces"] and grown.hashed == 1 and grown.reused == 6  # only the new file is read
    assert len(stored3) == len(stored) + 1

    listed.clear()
    write_catalogue(folder_root, [FOLDER, {**zipped, "label_map": {"angry": "Angry", "calm": "Neutral"}}])
    relabelled, stored4 = _inventory_round_trip(folder_root, stored3)
    assert listed == ["zipped"] and relabelled.hashed == 0  # re-classified, hashes reused per member
    assert stored4.loc[stored4["source_path"] == "calm/b.png", "label"].item() == "Neutral"

    listed.clear()
    truncated = stored4.iloc[:-1]
    assert truncated.attrs[LISTINGS_ATTR]
    _inventory_round_trip(folder_root, truncated)
    assert listed  # a previous table that does not match its listings is not trusted


# ---------------------------------------------------------------- hostile sources (issue #10)

ANGRY = ("raw", "faces", "angry")


def deny(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a folder unlistable: chmod 000, and (root ignores modes) refuse it in os.scandir."""
    path.chmod(0)
    if os.geteuid() == 0:
        real, target = os.scandir, os.fspath(path)

        def refuse(p=".", *args, **kwargs):  # type: ignore[no-untyped-def]
            if os.fspath(p) == target:
                raise PermissionError(13, "Permission denied", target)
            return real(p, *args, **kwargs)

        monkeypatch.setattr(os, "scandir", refuse)


def faults(root: Path) -> tuple[str, ...]:
    return source_watch.fingerprint_sources(root).sources["faces"].faults


def test_file_replaced_with_same_size_and_mtime_is_a_change(folder_root: Path) -> None:
    face = folder_root.joinpath(*ANGRY, "1.png")
    old = face.stat()
    before = source_watch.fingerprint_sources(folder_root)
    time.sleep(0.05)  # past the kernel's coarse clock tick, so the inode change time moves
    data = face.read_bytes()
    face.write_bytes(bytes(255 - b for b in data))  # different bytes, same size, same inode
    os.utime(face, ns=(old.st_atime_ns, old.st_mtime_ns))  # modification time set back
    assert face.stat().st_size == old.st_size and face.stat().st_mtime_ns == old.st_mtime_ns
    rewritten = source_watch.fingerprint_sources(folder_root)
    assert rewritten.digest != before.digest  # caught by st_ctime_ns

    other = face.with_name("other.tmp")
    other.write_bytes(data)
    os.utime(other, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(other, face)  # a new inode with the old size and mtime (rsync -t, cp -p + mv)
    assert source_watch.fingerprint_sources(folder_root).digest not in (before.digest, rewritten.digest)


def test_dangling_link_loop_and_fifo_are_part_of_the_fingerprint(folder_root: Path) -> None:
    angry = folder_root.joinpath(*ANGRY)
    digests = [source_watch.fingerprint_sources(folder_root).digest]
    (angry / "gone.png").symlink_to(angry / "deleted.png")
    (angry / "loop.png").symlink_to(angry / "loop.png")
    os.mkfifo(angry / "pipe.png")
    (angry / "up").symlink_to(folder_root / "raw", target_is_directory=True)  # a folder holding the link
    fp = source_watch.fingerprint_sources(folder_root)  # no exception, no endless walk
    assert fp.sources["faces"].files == 4 and fp.digest != digests[0]
    # the same listing and reasons as a run's folder reader (links to folders are followed there)
    assert fp.sources["faces"].faults == (
        f"angry/gone.png: dangling link (to '{angry / 'deleted.png'}')",
        f"angry/loop.png: symlink loop (link to '{angry / 'loop.png'}')",
        "angry/pipe.png: not a regular file (FIFO)",
        f"angry/up: symlink loop: '{folder_root / 'raw'}' is a folder that contains the link",
    )
    (angry / "gone.png").unlink()
    (angry / "gone.png").symlink_to(angry / "elsewhere.png")  # the link retargeted: a change
    assert source_watch.fingerprint_sources(folder_root).digest != fp.digest
    for name in ("gone.png", "loop.png", "pipe.png", "up"):
        (angry / name).unlink()
    assert source_watch.fingerprint_sources(folder_root).digest == digests[0]


def test_unlistable_subfolder_is_a_fault_not_a_skip(folder_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calm = folder_root.joinpath("raw", "faces", "calm")
    t = Ticker(folder_root)
    t.one_run()
    with monkeypatch.context() as m:
        deny(calm, m)
        assert faults(folder_root) == ("calm: cannot list folder: permission denied",)
        locked = t.one_run()  # noticed as a change, the run records what it can read
        assert "1 unreadable entry (calm: cannot list folder: permission denied)" in locked.tags["fer/changes"]
        t.nothing()
    calm.chmod(0o755)
    assert faults(folder_root) == ()
    assert "4 files" in t.one_run().tags["fer/changes"]  # readable again: a change back


def test_sensor_runs_for_a_dangling_link_and_names_it(folder_root: Path) -> None:
    t = Ticker(folder_root)
    t.one_run()
    link = folder_root.joinpath(*ANGRY, "broken.png")
    link.symlink_to(folder_root / "nowhere.png")
    request = t.one_run()
    assert request.tags["fer/changes"].startswith("source 'faces': 4 files, contents or dates changed; "
                                                  "source 'faces': 1 unreadable entry (angry/broken.png: dangling link")
    t.nothing()  # the same fault is no new change
    link.unlink()
    t.one_run()


def test_unreadable_source_root_skips_and_names_the_source(folder_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = Ticker(folder_root)
    t.one_run()
    cursor = t.cursor
    faces = folder_root / "raw" / "faces"
    with monkeypatch.context() as m:
        deny(faces, m)
        with pytest.raises(source_watch.UnreadableSourceError,
                           match="source 'faces': cannot list folder .*permission denied"):
            source_watch.fingerprint_sources(folder_root)
        message = t.nothing()
        assert message.startswith("source 'faces': cannot list folder") and "a run now would drop its files" in message
        assert t.cursor == cursor
    faces.chmod(0o755)
    assert "no change" in t.nothing()


def test_fifo_as_an_archive_source_is_an_unreadable_source(data_root: Path) -> None:
    os.mkfifo(data_root / "set.zip")
    write_catalogue(data_root, [ZIPPED])
    with pytest.raises(source_watch.UnreadableSourceError,
                       match=r"source 'z': cannot read .*not a regular file \(FIFO\)"):
        source_watch.fingerprint_sources(data_root)
    assert "source 'z'" in Ticker(data_root).nothing()


def test_names_that_are_not_utf8_or_hold_control_characters(folder_root: Path) -> None:
    angry = folder_root.joinpath(*ANGRY)
    before = source_watch.fingerprint_sources(folder_root)
    with open(os.path.join(os.fsencode(angry), b"caf\xe9.png"), "wb") as f:  # latin-1 bytes, not UTF-8
        f.write(face_png(91, size=40))
    (angry / "x\n\x1b[2J.png").symlink_to(angry / "missing.png")
    fp = source_watch.fingerprint_sources(folder_root)  # no UnicodeEncodeError
    assert fp.digest != before.digest and fp.sources["faces"].files == 5
    (fault,) = fp.sources["faces"].faults
    assert fault.startswith("angry/x\\n\\x1b[2J.png: dangling link") and "\x1b" not in fault
    assert "\n" not in "; ".join(source_watch.describe_changes(source_watch.parse_cursor(before.to_cursor(1)), fp))


def test_changes_inside_a_linked_folder_are_seen(folder_root: Path) -> None:
    """The sensor lists a folder source as a run does: a linked class folder is followed, so a
    new file behind the link is a change (and the run reads it)."""
    elsewhere = folder_root / "elsewhere" / "angry_extra"
    write(elsewhere / "a.png", face_png(93, size=40))
    (folder_root / "raw" / "faces" / "angry_more").symlink_to(elsewhere, target_is_directory=True)
    before = source_watch.fingerprint_sources(folder_root)
    assert before.sources["faces"].files == 5 and not before.sources["faces"].faults
    write(elsewhere / "b.png", face_png(94, size=40))
    after = source_watch.fingerprint_sources(folder_root)
    assert after.digest != before.digest and after.sources["faces"].files == 6
