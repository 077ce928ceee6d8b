"""Model assets: one per registered architecture (main model + variants), then an evaluation
of all of them on the held-out test split. Lineage in the UI: splits → model_* → model_evaluation."""

import json
import time

import dagster as dg

from fer_pipeline.analysis.recipes import model_start
from fer_pipeline.defs.assets.data import manifest, splits
from fer_pipeline.defs.assets.pretrain import pretrained_backbone
from fer_pipeline.defs.executors import GPU_OP_TAGS
from fer_pipeline.defs.metadata import file_version, md_image, md_table
from fer_pipeline.defs.resources import FerSettings, TrainSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL, ArchConfig
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.ml.evaluate import compare_checkpoints, write_comparison
from fer_pipeline.ml.workflow import (
    load_pipeline_data,
    train_and_save,
)

GROUP = "models"


def _load_arrays(fer: FerSettings):
    _, _, arrays, version = load_pipeline_data(fer.paths)
    return arrays, version


SCRATCH_TWIN = f"{MAIN_MODEL}_scratch"
"""The main architecture trained from random weights whatever ``init`` says: the comparison row
that shows what pretraining bought."""

MODELS: dict[str, ArchConfig] = {**ARCHITECTURES, SCRATCH_TWIN: ARCHITECTURES[MAIN_MODEL]}
"""Every model asset: the registered architectures plus the main model's scratch twin."""


def model_asset(name: str, arch: ArchConfig, init: str | None = None) -> dg.AssetsDefinition:
    """The asset that trains ``arch`` (factory: adding an architecture adds an asset); ``init``
    fixes the start (else the ``training`` resource's ``init``)."""
    key = f"model_{name}"
    role = ("main model" if name == MAIN_MODEL else
            "the main model trained from scratch (compare with the pretrained one)" if name == SCRATCH_TWIN
            else "variant")

    @fer_asset(
        name=key, group_name=GROUP, deps=[manifest, splits, pretrained_backbone],
        description=f"CNN '{name}' ({role}): {arch.description or arch}",
        # On Kubernetes the step's pod asks for one GPU; ignored by the other executors. The model
        # assets are independent: a distributed executor trains them in parallel.
        op_tags=GPU_OP_TAGS,
        check_specs=[
            dg.AssetCheckSpec("weights_finite", asset=key, blocking=True,
                              description="No NaN/inf in the saved weights."),
            dg.AssetCheckSpec("beats_majority_baseline", asset=key,
                              description="Validation macro-F1 above the majority-class baseline's."),
        ],
    )
    def _model(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings) -> dg.MaterializeResult:
        arrays, version = _load_arrays(fer)
        start = model_start(fer.paths, init or training.init, arch)
        context.log.info(f"training {name} on {len(arrays['train'])} images, validating on "
                         f"{len(arrays['validation'])} (data version {version}); start: {start.init} ({start.reason})")
        trained = train_and_save(name, arch, training.config(), arrays, fer.paths, version, fer.preprocess,
                                 log=context.log.info, start=start)
        if not trained.published:
            context.log.error(f"{name} has NaN/inf weights ({', '.join(trained.bad_tensors)}): not published; the "
                              f"previous checkpoint stays, the rejected one is at {trained.checkpoint}")
        val, base = trained.validation, trained.baseline_validation
        r = trained.result
        history = r.history_frame()
        fit = read_checkpoint_metadata(trained.checkpoint).get("calibration") or {}
        published = fer.paths.checkpoint(name)
        return dg.MaterializeResult(
            # the published weights' bytes: a retrain that gives the same weights changes nothing downstream
            data_version=file_version(published) if published.is_file() else None,
            metadata={
                "checkpoint": dg.MetadataValue.path(str(trained.checkpoint)),
                "data_version": version,
                "init": start.init, "init_reason": start.reason, "backbone": start.backbone or "",
                "best_epoch": r.best_epoch,
                "epochs_run": len(r.history),
                "stopped_early": r.stopped_early,
                "val_macro_f1": round(val.macro_f1, 4),
                "val_accuracy": round(val.accuracy, 4),
                "train_seconds": round(r.train_seconds, 1),
                "train_images_per_second": round(r.mean_images_per_second, 1),
                "temperature": fit.get("temperature"),
                "calibration_on_validation": dg.MetadataValue.json(
                    {k: fit.get(k) for k in ("n", "nll_before", "nll_after", "ece_before", "ece_after", "n_bins")}),
                "curves": md_image(trained.curves_png, f"{name} curves"),
                "history": md_table(history.round(4), 60),
            },
            check_results=[
                dg.AssetCheckResult(check_name="weights_finite", passed=trained.published,
                                    metadata={"tensors_with_nan_or_inf": trained.bad_tensors}),
                dg.AssetCheckResult(check_name="beats_majority_baseline",
                                    passed=val.macro_f1 > base.macro_f1,
                                    metadata={"val_macro_f1": val.macro_f1, "baseline_macro_f1": base.macro_f1,
                                              "val_accuracy": val.accuracy, "baseline_accuracy": base.accuracy}),
            ],
        )

    return _model


