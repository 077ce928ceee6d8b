"""Sensors and schedules that keep the assets up to date.

* ``source_files_sensor`` watches ``sources.yaml`` and every source it lists (new, changed or
  removed files in a folder; an archive or CSV replaced as a whole) with a stat-only
  fingerprint (:mod:`fer_pipeline.dataset.source_watch`) and requests ONE run per change, with a run key
  derived from the new fingerprint, so each change triggers exactly one run and nothing
  happens when nothing changed. The run brings every data asset (inventory, faces,
  de-duplication, manifest, splits, plots) and their checks up to date; the stages are
  incremental, so only the new files are decoded. Off until a user turns it on.
  Hostile sources do not stop it: a dangling or looping symbolic link, a FIFO or an unlistable
  subfolder is part of the fingerprint (its appearance is a change, the run records the file as
  excluded, the sensor logs it); a file replaced with the same size and a reset modification
  time is caught by its inode change time and inode number. It skips (keeping its cursor, and
  naming the source) only when a source's root cannot be read at all, since a run would then
  drop every file of that source.
* Retraining switch: models are not retrained on every small data change. With the environment
  variable ``FER_AUTO_RETRAIN=1`` (read when the code location loads: restart ``make ui`` after
  changing it) the sensor requests the ``main`` job (data and models) instead of
  ``data_pipeline``.
* ``training_work_sensor`` keeps the partitioned training work (:mod:`fer_pipeline.defs.jobs`)
  in step with ``main``: after each successful ``main`` run it requests one run per CV-fold and
  held-out-source partition that is not current (tagged with that ``main`` run as their batch),
  and once every run of the batch has succeeded, one ``training_reports`` run (the aggregates,
  label issues). Run keys make each request happen once. On by default when
  ``FER_AUTO_RETRAIN=1`` (so new data refreshes data, models, folds and reports), else off
  until a user turns it on.
* ``full_rebuild_schedule`` reprocesses everything from scratch (no decode cache, no reused
  hashes, no cached duplicate links) daily at ``FER_REBUILD_CRON`` (default ``0 3 * * *``, in
  ``FER_REBUILD_TIMEZONE``, default UTC) as a safety net. Off until a user turns it on. It
  rebuilds the data half only; models and training work follow through the sensors above.

Environment knobs (all optional): ``FER_SENSOR_INTERVAL_SECONDS`` (default 30),
``FER_AUTO_RETRAIN``, ``FER_REBUILD_CRON``, ``FER_REBUILD_TIMEZONE``.
"""

from __future__ import annotations

import os

import dagster as dg

from fer_pipeline.defs.env import env_int

try:  # Dagster's own cron check (internal module): a clear message for a bad FER_REBUILD_CRON
    from dagster._utils.schedules import is_valid_cron_string
except ImportError:  # pragma: no cover - then ScheduleDefinition's own validation applies
    def is_valid_cron_string(cron_string: str) -> bool:
        return True

from fer_pipeline.dataset import source_watch
from fer_pipeline.dataset.catalog import CatalogError
from fer_pipeline.defs.jobs import (
    DATA_JOB,
    MAIN_JOB,
    PARTITIONED_JOBS,
    REPORTS_JOB,
    cv_folds_job,
    loso_folds_job,
    main_job,
    training_reports_job,
)
from fer_pipeline.defs.resources import FerSettings

SENSOR_NAME = "source_files_sensor"
TRAINING_SENSOR_NAME = "training_work_sensor"
BATCH_TAG = "fer/batch"  # the main run a partition run refreshes after
BATCH_SIZE_TAG = "fer/batch_size"  # how many partition runs that batch has
SCHEDULE_NAME = "full_rebuild_schedule"

INTERVAL_ENV = "FER_SENSOR_INTERVAL_SECONDS"
RETRAIN_ENV = "FER_AUTO_RETRAIN"
CRON_ENV = "FER_REBUILD_CRON"
TIMEZONE_ENV = "FER_REBUILD_TIMEZONE"
DEFAULT_INTERVAL_SECONDS = 30
DEFAULT_REBUILD_CRON = "0 3 * * *"
REBUILD_RUN_CONFIG = {"resources": {"fer": {"config": {"rebuild": True}}}}

_TRUE = {"1", "true", "yes", "on"}


