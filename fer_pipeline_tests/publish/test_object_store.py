"""The data root in an object store (docs/operations.md, "Object storage"), against a real S3-compatible server:
moto's standalone server on a free loopback port, in its own process group, stopped by PID.

* Sync rules of :class:`fer_pipeline.storage.ObjectStore`: a push uploads only what was written
  since the last sync, faces first and the manifest table last, never the local-only folders; a
  pull downloads only what changed, mirrors removals, keeps unpushed local work; a file changed
  in the store since this working copy synced it is a conflict (nothing uploaded).
* A wrong URL, bucket or missing credentials fail before any step runs, naming the URL.
* The pipeline on ``s3://bucket/prefix`` with a fresh working copy: the data half and the main
  model; the published tables, read back from S3 with pandas + s3fs, equal a local run's on the
  same inputs; then another fresh working copy trains the other models and evaluates all three
  from the store's published set alone; ``fer-pipeline predict`` and the summary read the URL.
* Two Dask workers, each with its own working copy (two hosts, no shared disk), run the data half
  and two models through the bucket and end with the same published set.

Run it alone: ``.venv/bin/python -m pytest -q fer_pipeline_tests/publish/test_object_store.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from fer_pipeline import cli, outputs
from fer_pipeline.atomic import write_bytes, write_json
from fer_pipeline.classes import CLASSES
from fer_pipeline.publish import (
    MixedSetError,
    check_published,
    publish_tables,
    read_published,
)
from fer_pipeline.demo.synthetic_faces import generate_demo_source
from fer_pipeline.definitions import defs
from fer_pipeline.defs.resources import FerSettings
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.paths import DataPaths
from fer_pipeline.storage import (
    ObjectStore,
    StoreConflictError,
    StoreError,
    open_data_root,
)
from fer_pipeline_tests.conftest import REPO
from fer_pipeline_tests.servers import (
    LOOPBACK,
    ServerProcess,
    accepts_connections,
    free_port,
    start_server,
)

BIN = Path(sys.executable).parent
DATA_KEYS = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits"]
PUBLISHED = ("manifest", "excluded", "pool", "unlabelled", "splits")
RUN_CONFIG = {"training": {"config": {"epochs": 1, "patience": 1, "num_threads": 1}}}


@dataclass
class S3:
    endpoint: str
    bucket: str
    fs: object  # s3fs.S3FileSystem, for reading the bucket directly

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = start_server([str(BIN / "moto_server"), "-H", LOOPBACK, "-p", str(port)], port=port,
                          log=tmp_path_factory.mktemp("moto") / "moto.log", name="moto S3 server")
    try:
        server.wait_until(lambda: accepts_connections(port), timeout=60)
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    """A fresh bucket; credentials and endpoint the way a deployment gives them: the usual variables."""
    import s3fs

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_endpoint,
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"fer-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    return S3(s3_endpoint, bucket, fs)


# --- sync rules ---------------------------------------------------------------------------------

def _published_set(paths: DataPaths, n: int, tag: str) -> str:
    kept = pd.DataFrame({"source": ["s"] * n, "source_path": [f"{tag}{i}.png" for i in range(n)],
                         "image_id": [f"{tag}{i}" for i in range(n)], "label": ["Angry"] * n})
    excluded = pd.DataFrame({"source": ["s"], "source_path": ["bad.png"], "reason": ["not an image"]})
    splits = pd.DataFrame({"image_id": kept["image_id"], "split": ["train"] * n, "fold": [0] * n})
    return publish_tables(paths, kept, excluded, splits, run_id=tag)


def test_push_and_pull_move_only_changes_in_commit_order(s3: S3, tmp_path: Path) -> None:
    url = s3.url("root")
    a = ObjectStore(url, tmp_path / "a").open()
    pa = a.paths
    version = _published_set(pa, 3, "v1")
    write_bytes(pa.faces_dir / "k" / "shards" / "s1.npy", b"face pixels")
    write_bytes(pa.checkpoint("cnn4"), b"weights")
    write_json(pa.metrics_json, {"best_model": "cnn4"})
    write_bytes(pa.model_candidates_dir / "cnn3.safetensors", b"diverged")  # local only
    write_bytes(pa.candidates_dir / "rejected-run" / "manifest.parquet", b"x")  # another run's: local only
    order: list[str] = []
    put = a.fs.put_file
    a.fs.put_file = lambda lpath, rpath, **kw: (order.append(a.rel(Path(lpath))), put(lpath, rpath, **kw))[1]

    first = a.push()
    rel = {name: a.rel(getattr(pa, name)) for name in PUBLISHED}
    assert sorted(first.uploaded) == sorted(order) and len(order) == 8
    assert order[0].startswith("faces/") and order[-5:] == [rel["excluded"], rel["pool"], rel["unlabelled"], rel["splits"],
                                                          rel["manifest"]]
    assert order.index(a.rel(pa.metrics_json)) > order.index(a.rel(pa.checkpoint("cnn4")))
    assert not s3.fs.exists(f"{s3.bucket}/root/models/candidates") and \
        not s3.fs.exists(f"{s3.bucket}/root/manifest/candidates")
    assert a.push().uploaded == []  # nothing written since

    b = ObjectStore(url, tmp_path / "b")
    pulled = b.pull_published()
    assert sorted(pulled.downloaded) == sorted(order)
    assert check_published(b.paths) == version and b.paths.checkpoint("cnn4").read_bytes() == b"weights"
    again = b.pull_published()
    assert again.downloaded == [] and again.unchanged == 8

    write_json(pa.metrics_json, {"best_model": "cnn3"})  # one file changes
    assert a.push().uploaded == [a.rel(pa.metrics_json)]
    assert b.pull_published().downloaded == [a.rel(pa.metrics_json)]
    s3.fs.rm(f"{s3.bucket}/root/models/cnn4.safetensors")  # removed from the store: removed here
    assert b.pull_published().removed_local == [a.rel(pa.checkpoint("cnn4"))]
    assert not b.paths.checkpoint("cnn4").exists()

    write_json(b.paths.metrics_json, {"best_model": "mine"})  # b's own work, not pushed yet ...
    assert b.pull_published().kept_local == [b.rel(b.paths.metrics_json)]  # ... is not overwritten
    write_json(pa.metrics_json, {"best_model": "theirs"})
    a.push()  # ... but the store moved on: b's push is refused, nothing is uploaded
    with pytest.raises(StoreConflictError, match="reports/metrics.json"):
        b.push()
    assert json.loads(s3.fs.cat(f"{s3.bucket}/root/reports/metrics.json")) == {"best_model": "theirs"}
    b.pull_published()  # both changed: the store's version wins
    assert json.loads(b.paths.metrics_json.read_text()) == {"best_model": "theirs"}


def test_a_run_candidate_travels_with_the_run_until_published(s3: S3, tmp_path: Path) -> None:
    """manifest (one worker) writes the run's candidate, splits (another) publishes it: the
    candidate folder is pushed, pulled by that run only, and removed from the store once published."""
    url = s3.url("runs")
    a, b = ObjectStore(url, tmp_path / "a"), ObjectStore(url, tmp_path / "b")
    run = "run-1"
    write_bytes(a.paths.candidates_dir / run / "manifest.parquet", b"candidate")
    assert a.push(run_id=run).uploaded == [f"manifest/candidates/{run}/manifest.parquet"]
    assert b.pull_published(run_id="other-run").downloaded == []
    assert b.pull_published(run_id=run).downloaded == [f"manifest/candidates/{run}/manifest.parquet"]
    shutil.rmtree(b.paths.candidates_dir / run)  # published: the local publish removes the folder
    assert b.push(run_id=run).removed_remote == [f"manifest/candidates/{run}/manifest.parquet"]
    assert not s3.fs.exists(f"{s3.bucket}/runs/manifest/candidates/{run}/manifest.parquet")
    for i in range(4):  # rejected candidates: only the newest `keep` stay in the store
        write_bytes(a.paths.candidates_dir / f"rejected-{i}" / "checks_manifest.json", b"{}")
        a.push(run_id=f"rejected-{i}", keep_candidates=2)
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{s3.bucket}/runs/manifest/candidates")) == \
        ["rejected-2", "rejected-3"]


def test_a_mixed_set_in_the_store_is_refused(s3: S3, tmp_path: Path) -> None:
    """A push interrupted between two tables leaves a mixed set: readers refuse it, naming the tables."""
    a = ObjectStore(s3.url("mixed"), tmp_path / "a")
    _published_set(a.paths, 3, "v1")
    a.push()
    _published_set(a.paths, 4, "v2")
    s3.fs.put_file(str(a.paths.splits), f"{s3.bucket}/mixed/manifest/splits.parquet")  # half a push
    paths = open_data_root(s3.url("mixed"), working_copy=tmp_path / "reader")
    with pytest.raises(MixedSetError, match="not one set"):
        read_published(paths)


def test_a_push_waits_for_another_writers_push_or_refuses_naming_it(s3: S3, tmp_path: Path) -> None:
    """Two working copies push the same prefix: the store's lock object (a conditional create)
    lets one push at a time; the other waits, then refuses naming the holder, uploading nothing."""
    url = s3.url("locked")
    a, b = ObjectStore(url, tmp_path / "a"), ObjectStore(url, tmp_path / "b")
    _published_set(a.paths, 3, "v1")
    a.push()
    b.pull_published()
    _published_set(b.paths, 4, "v2")
    lock = f"{s3.bucket}/locked/.fer-publish.lock"
    before = s3.fs.cat(f"{s3.bucket}/locked/manifest/manifest.parquet")
    with a.push_lock(run_id="run-a"):
        assert json.loads(s3.fs.cat(lock))["run_id"] == "run-a"
        with pytest.raises(StoreConflictError, match=r"nothing uploaded: run run-a \(pid \d+ on .*holds the store's "
                                                     r"publication lock"):
            b.push(lock_wait=0.5)
        with pytest.raises(StoreConflictError, match="run run-a"):  # a second holder is refused as well
            with b.push_lock(run_id="run-b", wait=0.2):
                pass
    assert s3.fs.cat(f"{s3.bucket}/locked/manifest/manifest.parquet") == before
    assert not s3.fs.exists(lock)  # released
    assert b.push().uploaded[-1] == "manifest/manifest.parquet"
    assert not s3.fs.exists(lock)
    assert check_published(open_data_root(url, working_copy=tmp_path / "reader")) == \
        read_published(b.paths).manifest_version
    # a dead writer's lock (older than the lease) is removed, then taken
    s3.fs.pipe(lock, json.dumps({"run_id": "ghost"}).encode())
    with b.push_lock(run_id="run-b", wait=0.2, lease=0.0):
        assert json.loads(s3.fs.cat(lock))["run_id"] == "run-b"


def _another_writer_puts_first(store: ObjectStore, s3: S3, key: str, content: bytes) -> None:
    """Make ``store``'s next upload of ``key`` find ``content`` written there just before it."""
    put = store.fs.put_file

    def foreign_write_first(lpath: str, rpath: str, **kw: object) -> object:
        if rpath == key:
            s3.fs.pipe(key, content)
        return put(lpath, rpath, **kw)

    store.fs.put_file = foreign_write_first


