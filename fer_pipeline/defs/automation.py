"""What keeps the assets up to date unattended: a sensor that watches the sources, Dagster's
declarative automation for everything downstream, and a nightly safety net.

* ``source_files_sensor`` watches ``sources.yaml`` and every source it lists (new, changed or
  removed files in a folder; an archive or CSV replaced as a whole) with a stat-only
  fingerprint (:mod:`fer_pipeline.sources.watch`) and requests ONE run of
  ``data_pipeline`` per change, with a run key derived from the new fingerprint, so each change
  triggers exactly one run and nothing happens when nothing changed. The run observes the
  sources (``source_files``) and brings every data asset and its checks up to date; the stages
  are incremental, so only the new files are decoded. Off until a user turns it on.
  Hostile sources do not stop it: a dangling or looping symbolic link, a FIFO or an unlistable
  subfolder is part of the fingerprint (its appearance is a change, the run records the file as
  excluded, the sensor logs it); a file replaced with the same size and a reset modification
  time is caught by its inode change time and inode number. It skips (keeping its cursor, and
  naming the source) only when a source's root cannot be read at all, since a run would then
  drop every file of that source.
* ``fer_automation`` (an :class:`~dagster.AutomationConditionSensorDefinition`, on by default)
  evaluates :func:`up_to_date_condition` on every asset downstream of the data half: the
  backbone, the models, the fold and held-out-source partitions, the aggregates and the card
  are requested once an upstream asset has a new data version (or their code version, which
  includes the settings they compute with, changed), after their inputs have finished. The
  Automation page shows, per asset and partition, which part of the condition held.
* ``full_rebuild_schedule`` reprocesses everything from scratch (no decode cache, no reused
  hashes, no cached duplicate links) daily at ``FER_REBUILD_CRON`` (default ``0 3 * * *``, in
  ``FER_REBUILD_TIMEZONE``, default UTC) as a safety net. Off until a user turns it on. It
  rebuilds the data half only; automation follows where the data changed.

Environment knobs (operational, all optional): ``FER_SENSOR_INTERVAL_SECONDS`` (default 30, both
sensors), ``FER_REBUILD_CRON``, ``FER_REBUILD_TIMEZONE``. What is computed (recipe, budgets) is
in the settings file (:mod:`fer_pipeline.settings`), never here.
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

from fer_pipeline.defs.jobs import DATA_JOB, SOURCE_OBSERVATION
from fer_pipeline.defs.resources import NO_LABEL_STUDIO, FerSettings, LabelStudio
from fer_pipeline.review.label_studio import LabelStudioError
from fer_pipeline.sources import watch as source_watch
from fer_pipeline.sources.catalog import CatalogError

SENSOR_NAME = "source_files_sensor"
REVIEW_SENSOR_NAME = "label_studio_reviews_sensor"
AUTOMATION_SENSOR_NAME = "fer_automation"
SCHEDULE_NAME = "full_rebuild_schedule"

INTERVAL_ENV = "FER_SENSOR_INTERVAL_SECONDS"
CRON_ENV = "FER_REBUILD_CRON"
TIMEZONE_ENV = "FER_REBUILD_TIMEZONE"
DEFAULT_INTERVAL_SECONDS = 30
DEFAULT_REBUILD_CRON = "0 3 * * *"
REBUILD_RUN_CONFIG = {"resources": {"fer": {"config": {"rebuild": True}}}}
DATA_GROUP = "data"
AUTOMATED = dg.AssetSelection.all() - dg.AssetSelection.groups(DATA_GROUP) - dg.AssetSelection.assets(SOURCE_OBSERVATION)
"""What declarative automation keeps up to date: everything downstream of the data half (the
data half itself is the sources sensor's run)."""


def is_automated(spec: dg.AssetSpec) -> bool:
    """Whether ``spec`` is in :data:`AUTOMATED`."""
    return spec.group_name != DATA_GROUP and spec.key != dg.AssetKey(SOURCE_OBSERVATION)


def sensor_interval_seconds() -> int:
    return env_int(INTERVAL_ENV, DEFAULT_INTERVAL_SECONDS, 1, "seconds")


def rebuild_cron() -> str:
    cron = os.environ.get(CRON_ENV, "").strip() or DEFAULT_REBUILD_CRON
    if not is_valid_cron_string(cron):
        raise ValueError(f"{CRON_ENV}={cron!r} is not a valid cron expression (e.g. '{DEFAULT_REBUILD_CRON}')")
    return cron


def up_to_date_condition() -> dg.AutomationCondition:
    """Dagster's ``eager()`` with one change: an upstream update counts only when its data
    version changed (a re-run that reproduced the same data requests nothing), and a code
    version change (new code or settings) counts too. Each part is labelled for the UI."""
    AC = dg.AutomationCondition
    new_data = AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label("new data version")
        | AC.will_be_requested()
    ).with_label("an input has new data")
    trigger = (AC.newly_missing() | new_data
               | AC.code_version_changed().with_label("code or settings changed")).since_last_handled()
    return (trigger & ~AC.any_deps_missing() & ~AC.any_deps_in_progress()
            & ~AC.in_progress()).with_label("inputs changed and are ready")


