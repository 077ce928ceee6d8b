"""The review queue: which images a person should look at first, and why.

The input contract of the review loop is :data:`fer_pipeline.schema.REVIEW_QUEUE_COLUMNS`
(``reviews/review_queue.parquet``). Today's ranking uses what the pipeline already computes:

1. cleanlab's label suspects (``reports/label_issues``: confident learning on the out-of-fold
   probabilities), most suspect first;
2. then every other image the label-quality ranking scored, lowest label quality first;
3. then the kept images nothing scored yet (no cross-validation run, or the test split), in
   manifest order, so the loop works before any model exists.

Faces with an image-quality flag (``data_quality_flags``: blurred, dark, washed out, low
information, ...) or found an outlier in the embedding space (``face_embeddings``: far from their
nearest neighbours, :mod:`fer_pipeline.review.embeddings`) come right after the label suspects,
worst first, their reasons added to the row's reasons. An unlabelled image with a flag joins
that tier too (a blurred or non-face image is worth a look before it is given a class).

Unlabelled images (``role: unlabelled`` sources: the published ``unlabelled`` table) come next,
before the scored tier: a class is what they lack, and the one a reviewer gives them adds a face
to the four classes. The shipped model's least certain first (smallest margin between its two
most probable classes: where a person's answer teaches the most); without a model they are
listed unscored, in table order (:func:`rank_unlabelled`).

Images a person already reviewed (the manifest's ``review_source``) are left out. ``score`` is in
[0, 1], higher = more worth a look: ``1 - label quality`` for scored images, ``1 - top-2 margin``
for unlabelled ones, ``1 - cleanlab's outlier score`` for outliers, 0 for unscored ones; a flagged
face keeps the larger of its own score and its worst flag's. Other rankings (embedding
duplicates) add rows and reasons to the same contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fer_pipeline.classes import CLASSES
from fer_pipeline.schema import REVIEW_QUEUE_COLUMNS

PROB_COLUMNS = [f"p_{c}" for c in CLASSES]
CALIBRATED = "calibrated"
OUT_OF_FOLD = "out-of-fold"
UNSCORED_REASON = "not scored yet: no label-quality ranking covers it (run cross_validation and label_issues)"
UNLABELLED_UNSCORED_REASON = "unlabelled: not scored (no shipped model yet: materialize shipped_model)"
SUSPECT, FLAGGED, UNLABELLED, SCORED, UNSCORED = 0, 1, 2, 3, 4  # queue tiers, in order


def _with_flags(order: pd.DataFrame, flags: pd.DataFrame | None) -> pd.DataFrame:
    """``order`` (image_id, reasons, score, tier) with the quality flags merged in: a flagged face
    that is not a label suspect moves up to the FLAGGED tier, its flags' reasons added and its
    score the larger of its own and its worst flag's; then sorted by tier, then score (stable)."""
    if flags is not None and len(flags):
        per = (flags[flags["image_id"].isin(order["image_id"])].sort_values("score", ascending=False, kind="mergesort")
               .groupby("image_id", sort=False).agg(flag_reasons=("reason", "; ".join), flag_score=("score", "max")))
        order = order.merge(per, left_on="image_id", right_index=True, how="left")
        has = order["flag_reasons"].notna()
        unscored = order["tier"] == UNSCORED
        order.loc[has & unscored, "reasons"] = order.loc[has & unscored, "flag_reasons"]
        order.loc[has & ~unscored, "reasons"] = (order.loc[has & ~unscored, "reasons"] + "; "
                                                 + order.loc[has & ~unscored, "flag_reasons"])
        order.loc[has, "score"] = np.maximum(order.loc[has, "score"], order.loc[has, "flag_score"])
        order.loc[has & (order["tier"] != SUSPECT), "tier"] = FLAGGED
        order = order.drop(columns=["flag_reasons", "flag_score"])
    order["tier"] = order["tier"].astype("int64")
    score_rank = np.where(order["tier"] == UNSCORED, 0.0, -order["score"].astype("float64"))  # unscored: manifest order
    return order.assign(_key=score_rank).sort_values(["tier", "_key"], kind="mergesort").drop(columns="_key")


