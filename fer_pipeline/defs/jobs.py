"""The jobs of the code location, and the partitions of the training work.

Cross-validation folds and held-out sources are independent training jobs, so each is a
partition of an asset: ``cv_fold`` (partitions ``0``..``k-1``) and ``loso_fold`` (one partition
per four-class source of the catalogue). Both partition sets are known when the code location
loads (``k`` from the settings file, the sources from ``sources.yaml``), so Dagster can plan the
whole graph before a run starts: "Materialize all" in the UI is one backfill that ends with the
model card. After adding a source to the catalogue, reload the code location (UI: Deployment →
Reload, or restart ``make ui``); ``held_out_sources`` warns about a source without a partition.

A run materializes assets of one partitions definition, hence the jobs, in this order:

* ``main``: every unpartitioned asset upstream of the training work: the data half, the models,
  their evaluation, bias, mitigation, source confound and ``held_out_sources``;
* ``cv_folds`` and ``loso_folds``: one run per partition;
* ``training_reports``: what aggregates the partitions (``cross_validation``,
  ``cross_source_generalisation``), what reads the aggregates (``label_issues``) and the card;
* ``data_pipeline``: the source observation and the data group (what the sources sensor runs).

Nobody has to run them in order by hand: declarative automation brings the downstream assets up
to date after a data run (:mod:`fer_pipeline.defs.automation`), the UI's "Materialize all" plans
them as one backfill, and ``make demo`` (:mod:`fer_pipeline.defs.refresh`) runs what Dagster
reports missing or unsynced.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg

from fer_pipeline.defs.env import env_int
from fer_pipeline.paths import data_root_setting, is_store_url
from fer_pipeline.settings import DEFAULT_CV_FOLDS, current_settings
from fer_pipeline.sources.catalog import MAX_CATALOG_BYTES, Catalog, CatalogError, load_catalog

CV_FOLDS_ENV = "FER_CV_FOLDS"
SOURCE_OBSERVATION = "source_files"
REVIEWS_OBSERVATION = "label_studio_annotations"  # the review project's annotations (observable source asset)
CATALOG_FILE = "sources.yaml"

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


def cv_fold_count(environ: Mapping[str, str] | None = None, default: int | None = None) -> int:
    """The number of CV folds: ``cv_folds`` of the settings file (``default``: read it now), unless
    ``FER_CV_FOLDS`` overrides it for this process."""
    if default is None:
        default = current_settings(environ).cv_folds if environ is None else DEFAULT_CV_FOLDS
    return env_int(CV_FOLDS_ENV, default, 2, "folds", environ=environ, error=PartitionSettingError)


def partition_key_problem(key: str) -> str | None:
    """Why a source name cannot be a Dagster partition key (None: it can)."""
    bad = [s for s in ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0") if s in key]
    return f"its name contains {bad!r}, which a partition key may not" if bad else None


def _catalog(root: Path | None) -> Catalog:
    """The catalogue of ``root`` (default: the configured data root; an object-store root's
    catalogue is fetched alone, without pulling the sources)."""
    setting = str(root) if root is not None else data_root_setting()
    if not is_store_url(setting):
        return load_catalog(Path(setting) / CATALOG_FILE, Path(setting), check_paths=False)
    import fsspec

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / CATALOG_FILE
        with fsspec.open(f"{setting.rstrip('/')}/{CATALOG_FILE}", "rb") as remote:
            local.write_bytes(remote.read(MAX_CATALOG_BYTES + 1))  # one byte more: an oversized one is refused
        return load_catalog(local, Path(tmp), check_paths=False)


def held_out_source_keys(root: Path | None = None) -> tuple[list[str], str | None]:
    """(the ``loso_fold`` partitions: every four-class source of the catalogue whose name can be a
    partition key, a note on what was left out or why none could be read). Read when the code
    location loads; paths are not checked (a source may not exist yet)."""
    try:
        catalog = _catalog(root)
    except (CatalogError, OSError, ValueError) as exc:
        return [], f"no held-out source partitions: {exc}"
    keys, notes = [], []
    for spec in catalog.sources:
        if spec.role == "pretrain":
            continue
        problem = partition_key_problem(spec.name)
        if problem:
            notes.append(f"source {spec.name!r} cannot be held out: {problem}")
        else:
            keys.append(spec.name)
    return sorted(keys), "; ".join(notes) or None


def cv_fold_partitions(n_cv_folds: int) -> dg.StaticPartitionsDefinition:
    """Partitions ``0``..``n-1``, one per CV fold."""
    return dg.StaticPartitionsDefinition([str(k) for k in range(n_cv_folds)])


def held_out_partitions(keys: Sequence[str]) -> dg.StaticPartitionsDefinition:
    """One partition per held-out source."""
    return dg.StaticPartitionsDefinition(list(keys))

_TRAINING_WORK = dg.AssetSelection.assets(CV_FOLD, LOSO_FOLD)

data_pipeline_job = dg.define_asset_job(
    DATA_JOB, selection=dg.AssetSelection.assets(SOURCE_OBSERVATION, REVIEWS_OBSERVATION) | dg.AssetSelection.groups("data"),
    description="Observe the source files and the review project, then every data asset: sources → faces → de-duplicated → manifest → "
                "splits → plots.")

main_job = dg.define_asset_job(
    MAIN_JOB, selection=dg.AssetSelection.all() - _TRAINING_WORK.downstream(),
    description="Everything upstream of the training work: the data half, models, evaluation, bias, mitigation, "
                "source confound, held-out sources. Then cv_folds and loso_folds (one run per partition) and "
                "training_reports: declarative automation, a UI backfill or `make demo` run them in that order.")

cv_folds_job = dg.define_asset_job(
    CV_FOLDS_JOB, selection=dg.AssetSelection.assets(CV_FOLD),
    description="One cross-validation fold per run (partition = fold number).")

loso_folds_job = dg.define_asset_job(
    LOSO_FOLDS_JOB, selection=dg.AssetSelection.assets(LOSO_FOLD),
    description="One held-out source per run (partition = source name).")

training_reports_job = dg.define_asset_job(
    REPORTS_JOB, selection=_TRAINING_WORK.downstream() - _TRAINING_WORK,
    description="The aggregates of the fold and held-out-source partitions (cross_validation, "
                "cross_source_generalisation) and what reads them (label_issues, model_card).")

JOBS = [data_pipeline_job, main_job, cv_folds_job, loso_folds_job, training_reports_job]
