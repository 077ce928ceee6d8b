"""The Dagster code location: ``dagster dev`` (via workspace.yaml) and
``dagster asset materialize -m fer_pipeline.definitions`` load ``defs`` from here. The executor
(which engine runs the steps) is the ``FER_EXECUTOR`` setting and the number of CV folds (the
``cv_fold`` partitions) is ``FER_CV_FOLDS``, both read when this module loads
(:mod:`fer_pipeline.defs.executors`, :mod:`fer_pipeline.defs.jobs`)."""

from __future__ import annotations

import os

import dagster as dg

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from fer_pipeline.defs.assets.card import model_card  # noqa: E402
from fer_pipeline.defs.assets.data import DATA_ASSETS  # noqa: E402
from fer_pipeline.defs.assets.evaluation import evaluation_assets  # noqa: E402
from fer_pipeline.defs.assets.models import MODEL_ASSETS, model_evaluation  # noqa: E402
from fer_pipeline.defs.assets.pretrain import pretrained_backbone  # noqa: E402
from fer_pipeline.defs.automation import SCHEDULES, SENSORS  # noqa: E402
from fer_pipeline.defs.checks import DATA_CHECKS  # noqa: E402
from fer_pipeline.defs.executors import executor_from_env  # noqa: E402
from fer_pipeline.defs.jobs import JOBS, cv_fold_count  # noqa: E402
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings  # noqa: E402


def build_definitions(executor: dg.ExecutorDefinition | None = None, n_cv_folds: int | None = None) -> dg.Definitions:
    """The code location; ``executor`` defaults to the one ``FER_EXECUTOR`` selects
    (:mod:`fer_pipeline.defs.executors`), ``n_cv_folds`` to ``FER_CV_FOLDS`` (:mod:`fer_pipeline.defs.jobs`)."""
    return dg.Definitions(
        assets=[*DATA_ASSETS, pretrained_backbone, *MODEL_ASSETS, model_evaluation, *evaluation_assets(n_cv_folds or cv_fold_count()),
                model_card],
        asset_checks=[*DATA_CHECKS],
        jobs=JOBS,
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources={"fer": FerSettings(), "training": TrainSettings(), "analysis": AnalysisSettings()},
        # Default (FER_EXECUTOR unset): one process for the whole run. Stages parallelise internally
        # (decoding pool, torch threads), and a process per step would pay Python/torch/GX start-up
        # for every step and check. FER_EXECUTOR=multiprocess / dask / k8s spread steps over
        # processes or hosts (README "Scaling out").
        executor=executor if executor is not None else executor_from_env(),
    )


# FER_EXECUTOR and FER_CV_FOLDS are read here, when the code location loads.
defs = build_definitions()
