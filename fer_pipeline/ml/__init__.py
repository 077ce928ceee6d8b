"""The model half of the pipeline: plain Python + torch, no Dagster.

Typical use (what the Dagster assets do)::

    kept, splits, arrays, version = load_pipeline_data(paths)                     # ml.workflow
    trained = train_and_save("cnn4", ARCHITECTURES[MAIN_MODEL], TrainConfig(), arrays,
                             paths, version, PreprocessSettings())                # checkpoint + curves
    comparison = compare_checkpoints(paths, ARCHITECTURES, arrays["train"], arrays["test"],
                                     version, validation=arrays["validation"])   # best on validation
    write_comparison(paths, comparison)                                           # metrics.json/.csv
    predict_images(["photo.jpg"], paths.checkpoint(comparison.best))              # ml.predict
"""

from fer_pipeline.ml.architectures import (
    ARCHITECTURES,
    MAIN_MODEL,
    ArchConfig,
    build_model,
    count_parameters,
    get_architecture,
)
from fer_pipeline.ml.data import (
    AugmentConfig,
    Normalization,
    SplitArrays,
    load_split_arrays,
)
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
