"""The Dagster code location: ``dagster dev`` (via workspace.yaml) and
``dagster asset materialize -m fer_pipeline.definitions`` load ``defs`` from here.

Everything a run computes with is read once, when the code location loads, from the settings
file (:mod:`fer_pipeline.settings`: ``$FER_SETTINGS`` or ``settings.yaml`` in the data root) and
the catalogue (which sources can be held out): the UI, the sensors, automation and the CLI then
share them. Which engine runs the steps is ``FER_EXECUTOR`` (:mod:`fer_pipeline.defs.executors`),
an operational choice, not a setting of the recipe."""

from __future__ import annotations

import os

import dagster as dg

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from fer_pipeline.defs.assets.card import model_card  # noqa: E402
from fer_pipeline.defs.assets.data import DATA_ASSETS  # noqa: E402
from fer_pipeline.defs.assets.evaluation import evaluation_assets  # noqa: E402
from fer_pipeline.defs.assets.models import MODEL_ASSETS, model_evaluation  # noqa: E402
from fer_pipeline.defs.assets.pretrain import pretrained_backbone  # noqa: E402
from fer_pipeline.defs.assets.review import REVIEW_ASSETS  # noqa: E402
from fer_pipeline.defs.assets.shipped import build_shipped_asset
from fer_pipeline.defs.automation import SCHEDULES, SENSORS, is_automated, up_to_date_condition  # noqa: E402
from fer_pipeline.defs.checks import DATA_CHECKS  # noqa: E402
from fer_pipeline.defs.executors import executor_from_env  # noqa: E402
from fer_pipeline.defs.jobs import CV_FOLD, JOBS, cv_fold_count, held_out_source_keys  # noqa: E402
from fer_pipeline.defs.resources import LabelStudio  # noqa: E402
from fer_pipeline.defs.settings import bind_resources, versioned  # noqa: E402
from fer_pipeline.settings import Settings, current_settings  # noqa: E402


def _automated(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """``assets`` with :func:`up_to_date_condition` on those declarative automation keeps current."""
    condition = up_to_date_condition()

    def spec(s: dg.AssetSpec) -> dg.AssetSpec:
        return s.replace_attributes(automation_condition=condition) if is_automated(s) else s

    return [a.map_asset_specs(spec) if isinstance(a, dg.AssetsDefinition) else a for a in assets]


def build_definitions(executor: dg.ExecutorDefinition | None = None, n_cv_folds: int | None = None,
                      settings: Settings | None = None, held_out: list[str] | None = None) -> dg.Definitions:
    """The code location. Defaults: ``executor`` from ``FER_EXECUTOR``, ``settings`` from the
    settings file, ``n_cv_folds`` from its ``cv_folds`` (``FER_CV_FOLDS`` overrides it),
    ``held_out`` from the catalogue's four-class sources."""
    settings = settings if settings is not None else current_settings()
    n_cv_folds = n_cv_folds or cv_fold_count(default=settings.cv_folds)
    if held_out is None:
        held_out, note = held_out_source_keys()
        if note:
            dg.get_dagster_logger().warning(note)
    assets = [*DATA_ASSETS, pretrained_backbone, *MODEL_ASSETS, model_evaluation,
              *evaluation_assets(n_cv_folds, held_out), build_shipped_asset(n_cv_folds), model_card,
              *REVIEW_ASSETS]
    # the fold count is part of what a fold means: changing it marks every fold unsynced; "members":
    # folds now keep their model (an ensemble member), so folds stored without one are unsynced
    resources = bind_resources(settings)  # a bad settings file fails here, naming file and field
    assets = versioned(assets, resources, extra={CV_FOLD: f"{n_cv_folds}-fold-members"})
    # the review loop's server: from the environment when used (unset = the loop is off), not the settings file
    resources = {**resources, "label_studio": LabelStudio()}
    return dg.Definitions(
        assets=_automated(assets),
        asset_checks=[*DATA_CHECKS],
        jobs=JOBS,
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources=resources,
        # Default (FER_EXECUTOR unset): one process for the whole run. Stages parallelise internally
        # (decoding pool, torch threads), and a process per step would pay Python/torch/GX start-up
        # for every step and check. FER_EXECUTOR=multiprocess / dask / k8s spread steps over
        # processes or hosts (docs/operations.md, "Scaling out").
        executor=executor if executor is not None else executor_from_env(),
    )


# The settings file, the catalogue and FER_EXECUTOR are read here, when the code location loads.
defs = build_definitions()