@pytest.mark.parametrize(("prefix", "pushed_before", "refusal"), [
    ("cas", True, "manifest/manifest.parquet changed in the store while this push"),  # If-Match on the listed ETag
    ("cas-new", False, "was kept, not overwritten"),  # no manifest listed yet: If-None-Match
])
def test_a_manifest_written_during_a_push_is_never_overwritten(s3: S3, tmp_path: Path, prefix: str,
                                                               pushed_before: bool, refusal: str) -> None:
    """A writer that ignores the lock puts its manifest between this push's listing and its
    manifest upload: the conditional PUT refuses to overwrite it."""
    store = ObjectStore(s3.url(prefix), tmp_path / "a")
    _published_set(store.paths, 3, "v1")
    if pushed_before:
        store.push()
        _published_set(store.paths, 4, "v2")
    key = f"{s3.bucket}/{prefix}/manifest/manifest.parquet"
    _another_writer_puts_first(store, s3, key, b"another writer's manifest")
    with pytest.raises(StoreConflictError, match=refusal):
        store.push()
    assert s3.fs.cat(key) == b"another writer's manifest"
    assert not s3.fs.exists(f"{s3.bucket}/{prefix}/.fer-publish.lock")


def test_a_refused_push_is_reported_by_the_run(s3: S3, tmp_path: Path) -> None:
    """The store changes a file while a step rewrites it: the step's push is refused, the store
    keeps the other writer's version, and the run's log says so as an error (Dagster records a
    failed resource teardown as an engine event: the run itself still ends in success)."""
    s3.fs.pipe(f"{s3.bucket}/race/reports/metrics.json", b"{}")

    @dg.asset
    def rewrite_metrics(fer: FerSettings) -> None:
        s3.fs.pipe(f"{s3.bucket}/race/reports/metrics.json", b'{"writer": "other"}')
        write_json(fer.paths.metrics_json, {"writer": "this step"})

    fer = FerSettings(data_root=s3.url("race"), working_copy=str(tmp_path / "w"))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([rewrite_metrics], resources={"fer": fer}, instance=instance, raise_on_error=False)
    teardown = [e for e in result.all_events if e.message and "Teardown of resources" in e.message]
    assert teardown and "StoreConflictError" in str(teardown[0].event_specific_data.error)
    errors = [e.user_message for e in instance.all_logs(result.run_id) if e.level >= logging.ERROR]
    assert any("outputs NOT pushed" in m and "reports/metrics.json" in m for m in errors), errors
    assert json.loads(s3.fs.cat(f"{s3.bucket}/race/reports/metrics.json")) == {"writer": "other"}