def auto_retrain_enabled() -> bool:
    """``FER_AUTO_RETRAIN`` is on (1/true/yes/on); off by default."""
    return os.environ.get(RETRAIN_ENV, "").strip().lower() in _TRUE


def sensor_interval_seconds() -> int:
    return env_int(INTERVAL_ENV, DEFAULT_INTERVAL_SECONDS, 1, "seconds")


def rebuild_cron() -> str:
    cron = os.environ.get(CRON_ENV, "").strip() or DEFAULT_REBUILD_CRON
    if not is_valid_cron_string(cron):
        raise ValueError(f"{CRON_ENV}={cron!r} is not a valid cron expression (e.g. '{DEFAULT_REBUILD_CRON}')")
    return cron


def build_source_sensor(job_name: str | None = None, minimum_interval_seconds: int | None = None,
                        name: str = SENSOR_NAME) -> dg.SensorDefinition:
    """The sources sensor, targeting ``job_name`` (default: ``main`` when ``FER_AUTO_RETRAIN`` is
    on, else ``data_pipeline``)."""
    target = job_name or (MAIN_JOB if auto_retrain_enabled() else DATA_JOB)
    interval = minimum_interval_seconds or sensor_interval_seconds()

    @dg.sensor(
        name=name,
        job_name=target,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            f"Watches sources.yaml and every catalogued source (file names, sizes, dates and inodes; "
            f"no image is read) every {interval} s and requests one run of '{target}' per change. Set FER_AUTO_RETRAIN=1 to "
            f"target 'main' (also retrains the models)."),
    )
    def _sensor(context: dg.SensorEvaluationContext, fer: FerSettings) -> dg.SensorResult | dg.SkipReason:
        root = fer.paths.root
        try:
            fingerprint = source_watch.fingerprint_sources(root)
        except CatalogError as exc:  # the cursor is kept: fixing the catalogue is compared with the last good state
            return dg.SkipReason(f"catalogue problem, sources not checked: {exc}")
        except source_watch.UnreadableSourceError as exc:  # a run now would drop the whole source
            return dg.SkipReason(f"{exc}; sources not checked (a run now would drop its files), "
                                 f"the last good state is kept")
        except OSError as exc:  # sources.yaml itself, or the data root
            return dg.SkipReason(f"cannot read the sources under {root}: {exc}")
        previous = source_watch.parse_cursor(context.cursor)
        if previous is not None and previous.digest == fingerprint.digest:
            return dg.SkipReason(f"no change in {len(fingerprint.sources)} source(s) "
                                 f"({fingerprint.files} file(s)) or sources.yaml")
        seq = (previous.seq if previous else 0) + 1
        changes = source_watch.describe_changes(previous, fingerprint)
        summary = "; ".join(changes)
        context.log.info(f"sources changed: {summary}")
        for state in fingerprint.sources.values():
            if state.faults:  # the run records them as excluded; say so here too
                context.log.warning(f"source '{state.name}': {len(state.faults)} unreadable entr"
                                    f"{'y' if len(state.faults) == 1 else 'ies'}: " + "; ".join(state.faults[:20]))
        request = dg.RunRequest(
            run_key=source_watch.run_key(fingerprint, seq),
            job_name=target,
            tags={"fer/trigger": "source_change", "fer/source_fingerprint": fingerprint.digest[:16],
                  "fer/changes": summary if len(summary) <= 200 else summary[:197] + "..."},
        )
        return dg.SensorResult(run_requests=[request], cursor=fingerprint.to_cursor(seq))

    return _sensor


