"""Source confounds: is a class secretly learnable from *where* its images come from?

Hand-assembled datasets often take each class from a different collection (one class from a
grayscale set, another from colour webcam frames). A model then learns the source -- colour vs
grayscale, resolution, background, compression -- instead of the expression, scores well on a
test split drawn from the same sources and fails on anything else.

:func:`confound_findings` flags a class when more than ``max_share`` of its images come from one
source *while other classes do not* come mostly from that source (with a single source, or a
source that dominates every class, the class/source association carries no signal).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fer_pipeline.analysis.bias import group_metrics
from fer_pipeline.classes import CLASSES


def source_share_matrix(frame: pd.DataFrame, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Rows: classes present (CLASSES order); columns: sources; values: share of the class's images."""
    counts = pd.crosstab(frame["label"].astype(str), frame["source"].astype(str))
    order = [c for c in classes if c in counts.index] + [c for c in counts.index if c not in classes]
    counts = counts.reindex(order)
    return counts.div(counts.sum(axis=1), axis=0)


def source_share_table(frame: pd.DataFrame, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Long table: label, source, n, share of the class, plus each class's dominant source."""
    counts = pd.crosstab(frame["label"].astype(str), frame["source"].astype(str))
    shares = source_share_matrix(frame, classes)
    rows = []
    for label in shares.index:
        for source in shares.columns:
            rows.append({"label": label, "source": source, "n": int(counts.loc[label, source]),
                         "share_of_class": float(shares.loc[label, source])})
    return pd.DataFrame(rows, columns=["label", "source", "n", "share_of_class"])


def confound_findings(frame: pd.DataFrame, max_share: float = 0.9, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Classes that come more than ``max_share`` from one source while some other class does not.

    Columns: label, source, share (of the class from that source), class_share_of_source (how
    much of that source is this class: near 1 = the source alone identifies the class),
    other_classes_share (that source's share of each other class, as text), n_class. Most
    telling first. When three classes come from one source and the fourth from another, all
    four are listed: the source separates them either way.
    """
    shares = source_share_matrix(frame, classes)
    counts = pd.crosstab(frame["label"].astype(str), frame["source"].astype(str))
    n_class = frame["label"].astype(str).value_counts()
    rows = []
    for label in shares.index:
        source = str(shares.loc[label].idxmax())
        share = float(shares.loc[label, source])
        if share <= max_share:
            continue
        others = shares.drop(index=label)[source]
        if len(others) and (others <= max_share).any():
            rows.append({"label": label, "source": source, "share": share,
                         "class_share_of_source": float(counts.loc[label, source] / counts[source].sum()),
                         "other_classes_share": ", ".join(f"{k} {v:.0%}" for k, v in others.items()),
                         "n_class": int(n_class.get(label, 0))})
    # most telling first: the source's images are (almost) all of this class
    columns = ["label", "source", "share", "class_share_of_source", "other_classes_share", "n_class"]
    return pd.DataFrame(rows, columns=columns).sort_values("class_share_of_source", ascending=False,
                                                          kind="mergesort").reset_index(drop=True)


def per_source_metrics(frame: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray,
                       classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Test metrics of one model per source (macro over the classes present in that source)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    sources = frame["source"].astype(str).to_numpy()
    rows = []
    for source in sorted(set(sources)):
        mask = sources == source
        gm = group_metrics(y_true[mask], y_pred[mask], classes)
        present = sorted(set(y_true[mask].tolist()))
        rows.append({"source": source, **gm, "classes": ", ".join(classes[i] for i in present)})
    rows.append({"source": "(all)", **group_metrics(y_true, y_pred, classes),
                 "classes": ", ".join(classes[i] for i in sorted(set(y_true.tolist())))})
    return pd.DataFrame(rows, columns=["source", "n", "accuracy", "macro_precision", "macro_recall", "macro_f1",
                                       "classes"])
