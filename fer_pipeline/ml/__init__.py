"""The model half of the pipeline: plain Python + torch, no Dagster.

Typical use (what the Dagster assets do)::

    splits = load_split_arrays(root, manifest_df, splits_df)
    result = train_model(splits["train"].images, splits["train"].labels,
                         splits["validation"].images, splits["validation"].labels,
                         ARCHITECTURES[MAIN_MODEL], TrainConfig(), log=context.log.info)
    save_checkpoint(models_dir / "cnn4.safetensors", result, data_version=version)
    loaded = load_checkpoint(models_dir / "cnn4.safetensors")          # ml.checkpoint
    ev = evaluate_model(loaded, splits["test"].images, splits["test"].labels)  # ml.evaluate

(``version`` from :func:`fer_pipeline.ml.workflow.data_version`.)
"""

from fer_pipeline.ml.architectures import (
    ARCHITECTURES,
    MAIN_MODEL,
    ArchConfig,
    build_model,
    count_parameters,
    get_architecture,
)
from fer_pipeline.ml.data import AugmentConfig, Normalization, SplitArrays, load_split_arrays
from fer_pipeline.ml.metrics import (
    ClassificationMetrics,
    best_model_name,
    compare_models,
    confusion_matrix,
    evaluate_predictions,
    majority_baseline,
    normalize_confusion,
)
from fer_pipeline.ml.train import EpochStats, TrainConfig, TrainResult, train_model

__all__ = [
    "ARCHITECTURES",
    "MAIN_MODEL",
    "ArchConfig",
    "AugmentConfig",
    "ClassificationMetrics",
    "EpochStats",
    "Normalization",
    "SplitArrays",
    "TrainConfig",
    "TrainResult",
    "best_model_name",
    "build_model",
    "compare_models",
    "confusion_matrix",
    "count_parameters",
    "evaluate_predictions",
    "get_architecture",
    "load_split_arrays",
    "majority_baseline",
    "normalize_confusion",
    "train_model",
]
