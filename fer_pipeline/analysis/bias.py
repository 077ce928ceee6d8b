"""Per-group test metrics for every demographic attribute: does the model work equally well
for everyone?

For each attribute present in the data (gender, age_group, race) and each group within it,
the table gives the number of test images, accuracy, macro precision/recall/F1 and the gap to
the overall score in percentage points. Images without the attribute form the group
``unknown``: reported, never judged. Groups smaller than ``min_group_size`` are marked "too
small to judge" (their scores are shown but too noisy to act on), not hidden.

Macro averages are taken over the classes present in the group (as in
:func:`fer_pipeline.ml.evaluate.metrics_by_group`), so a small group that happens to lack a
class is not penalised for it; the overall score uses the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.metrics import group_metrics  # noqa: F401  (re-exported: analysis uses it)
from fer_pipeline.schema import DEMOGRAPHIC_ATTRIBUTES

ATTRIBUTES: tuple[str, ...] = DEMOGRAPHIC_ATTRIBUTES
UNKNOWN = "unknown"

STATUS_OK = "ok"
STATUS_GAP = "below overall"
STATUS_SMALL = "too small to judge"
STATUS_UNKNOWN = "unknown: not judged"

TABLE_COLUMNS = ["attribute", "group", "n", "share", "accuracy", "macro_precision", "macro_recall", "macro_f1",
                 "accuracy_gap_pts", "macro_f1_gap_pts", "status"]


def group_labels(frame: pd.DataFrame, attribute: str) -> np.ndarray:
    """The attribute's value per row as strings, missing values as ``unknown``."""
    if attribute not in frame.columns:
        return np.full(len(frame), UNKNOWN, dtype=object)
    values = frame[attribute].astype("object")
    return values.where(values.notna() & (values.astype(str).str.strip() != ""), UNKNOWN).astype(str).to_numpy()


def present_attributes(frame: pd.DataFrame, attributes: Sequence[str] = ATTRIBUTES) -> list[str]:
    """Attributes that at least one row carries."""
    return [a for a in attributes if a in frame.columns and (group_labels(frame, a) != UNKNOWN).any()]


@dataclass
class BiasReport:
    overall: dict[str, float]
    tables: dict[str, pd.DataFrame]  # attribute -> one row per group
    coverage: pd.DataFrame  # attribute, n_with_attribute, n_total, coverage
    absent: list[str] = field(default_factory=list)
    min_group_size: int = 30
    max_gap_points: float = 5.0

    @property
    def long_table(self) -> pd.DataFrame:
        if not self.tables:
            return pd.DataFrame(columns=TABLE_COLUMNS)
        return pd.concat(self.tables.values(), ignore_index=True)

    @property
    def flagged(self) -> pd.DataFrame:
        """Judged groups whose macro-F1 is more than ``max_gap_points`` below the overall."""
        t = self.long_table
        return t[t["status"] == STATUS_GAP].reset_index(drop=True)


def bias_report(
    frame: pd.DataFrame,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    attributes: Sequence[str] = ATTRIBUTES,
    min_group_size: int = 30,
    max_gap_points: float = 5.0,
    classes: Sequence[str] = CLASSES,
) -> BiasReport:
    """Per-group metrics for every present attribute (``frame`` is aligned with the predictions)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(frame) != len(y_true) or len(y_true) != len(y_pred):
        raise ValueError(f"frame ({len(frame)}), y_true ({len(y_true)}) and y_pred ({len(y_pred)}) differ in length")
    overall = group_metrics(y_true, y_pred, classes)
    present = present_attributes(frame, attributes)
    tables: dict[str, pd.DataFrame] = {}
    coverage = []
    for attr in attributes:
        g = group_labels(frame, attr)
        known = int((g != UNKNOWN).sum())
        coverage.append({"attribute": attr, "n_with_attribute": known, "n_total": len(g),
                         "coverage": known / len(g) if len(g) else 0.0})
        if attr not in present:
            continue
        rows = []
        # known groups by size (largest first), then unknown last
        names = sorted(set(g) - {UNKNOWN}, key=lambda v: (-(g == v).sum(), v)) + ([UNKNOWN] if (g == UNKNOWN).any() else [])
        for name in names:
            mask = g == name
            gm = group_metrics(y_true[mask], y_pred[mask], classes)
            acc_gap = 100.0 * (gm["accuracy"] - overall["accuracy"])
            f1_gap = 100.0 * (gm["macro_f1"] - overall["macro_f1"])
            if name == UNKNOWN:
                status = STATUS_UNKNOWN
            elif gm["n"] < min_group_size:
                status = STATUS_SMALL
            elif f1_gap < -max_gap_points:
                status = STATUS_GAP
            else:
                status = STATUS_OK
            rows.append({"attribute": attr, "group": name, **gm, "share": gm["n"] / len(g),
                         "accuracy_gap_pts": acc_gap, "macro_f1_gap_pts": f1_gap, "status": status})
        tables[attr] = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    absent = [a for a in attributes if a not in present]
    return BiasReport(overall, tables, pd.DataFrame(coverage), absent, min_group_size, max_gap_points)
