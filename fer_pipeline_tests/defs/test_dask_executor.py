"""The executor as a setting (docs/operations.md, "Scaling out"), and steps spread over Dask workers.

* ``FER_EXECUTOR``: the default is one process; an unknown value fails when the code location
  loads, naming the variable and the allowed values; ``k8s`` loads (``dagster definitions
  validate``) with dagster-k8s' ``k8s_job_executor``, and the model assets' op tags make the step
  pod ask for a GPU.
* Dask, for real: ``dask scheduler`` and two ``dask worker`` processes (one process, one thread
  each) on free loopback ports, each in its own process group and stopped by PID at the end. The
  data half and the three model assets are materialized through them with ``execute_job`` on a
  persistent temporary instance; the test asks the workers for their PIDs and checks that the
  steps' events came from both (never from this process) and that the three independent model
  steps were spread over both, then that the published tables and the checkpoints' validation
  metrics equal those of an in-process run of the same catalogue in another data root. Then the
  training work: the two ``cv_fold`` partitions, one run each, launched at the same time from two
  processes (as a backfill launches them), train on the two workers at once, and the fold table
  the aggregate publishes equals the one from in-process fold runs.

Run it alone: ``.venv/bin/python -m pytest -q fer_pipeline_tests/defs/test_dask_executor.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from fer_pipeline.defs import executors
from fer_pipeline.defs.jobs import CV_FOLDS_ENV, CV_FOLDS_JOB, REPORTS_JOB
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.paths import DataPaths
from fer_pipeline_tests.conftest import REPO
from fer_pipeline_tests.servers import (
    LOOPBACK,
    ServerProcess,
    accepts_connections,
    free_port,
    start_server,
)

README = REPO / "docs" / "operations.md"
BIN = Path(sys.executable).parent
CATALOGUE = {"sources": [{"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 240, "seed": 3}]}
DATA_KEYS = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits"]
MODELS = {"model_cnn4": "cnn4", "model_cnn3": "cnn3", "model_cnn4_k5": "cnn4_k5"}
# Tiny budgets; one torch thread in both runs (a Dask nanny starts its worker with
# OMP_NUM_THREADS=1, and CPU results are reproducible for a given thread count).
RUN_CONFIG = {"resources": {"training": {"config": {"epochs": 1, "patience": 1, "num_threads": 1}}}}
SELECTION = [dg.AssetKey(k) for k in [*DATA_KEYS, *MODELS]]
N_FOLDS = 2  # FER_CV_FOLDS here and on the workers
FOLD_TABLE_RUN_COLUMNS = ["run_id", "train_seconds"]  # which run, how long: the rest must be equal


def fer_asset_job() -> dg.JobDefinition:
    """The code location's ``main`` job (every asset; a run selects some) with the executor
    ``FER_EXECUTOR`` selects. Module level, so that ``dg.reconstructable`` can rebuild it in each
    Dask worker (which imports this module)."""
    from fer_pipeline.defs.definitions import build_definitions

    return build_definitions().resolve_job_def("main")


def _worker_is_daemonic() -> bool:
    """Run in a Dask worker: a daemonic process could not start the faces decoding pool."""
    import multiprocessing

    return bool(multiprocessing.current_process().daemon)


# --- the setting --------------------------------------------------------------------------------

def _load(env_extra: dict[str, str], *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GX_ANALYTICS_ENABLED": "false", "DAGSTER_DISABLE_TELEMETRY": "1", **env_extra}
    return subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_default_is_one_process() -> None:
    assert executors.executor_name({}) == "in_process"
    assert executors.executor_from_env({}) is dg.in_process_executor
    assert executors.executor_from_env({"FER_EXECUTOR": " Multiprocess "}) is dg.multiprocess_executor


def test_unknown_executor_fails_fast_naming_the_variable() -> None:
    with pytest.raises(executors.ExecutorSettingError) as err:
        executors.executor_from_env({"FER_EXECUTOR": "celery-on-mars"})
    message = str(err.value)
    assert "FER_EXECUTOR='celery-on-mars'" in message
    assert all(name in message for name in executors.EXECUTORS)
    with pytest.raises(executors.ExecutorSettingError, match="FER_DASK_ADDRESS"):
        executors.executor_from_env({"FER_EXECUTOR": "dask"})
    # The code location itself refuses to load, with that message.
    out = _load({"FER_EXECUTOR": "sparkles"}, sys.executable, "-c", "import fer_pipeline.definitions")
    assert out.returncode != 0
    assert "FER_EXECUTOR='sparkles' is not a known executor; allowed values: in_process, multiprocess, dask, k8s" \
        in out.stderr


def test_dask_executor_points_at_the_configured_scheduler() -> None:
    ex = executors.executor_from_env({"FER_EXECUTOR": "dask", "FER_DASK_ADDRESS": "tcp://10.1.2.3:8786"})
    assert ex.name == "dask"
    applied = ex.apply_config_mapping({})
    assert applied.success and applied.value == {"config": {"cluster": {"existing": {"address": "tcp://10.1.2.3:8786"}}}}


def test_definitions_load_on_kubernetes_with_gpu_tags(tmp_path: Path) -> None:
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    from fer_pipeline.defs.definitions import build_definitions

    out = _load({"FER_EXECUTOR": "k8s", "DAGSTER_HOME": str(tmp_path)},
                str(BIN / "dagster"), "definitions", "validate", "-m", "fer_pipeline.definitions")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr

    defs = build_definitions(executors.executor_from_env({"FER_EXECUTOR": "k8s"}))
    for job in (defs.resolve_job_def("main"), defs.resolve_implicit_global_asset_job_def()):
        assert job.executor_def.name == "k8s"
    image = DagsterK8sJobConfig(job_image="fer-pipeline:test", dagster_home="/opt/dagster/dagster_home")

    def pod_limits(asset: str) -> dict[str, str] | None:
        user = get_user_defined_k8s_config(defs.resolve_assets_def(asset).op.tags)
        job = construct_dagster_k8s_job(image, ["dagster", "api", "execute_step"], "dagster-step-test",
                                        user_defined_k8s_config=user)
        return job.spec.template.spec.containers[0].resources.limits

    for asset in MODELS:
        assert pod_limits(asset) == {"nvidia.com/gpu": "1"}, asset
    assert pod_limits("splits") is None  # the data half asks for no GPU


def test_readme_run_launcher_block_is_valid_k8s_config() -> None:
    """The `dagster.yaml` block of docs/operations.md, "Scaling out" is config K8sRunLauncher accepts."""
    from dagster._config import validate_config
    from dagster_k8s import K8sRunLauncher

    section = README.read_text().split("### Scaling out", 1)[1].split("\n### ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    (block,) = [b for b in blocks if "K8sRunLauncher" in b]
    launcher = yaml.safe_load(block)["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert result.success, [e.message for e in result.errors]


# --- Dask, for real -----------------------------------------------------------------------------

def _data_root(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "sources.yaml").write_text(yaml.safe_dump(CATALOGUE))
    return path


def _published(root: Path) -> dict[str, object]:
    paths = DataPaths(root)
    tables = {name: pd.read_parquet(getattr(paths, name)) for name in ("manifest", "excluded", "splits")}
    validation = {name: read_checkpoint_metadata(paths.checkpoint(name))["metrics"]["validation"]
                  for name in MODELS.values()}
    return {"tables": tables, "validation": validation}


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[tuple[str, Path, list[ServerProcess]]]:
    """A scheduler and two single-threaded workers on loopback, with the environment a real
    deployment gives its workers: the same data root, FER_EXECUTOR and the repo importable."""
    data = _data_root(tmp_path / "dask-data")
    port = free_port()
    address = f"tcp://{LOOPBACK}:{port}"
    env = {**os.environ, "FER_DATA_DIR": str(data), "FER_EXECUTOR": "dask", "FER_DASK_ADDRESS": address,
           "DAGSTER_HOME": str(tmp_path / "dagster_home"), "PYTHONPATH": str(REPO), CV_FOLDS_ENV: str(N_FOLDS),
           "GX_ANALYTICS_ENABLED": "false", "DAGSTER_DISABLE_TELEMETRY": "1",
           # worker processes may start their own (faces decoding pool on large sources)
           "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    started: list[ServerProcess] = []
    try:
        scheduler = start_server([str(BIN / "dask"), "scheduler", "--host", LOOPBACK, "--port", str(port),
                                  "--no-dashboard"],
                                 port=port, log=tmp_path / "logs" / "scheduler.log", name="dask scheduler",
                                 env=env, cwd=REPO)
        started.append(scheduler)
        scheduler.wait_until(lambda: accepts_connections(port), timeout=60)
        for i in (1, 2):
            started.append(start_server(
                [str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", LOOPBACK,
                 "--no-dashboard", "--name", f"fer-worker-{i}"],
                port=port, log=tmp_path / "logs" / f"worker{i}.log", name=f"dask worker {i}", env=env, cwd=REPO))
        yield address, data, started
    finally:
        for server in reversed(started):
            server.stop()


def _fold_table(root: Path, instance: dg.DagsterInstance) -> pd.DataFrame:
    """The aggregate of the stored folds (in this process: it trains nothing)."""
    from fer_pipeline.defs.definitions import build_definitions

    job = build_definitions(dg.in_process_executor, n_cv_folds=N_FOLDS).resolve_job_def(REPORTS_JOB)
    assert job.execute_in_process(instance=instance, run_config=RUN_CONFIG,
                                  asset_selection=[dg.AssetKey("cross_validation")]).success
    return pd.read_parquet(DataPaths(root).report("cv_folds").with_suffix(".parquet"))


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_steps_run_on_two_dask_workers_and_match_in_process(
        dask_cluster: tuple[str, Path, list[ServerProcess]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client

    from fer_pipeline.defs.definitions import build_definitions

    address, dask_data, servers = dask_cluster
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv(CV_FOLDS_ENV, str(N_FOLDS))

    # Reference: the same catalogue in another data root, in this process (while the workers start).
    ref_data = _data_root(tmp_path / "ref-data")
    monkeypatch.setenv("FER_DATA_DIR", str(ref_data))
    ref_defs = build_definitions(dg.in_process_executor, n_cv_folds=N_FOLDS)
    ref_instance = dg.DagsterInstance.ephemeral()
    ref = ref_defs.resolve_job_def("main").execute_in_process(
        instance=ref_instance, run_config=RUN_CONFIG, asset_selection=SELECTION)
    assert ref.success
    for fold in range(N_FOLDS):
        assert ref_defs.resolve_job_def(CV_FOLDS_JOB).execute_in_process(
            instance=ref_instance, run_config=RUN_CONFIG, partition_key=str(fold)).success
    ref_folds = _fold_table(ref_data, ref_instance)

    # Through Dask: a persistent instance (the workers write their events into it).
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("FER_DATA_DIR", str(dask_data))
    monkeypatch.setenv("FER_EXECUTOR", "dask")
    monkeypatch.setenv("FER_DASK_ADDRESS", address)
    with Client(address, timeout=30) as client:
        for server in servers:
            assert server.alive(), f"{server.name} exited:\n{server.log_tail()}"
        client.wait_for_workers(2, timeout=90)
        worker_pids = client.run(os.getpid)  # address -> PID, asked of every worker through the scheduler
        assert not any(client.run(_worker_is_daemonic).values())  # DASK_DISTRIBUTED__WORKER__DAEMON=False
    assert len(worker_pids) == 2 and len(set(worker_pids.values())) == 2

    with dg.DagsterInstance.get() as instance:
        job = dg.reconstructable(fer_asset_job)
        start = time.perf_counter()
        with dg.execute_job(job, instance=instance, run_config=RUN_CONFIG, asset_selection=SELECTION) as result:
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            assert result.job_def.executor_def.name == "dask"
            run_id = result.run_id
        seconds = time.perf_counter() - start
        starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        done = {e.dagster_event.asset_key.path[-1]
                for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)}
    print(f"dask run: {seconds:.1f} s")

    # Distribution: every step ran in a worker process, never here, and both workers ran steps.
    step_pid = {e.step_key: e.dagster_event.pid for e in starts}
    assert set(step_pid) >= {*DATA_KEYS, *MODELS}, sorted(step_pid)
    assert done >= {*DATA_KEYS, *MODELS}
    assert os.getpid() not in step_pid.values()
    assert set(step_pid.values()) <= set(worker_pids.values()), (step_pid, worker_pids)
    assert len(set(step_pid.values())) == 2, step_pid
    # The three models are independent: they are spread over both workers (trained in parallel).
    assert len({step_pid[m] for m in MODELS}) == 2, step_pid
    print("steps per worker:", {pid: sorted(k for k, p in step_pid.items() if p == pid)
                                for pid in set(step_pid.values())})

    # Equality: the published set and the trained models are those of the in-process run.
    expected, got = _published(ref_data), _published(dask_data)
    for name, table in expected["tables"].items():
        pd.testing.assert_frame_equal(got["tables"][name], table, obj=name)
    assert got["validation"] == expected["validation"]

    # The training work: one run per fold partition, both launched at once from two processes
    # (each its own execute_job, as a backfill's runs), their steps on the Dask workers.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from fer_pipeline.defs.refresh import execute

    keys = [str(k) for k in range(N_FOLDS)]
    with ProcessPoolExecutor(N_FOLDS, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = list(pool.map(execute, [CV_FOLDS_JOB] * N_FOLDS, [[dg.AssetKey("cv_fold")]] * N_FOLDS, keys,
                                 [RUN_CONFIG] * N_FOLDS))
    assert [(o.partition, o.status) for o in outcomes] == [(k, "SUCCESS") for k in keys], outcomes
    with dg.DagsterInstance.get() as instance:
        fold_pid = {o.partition: instance.all_logs(o.run_id, of_type=dg.DagsterEventType.STEP_START)[0]
                    .dagster_event.pid for o in outcomes}
        records = [instance.get_run_record_by_id(o.run_id) for o in outcomes]
        assert instance.get_materialized_partitions(dg.AssetKey("cv_fold")) == set(keys)
        folds = _fold_table(dask_data, instance)
    print("fold partition -> worker pid:", fold_pid)
    assert set(fold_pid.values()) <= set(worker_pids.values()), (fold_pid, worker_pids)
    assert len(set(fold_pid.values())) == N_FOLDS, fold_pid  # side by side, one per worker
    first, second = sorted(records, key=lambda r: r.start_time)
    assert second.start_time < first.end_time  # the two runs were in flight at the same time
    assert len(set(folds["run_id"].iloc[:N_FOLDS])) == N_FOLDS  # each fold from its own run
    pd.testing.assert_frame_equal(folds.drop(columns=FOLD_TABLE_RUN_COLUMNS),
                                  ref_folds.drop(columns=FOLD_TABLE_RUN_COLUMNS))
