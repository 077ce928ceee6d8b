"""Bring the whole graph up to date by Dagster's own definition of "out of date": observe the
sources and the Label Studio review project, then run what Dagster reports *missing* or
*unsynced* (code or data versions changed), job by job in the order the partitions need: ``main``, one run per ``cv_folds``/``loso_folds``
partition, ``training_reports``. ``make demo`` runs::

    python -m fer_pipeline.defs.refresh --settings configs/demo.yaml

``--settings FILE`` first makes FILE the settings in force (it is copied to where every launch
path reads them, :mod:`fer_pipeline.settings`), so ``make ui`` afterwards shows the same recipe
and fold count. ``-c RUN_CONFIG`` overrides settings for these runs only (recorded on the runs
and their materializations). Runs are created like the UI's (with the code location's origin, so
the UI's timeline shows them) in ``$DAGSTER_HOME`` and executed in this process; partitions run
``--concurrency`` at a time. Exit status 0 when every run succeeded.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
import yaml
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.execution.api import execute_run
from dagster._core.loader import LoadingContext
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from fer_pipeline.defs.jobs import (
    CV_FOLDS_JOB,
    DATA_JOB,
    LOSO_FOLDS_JOB,
    MAIN_JOB,
    REPORTS_JOB,
    REVIEWS_OBSERVATION,
    SOURCE_OBSERVATION,
)
from fer_pipeline.paths import REPO_ROOT
from fer_pipeline.settings import install_settings, settings_path

LOCATION = "fer_pipeline.definitions"  # the code location's name in workspace.yaml
ORDER = (MAIN_JOB, CV_FOLDS_JOB, LOSO_FOLDS_JOB, REPORTS_JOB)
TRIGGER_TAG = {"fer/trigger": "refresh"}


class Outcome(NamedTuple):
    job: str
    partition: str | None
    status: str
    seconds: float
    run_id: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "SUCCESS"


def job_def(name: str) -> dg.JobDefinition:
    """A job of the code location, as a run process rebuilds it."""
    from fer_pipeline.defs.definitions import defs

    return defs.resolve_job_def(name)


def execute(job: str, keys: Sequence[dg.AssetKey] | None = None, partition: str | None = None,
            run_config: dict[str, Any] | None = None) -> Outcome:
    """One run of ``job`` for ``keys`` (None: all of its assets; one ``partition``), created with
    the code location's origin exactly as the UI creates it, executed here."""
    recon = dg.build_reconstructable_job("fer_pipeline.defs.refresh", "job_def", reconstructable_args=(job,))
    if keys is not None:
        recon = recon.get_subset(asset_selection=set(keys))
    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=LOCATION,
                                  working_directory=str(REPO_ROOT))
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(ManagedGrpcPythonEnvCodeLocationOrigin(target, LOCATION),
                                                    "__repository__"), job)
    tags = {**TRIGGER_TAG, **({"dagster/partition": partition} if partition is not None else {})}
    start = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        run = instance.create_run_for_job(job_def=recon.get_definition(), run_config=run_config or {}, tags=tags,
                                          asset_selection=frozenset(keys) if keys is not None else None,
                                          remote_job_origin=origin,
                                          job_code_origin=recon.get_python_origin())
        result = execute_run(recon, run, instance)
        failures = [e.message or "" for e in result.all_events if e.is_failure]
    note = failures[0].splitlines()[0][:160] if failures and failures[0] else ""
    return Outcome(job, partition, "SUCCESS" if result.success else "FAILURE", time.perf_counter() - start,
                   run.run_id, note)


