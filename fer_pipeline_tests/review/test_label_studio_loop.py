"""The review round trip against a real Label Studio server (issue 20, part 4).

The server (``.venv-label-studio/``, installed by ``make test`` through
scripts/install_label_studio.sh) starts on a free loopback port in its own process group, with its
SQLite database in a temporary folder and a reviewer account and token made on the command line.
Then, with real Dagster materializations on real image files:

1. the data job runs on two small generated sources (its ``label_studio_reviews`` pulls: the
   project does not exist yet, so no review);
2. ``review_queue`` ranks the kept images and ``label_studio_tasks`` pushes the top 20; pushing again
   creates nothing;
3. a reviewer answers through Label Studio's API as its UI does: one "exclude", one "not a face", one
   relabel, one relabel of a file that is changed afterwards (reported, not applied), one unknown
   label and an answer on a second task for an image that already has one (both refused, each with
   its reason);
4. the reviews sensor notices the annotations and requests the data job, which pulls them, and the
   manifest applies them: the checks are on the manifest, the excluded table, the outcomes report
   and the accounting.

The one stand-in: the cross-validation's out-of-fold probabilities (training is tested elsewhere)
are written by the test, so the label-issue ranking and the queue's predictions have inputs.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleStatus,
)
from PIL import Image

from fer_pipeline.analysis.label_issues import label_issue_report
from fer_pipeline.atomic import write_parquet, write_table
from fer_pipeline.classes import CLASSES
from fer_pipeline.dataset.manifest import STALE, accounting_items, check_accounting
from fer_pipeline.defs.assets.review import label_studio_tasks, review_queue
from fer_pipeline.defs.automation import build_review_sensor
from fer_pipeline.defs.jobs import DATA_JOB
from fer_pipeline.defs.resources import FerSettings, LabelStudio
from fer_pipeline.paths import DataPaths
from fer_pipeline.review.label_studio import FROM_NAME, PIPELINE_LABEL_VERSION, TO_NAME
from fer_pipeline_tests.conftest import REPO, asset_metadata
from fer_pipeline_tests.control_plane_data import build_control_plane_root
from fer_pipeline_tests.servers import (
    LOOPBACK,
    free_port,
    require_executables,
    start_server,
)

pytestmark = pytest.mark.slow

LABEL_STUDIO = REPO / ".venv-label-studio" / "bin" / "label-studio"
PROJECT = "fer review (test)"
N_TASKS = 20


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory):
    require_executables("Label Studio", [LABEL_STUDIO], "make test runs scripts/install_label_studio.sh")
    home = tmp_path_factory.mktemp("label-studio")
    port, token = free_port(), secrets.token_hex(20)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LABEL_STUDIO_BASE_DATA_DIR": str(home / "data"), "DJANGO_DB": "sqlite",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "",
           "FRONTEND_SENTRY_DSN": "", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    server = start_server(
        [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", LOOPBACK, "--port", str(port),
         "--data-dir", str(home / "data"), "--username", "reviewer@example.com", "--password", secrets.token_hex(8),
         "--user-token", token, "--enable-legacy-api-token"],
        port=port, log=home / "label-studio.log", name="label-studio", env=env, cwd=home)
    url = f"http://{LOOPBACK}:{port}"
    try:
        server.wait_until(lambda: _healthy(url), timeout=600, every=1.0)  # the first start migrates its database
        yield url, token
    finally:
        server.stop()


def _png_face(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return np.asarray(im)


def _choice(value: str) -> list[dict]:
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [value]}}]


def _stand_in_cross_validation(paths: DataPaths) -> pd.DataFrame:
    """Out-of-fold probabilities for the train and validation images: each image's own label most
    probable, except every 7th image, which the 'model' confidently puts in the next class."""
    manifest = pd.read_parquet(paths.manifest)
    splits = pd.read_parquet(paths.splits)
    pool = manifest.merge(splits[splits["split"] != "test"], on="image_id").sort_values("image_id")
    rng = np.random.default_rng(0)
    own = pool["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    target = np.where(np.arange(len(pool)) % 7 == 0, (own + 1) % len(CLASSES), own)
    p = rng.uniform(0.02, 0.1, (len(pool), len(CLASSES)))
    p[np.arange(len(pool)), target] = rng.uniform(0.6, 0.9, len(pool))
    p /= p.sum(axis=1, keepdims=True)
    oof = pd.DataFrame({"image_id": pool["image_id"].to_numpy(), "label": pool["label"].to_numpy(),
                        "fold": pool["fold"].to_numpy()})
    for j, c in enumerate(CLASSES):
        oof[f"p_{c}"] = p[:, j]
    oof["predicted"] = [CLASSES[j] for j in p.argmax(1)]
    write_parquet(paths.report("cv_oof"), oof)
    report = label_issue_report(oof, manifest, cv_macro_f1=0.8, n_pool=len(oof))
    write_table(paths.report("label_issues"), report.ranked)
    return oof


def _data_run(root: Path, env: dict[str, str], instance: dg.DagsterInstance | None = None,
              only: Sequence[str] | None = None):
    from fer_pipeline.definitions import defs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FER_DATA_DIR", str(root))
        for k, v in env.items():
            mp.setenv(k, v)
        return defs.resolve_job_def(DATA_JOB).execute_in_process(
            instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False,
            asset_selection=[dg.AssetKey(k) for k in only] if only else None)


def _reviews_status(instance: dg.DagsterInstance) -> StaleStatus:
    """What Dagster (the UI, `fer-pipeline run`) says of label_studio_reviews in ``instance``."""
    from fer_pipeline.definitions import defs
    from fer_pipeline.defs.refresh import _Loading

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), _Loading(instance))
    return resolver.get_status(dg.AssetKey("label_studio_reviews"), None)


def test_round_trip_through_label_studio(label_studio, tmp_path: Path) -> None:
    from label_studio_sdk import LabelStudio as SDK

    url, token = label_studio
    env = {"FER_LABEL_STUDIO_URL": url, "FER_LABEL_STUDIO_API_KEY": token, "FER_LABEL_STUDIO_PROJECT": PROJECT}
    root = tmp_path / "data"
    build_control_plane_root(root, n_images=200, seed=11)
    paths = DataPaths(root)

    # 1. the data run: the pull finds no project yet, so nothing is reviewed
    instance = dg.DagsterInstance.ephemeral()  # one instance: Dagster's own idea of what is out of date
    first = _data_run(root, env, instance)
    assert first.success
    assert _reviews_status(instance) == StaleStatus.FRESH
    pulled = asset_metadata(first, "label_studio_reviews")
    assert pulled["dagster/row_count"] == 0 and pulled["project"] == PROJECT
    before = pd.read_parquet(paths.manifest)
    assert before["review_source"].isna().all()

    # 2. queue and push: 20 tasks, each with the face, the current label pre-annotated, the model's view
    oof = _stand_in_cross_validation(paths)
    resources = {"fer": FerSettings(data_root=str(root)),
                 "label_studio": LabelStudio(url=url, api_key=token, project=PROJECT, push_top_n=N_TASKS)}
    pushed = dg.materialize([review_queue, label_studio_tasks], resources=resources)
    assert pushed.success
    assert asset_metadata(pushed, "label_studio_tasks")["pushed"] == N_TASKS
    queue = pd.read_parquet(paths.review_queue)
    assert len(queue) == len(before) and queue["rank"].tolist() == list(range(1, len(queue) + 1))
    assert queue["reasons"].head(5).str.startswith("cleanlab label suspect").all()
    assert queue["predicted"].notna().sum() == len(oof)
    # in the UI: the queue's first faces as a grid (24 faces: 4 rows of 6), the Label Studio server and project
    shown = asset_metadata(pushed, "review_queue")
    assert shown["label_studio"] == url and shown["label_studio_project"] == PROJECT
    grid = paths.report("review_queue_top")
    assert base64.b64encode(grid.read_bytes()).decode() in shown["top_faces"]
    with Image.open(grid) as im:
        assert 0.7 < im.height / im.width < 0.85, im.size  # (2.1 x 4 + 0.5) / (1.9 x 6): four full rows

    sdk = SDK(base_url=url, api_key=token)
    project = next(p for p in sdk.projects.list() if p.title == PROJECT)
    tasks = sorted(sdk.tasks.list(project=project.id, fields="all"), key=lambda t: t.id)
    assert len(tasks) == N_TASKS
    top = queue.head(N_TASKS).set_index("sha256")
    assert {t.data["sha256"] for t in tasks} == set(top.index)
    for task in tasks:
        row = top.loc[task.data["sha256"]]
        assert _png_face(task.data["image"]).shape == (48, 48)
        assert task.data["label"] == f"current label: {row['label']}"
        assert task.data["model"].startswith(f"model: {row['predicted']} (")
        (prediction,) = task.predictions
        assert prediction.model_version == PIPELINE_LABEL_VERSION
        assert prediction.result[0]["value"]["choices"] == [row["label"]]

    again = dg.materialize([label_studio_tasks], resources=resources)  # idempotent: keyed by content hash
    assert asset_metadata(again, "label_studio_tasks")["pushed"] == 0
    assert len(list(sdk.tasks.list(project=project.id))) == N_TASKS

    # tasks without answers are not reviews: observing the project changes nothing
    assert _data_run(root, env, instance, only=["label_studio_annotations"]).success
    assert _reviews_status(instance) == StaleStatus.FRESH

    # the sensor before any review: nothing to run
    sensor = build_review_sensor()
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                 resources={"label_studio": resources["label_studio"]}) as ctx:
        quiet = sensor(ctx)
    assert not quiet.run_requests and quiet.cursor

    # 3. a reviewer answers, through the API the UI uses
    excluded_task, not_face_task, relabel_task, unknown_task, duplicated_task = tasks[:5]
    # the file changed after its review: one whose bytes no other file holds (an exact copy elsewhere would
    # still be the reviewed image, and the review, keyed by content, would rightly apply to it)
    counts = pd.read_parquet(paths.raw_inventory)["sha256"].value_counts()
    changed_task = next(t for t in tasks[5:] if counts.get(t.data["sha256"]) == 1)
    sdk.annotations.create(id=excluded_task.id, result=_choice("exclude"))
    sdk.annotations.create(id=not_face_task.id, result=_choice("not a face"))
    current = top.loc[relabel_task.data["sha256"], "label"]
    new_label = next(c for c in CLASSES if c != current)
    sdk.annotations.create(id=relabel_task.id, result=_choice(new_label))
    changed_current = top.loc[changed_task.data["sha256"], "label"]
    sdk.annotations.create(id=changed_task.id, result=_choice(next(c for c in CLASSES if c != changed_current)))
    sdk.annotations.create(id=unknown_task.id, result=_choice("Happy"))
    duplicate = sdk.projects.import_tasks(project.id, request=[{"data": dict(duplicated_task.data)}],
                                          return_task_ids=True)
    sdk.annotations.create(id=duplicate.task_ids[0], result=_choice("Angry"))
    assert len(list(sdk.tasks.list(project=project.id))) == N_TASKS + 1

    # the changed file: same place, other bytes (brightened), after its review
    changed_path = root / "raw" / changed_task.data["source"] / changed_task.data["source_path"]
    with Image.open(changed_path) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.int16)
    Image.fromarray(np.clip(pixels + 12, 0, 255).astype(np.uint8), "L").save(changed_path, format="PNG")

    # 4. Dagster notices: observing the review project (as `fer-pipeline run` and the data job do) marks
    # label_studio_reviews unsynced; the sensor asks for the data run; the manifest applies the reviews
    assert _data_run(root, env, instance, only=["label_studio_annotations"]).success
    assert _reviews_status(instance) == StaleStatus.STALE
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), cursor=quiet.cursor,
                                 resources={"label_studio": resources["label_studio"]}) as ctx:
        noticed = sensor(ctx)
    (request,) = noticed.run_requests
    assert request.job_name == DATA_JOB and request.tags["fer/trigger"] == "new_reviews"
    with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), cursor=noticed.cursor,
                                 resources={"label_studio": resources["label_studio"]}) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)  # nothing new since

    second = _data_run(root, env)
    assert second.success
    reviews = pd.read_parquet(paths.reviews)
    assert len(reviews) == 6
    refused = reviews.set_index("task_id")["refused"]
    assert refused[unknown_task.id].startswith("unknown label 'Happy'")
    assert refused[duplicate.task_ids[0]] == f"duplicate task: the image already has task {duplicated_task.id}"
    assert refused.isna().sum() == 4
    assert set(reviews["reviewer"]) == {"reviewer@example.com"}

    manifest = pd.read_parquet(paths.manifest)
    excluded = pd.read_parquet(paths.excluded)
    by_sha = manifest.set_index("sha256")
    relabelled = by_sha.loc[relabel_task.data["sha256"]]
    assert relabelled["label"] == new_label and relabelled["reviewed_label"] == new_label
    assert relabelled["label_before_review"] == current
    assert relabelled["review_source"].startswith(f"label-studio {PROJECT} task {relabel_task.id} annotation ")
    assert "by reviewer@example.com at 20" in relabelled["review_source"]
    for task, why in ((excluded_task, "review: excluded by the reviewer"), (not_face_task, "review: not a face")):
        assert task.data["sha256"] not in set(manifest["sha256"])
        row = excluded[(excluded["source"] == task.data["source"])
                       & (excluded["source_path"] == task.data["source_path"])]
        assert len(row) == 1 and row["stage"].item() == "review" and row["reason"].item().startswith(why)
    # the changed file: reported, not applied; the file is still kept under its new hash and old label
    outcomes = pd.read_csv(paths.report("review_outcomes")).set_index("task_id")
    assert outcomes.loc[changed_task.id, "outcome"] == STALE
    assert not outcomes.loc[changed_task.id, "applied"]
    now = manifest[manifest["source_path"] == changed_task.data["source_path"]]
    now = now[now["source"] == changed_task.data["source"]]
    assert len(now) == 1 and now["sha256"].item() != changed_task.data["sha256"]
    assert now["label"].item() == changed_current and pd.isna(now["review_source"].item())
    assert manifest["review_source"].notna().sum() == 1
    assert len(manifest) == len(before) - 2  # the two exclusions left; nothing else moved

    # every file still accounted for, once
    inventory = pd.read_parquet(paths.raw_inventory)
    faces = pd.read_parquet(paths.faces_table)
    pool = pd.read_parquet(paths.pool) if paths.pool.is_file() else None
    accounting = check_accounting(accounting_items(inventory, faces), manifest, excluded, pool)
    assert accounting["balanced"], accounting
    meta = asset_metadata(second, "manifest")
    assert meta["accounting_balanced"] is True and meta["reviewed_images"] == 3
    checks = {e.check_name: e.passed for e in second.get_asset_check_evaluations()}
    assert checks["manifest_accounting"]
