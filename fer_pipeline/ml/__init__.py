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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so importing a torch-free module of this package
# (``ml.predict`` with onnxruntime, ``ml.framing``, ``ml.exported``) does not import torch.
_EXPORTS = {
    "fer_pipeline.ml.architectures": ("ARCHITECTURES", "MAIN_MODEL", "ArchConfig", "build_model",
                                      "count_parameters", "get_architecture"),
    "fer_pipeline.ml.data": ("AugmentConfig", "Normalization", "SplitArrays", "load_split_arrays"),
    "fer_pipeline.ml.metrics": ("ClassificationMetrics", "best_model_name", "compare_models", "confusion_matrix",
                                "evaluate_predictions", "majority_baseline", "normalize_confusion"),
    "fer_pipeline.ml.train": ("EpochStats", "TrainConfig", "TrainResult", "train_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fer_pipeline.ml' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