class _Loading(LoadingContext):
    """The per-query cache Dagster's staleness resolver reads the instance through."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self._instance, self._loaders = instance, {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


def out_of_date(job: str) -> dict[str | None, list[dg.AssetKey]]:
    """Partition (None: unpartitioned) -> the assets of ``job`` Dagster reports missing or
    unsynced (what the UI shows as Missing or Unsynced)."""
    from fer_pipeline.defs.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = [k for k in job_def(job).asset_layer.selected_asset_keys if graph.get(k).is_materializable]
    with dg.DagsterInstance.get() as instance:
        resolver = CachingStaleStatusResolver(instance, graph, _Loading(instance))
        todo: dict[str | None, list[dg.AssetKey]] = {}
        for key in keys:
            partitions = graph.get(key).partitions_def
            for partition in partitions.get_partition_keys() if partitions else [None]:
                if resolver.get_status(key, partition) != StaleStatus.FRESH:
                    todo.setdefault(partition, []).append(key)
    return todo


def run_many(args: Sequence[tuple[str, Sequence[dg.AssetKey] | None, str | None, dict[str, Any]]],
             concurrency: int = 1) -> list[Outcome]:
    """:func:`execute` for each argument tuple, ``concurrency`` at a time (each in a fresh process)."""
    if concurrency > 1 and len(args) > 1:
        with ProcessPoolExecutor(min(concurrency, len(args)), mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(execute, *zip(*args, strict=True)))
    else:
        done = [execute(*a) for a in args]
    for o in done:
        print(f"refresh: {o.job}[{o.partition or '-'}]: {o.status} in {o.seconds:.1f} s (run {o.run_id[:8]}) {o.note}")
    return done


def run_partitions(job: str, keys: Sequence[str], run_config: dict[str, Any], concurrency: int = 1) -> list[Outcome]:
    """One run per partition key of a partitioned job (every asset of the job)."""
    return run_many([(job, None, key, run_config) for key in keys], concurrency)


MAX_SWEEPS = 4


def refresh(run_config: dict[str, Any] | None = None, concurrency: int = 1) -> list[Outcome]:
    """Observe the sources, then each job's missing or unsynced assets; stops after a failed ``main``."""
    run_config = run_config or {}
    # the sources and the review project: what changed there marks the data half unsynced
    outcomes = [execute(DATA_JOB, [dg.AssetKey(SOURCE_OBSERVATION), dg.AssetKey(REVIEWS_OBSERVATION)], None, {})]
    # Dagster marks an asset unsynced once an input it read has a newer version; an input that is
    # only due to change (several levels up, across the partitioned folds) shows when it has
    # changed. So sweep the jobs again until a sweep finds nothing to do (a few at most).
    for sweep in range(MAX_SWEEPS):
        ran = False
        for job in ORDER:
            work = out_of_date(job)
            if sweep and not work:
                continue
            which = f" {sorted(map(str, work))}" if work and (job in (CV_FOLDS_JOB, LOSO_FOLDS_JOB) or sweep) else ""
            print(f"refresh: {job}: {len(work)} run(s) to bring up to date{which}")
            args = [(job, keys, partition, run_config)
                    for partition, keys in sorted(work.items(), key=lambda w: str(w[0]))]
            done = run_many(args, concurrency)
            outcomes += done
            ran = ran or bool(done)
            if job == MAIN_JOB and any(o.status != "SUCCESS" for o in done):
                return outcomes
        if not ran or any(o.status != "SUCCESS" for o in outcomes):
            break  # done, or a failed run that another sweep would only repeat
    return outcomes


def outcome_table(outcomes: Sequence[Outcome]) -> str:
    rows = [f"{'job':<18} {'partition':<24} {'status':<8} {'seconds':>8}  run"]
    rows += [f"{o.job:<18} {o.partition or '-':<24} {o.status:<8} {o.seconds:>8.1f}  {o.run_id[:8]}"
             f"{'  ' + o.note if o.note and o.status != 'SUCCESS' else ''}" for o in outcomes]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None, prog: str = "python -m fer_pipeline.defs.refresh") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", type=Path, help="make this settings file the one in force first")
    parser.add_argument("-c", "--config", action="append", default=[], type=Path,
                        help="run config YAML overriding settings for these runs only; repeat to merge")
    parser.add_argument("--concurrency", type=int, default=1, help="partition runs at a time (default 1)")
    args = parser.parse_args(argv)
    if not os.environ.get("DAGSTER_HOME"):
        parser.error("DAGSTER_HOME is not set: runs and statuses live in a persistent instance "
                     "(make demo uses ./dagster_home)")
    if args.settings:
        target = settings_path()
        if target is None:
            parser.error("an object-store data root reads its settings from $FER_SETTINGS: set it")
        changed = install_settings(args.settings, target)
        print(f"refresh: settings {target} {'<- ' + str(args.settings) if changed else '(unchanged)'}")
    run_config: dict[str, Any] = {}
    for path in args.config:
        run_config = _merge(run_config, yaml.safe_load(path.read_text()) or {})
    start = time.perf_counter()
    outcomes = refresh(run_config, args.concurrency)
    print(outcome_table(outcomes))
    print(f"refresh: {time.perf_counter() - start:.1f} s in all")
    return 0 if all(o.status == "SUCCESS" for o in outcomes) else 1


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


if __name__ == "__main__":
    sys.exit(main())
