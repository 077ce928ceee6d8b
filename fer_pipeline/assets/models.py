"""Model assets: one per registered architecture (main model + variants), then an evaluation
of all of them on the held-out test split. Lineage in the UI: splits → model_* → model_evaluation."""

import json
import time

import dagster as dg
import pandas as pd
from pydantic import Field

from fer_pipeline.assets.data import manifest, splits
from fer_pipeline.assets.metadata import md_image, md_table
from fer_pipeline.atomic import write_csv, write_json
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL, ArchConfig
from fer_pipeline.ml.metrics import best_model_name, compare_models, majority_baseline
from fer_pipeline.ml.plots import plot_confusion_matrix
from fer_pipeline.ml.train import TrainConfig
from fer_pipeline.ml.workflow import evaluate_checkpoint, load_pipeline_data, train_and_save, weights_are_finite
from fer_pipeline.resources import FerSettings

GROUP = "models"


class TrainSettings(dg.ConfigurableResource):
    """Training recipe knobs (the rest of :class:`TrainConfig` keeps its tuned defaults)."""

    epochs: int = Field(default=40, description="Maximum epochs per model")
    patience: int = Field(default=12, description="Early stopping: epochs without val macro-F1 gain")
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str = Field(default="auto", description="auto = CUDA when available, else CPU")
    num_threads: int = Field(default=0, description="torch CPU threads; 0 = torch default")
    macro_f1_floor: float = Field(default=0.5, description="Warn when a model's test macro-F1 is below")

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, patience=self.patience, batch_size=self.batch_size, lr=self.lr,
                           seed=self.seed, device=self.device, num_threads=self.num_threads or None)


def _load_arrays(fer: FerSettings):
    _, _, arrays, version = load_pipeline_data(fer.paths)
    return arrays, version


def model_asset(name: str, arch: ArchConfig) -> dg.AssetsDefinition:
    """The asset that trains ``arch`` (factory: adding an architecture adds an asset)."""
    key = f"model_{name}"
    role = "main model" if name == MAIN_MODEL else "variant"

    @dg.asset(
        name=key, group_name=GROUP, deps=[manifest, splits],
        description=f"CNN '{name}' ({role}): {arch.description or arch}",
        check_specs=[
            dg.AssetCheckSpec("weights_finite", asset=key, blocking=True,
                              description="No NaN/inf in the saved weights."),
            dg.AssetCheckSpec("beats_majority_baseline", asset=key,
                              description="Validation macro-F1 above the majority-class baseline's."),
        ],
    )
    def _model(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings) -> dg.MaterializeResult:
        arrays, version = _load_arrays(fer)
        context.log.info(f"training {name} on {len(arrays['train'])} images, validating on "
                         f"{len(arrays['validation'])} (data version {version})")
        trained = train_and_save(name, arch, training.config(), arrays, fer.paths.models_dir, version,
                                 log=context.log.info)
        finite, bad = weights_are_finite(trained.checkpoint)
        val, base = trained.validation, trained.baseline_validation
        r = trained.result
        history = r.history_frame()
        return dg.MaterializeResult(
            metadata={
                "checkpoint": dg.MetadataValue.path(str(trained.checkpoint)),
                "data_version": version,
                "best_epoch": r.best_epoch,
                "epochs_run": len(r.history),
                "stopped_early": r.stopped_early,
                "val_macro_f1": round(val.macro_f1, 4),
                "val_accuracy": round(val.accuracy, 4),
                "train_seconds": round(r.train_seconds, 1),
                "train_images_per_second": round(r.mean_images_per_second, 1),
                "curves": md_image(trained.curves_png, f"{name} curves"),
                "history": md_table(history.round(4), 60),
            },
            check_results=[
                dg.AssetCheckResult(check_name="weights_finite", passed=finite,
                                    metadata={"tensors_with_nan_or_inf": bad}),
                dg.AssetCheckResult(check_name="beats_majority_baseline",
                                    passed=val.macro_f1 > base.macro_f1,
                                    metadata={"val_macro_f1": val.macro_f1, "baseline_macro_f1": base.macro_f1,
                                              "val_accuracy": val.accuracy, "baseline_accuracy": base.accuracy}),
            ],
        )

    return _model


MODEL_ASSETS = [model_asset(name, arch) for name, arch in ARCHITECTURES.items()]


@dg.asset(
    group_name=GROUP, deps=[*MODEL_ASSETS, splits],
    description="Every model on the held-out test split: metrics, confusion matrices, comparison.",
    check_specs=[dg.AssetCheckSpec("test_macro_f1_floor", asset="model_evaluation",
                                   description="Each model's test macro-F1 at or above the configured floor "
                                               "(warning).")],
)
def model_evaluation(context: dg.AssetExecutionContext, fer: FerSettings,
                     training: TrainSettings) -> dg.MaterializeResult:
    start = time.perf_counter()
    paths = fer.paths
    arrays, version = _load_arrays(fer)
    test = arrays["test"]
    results, metadata = {}, {}
    for name in ARCHITECTURES:
        ev = evaluate_checkpoint(paths.models_dir / f"{name}.safetensors", test)
        if ev.loaded.metadata.get("data_version") != version:
            context.log.warning(f"{name} was trained on data version {ev.loaded.metadata.get('data_version')}, "
                                f"the splits are now {version}: re-materialize the model")
        results[name] = ev.metrics
        png = plot_confusion_matrix(ev.metrics.confusion, CLASSES, paths.reports_dir / f"confusion_{name}.png",
                                    title=f"{name} — test split (n={ev.metrics.n})")
        metadata[f"confusion_{name}"] = md_image(png, name)
        metadata[f"per_class_{name}"] = md_table(ev.metrics.per_class.round(4))
    baseline = majority_baseline(arrays["train"].labels, test.labels)
    table = compare_models({**results, "majority_baseline": baseline})
    models_only = table[table["model"] != "majority_baseline"].reset_index(drop=True)
    best = best_model_name(models_only)
    write_csv(paths.reports_dir / "metrics.csv", table)
    write_json(paths.reports_dir / "metrics.json", {
        "best_model": best, "data_version": version, "split": "test", "n_test": int(len(test)),
        "models": {n: m.to_dict() for n, m in results.items()}, "majority_baseline": baseline.to_dict(),
        "checkpoints": {n: str(paths.models_dir / f"{n}.safetensors") for n in results},
    })
    below = {n: round(m.macro_f1, 4) for n, m in results.items() if m.macro_f1 < training.macro_f1_floor}
    context.log.info(f"best model: {best}\n{table.to_string(index=False)}")
    return dg.MaterializeResult(
        metadata={"best_model": best, "comparison": md_table(table.round(4)), **metadata,
                  "metrics_json": dg.MetadataValue.path(str(paths.reports_dir / "metrics.json")),
                  "data_version": version, "n_test": len(test),
                  "seconds": round(time.perf_counter() - start, 1)},
        check_results=[dg.AssetCheckResult(
            check_name="test_macro_f1_floor", passed=not below, severity=dg.AssetCheckSeverity.WARN,
            metadata={"floor": training.macro_f1_floor, "models_below": json.dumps(below),
                      "test_macro_f1": {n: round(m.macro_f1, 4) for n, m in results.items()}})],
    )