def outlier_flags(outliers: pd.DataFrame | None) -> pd.DataFrame | None:
    """The outliers (``image_id``, ``score``: cleanlab's outlier score, lower = more atypical,
    ``reason``) as queue flags (``image_id``, ``score`` higher = worse, ``reason``)."""
    if outliers is None or not len(outliers):
        return None
    return outliers[["image_id", "reason"]].assign(
        score=(1.0 - outliers["score"].astype("float64")).clip(0.0, 1.0))[["image_id", "score", "reason"]]


def probability_table(test_predictions: pd.DataFrame | None, best_model: str | None,
                      oof: pd.DataFrame | None) -> pd.DataFrame:
    """``image_id``, ``p_<class>`` and ``probabilities`` (where they come from) for every image the
    models scored: the best model's calibrated test probabilities first, then the cross-validation's
    out-of-fold ones (each image scored by a fold model that never trained on it; not calibrated)."""
    parts = []
    if test_predictions is not None and len(test_predictions) and best_model is not None:
        best = test_predictions[test_predictions["model"] == best_model]
        parts.append(best[["image_id", *PROB_COLUMNS]].assign(probabilities=f"{CALIBRATED} ({best_model})"))
    if oof is not None and len(oof):
        parts.append(oof[["image_id", *PROB_COLUMNS]].assign(probabilities=f"{OUT_OF_FOLD} (not calibrated)"))
    if not parts:
        return pd.DataFrame(columns=["image_id", *PROB_COLUMNS, "probabilities"])
    table = pd.concat(parts, ignore_index=True).drop_duplicates("image_id", keep="first")
    return table.reset_index(drop=True)


def top2_margin(probabilities: np.ndarray) -> np.ndarray:
    """Per row, the most probable class's probability minus the runner-up's: 0 = torn between two."""
    top = np.sort(np.asarray(probabilities, dtype=np.float64), axis=1)
    return top[:, -1] - top[:, -2]


def rank_unlabelled(unlabelled: pd.DataFrame, probabilities: pd.DataFrame | None = None,
                    unscored_reason: str = UNLABELLED_UNSCORED_REASON) -> pd.DataFrame:
    """``image_id``, ``reasons``, ``score``, ``tier`` (UNLABELLED) for the unlabelled images: those
    the model scored (``probabilities``: ``image_id`` and ``p_<class>``) least certain first
    (smallest top-2 margin; ``score`` = 1 - margin), then the others unscored (score 0), in table
    order, with ``unscored_reason``."""
    ids = unlabelled[["image_id"]].reset_index(drop=True)
    probs = probabilities if probabilities is not None else pd.DataFrame(columns=["image_id", *PROB_COLUMNS])
    scored = ids.merge(probs[["image_id", *PROB_COLUMNS]].dropna(), on="image_id", how="inner")
    margin = top2_margin(scored[PROB_COLUMNS].to_numpy()) if len(scored) else np.zeros(0)
    scored = scored[["image_id"]].assign(
        reasons=[f"unlabelled: least certain (top-2 margin {m:.2f})" for m in margin],
        score=(1.0 - margin).clip(0.0, 1.0), _margin=margin)
    scored = scored.sort_values(["_margin", "image_id"], kind="mergesort").drop(columns="_margin")
    rest = ids[~ids["image_id"].isin(scored["image_id"])].assign(reasons=unscored_reason, score=0.0)
    out = pd.concat([scored, rest], ignore_index=True)
    out["score"] = out["score"].astype("float64")
    return out.assign(tier=UNLABELLED)


def _reason(row: pd.Series) -> str:
    if row["is_label_issue"]:
        return (f"cleanlab label suspect: labelled {row['given_label']}, the model says {row['predicted_label']} "
                f"(self-confidence {row['self_confidence']:.2f})")
    return f"low label quality: labelled {row['given_label']} (self-confidence {row['self_confidence']:.2f})"


def _unreviewed(table: pd.DataFrame) -> pd.DataFrame:
    if "review_source" in table.columns:
        table = table[table["review_source"].isna()]
    return table.reset_index(drop=True)


