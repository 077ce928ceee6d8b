"""Evaluate a trained model on a labelled split: predictions, probabilities and metrics together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer_pipeline.ml.checkpoint import LoadedModel
from fer_pipeline.ml.metrics import ClassificationMetrics, evaluate_predictions


@dataclass
class Evaluation:
    metrics: ClassificationMetrics
    y_true: np.ndarray
    y_pred: np.ndarray
    probabilities: np.ndarray  # (N, C)

    def predictions_frame(self, image_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per sample: true/predicted class names, correctness, class probabilities."""
        classes = self.metrics.classes
        df = pd.DataFrame(
            {
                "true": [classes[i] for i in self.y_true],
                "predicted": [classes[i] for i in self.y_pred],
                "correct": self.y_true == self.y_pred,
            }
        )
        for j, c in enumerate(classes):
            df[f"p_{c}"] = self.probabilities[:, j]
        if image_ids is not None:
            df.insert(0, "image_id", list(image_ids))
        return df


def evaluate_model(model: LoadedModel, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Run ``model`` (with its recorded test-time flip setting) on uint8 faces and score it."""
    probs = model.predict_proba(images)
    y_true = np.asarray(labels, dtype=np.int64)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    return Evaluation(evaluate_predictions(y_true, y_pred, probs, classes=model.classes), y_true, y_pred, probs)


def metrics_by_group(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: Sequence[object] | pd.Series,
    classes: Sequence[str],
) -> pd.DataFrame:
    """Accuracy and macro-F1 per group (e.g. gender, age group); missing values form "unknown".

    A group's macro-F1 averages only the classes present in that group, so a small group
    lacking one class is not penalised for it.
    """
    g = pd.Series(list(groups), dtype="object").fillna("unknown").astype(str).to_numpy()
    rows = []
    for name in sorted(set(g)):
        mask = g == name
        m = evaluate_predictions(np.asarray(y_true)[mask], np.asarray(y_pred)[mask], classes=classes)
        present = m.per_class[m.per_class["support"] > 0]
        f1 = float(present["f1"].mean()) if len(present) else 0.0
        rows.append({"group": name, "n": m.n, "accuracy": m.accuracy, "macro_f1": f1})
    return pd.DataFrame(rows, columns=["group", "n", "accuracy", "macro_f1"])
