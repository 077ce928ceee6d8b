"""The review queue: which images a person should look at first, and why.

The input contract of the review loop is :data:`fer_pipeline.schema.REVIEW_QUEUE_COLUMNS`
(``reviews/review_queue.parquet``). Today's ranking uses what the pipeline already computes:

1. cleanlab's label suspects (``reports/label_issues``: confident learning on the out-of-fold
   probabilities), most suspect first;
2. then every other image the label-quality ranking scored, lowest label quality first;
3. then the kept images nothing scored yet (no cross-validation run, or the test split), in
   manifest order, so the loop works before any model exists.

Faces with an image-quality flag (``data_quality_flags``: blurred, dark, washed out, low
information, ...) come right after the label suspects, worst flag first, their flag reasons
added to the row's reasons.

Images a person already reviewed (the manifest's ``review_source``) are left out. ``score`` is in
[0, 1], higher = more worth a look: ``1 - label quality`` for scored images, 0 for unscored ones.
Other rankings (embedding duplicates, outliers, unlabelled sources) add rows and reasons to the
same contract.
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
SUSPECT, FLAGGED, SCORED, UNSCORED = 0, 1, 2, 3  # queue tiers, in order


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


def _reason(row: pd.Series) -> str:
    if row["is_label_issue"]:
        return (f"cleanlab label suspect: labelled {row['given_label']}, the model says {row['predicted_label']} "
                f"(self-confidence {row['self_confidence']:.2f})")
    return f"low label quality: labelled {row['given_label']} (self-confidence {row['self_confidence']:.2f})"


def build_review_queue(manifest: pd.DataFrame, label_issues: pd.DataFrame | None = None,
                       probabilities: pd.DataFrame | None = None,
                       classes: Sequence[str] = CLASSES, flags: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ranked queue (:data:`REVIEW_QUEUE_COLUMNS`) over the kept images of ``manifest`` (the
    published manifest: ``image_id``, ``sha256``, ``face_index``, ``source``, ``source_path``,
    ``face_path``, ``label``, optionally ``review_source``). ``label_issues``: the label-issue
    ranking (``RANKING_COLUMNS`` of :mod:`fer_pipeline.analysis.label_issues`); ``probabilities``:
    :func:`probability_table`; ``flags``: quality flags (``image_id``, ``score``, ``reason``)."""
    kept = manifest
    if "review_source" in kept.columns:
        kept = kept[kept["review_source"].isna()]
    kept = kept.reset_index(drop=True)
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
    order = _with_flags(pd.concat([ranked, rest], ignore_index=True), flags)
    cols = ["image_id", "sha256", "face_index", "source", "source_path", "face_path", "label"]
    queue = order.merge(kept[cols], on="image_id", how="left", validate="one_to_one")
    queue = queue.rename(columns={"face_path": "image"})
    probs = probabilities if probabilities is not None else probability_table(None, None, None)
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