def test_sensor_sees_a_source_change_in_the_bucket(s3: S3, tmp_path: Path) -> None:
    """Outside a run the resource pulls the catalogue and the sources: a new image in the bucket
    is a change for the sensor (one run requested), an unchanged bucket is not."""
    from fer_pipeline.defs import automation
    from fer_pipeline_tests.conftest import face_png

    s3.fs.pipe(f"{s3.bucket}/watch/sources.yaml", yaml.safe_dump({"sources": [
        {"name": "f", "kind": "image_folders", "path": "raw/f", "label_map": {"angry": "Angry"}}]}).encode())
    s3.fs.pipe(f"{s3.bucket}/watch/raw/f/angry/a.png", face_png(1))
    fer = FerSettings(data_root=s3.url("watch"), working_copy=str(tmp_path / "w"))
    cursor = None
    for expected_runs, new_image in ((1, None), (0, None), (1, "b.png")):
        if new_image:
            s3.fs.pipe(f"{s3.bucket}/watch/raw/f/angry/{new_image}", face_png(2))
        with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), cursor=cursor,
                                     resources={"fer": fer}) as ctx:
            data = automation.source_files_sensor.evaluate_tick(ctx)
        assert len(data.run_requests) == expected_runs, data.skip_message
        cursor = data.cursor or cursor
    assert (tmp_path / "w" / "raw" / "f" / "angry" / "b.png").is_file()