def build_training_work_sensor(name: str = TRAINING_SENSOR_NAME,
                               default_status: dg.DefaultSensorStatus | None = None) -> dg.SensorDefinition:
    """After a successful ``main`` run: one run per partition that is not current, then (when
    all of them succeeded) one ``training_reports`` run. Default status: running when
    ``FER_AUTO_RETRAIN`` is on, else stopped."""
    if default_status is None:
        default_status = dg.DefaultSensorStatus.RUNNING if auto_retrain_enabled() else dg.DefaultSensorStatus.STOPPED

    @dg.run_status_sensor(
        name=name,
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[main_job, cv_folds_job, loso_folds_job],
        request_jobs=[cv_folds_job, loso_folds_job, training_reports_job],
        minimum_interval_seconds=sensor_interval_seconds(),
        default_status=default_status,
        description=(f"After each successful '{MAIN_JOB}' run, requests one run per CV-fold and held-out-source "
                     f"partition that is not current, then '{REPORTS_JOB}' once they all succeeded "
                     f"(on by default with {RETRAIN_ENV}=1)."),
    )
    def _sensor(context: dg.RunStatusSensorContext) -> list[dg.RunRequest] | dg.SkipReason:
        # imported here: it reads the loaded code location
        from fer_pipeline.defs.refresh import partitions_to_run

        run = context.dagster_run
        if run.job_name == MAIN_JOB:
            batch = run.run_id
            todo: dict[str, list[str]] = {}
            for job in PARTITIONED_JOBS:
                keys = _static_keys(context, job)
                todo[job] = partitions_to_run(context.instance, job, {}, keys=keys)[0]
            size = sum(map(len, todo.values()))
            if not size:
                return [dg.RunRequest(run_key=f"{batch}:{REPORTS_JOB}", job_name=REPORTS_JOB,
                                      tags={BATCH_TAG: batch, "fer/trigger": "training_work"})]
            context.log.info(f"main run {batch[:8]} succeeded: {size} partition run(s) " +
                             ", ".join(f"{job} {keys}" for job, keys in todo.items() if keys))
            return [dg.RunRequest(run_key=f"{batch}:{job}:{key}", job_name=job, partition_key=key,
                                  tags={BATCH_TAG: batch, BATCH_SIZE_TAG: str(size), "fer/trigger": "training_work"})
                    for job, keys in todo.items() for key in keys]
        batch = run.tags.get(BATCH_TAG)
        if not batch or BATCH_SIZE_TAG not in run.tags:
            return dg.SkipReason(f"run {run.run_id[:8]} of {run.job_name} is not part of a refresh after main")
        runs = context.instance.get_runs(filters=dg.RunsFilter(tags={BATCH_TAG: batch}))
        succeeded = {(r.job_name, r.tags.get("dagster/partition")) for r in runs
                     if r.job_name in PARTITIONED_JOBS and r.status == dg.DagsterRunStatus.SUCCESS}
        size = int(run.tags[BATCH_SIZE_TAG])
        if len(succeeded) < size:
            return dg.SkipReason(f"batch {batch[:8]}: {len(succeeded)} of {size} partition runs succeeded so far")
        return [dg.RunRequest(run_key=f"{batch}:{REPORTS_JOB}", job_name=REPORTS_JOB,
                              tags={BATCH_TAG: batch, "fer/trigger": "training_work"})]

    return _sensor


def _static_keys(context: dg.RunStatusSensorContext, job: str) -> list[str] | None:
    """The partition keys of a static partitioned job from the loaded code location (None: ask
    the definitions module, or the instance for dynamic partitions)."""
    repo = context.repository_def
    if repo is None or not repo.has_job(job):
        return None
    partitions = repo.get_job(job).partitions_def
    return None if isinstance(partitions, dg.DynamicPartitionsDefinition) else list(partitions.get_partition_keys())


def build_rebuild_schedule(cron: str | None = None, job_name: str = DATA_JOB) -> dg.ScheduleDefinition:
    """Daily from-scratch reprocessing (``rebuild: true``); off until a user turns it on."""
    cron = cron or rebuild_cron()
    return dg.ScheduleDefinition(
        name=SCHEDULE_NAME,
        cron_schedule=cron,
        job_name=job_name,
        run_config=REBUILD_RUN_CONFIG,
        execution_timezone=os.environ.get(TIMEZONE_ENV, "").strip() or None,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        tags={"fer/trigger": "scheduled_rebuild"},
        description=(f"Safety net: reprocesses every source from scratch ({cron}; set {CRON_ENV} to change): "
                     "no decode cache, no reused content hashes, no cached duplicate links."),
    )


source_files_sensor = build_source_sensor()
training_work_sensor = build_training_work_sensor()
full_rebuild_schedule = build_rebuild_schedule()

SENSORS: list[dg.SensorDefinition] = [source_files_sensor, training_work_sensor]
SCHEDULES: list[dg.ScheduleDefinition] = [full_rebuild_schedule]
