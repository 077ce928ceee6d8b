"""The jobs of the code location, and the partitions of the training work.

Cross-validation folds and held-out sources are independent training jobs, so each is a
partition of an asset: ``cv_fold`` (static partitions ``0``..``k-1``) and ``loso_fold`` (dynamic
partitions, one per held-out source, added by ``held_out_sources`` as sources appear). Dagster
then records which are done and for which data, a UI backfill runs the missing ones, and a
distributed executor runs them side by side. A run materializes assets of one partitions
definition, hence five jobs, run in this order (``python -m fer_pipeline.defs.refresh`` does,
and so does ``training_work_sensor`` after a ``main`` run):

* ``main``: every unpartitioned asset upstream of the training work: the data half, the models,
  their evaluation, bias, mitigation, source confound and ``held_out_sources``;
* ``cv_folds`` and ``loso_folds``: one run per partition;
* ``training_reports``: what aggregates the partitions (``cross_validation``,
  ``cross_source_generalisation``) and what reads the aggregates (``label_issues``);
* ``data_pipeline``: the data group alone (what the sources sensor refreshes).

The number of CV folds is ``FER_CV_FOLDS`` (default 10, every fold ``splits`` stores), read when
the code location loads: Dagster fixes a partitions definition at load time, so a run config
cannot change it. Restart ``make ui`` after changing it.
"""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from fer_pipeline.defs.env import env_int

CV_FOLDS_ENV = "FER_CV_FOLDS"
DEFAULT_CV_FOLDS = 10
HELD_OUT_SOURCE_PARTITIONS = "held_out_source"

# Asset names of the training work (the assets live in defs/assets/evaluation.py).
CV_FOLD = "cv_fold"
LOSO_FOLD = "loso_fold"
HELD_OUT_SOURCES = "held_out_sources"

DATA_JOB = "data_pipeline"
MAIN_JOB = "main"
CV_FOLDS_JOB = "cv_folds"
LOSO_FOLDS_JOB = "loso_folds"
REPORTS_JOB = "training_reports"
#: partitioned job -> its one partitioned asset
PARTITIONED_JOBS: dict[str, str] = {CV_FOLDS_JOB: CV_FOLD, LOSO_FOLDS_JOB: LOSO_FOLD}


class PartitionSettingError(ValueError):
    """A bad ``FER_CV_FOLDS``: raised when the code location loads."""


def cv_fold_count(environ: Mapping[str, str] | None = None) -> int:
    """The number of CV folds, ``FER_CV_FOLDS`` (unset or empty: 10)."""
    return env_int(CV_FOLDS_ENV, DEFAULT_CV_FOLDS, 2, "folds", environ=environ, error=PartitionSettingError)


def cv_fold_partitions(n_cv_folds: int) -> dg.StaticPartitionsDefinition:
    """Partitions ``0``..``n-1``, one per CV fold."""
    return dg.StaticPartitionsDefinition([str(k) for k in range(n_cv_folds)])


LOSO_PARTITIONS = dg.DynamicPartitionsDefinition(name=HELD_OUT_SOURCE_PARTITIONS)

_TRAINING_WORK = dg.AssetSelection.assets(CV_FOLD, LOSO_FOLD)

data_pipeline_job = dg.define_asset_job(
    DATA_JOB, selection=dg.AssetSelection.groups("data"),
    description="Every data asset: sources → faces → de-duplicated → manifest → splits → plots.")

main_job = dg.define_asset_job(
    MAIN_JOB, selection=dg.AssetSelection.all() - _TRAINING_WORK.downstream(),
    description="Everything upstream of the training work: the data half, models, evaluation, bias, mitigation, "
                "source confound, held-out sources. Then run cv_folds and loso_folds (one run per partition) and "
                "training_reports: `python -m fer_pipeline.defs.refresh` runs all four.")

cv_folds_job = dg.define_asset_job(
    CV_FOLDS_JOB, selection=dg.AssetSelection.assets(CV_FOLD),
    description="One cross-validation fold per run (partition = fold number).")

loso_folds_job = dg.define_asset_job(
    LOSO_FOLDS_JOB, selection=dg.AssetSelection.assets(LOSO_FOLD),
    description="One held-out source per run (partition = source name).")

training_reports_job = dg.define_asset_job(
    REPORTS_JOB, selection=_TRAINING_WORK.downstream() - _TRAINING_WORK,
    description="The aggregates of the fold and held-out-source partitions (cross_validation, "
                "cross_source_generalisation) and what reads them (label_issues).")

JOBS = [data_pipeline_job, main_job, cv_folds_job, loso_folds_job, training_reports_job]
