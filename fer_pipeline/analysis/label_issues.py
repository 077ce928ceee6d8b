"""Which images are probably mislabelled? Confident learning on out-of-fold probabilities.

Confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 2021), as implemented by the cleanlab library:

1. Out-of-fold predicted probabilities ``p`` (from the cross-validation: every image scored by
   a model that never trained on it).
2. Per-class threshold ``t_j`` = mean of ``p[:, j]`` over the images *labelled* ``j`` (the
   model's average self-confidence for that class).
3. Confident joint ``C[i][j]``: images labelled ``i`` whose ``p[:, j] >= t_j`` (if several
   classes pass, the most probable of them), i.e. images confidently belonging to ``j``.
4. Calibrate ``C`` so each row sums to the number of images labelled ``i``; its off-diagonal
   entries estimate how many images labelled ``i`` truly belong to ``j``.
5. Prune by noise rate: for each ``i != j`` flag the ``C[i][j]`` images labelled ``i`` with the
   largest margin ``p[:, j] - p[:, i]``; never flag an image the model predicts as its given label.
6. Rank by a label-quality score, lowest first: self-confidence ``p[label]`` or the normalised
   margin ``(p[label] - max_{j != label} p[j] + 1) / 2``.

:func:`find_label_issues` uses cleanlab when it is installed (the project depends on it) and
falls back to :func:`confident_learning_issues`, this module's own implementation of steps
2-5. Nothing is ever relabelled automatically: a user reviews the ranking and writes
corrections into ``<data root>/relabels.csv``, which the ``manifest`` asset applies (and records).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer_pipeline.classes import CLASS_TO_INDEX, CLASSES
from fer_pipeline.paths import RELABELS_FILE

METHODS = ("self_confidence", "normalized_margin")


def self_confidence(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    return np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]


def normalized_margin(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``(p[label] - max other p + 1) / 2`` in [0, 1]; low = the model prefers another class."""
    labels = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    own = p[np.arange(len(labels)), labels]
    other = p.copy()
    other[np.arange(len(labels)), labels] = -np.inf
    return (own - other.max(axis=1) + 1.0) / 2.0


def quality_scores(labels: np.ndarray, probs: np.ndarray, method: str = "self_confidence") -> np.ndarray:
    if method == "self_confidence":
        return self_confidence(labels, probs)
    if method == "normalized_margin":
        return normalized_margin(labels, probs)
    raise ValueError(f"unknown ranking method {method!r}; use one of {METHODS}")


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated confident joint (K, K) as float counts, per-class thresholds (K,))."""
    labels = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    thresholds = np.array([p[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    passes = p >= thresholds - 1e-6
    any_pass = passes.any(axis=1)
    guess = np.where(passes, p, -np.inf).argmax(axis=1)  # most probable among the confident classes
    cj = np.zeros((k, k))
    np.add.at(cj, (labels[any_pass], guess[any_pass]), 1.0)
    row = cj.sum(axis=1, keepdims=True)
    calibrated = np.divide(cj * counts[:, None], row, out=np.zeros_like(cj), where=row > 0)
    return calibrated, thresholds


def confident_learning_issues(labels: np.ndarray, probs: np.ndarray, min_examples_per_class: int = 1) -> np.ndarray:
    """Boolean mask of likely label errors (prune by noise rate); see the module docstring."""
    labels = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n, k = p.shape
    cj, _ = confident_joint(labels, p)
    issues = np.zeros(n, dtype=bool)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        if not len(members):
            continue
        budget = max(0, len(members) - min_examples_per_class)  # keep at least a few per class
        for j in range(k):
            if j == i:
                continue
            n_remove = min(int(round(cj[i, j])), budget)
            if n_remove <= 0:
                continue
            margin = p[members, j] - p[members, i]
            top = members[np.argsort(-margin, kind="stable")[:n_remove]]
            issues[top] = True
    issues &= p.argmax(axis=1) != labels
    return issues


def find_label_issues(labels: np.ndarray, probs: np.ndarray, *, use_cleanlab: bool = True) -> tuple[np.ndarray, str]:
    """(mask of likely label errors, which implementation ran: ``cleanlab x.y`` or ``builtin``)."""
    labels = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if not len(labels):
        return np.zeros(0, dtype=bool), "builtin"
    if use_cleanlab and len(set(labels.tolist())) == p.shape[1]:  # cleanlab wants every class present
        try:
            import cleanlab
            from cleanlab.filter import find_label_issues as cl_find

            mask = cl_find(labels, p / p.sum(axis=1, keepdims=True), filter_by="prune_by_noise_rate", n_jobs=1)
            return np.asarray(mask, dtype=bool), f"cleanlab {cleanlab.__version__}"
        except ImportError:
            pass
    return confident_learning_issues(labels, p), "builtin"


RANKING_COLUMNS = ["rank", "image_id", "source", "source_path", "given_label", "predicted_label",
                   "self_confidence", "predicted_probability", "score", "is_label_issue", "cv_fold"]


def rank_label_issues(oof: pd.DataFrame, manifest: pd.DataFrame, *, method: str = "self_confidence",
                      classes: Sequence[str] = CLASSES, use_cleanlab: bool = True) -> tuple[pd.DataFrame, str]:
    """Ranked table over every image with an out-of-fold prediction, most suspect first.

    ``oof`` has ``image_id``, ``label``, ``fold`` and ``p_<class>`` columns (the cross-validation
    output). Rows flagged by confident learning come first, each group ordered by ``score``
    (the label-quality score of ``method``; lower = more likely mislabelled).
    """
    prob_cols = [f"p_{c}" for c in classes]
    oof = oof.reset_index(drop=True)
    labels = oof["label"].map(CLASS_TO_INDEX).to_numpy(dtype=np.int64)
    p = oof[prob_cols].to_numpy(dtype=np.float64)
    issues, impl = find_label_issues(labels, p, use_cleanlab=use_cleanlab)
    info = manifest.set_index("image_id")
    df = pd.DataFrame({
        "image_id": oof["image_id"].astype(str),
        "source": oof["image_id"].map(info["source"]) if "source" in info else None,
        "source_path": oof["image_id"].map(info["source_path"]) if "source_path" in info else None,
        "given_label": oof["label"].astype(str),
        "predicted_label": [classes[i] for i in p.argmax(axis=1)] if len(p) else [],
        "self_confidence": self_confidence(labels, p) if len(p) else [],
        "predicted_probability": p.max(axis=1) if len(p) else [],
        "score": quality_scores(labels, p, method) if len(p) else [],
        "is_label_issue": issues,
        "cv_fold": oof["fold"].astype("int64") if "fold" in oof else -1,
    })
    df = df.sort_values(["is_label_issue", "score", "image_id"], ascending=[False, True, True], kind="mergesort")
    df = df.reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df[RANKING_COLUMNS], impl


# --------------------------------------------------------------------------------------------
# The report users act on: ranking, relabel suggestions, how far to trust it
# --------------------------------------------------------------------------------------------

WEAK_CV_MACRO_F1 = 0.5
"""Below this cross-validation macro-F1 the out-of-fold probabilities say more about the model
than about the labels."""

RELABEL_HOWTO = (
    "Nothing is relabelled automatically. To correct labels: review the suspects (thumbnails above; "
    "`reports/label_issues.csv` has every ranked image with its source path), then write the corrections to "
    f"`<data root>/{RELABELS_FILE}` with the header `image_id,label,note` (label one of {', '.join(CLASSES)}; "
    "note optional), e.g. start from `reports/relabels_suggested.csv` (the flagged images with the model's label "
    "filled in) and keep only the rows you agree with. Re-materialize `manifest` (and downstream): it applies the "
    "file, records the old label in the column `relabelled_from` and lists the applied rows in its metadata. An "
    "unknown image id or label stops the manifest with an error naming the line.")


def relabel_suggestions(ranked: pd.DataFrame) -> pd.DataFrame:
    """The flagged images in ``relabels.csv`` form, with the model's label filled in."""
    flagged = ranked[ranked["is_label_issue"]]
    return pd.DataFrame({"image_id": flagged["image_id"], "label": flagged["predicted_label"],
                         "note": "label_issues: given " + flagged["given_label"] + ", model says "
                                 + flagged["predicted_label"]})