def build_review_queue(manifest: pd.DataFrame, label_issues: pd.DataFrame | None = None,
                       probabilities: pd.DataFrame | None = None,
                       classes: Sequence[str] = CLASSES, flags: pd.DataFrame | None = None,
                       unlabelled: pd.DataFrame | None = None, unlabelled_probabilities: pd.DataFrame | None = None,
                       unlabelled_unscored_reason: str = UNLABELLED_UNSCORED_REASON,
                       outliers: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ranked queue (:data:`REVIEW_QUEUE_COLUMNS`) over the kept images of ``manifest`` (the
    published manifest: ``image_id``, ``sha256``, ``face_index``, ``source``, ``source_path``,
    ``face_path``, ``label``, optionally ``review_source``). ``label_issues``: the label-issue
    ranking (``RANKING_COLUMNS`` of :mod:`fer_pipeline.analysis.label_issues`); ``probabilities``:
    :func:`probability_table`; ``flags``: quality flags (``image_id``, ``score``, ``reason``);
    ``unlabelled``: the published unlabelled images (the manifest's columns, null ``label``) and
    ``unlabelled_probabilities`` the model's for them (``image_id``, ``p_<class>``,
    ``probabilities``; None: no model), ranked by :func:`rank_unlabelled`; ``outliers``: the
    embedding outliers (``image_id``, ``score`` cleanlab's, lower = more atypical, ``reason``),
    merged like the quality flags (:func:`outlier_flags`)."""
    kept = _unreviewed(manifest)
    cols = ["image_id", "sha256", "face_index", "source", "source_path", "face_path", "label"]
    unl = _unreviewed(unlabelled) if unlabelled is not None else pd.DataFrame(columns=cols)
    if label_issues is not None and len(label_issues):
        ranked = label_issues[label_issues["image_id"].isin(kept["image_id"])].copy()
        ranked["reasons"] = ranked.apply(_reason, axis=1) if len(ranked) else pd.Series(dtype=str)
        ranked["score"] = (1.0 - ranked["score"].astype("float64")).clip(0.0, 1.0)
        ranked = ranked.sort_values(["is_label_issue", "score", "image_id"], ascending=[False, False, True],
                                    kind="mergesort")
        ranked["tier"] = np.where(ranked["is_label_issue"].astype(bool), SUSPECT, SCORED)
        ranked = ranked[["image_id", "reasons", "score", "tier"]]
    else:
        ranked = pd.DataFrame({"image_id": pd.Series(dtype=str), "reasons": pd.Series(dtype=str),
                               "score": pd.Series(dtype="float64"), "tier": pd.Series(dtype="int64")})
    rest = kept.loc[~kept["image_id"].isin(ranked["image_id"]), ["image_id"]]
    rest = rest.assign(reasons=UNSCORED_REASON, score=0.0, tier=UNSCORED)
    parts = [ranked, rest]
    if len(unl):
        parts.append(rank_unlabelled(unl, unlabelled_probabilities, unlabelled_unscored_reason))
        kept = pd.concat([kept[cols], unl[cols].assign(label=None)], ignore_index=True)
    both = [f[["image_id", "score", "reason"]] for f in (flags, outlier_flags(outliers)) if f is not None and len(f)]
    order = _with_flags(pd.concat(parts, ignore_index=True), pd.concat(both, ignore_index=True) if both else None)
    queue = order.merge(kept[cols], on="image_id", how="left", validate="one_to_one")
    queue = queue.rename(columns={"face_path": "image"})
    probs = probabilities if probabilities is not None else probability_table(None, None, None)
    if unlabelled_probabilities is not None and len(unlabelled_probabilities):
        probs = pd.concat([probs[["image_id", *PROB_COLUMNS, "probabilities"]],
                           unlabelled_probabilities[["image_id", *PROB_COLUMNS, "probabilities"]]],
                          ignore_index=True).drop_duplicates("image_id", keep="first")
    queue = queue.merge(probs[["image_id", *PROB_COLUMNS, "probabilities"]], on="image_id", how="left")
    p = queue[PROB_COLUMNS].to_numpy(dtype=np.float64)
    has = ~np.isnan(p).any(axis=1)
    best = np.where(has, np.nan_to_num(p, nan=-1.0).argmax(axis=1), 0)
    queue["predicted"] = pd.Series([classes[j] if h else None for j, h in zip(best, has)], dtype="object")
    queue.insert(0, "rank", np.arange(1, len(queue) + 1, dtype=np.int64))
    queue["face_index"] = queue["face_index"].fillna(0).astype("int64")
    queue["score"] = queue["score"].astype("float64")
    for col in PROB_COLUMNS:
        queue[col] = queue[col].astype("float64")
    return queue[list(REVIEW_QUEUE_COLUMNS)].reset_index(drop=True)
