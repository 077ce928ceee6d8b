"""The Dagster code location: ``dagster dev`` (via workspace.yaml) and
``dagster asset materialize -m fer_pipeline.definitions`` load ``defs`` from here. The executor
(which engine runs the steps) is the ``FER_EXECUTOR`` setting, read when this module loads
(:mod:`fer_pipeline.defs.executors`)."""

from __future__ import annotations

import os

import dagster as dg

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from fer_pipeline.defs.assets.data import DATA_ASSETS  # noqa: E402
from fer_pipeline.defs.assets.evaluation import EVALUATION_ASSETS  # noqa: E402
from fer_pipeline.defs.assets.models import MODEL_ASSETS, model_evaluation  # noqa: E402
from fer_pipeline.defs.automation import SCHEDULES, SENSORS  # noqa: E402
from fer_pipeline.defs.checks import DATA_CHECKS  # noqa: E402
from fer_pipeline.defs.executors import executor_from_env  # noqa: E402
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings  # noqa: E402

data_pipeline_job = dg.define_asset_job(
    "data_pipeline", selection=dg.AssetSelection.groups("data"),
    description="Every data asset: sources → faces → de-duplicated → manifest → splits → plots.")

main_job = dg.define_asset_job(
    "main", selection=dg.AssetSelection.all(),
    description="Everything: the data half, then models, evaluation and analysis.")


def build_definitions(executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """The code location; ``executor`` defaults to the one ``FER_EXECUTOR`` selects
    (:mod:`fer_pipeline.defs.executors`)."""
    return dg.Definitions(
        assets=[*DATA_ASSETS, *MODEL_ASSETS, model_evaluation, *EVALUATION_ASSETS],
        asset_checks=[*DATA_CHECKS],
        jobs=[data_pipeline_job, main_job],
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources={"fer": FerSettings(), "training": TrainSettings(), "analysis": AnalysisSettings()},
        # Default (FER_EXECUTOR unset): one process for the whole run. Stages parallelise internally
        # (decoding pool, torch threads), and a process per step would pay Python/torch/GX start-up
        # for every step and check. FER_EXECUTOR=multiprocess / dask / k8s spread steps over
        # processes or hosts (README "Scaling out").
        executor=executor if executor is not None else executor_from_env(),
    )


# FER_EXECUTOR is read here, when the code location loads.
defs = build_definitions()
