"""One control plane, Dagster's (issue 17), tested with real processes on a small generated
data root with tiny budgets (settings.yaml in the data root, as ``make demo`` writes it):

1. ``python -m fer_pipeline.defs.refresh`` (``make demo``'s path) builds every asset and every
   partition from a fresh instance; its runs carry the code location's origin (what the UI's
   timeline groups by); afterwards Dagster reports nothing missing or unsynced, and a second
   refresh runs nothing but the source observation.
2. "Out of date" is Dagster's: a changed analysis setting marks exactly the assets that compute
   with it unsynced (not the data half, not the models), and a refresh brings back only those.
3. Unattended: a real ``dagster-daemon`` with the sources sensor on: new images give exactly one
   data run, then declarative automation brings the models, partitions, reports and card up to
   date, with no failed run, until nothing is unsynced.
4. Equivalence: the automation chain's published manifest, splits and model metrics equal those
   of a from-scratch ``refresh`` of the same final files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus

from fer_pipeline.demo.synthetic_faces import generate_demo_source
from fer_pipeline.defs.definitions import build_definitions
from fer_pipeline.defs.refresh import LOCATION, _Loading
from fer_pipeline.settings import load_settings
from fer_pipeline_tests.control_plane_data import (
    REPO,
    SOURCES,
    assert_same_publication,
    build_control_plane_root,
    cli_env,
    copy_root,
    new_home,
    refresh,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

N_NEW = 12
INTERVAL = 2  # seconds between sensor evaluations in the daemon test


def definitions(root: Path) -> dg.Definitions:
    return build_definitions(dg.in_process_executor, settings=load_settings(root / "settings.yaml"),
                             held_out=list(SOURCES))


def statuses(root: Path, home: Path) -> dict[tuple[str, str | None], StaleStatus]:
    """What the UI shows for every asset (partition): fresh, stale (Unsynced) or missing."""
    graph = definitions(root).resolve_asset_graph()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        resolver = CachingStaleStatusResolver(instance, graph, _Loading(instance))
        out = {}
        for key in graph.materializable_asset_keys:
            partitions = graph.get(key).partitions_def
            for p in partitions.get_partition_keys() if partitions else [None]:
                out[(key.to_user_string(), p)] = resolver.get_status(key, p)
        return out


def not_fresh(root: Path, home: Path) -> set[str]:
    return {k for (k, _), s in statuses(root, home).items() if s != StaleStatus.FRESH}


def runs(home: Path) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(reversed(instance.get_runs()))  # oldest first


def add_images(root: Path, n: int = N_NEW) -> None:
    """New faces into source ``a`` (drawn with another seed, so not duplicates)."""
    extra = root.parent / f"extra-{root.name}"
    generate_demo_source(extra, n_images=60, seed=99)
    files = sorted(p for p in extra.rglob("*.png") if p.parent.name in ("Neutral", "Focused", "Tired", "Angry"))[:n]
    for f in files:
        dest = root / "raw" / "a" / f.parent.name / f"new_{f.name}"
        shutil.copyfile(f, dest)
    shutil.rmtree(extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("control_plane")
    root, home = base / "data", new_home(base / "home")
    build_control_plane_root(root)
    return root, home, refresh(root, home)


def test_refresh_builds_everything_and_looks_like_a_ui_run(built: tuple[Path, Path, str]) -> None:
    root, home, out = built
    assert not_fresh(root, home) == set(), statuses(root, home)
    assert (root / "reports" / "model_card.md").is_file()
    history = runs(home)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in history)
    assert all(r.remote_job_origin is not None and r.remote_job_origin.location_name == LOCATION for r in history)
    partitions = {(r.job_name, r.tags.get("dagster/partition")) for r in history}
    assert {("cv_folds", "0"), ("cv_folds", "1"), ("loso_folds", "a"), ("loso_folds", "b")} <= partitions
    assert "training_reports" in {r.job_name for r in history}
    # nothing to do the second time: only the observations (sources, review project) run
    before = len(history)
    refresh(root, home)
    after = runs(home)[before:]
    assert [(r.job_name, sorted(k.to_user_string() for k in r.asset_selection or [])) for r in after] == \
        [("data_pipeline", ["label_studio_annotations", "source_files"])]


def test_a_changed_setting_marks_exactly_what_computes_with_it(built: tuple[Path, Path, str]) -> None:
    root, home, _ = built
    settings = yaml.safe_load((root / "settings.yaml").read_text())
    settings["analysis"]["min_group_size"] = 6
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    unsynced = not_fresh(root, home)
    groups = {k.to_user_string(): definitions(root).resolve_asset_graph().get(k).group_name
              for k in definitions(root).resolve_asset_graph().materializable_asset_keys}
    # the evaluation group computes with analysis settings; the review queue reads its label issues
    assert unsynced == {k for k, g in groups.items() if g in ("evaluation", "review")}, unsynced
    before = len(runs(home))
    refresh(root, home)
    assert not_fresh(root, home) == set()
    rerun = {k.to_user_string() for r in runs(home)[before:] for k in r.asset_selection or []}
    # nothing of the data half or the trained models; the shipped model is chosen among the fold
    # ensemble (retrained here) and the single models, so it is chosen again
    assert not rerun & {k for k, g in groups.items() if g in ("data", "models")} - {"shipped_model"}
    assert "cv_fold" in rerun and "model_card" in rerun


def wait_until_quiet(root: Path, home: Path, start: int, daemon: subprocess.Popen,
                     timeout: float = 900) -> list[dg.DagsterRun]:
    """The runs after the first ``start`` once some ran and then, for several sensor intervals,
    nothing ran and nothing was out of date."""
    deadline, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        time.sleep(5)
        assert daemon.poll() is None, (home / "daemon.log").read_text()[-3000:]
        history = runs(home)[start:]
        busy = [r for r in history if not r.is_finished]
        quiet = quiet + 1 if history and not busy and not not_fresh(root, home) else 0
        if quiet >= 3:
            return history
    pytest.fail(f"not up to date after {timeout:.0f} s: {sorted(not_fresh(root, home))}; runs "
                f"{[(r.job_name, r.status.value) for r in runs(home)[start:]]}")


@pytest.fixture
def daemon(built: tuple[Path, Path, str]) -> Iterator[subprocess.Popen]:
    root, home, _ = built
    proc = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-w", str(REPO / "workspace.yaml")],
                            cwd=REPO, env=cli_env(root, home, FER_SENSOR_INTERVAL_SECONDS=str(INTERVAL)), start_new_session=True,
                            stdout=open(home / "daemon.log", "w"), stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) is not None


def test_new_images_flow_through_automation_and_match_a_fresh_build(
        built: tuple[Path, Path, str], daemon: subprocess.Popen, tmp_path: Path) -> None:
    root, home, _ = built
    refresh(root, home)  # settings of the previous test: start from a fresh, complete graph
    start = len(runs(home))
    done = subprocess.run([sys.executable, "-m", "dagster", "sensor", "start", "source_files_sensor",
                           "-w", str(REPO / "workspace.yaml")], cwd=REPO, env=cli_env(root, home, FER_SENSOR_INTERVAL_SECONDS=str(INTERVAL)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # its first tick has no cursor: one data run, which reproduces the same data, so automation
    # requests nothing (a re-run that changed nothing retrains nothing)
    first = wait_until_quiet(root, home, start, daemon)
    assert [(r.job_name, r.tags.get("fer/trigger")) for r in first] == [("data_pipeline", "source_change")]
    start = len(runs(home))
    add_images(root)
    history = wait_until_quiet(root, home, start, daemon)
    assert [r.status for r in history if r.status != dg.DagsterRunStatus.SUCCESS] == []
    data_runs = [r for r in history if r.job_name == "data_pipeline"]
    assert len(data_runs) == 1 and data_runs[0].tags.get("fer/trigger") == "source_change"
    automated = [r for r in history if r is not data_runs[0]]
    assert automated and all(r.tags.get("fer/trigger") == "automation" for r in automated)
    touched = {k.to_user_string() for r in automated for k in r.asset_selection or []}
    assert {"model_cnn4", "cv_fold", "loso_fold", "cross_validation", "model_card"} <= touched
    with dg.DagsterInstance.from_config(str(home)) as instance:
        kept = instance.fetch_materializations(dg.AssetKey("manifest"), limit=1).records[0]
        assert kept.asset_materialization.metadata["kept"].value > 0

    # equivalence: a from-scratch refresh of the same final files publishes the same
    fresh = copy_root(root, tmp_path / "data")
    refresh(fresh, new_home(tmp_path / "home"))
    assert_same_publication(root, fresh)
    assert json.loads((root / "reports" / "metrics.json").read_text())["best_model"] == \
        json.loads((fresh / "reports" / "metrics.json").read_text())["best_model"]