def test_bad_url_bucket_or_credentials_fail_fast(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError, match=r"unknown storage protocol 's4://'"):
        ObjectStore("s4://bucket/prefix", tmp_path / "w")
    with pytest.raises(StoreError, match=r"data root 's3://no-such-bucket-fer/p': bucket 'no-such-bucket-fer' "
                                         r"does not exist"):
        ObjectStore("s3://no-such-bucket-fer/p", tmp_path / "w").open()
    ObjectStore(s3.url("one"), tmp_path / "w").open()
    with pytest.raises(StoreError, match=f"working copy .* mirrors {s3.url('one')}, not {s3.url('two')}"):
        ObjectStore(s3.url("two"), tmp_path / "w").open()

    # Through Dagster: the run fails while the resource starts, before any step has run.
    result = _materialize(FerSettings(data_root="s3://no-such-bucket-fer/p", working_copy=str(tmp_path / "w2")),
                          ["raw_sources"])
    assert not result.success and not result.get_asset_materialization_events()
    errors = [str(e.event_specific_data.error) for e in result.all_events
              if getattr(e.event_specific_data, "error", None) is not None]
    assert any("bucket 'no-such-bucket-fer' does not exist" in e for e in errors), errors

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreError, match=r"cannot reach the store \(NoCredentialsError.*AWS_ACCESS_KEY_ID"):
        ObjectStore(s3.url("p"), tmp_path / "w3").open()