def reliability_caution(cv_macro_f1: float | None) -> str:
    """A caution (markdown) when the cross-validation models are too weak to judge labels; ''
    when they are not (or unknown)."""
    if cv_macro_f1 is None or cv_macro_f1 >= WEAK_CV_MACRO_F1:
        return ""
    return (f"**Caution:** the cross-validation models are weak (mean macro-F1 {cv_macro_f1:.3f}), so most "
            "'suspects' are model errors rather than label errors. Give the cross-validation more epochs "
            "(analysis.cv_epochs) before acting on this ranking.")


@dataclass
class LabelIssueReport:
    ranked: pd.DataFrame  # RANKING_COLUMNS, most suspect first
    suggestions: pd.DataFrame  # relabels.csv rows for the flagged images
    implementation: str
    cv_macro_f1: float | None
    caution: str  # '' when the ranking can be trusted as far as CV strength goes
    coverage_note: str

    @property
    def flagged(self) -> pd.DataFrame:
        return self.ranked[self.ranked["is_label_issue"]]

    @property
    def reliability(self) -> str:
        return self.caution or (f"cross-validation mean macro-F1 {self.cv_macro_f1:.3f}"
                                if self.cv_macro_f1 is not None else "no cross-validation table found")


def label_issue_report(oof: pd.DataFrame, manifest: pd.DataFrame, *, cv_macro_f1: float | None,
                       n_pool: int | None, folds_run: object = None,
                       method: str = "self_confidence") -> LabelIssueReport:
    """Rank the images of the current manifest that have an out-of-fold prediction (the label
    the CV trained with is the one judged; a relabel since then shows in the manifest)."""
    oof = oof[oof["image_id"].isin(manifest["image_id"])]
    ranked, impl = rank_label_issues(oof, manifest, method=method)
    coverage = ("every train+validation image has an out-of-fold prediction" if n_pool == len(ranked)
                else f"only the {len(ranked)} images of the CV folds run ({folds_run}) are ranked: run every fold "
                     "for full coverage")
    return LabelIssueReport(ranked, relabel_suggestions(ranked), impl, cv_macro_f1,
                            reliability_caution(cv_macro_f1), coverage)