def build_automation_sensor(minimum_interval_seconds: int | None = None,
                            default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
                            ) -> dg.AutomationConditionSensorDefinition:
    """The sensor that evaluates the assets' automation conditions."""
    interval = minimum_interval_seconds or sensor_interval_seconds()
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR_NAME, target=AUTOMATED, default_status=default_status, minimum_interval_seconds=interval,
        run_tags={"fer/trigger": "automation"},
        description=f"Every {interval} s: requests the models, partitions, reports and card whose inputs have new "
                    "data, or whose code or settings changed, once those inputs are ready.")


def build_source_sensor(job_name: str = DATA_JOB, minimum_interval_seconds: int | None = None,
                        name: str = SENSOR_NAME) -> dg.SensorDefinition:
    """The sources sensor, requesting runs of ``job_name``."""
    target = job_name
    interval = minimum_interval_seconds or sensor_interval_seconds()

    @dg.sensor(
        name=name,
        job_name=target,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            f"Watches sources.yaml and every catalogued source (file names, sizes, dates and inodes; "
            f"no image is read) every {interval} s and requests one run of '{target}' per change; automation then "
            "brings the models, partitions, reports and card up to date."),
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


def build_review_sensor(job_name: str = DATA_JOB, minimum_interval_seconds: int | None = None,
                        name: str = REVIEW_SENSOR_NAME) -> dg.SensorDefinition:
    """The reviews sensor: requests one run of ``job_name`` (whose ``label_studio_reviews`` pulls the
    reviews, and whose manifest applies them) each time the review project's annotations change."""
    interval = minimum_interval_seconds or sensor_interval_seconds()

    @dg.sensor(
        name=name, job_name=job_name, minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(f"Every {interval} s: asks the Label Studio review project for its annotations (ids, update "
                     f"times, decisions) and requests one run of '{job_name}' when they changed: the run pulls the "
                     "reviews and the manifest applies them. Skips when no Label Studio is configured."),
    )
    def _sensor(context: dg.SensorEvaluationContext, label_studio: LabelStudio) -> dg.SensorResult | dg.SkipReason:
        if not label_studio.enabled:
            return dg.SkipReason(NO_LABEL_STUDIO)
        client = label_studio.client()  # a setting that cannot work fails the tick, naming the field
        try:
            digest, n = client.fingerprint()
        except LabelStudioError as exc:  # a failed tick naming the URL, shown on the sensor's page
            raise RuntimeError(str(exc)) from exc
        if context.cursor == digest:
            return dg.SkipReason(f"no new reviews in '{client.project_title}' ({n} annotation(s))")
        if context.cursor is None and n == 0:
            return dg.SensorResult(skip_reason=f"no reviews yet in '{client.project_title}'", cursor=digest)
        context.log.info(f"reviews changed in '{client.project_title}' ({n} annotation(s)): requesting '{job_name}'")
        request = dg.RunRequest(run_key=f"reviews-{digest}", job_name=job_name,
                                tags={"fer/trigger": "new_reviews", "fer/reviews_fingerprint": digest[:16]})
        return dg.SensorResult(run_requests=[request], cursor=digest)

    return _sensor


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
automation_sensor = build_automation_sensor()
review_sensor = build_review_sensor()
full_rebuild_schedule = build_rebuild_schedule()

SENSORS: list[dg.SensorDefinition] = [source_files_sensor, automation_sensor, review_sensor]
SCHEDULES: list[dg.ScheduleDefinition] = [full_rebuild_schedule]