# --- the pipeline on s3:// --------------------------------------------------------------------------

def _sources(tmp_path: Path) -> tuple[dict, dict[str, bytes]]:
    """A catalogue and its files (relative path -> bytes): a zip source, a folder source and a
    demographics CSV beside them, all made here from the demo generator."""
    demo = generate_demo_source(tmp_path / "generated", n_images=240, seed=3).root
    files: dict[str, bytes] = {}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for png in sorted(demo.glob("[AN]*/*.png")):  # Angry, Neutral
            zf.write(png, png.relative_to(demo).as_posix())
    files["raw/part1.zip"] = archive.getvalue()
    for png in sorted(demo.glob("[FT]*/*.png")):  # Focused, Tired
        files[f"raw/part2/{png.relative_to(demo).as_posix()}"] = png.read_bytes()
    files["meta/demographics.csv"] = (demo / "demographics.csv").read_bytes()
    demographics = {"csv": "meta/demographics.csv", "key": "file",
                    "columns": {"gender": "gender", "age_group": "age_group"}}
    catalogue = {"sources": [
        {"name": "part1", "kind": "image_folders", "path": "raw/part1.zip",
         "label_map": {"angry": "Angry", "neutral": "Neutral"}, "demographics": demographics},
        {"name": "part2", "kind": "image_folders", "path": "raw/part2",
         "label_map": {"focused": "Focused", "tired": "Tired"}, "demographics": demographics}]}
    files["sources.yaml"] = yaml.safe_dump(catalogue).encode()
    return catalogue, files


def _materialize(fer: FerSettings, keys: list[str]) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey(k) for k in keys],
        run_config={"resources": {**RUN_CONFIG, "fer": {"config": {"data_root": fer.data_root,
                                                                   "working_copy": fer.working_copy}}}},
        raise_on_error=False)


