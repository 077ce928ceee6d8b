"""Bring the whole graph up to date through Dagster runs, in the order the jobs need
(:mod:`fer_pipeline.defs.jobs`): ``main``, then one run per partition of ``cv_folds`` and
``loso_folds`` that is not current, then ``training_reports``. ``make demo`` runs::

    python -m fer_pipeline.defs.refresh -c configs/demo.yaml

A partition is current when Dagster's latest materialization of it and its stored result both
carry the identity (data version + recipe) this run config would train it with; ``--force``
retrains every partition, ``--steps`` picks the stages. Every run goes through Dagster
(``execute_job``) with the executor the code location selects (``FER_EXECUTOR``) and is recorded
in the instance (``$DAGSTER_HOME``), so the UI shows it and the partitions' status.
``--concurrency N`` launches up to N partition runs at a time, each from its own process: with
``FER_EXECUTOR=dask`` and N workers, N folds train side by side.

Exit status: 0 when every run succeeded, 1 otherwise (the table printed at the end says which).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from fer_pipeline.defs.jobs import (
    CV_FOLDS_JOB,
    LOSO_FOLDS_JOB,
    LOSO_PARTITIONS,
    MAIN_JOB,
    PARTITIONED_JOBS,
    REPORTS_JOB,
)

STEPS = ("main", "partitions", "reports")
TRIGGER_TAG = {"fer/trigger": "refresh"}


def job_def(name: str) -> dg.JobDefinition:
    """A job of the code location (what each run process rebuilds; see :func:`execute`)."""
    from fer_pipeline.definitions import defs

    return defs.resolve_job_def(name)


@dataclass
class RunOutcome:
    job: str
    partition: str | None
    status: str  # SUCCESS, FAILURE, or "current" (not run)
    seconds: float = 0.0
    run_id: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("SUCCESS", "current")


def execute(job_name: str, partition: str | None = None, run_config: dict[str, Any] | None = None) -> RunOutcome:
    """One run of ``job_name`` (one partition of a partitioned job) through ``execute_job``, in
    the instance at ``$DAGSTER_HOME``; module level so that a pool process can run it."""
    tags = {**TRIGGER_TAG, **({"dagster/partition": partition} if partition is not None else {})}
    start = time.perf_counter()
    job = dg.build_reconstructable_job("fer_pipeline.defs.refresh", "job_def", reconstructable_args=(job_name,))
    with dg.DagsterInstance.get() as instance, \
            dg.execute_job(job, instance=instance, run_config=run_config or {}, tags=tags) as result:
        failures = [e.message for e in result.all_events if e.is_failure]
        status = "SUCCESS" if result.success else "FAILURE"
        note = (failures[0] or "").splitlines()[0][:160] if failures else ""
        return RunOutcome(job_name, partition, status, time.perf_counter() - start, result.run_id, note)


# --------------------------------------------------------------------------------------------
# which partitions are current
# --------------------------------------------------------------------------------------------


def _settings(run_config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The ``fer``, ``training`` and ``analysis`` resources this run config gives."""
    from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings

    resources = (run_config or {}).get("resources", {})

    def conf(name: str) -> dict[str, Any]:
        return dict((resources.get(name) or {}).get("config") or {})

    return FerSettings(**conf("fer")), TrainSettings(**conf("training")), AnalysisSettings(**conf("analysis"))


def expected_identities(job_name: str, keys: Sequence[str], run_config: dict[str, Any],
                        n_cv_folds: int) -> dict[str, str] | str:
    """Partition -> the identity a run with ``run_config`` would give it now, or why unknown."""
    from fer_pipeline.dataset.publish import read_published
    from fer_pipeline.defs.assets.evaluation import cv_recipe, loso_recipe, main_start

    try:
        fer, training, analysis = _settings(run_config)
        version = read_published(fer.paths).data_version
    except Exception as exc:  # noqa: BLE001 - then every partition runs; the run says what is wrong
        return f"cannot tell ({type(exc).__name__}: {exc})"
    start = main_start(fer, training, with_weights=False)
    if job_name == CV_FOLDS_JOB:
        _, recipe = cv_recipe(version, training, analysis, n_cv_folds, start)
    else:
        _, recipe = loso_recipe(version, training, analysis, start)
    return {k: recipe.identity(int(k) if job_name == CV_FOLDS_JOB else k) for k in keys}


def stored_identity(job_name: str, key: str, run_config: dict[str, Any]) -> str | None:
    """The identity of the partition's stored result under the data root (None: none)."""
    from fer_pipeline.analysis.cross_validation import FoldStore
    from fer_pipeline.analysis.generalisation import LosoStore

    paths = _settings(run_config)[0].paths
    if job_name == CV_FOLDS_JOB:
        return FoldStore(paths.report("cv_fold_results")).stored_identity(int(key))
    return LosoStore(paths.report("loso_results")).stored_identity(key)