MODEL_ASSETS = [model_asset(name, arch, "scratch" if name == SCRATCH_TWIN else None) for name, arch in MODELS.items()]


@fer_asset(
    group_name=GROUP, deps=[*MODEL_ASSETS, splits],
    description="Every model on the validation and the held-out test split: the best chosen by validation "
                "macro-F1 (the test split only reports), metrics, confusion matrices, comparison; calibration "
                "(ECE before/after each checkpoint's temperature, reliability diagrams); the test predictions.",
    check_specs=[dg.AssetCheckSpec("test_macro_f1_floor", asset="model_evaluation",
                                   description="Each model's test macro-F1 at or above the configured floor "
                                               "(warning).")],
)
def model_evaluation(context: dg.AssetExecutionContext, fer: FerSettings,
                     training: TrainSettings) -> dg.MaterializeResult:
    start = time.perf_counter()
    paths = fer.paths
    arrays, version = _load_arrays(fer)
    comparison = compare_checkpoints(paths, MODELS, arrays["train"], arrays["test"], version,
                                     validation=arrays["validation"])
    for warning in comparison.warnings:
        context.log.warning(warning)
    files = write_comparison(paths, comparison)
    metadata: dict[str, object] = {}
    for name, ev in comparison.evaluations.items():
        metadata[f"confusion_{name}"] = md_image(files[f"confusion_{name}"], name)
        metadata[f"reliability_{name}"] = md_image(files[f"reliability_{name}"], f"{name} reliability")
        metadata[f"per_class_{name}"] = md_table(ev.metrics.per_class.round(4))
    below = comparison.below(training.macro_f1_floor)
    context.log.info(f"best model (by {comparison.report.selected_by}): {comparison.best}\n"
                     f"{comparison.table.to_string(index=False)}")
    return dg.MaterializeResult(
        metadata={"best_model": comparison.best, "selected_by": comparison.report.selected_by,
                  "val_macro_f1": round(comparison.validation[comparison.best].metrics.macro_f1, 4),
                  "test_macro_f1": round(comparison.evaluations[comparison.best].metrics.macro_f1, 4),
                  "comparison": md_table(comparison.table.round(4)), **metadata,
                  "ece_test": dg.MetadataValue.json({n: {k: c[k] for k in ("temperature", "ece_before", "ece_after")}
                                                     for n, c in comparison.report.calibration.items()}),
                  "metrics_json": dg.MetadataValue.path(str(paths.metrics_json)),
                  "test_predictions": dg.MetadataValue.path(str(files["test_predictions"])),
                  "data_version": version, "n_test": comparison.report.n_test,
                  "seconds": round(time.perf_counter() - start, 1)},
        check_results=[dg.AssetCheckResult(
            check_name="test_macro_f1_floor", passed=not below, severity=dg.AssetCheckSeverity.WARN,
            metadata={"floor": training.macro_f1_floor, "models_below": json.dumps(below),
                      "test_macro_f1": {n: round(e.metrics.macro_f1, 4)
                                        for n, e in comparison.evaluations.items()}})],
    )