@dataclass
class Reference:
    """The inputs, and a run of the data half + the main model on them in a local data root."""

    files: dict[str, bytes]
    root: Path

    @property
    def paths(self) -> DataPaths:
        return DataPaths(self.root)

    def upload(self, s3: S3, prefix: str) -> str:
        for rel, data in self.files.items():
            s3.fs.pipe(f"{s3.bucket}/{prefix}/{rel}", data)
        return s3.url(prefix)

    def assert_bucket_matches(self, s3: S3, prefix: str, tmp_path: Path) -> None:
        """The published tables read from the bucket itself (pandas + s3fs) equal this run's, and
        the main model's checkpoint in the bucket has its data version and validation metrics."""
        options = {"client_kwargs": {"endpoint_url": s3.endpoint}}
        for name in PUBLISHED:
            path = getattr(self.paths, name)
            got = pd.read_parquet(f"{s3.url(prefix)}/manifest/{path.name}", storage_options=options)
            pd.testing.assert_frame_equal(got, pd.read_parquet(path), obj=name)
        ckpt = tmp_path / f"{prefix}-cnn4.safetensors"
        s3.fs.get_file(f"{s3.bucket}/{prefix}/models/{self.paths.checkpoint('cnn4').name}", str(ckpt))
        got_meta, ref_meta = read_checkpoint_metadata(ckpt), read_checkpoint_metadata(self.paths.checkpoint("cnn4"))
        assert got_meta["data_version"] == ref_meta["data_version"]
        assert got_meta["metrics"]["validation"] == ref_meta["metrics"]["validation"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    _, files = _sources(tmp_path_factory.mktemp("inputs"))
    root = tmp_path_factory.mktemp("local")
    for rel, data in files.items():
        write_bytes(root / rel, data)
    ref = _materialize(FerSettings(data_root=str(root)), [*DATA_KEYS, "model_cnn4"])
    assert ref.success, [e.message for e in ref.all_events if e.is_failure]
    kept = pd.read_parquet(DataPaths(root).manifest)
    assert set(kept["source"]) == {"part1", "part2"} and kept["gender"].notna().any()  # both sources, CSV read
    return Reference(files, root)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_pipeline_on_s3_equals_a_local_run(s3: S3, reference: Reference, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    files, local = reference.files, reference.root
    url = reference.upload(s3, "fer")
    run = _materialize(FerSettings(data_root=url, working_copy=str(tmp_path / "wc-a")), [*DATA_KEYS, "model_cnn4"])
    assert run.success, [e.message for e in run.all_events if e.is_failure]
    reference.assert_bucket_matches(s3, "fer", tmp_path)
    kept = pd.read_parquet(reference.paths.manifest)
    # What stays local: the sources' copies and the run's published candidate are not in the bucket.
    listed = {p.split("/fer/", 1)[1] for p in s3.fs.find(f"{s3.bucket}/fer")}
    assert any(p.startswith("faces/") for p in listed)
    assert not any(p.startswith(("manifest/candidates/", "models/candidates/")) for p in listed)
    assert listed - set(files) >= {"manifest/raw_inventory.parquet", "manifest/manifest.parquet"}

    # Another fresh working copy: the other two models and the evaluation, from the store alone.
    wc_b = tmp_path / "wc-b"
    second = _materialize(FerSettings(data_root=url, working_copy=str(wc_b)),
                          ["model_cnn3", "model_cnn4_k5", "model_evaluation"])
    assert second.success, [e.message for e in second.all_events if e.is_failure]
    assert not (wc_b / "raw").exists()  # no step read the sources, so none were fetched
    assert {"models/cnn3.safetensors", "models/cnn4_k5.safetensors", "reports/metrics.json"} <= \
        {p.split("/fer/", 1)[1] for p in s3.fs.find(f"{s3.bucket}/fer")}
    report = json.loads(s3.fs.cat(f"{s3.bucket}/fer/reports/metrics.json"))
    assert set(report["models"]) >= {"cnn4", "cnn3", "cnn4_k5"}

    # Readers outside a run take the URL too: predict (best model from metrics.json) and the summary.
    monkeypatch.setenv("FER_WORKING_COPY", str(tmp_path / "wc-cli"))
    face = local / min(p for p in files if p.startswith("raw/part2/Tired/"))
    assert cli.main(["predict", "--data-root", url, "--format", "json", str(face)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["error"] is None and row["label"] in CLASSES
    monkeypatch.setenv("FER_DATA_DIR", url)
    monkeypatch.setenv("FER_WORKING_COPY", str(tmp_path / "wc-summary"))
    assert outputs.main() == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Data root {url} (working copy {tmp_path / 'wc-summary'})")
    assert f"{len(kept)} kept images" in text and f"best model    {report['best_model']}" in text
    assert np.isfinite(report["models"][report["best_model"]]["f1"]["macro"])


# --- Dask workers as two hosts: no shared disk, each its own working copy -------------------------

def fer_asset_job() -> dg.JobDefinition:
    """The code location's ``main`` job with the executor ``FER_EXECUTOR`` selects; module level,
    so that ``dg.reconstructable`` rebuilds it in each Dask worker."""
    from fer_pipeline.defs.definitions import build_definitions

    return build_definitions().resolve_job_def("main")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_dask_workers_with_their_own_working_copies(s3: S3, reference: Reference, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Dask workers, each with its own working copy (``FER_WORKING_COPY``), as on two hosts
    without a shared disk: each step pulls what it reads and pushes what it wrote, so the run's
    candidate, the face store and the splits travel between the workers through the bucket, and
    the bucket ends with the local run's published set and main model."""
    from distributed import Client

    url = reference.upload(s3, "dask")
    port = free_port()
    address = f"tcp://{LOOPBACK}:{port}"
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    env = {**os.environ, "FER_EXECUTOR": "dask", "FER_DASK_ADDRESS": address, "DAGSTER_HOME": str(home),
           "PYTHONPATH": str(REPO), "GX_ANALYTICS_ENABLED": "false", "DAGSTER_DISABLE_TELEMETRY": "1",
           "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}  # the AWS_* variables of the s3 fixture included
    models = ["model_cnn4", "model_cnn3"]  # independent: they run side by side, one on each worker
    started: list[ServerProcess] = []
    try:
        started.append(start_server([str(BIN / "dask"), "scheduler", "--host", LOOPBACK, "--port", str(port),
                                     "--no-dashboard"], port=port, log=tmp_path / "logs" / "scheduler.log",
                                    name="dask scheduler", env=env, cwd=REPO))
        started[0].wait_until(lambda: accepts_connections(port), timeout=60)
        for i in (1, 2):
            started.append(start_server(
                [str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", LOOPBACK,
                 "--no-dashboard", "--name", f"fer-worker-{i}"], port=port, log=tmp_path / "logs" / f"worker{i}.log",
                name=f"dask worker {i}", env={**env, "FER_WORKING_COPY": str(tmp_path / f"wc-worker{i}")}, cwd=REPO))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=90)
            worker_pids = set(client.run(os.getpid).values())
        for name in ("DAGSTER_HOME", "FER_EXECUTOR", "FER_DASK_ADDRESS"):
            monkeypatch.setenv(name, env[name])
        # execute_job's result sets the resources up in this process too (it pulls; nothing to push)
        monkeypatch.setenv("FER_WORKING_COPY", str(tmp_path / "wc-launcher"))
        with dg.DagsterInstance.get() as instance:
            with dg.execute_job(dg.reconstructable(fer_asset_job), instance=instance,
                                run_config={"resources": {**RUN_CONFIG, "fer": {"config": {"data_root": url}}}},
                                asset_selection=[dg.AssetKey(k) for k in [*DATA_KEYS, *models]]) as result:
                assert result.success, [e.message for e in result.all_events if e.is_failure]
                run_id = result.run_id
            starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    finally:
        for server in reversed(started):
            server.stop()
    step_pid = {e.step_key: e.dagster_event.pid for e in starts}
    assert set(step_pid) >= {*DATA_KEYS, *models} and set(step_pid.values()) <= worker_pids, step_pid
    # Some model ran on the other worker than splits: it read splits and faces from the bucket.
    assert any(step_pid[m] != step_pid["splits"] for m in models), step_pid
    reference.assert_bucket_matches(s3, "dask", tmp_path)
    for i in (1, 2):  # both working copies were used
        assert (tmp_path / f"wc-worker{i}" / ".fer-store.json").is_file()


# --- hostile input: a damaged sync record, escaping keys, a truncated table in the store ----------

@pytest.mark.parametrize("record", ['{"url": "s3://x", "objects": {"manifest/ma', "not json at all", "\xff\xfe",
                                    "[1, 2]", '"a string"', "null", "{}", '{"url": "SAME"}',
                                    '{"url": "SAME", "objects": []}', '{"url": "SAME", "objects": {"a": 5}}',
                                    '{"url": "SAME", "objects": {"reports/metrics.json": "x"}}',
                                    '{"url": "SAME", "objects": {"../../outside": ["1:e", 1, 2, 3]}}'],
                         ids=["truncated", "not-json", "not-utf8", "list", "string", "null", "empty",
                              "no-objects", "objects-list", "bad-entry", "entry-string", "escaping-entry"])
def test_a_damaged_sync_record_is_rebuilt_from_the_store(s3: S3, tmp_path: Path, record: str) -> None:
    """A sync record that is truncated, not JSON or of the wrong shape is treated as empty (the
    documented recovery: everything is compared with the store again): no raw JSONDecodeError,
    KeyError, AttributeError or TypeError, the pull downloads the store's files by size/ETag again
    and the next sync works from a sound record."""
    url = s3.url("rec")
    a = ObjectStore(url, tmp_path / "a")
    _published_set(a.paths, 3, "v1")
    write_json(a.paths.metrics_json, {"best_model": "cnn4"})
    a.push()
    outside = tmp_path / "outside"
    outside.write_text("keep me")
    b = ObjectStore(url, tmp_path / "wc" / "b")
    b.local.mkdir(parents=True)
    (b.local / ".fer-store.json").write_text(record.replace("SAME", url), encoding="latin-1")
    pulled = b.pull_published()
    assert sorted(pulled.downloaded) == sorted([a.rel(a.paths.metrics_json),
                                                *(a.rel(getattr(a.paths, t)) for t in PUBLISHED)])
    assert check_published(b.paths) == check_published(a.paths)
    assert outside.read_text() == "keep me"
    state = json.loads((b.local / ".fer-store.json").read_text())
    assert state["url"] == url and sorted(state["objects"]) == sorted(pulled.downloaded)
    assert b.pull_published().unchanged == 6 and b.push().uploaded == []


def test_a_sync_record_of_another_url_is_refused(s3: S3, tmp_path: Path) -> None:
    wc = tmp_path / "w"
    wc.mkdir()
    (wc / ".fer-store.json").write_text(json.dumps({"url": s3.url("other"), "objects": {}}))
    with pytest.raises(StoreError, match=f"working copy {wc} mirrors {s3.url('other')}, not {s3.url('mine')}"):
        ObjectStore(s3.url("mine"), wc).pull_published()
    assert json.loads((wc / ".fer-store.json").read_text())["url"] == s3.url("other")  # left as it was


@pytest.mark.parametrize("bad", ["manifest/../../escaped.txt", "manifest/../../../escaped.txt",
                                 "reports/../../escaped.txt", "models//abs/escaped.txt", "models/./escaped.txt",
                                 "sources.yaml/../../escaped.txt"])
def test_a_key_escaping_the_working_copy_is_refused(s3: S3, tmp_path: Path, bad: str) -> None:
    """An object whose key, relative to the data root, would land outside the working copy (``..``)
    or is not a plain relative path (empty or ``.`` parts) is not downloaded: the pull names it in
    the log and in ``refused``, writes nothing outside the working copy, and pulls the rest."""
    url = s3.url("esc")
    s3.fs.pipe(f"{s3.bucket}/esc/reports/metrics.json", b"{}")
    s3.fs.pipe(f"{s3.bucket}/esc/sources.yaml", b"sources: []\n")
    s3.fs.pipe(f"{s3.bucket}/esc/{bad}", b"hostile")
    assert f"esc/{bad}" in {p.split("/", 1)[1] for p in s3.fs.find(f"{s3.bucket}/esc")}  # the key exists as is
    wc = tmp_path / "deep" / "wc"
    logged: list[str] = []
    report = ObjectStore(url, wc).pull_published(log=logged.append)
    # A key under "sources.yaml/" hides the object sources.yaml from s3fs's find (it lists the prefix):
    # the catalogue is then not pulled, and the catalogue's own checks report it missing.
    shadowed = bad.startswith("sources.yaml/")
    assert report.refused == [bad]
    assert sorted(report.downloaded) == ["reports/metrics.json", *([] if shadowed else ["sources.yaml"])]
    assert any(bad in m and "refused" in m for m in logged), logged
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.startswith("deep/wc/") for p in written), written
    assert not any("escaped" in p for p in written), written
    assert bad not in json.loads((wc / ".fer-store.json").read_text())["objects"]


def test_a_truncated_published_table_in_the_store_is_refused(s3: S3, tmp_path: Path) -> None:
    """manifest.parquet cut in half in the bucket: the pull brings it (after its retries for a mixed
    set) and readers refuse it, naming the file; nothing raw from pyarrow."""
    url = s3.url("cut")
    a = ObjectStore(url, tmp_path / "a")
    _published_set(a.paths, 3, "v1")
    a.push()
    key = f"{s3.bucket}/cut/manifest/manifest.parquet"
    data = s3.fs.cat(key)
    s3.fs.pipe(key, data[:len(data) // 2])
    paths = open_data_root(url, working_copy=tmp_path / "reader")
    assert paths.manifest.stat().st_size == len(data) // 2
    with pytest.raises(MixedSetError, match=r"manifest\.parquet is not a readable Parquet table"):
        read_published(paths)
    with pytest.raises(MixedSetError, match=r"manifest\.parquet is not a readable Parquet table"):
        check_published(paths)