def recorded_identity(instance: dg.DagsterInstance, asset: str, key: str) -> str | None:
    """The identity Dagster's latest materialization of partition ``key`` recorded (None: never)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1).records
    if not records:
        return None
    entry = records[0].asset_materialization.metadata.get("recipe_identity") if records[0].asset_materialization \
        else None
    return str(entry.value) if entry is not None else None


def partition_keys(instance: dg.DagsterInstance, job_name: str) -> list[str]:
    """Every partition of a partitioned job: the fold numbers, or the registered held-out sources."""
    if job_name == LOSO_FOLDS_JOB:
        return list(instance.get_dynamic_partitions(LOSO_PARTITIONS.name))
    return list(job_def(job_name).partitions_def.get_partition_keys())


def partitions_to_run(instance: dg.DagsterInstance, job_name: str, run_config: dict[str, Any], *,
                      keys: Sequence[str] | None = None, force: bool = False) -> tuple[list[str], list[RunOutcome]]:
    """(partitions to run, outcomes of the current ones, which are not run), among ``keys``
    (default: every partition of the job)."""
    keys = list(keys) if keys is not None else partition_keys(instance, job_name)
    if force or not keys:
        return keys, []
    n_cv_folds = len(keys) if job_name == CV_FOLDS_JOB else 0
    expected = expected_identities(job_name, keys, run_config, n_cv_folds)
    if isinstance(expected, str):
        return keys, []
    asset = PARTITIONED_JOBS[job_name]
    todo, current = [], []
    for key in keys:
        want = expected[key]
        if recorded_identity(instance, asset, key) == want and stored_identity(job_name, key, run_config) == want:
            current.append(RunOutcome(job_name, key, "current", note="trained on the published data with this "
                                                                     "recipe; --force retrains"))
        else:
            todo.append(key)
    return todo, current


# --------------------------------------------------------------------------------------------
# the refresh
# --------------------------------------------------------------------------------------------


def run_partitions(job_name: str, keys: Sequence[str], run_config: dict[str, Any], concurrency: int = 1,
                   on_done: Callable[[RunOutcome], None] | None = None) -> list[RunOutcome]:
    """One run per partition key; ``concurrency`` > 1: that many at a time, each from its own
    process (started fresh: nothing of this process is shared with the runs)."""
    outcomes: list[RunOutcome] = []
    if concurrency <= 1 or len(keys) <= 1:
        for key in keys:
            outcomes.append(execute(job_name, key, run_config))
            if on_done:
                on_done(outcomes[-1])
        return outcomes
    with ProcessPoolExecutor(max_workers=min(concurrency, len(keys)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(execute, job_name, key, run_config) for key in keys]
        for future in futures:
            outcomes.append(future.result())
            if on_done:
                on_done(outcomes[-1])
    return outcomes


def refresh(run_config: dict[str, Any] | None = None, *, steps: Sequence[str] = STEPS, concurrency: int = 1,
            force: bool = False, log: Callable[[str], None] = print) -> list[RunOutcome]:
    """Run ``main``, the partitions that are not current, then ``training_reports`` (each as
    selected by ``steps``); stops after a failed ``main``. Returns every outcome, in order."""
    run_config = run_config or {}
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")

    def done(o: RunOutcome) -> None:
        where = f"{o.job}[{o.partition}]" if o.partition is not None else o.job
        log(f"refresh: {where}: {o.status} in {o.seconds:.1f} s (run {o.run_id[:8]}){' - ' + o.note if o.note else ''}")

    outcomes: list[RunOutcome] = []
    if "main" in steps:
        outcomes.append(execute(MAIN_JOB, None, run_config))
        done(outcomes[-1])
        if not outcomes[-1].ok:
            return outcomes
    if "partitions" in steps:
        with dg.DagsterInstance.get() as instance:
            plans = {job: partitions_to_run(instance, job, run_config, force=force) for job in PARTITIONED_JOBS}
        for job, (todo, current) in plans.items():
            outcomes.extend(current)
            log(f"refresh: {job} ({PARTITIONED_JOBS[job]}): {len(todo)} partition(s) to run {todo}, "
                f"{len(current)} current")
            outcomes.extend(run_partitions(job, todo, run_config, concurrency, on_done=done))
    if "reports" in steps:
        outcomes.append(execute(REPORTS_JOB, None, run_config))
        done(outcomes[-1])
    return outcomes


def outcome_table(outcomes: Sequence[RunOutcome]) -> str:
    lines = [f"{'job':<18} {'partition':<24} {'status':<8} {'seconds':>8}  run",
             *(f"{o.job:<18} {o.partition if o.partition is not None else '-'!s:<24} {o.status:<8} "
               f"{o.seconds:>8.1f}  {o.run_id[:8] or '-'}{'  ' + o.note if o.note and not o.ok else ''}"
               for o in outcomes)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_pipeline.defs.refresh", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", default=[], type=Path,
                        help="run config YAML (as `dagster job execute -c`); repeat to merge")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    parser.add_argument("--concurrency", type=int, default=1, help="partition runs at a time (default 1)")
    parser.add_argument("--force", action="store_true", help="retrain partitions that are current")
    args = parser.parse_args(argv)
    if not os.environ.get("DAGSTER_HOME"):
        parser.error("DAGSTER_HOME is not set: runs and partition status live in a persistent instance "
                     "(make demo uses ./dagster_home)")
    run_config: dict[str, Any] = {}
    for path in args.config:
        run_config = _merge(run_config, yaml.safe_load(path.read_text()) or {})
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    start = time.perf_counter()
    outcomes = refresh(run_config, steps=steps, concurrency=args.concurrency, force=args.force)
    print(outcome_table(outcomes))
    print(f"refresh: {time.perf_counter() - start:.1f} s in all")
    return 0 if all(o.ok for o in outcomes) else 1


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


if __name__ == "__main__":
    sys.exit(main())
