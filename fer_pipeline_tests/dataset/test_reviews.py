"""The manifest applies review decisions (fer_pipeline.dataset.manifest.apply_reviews): relabels with
provenance, exclusions as excluded rows, stale reviews reported and not applied, the latest review
of an image decides, and every item stays accounted for once."""

from __future__ import annotations

import pandas as pd

from fer_pipeline.dataset.manifest import (
    APPLIED,
    CONFIRMED,
    EXCLUDED,
    NOT_KEPT,
    STALE,
    SUPERSEDED,
    UNKNOWN,
    apply_reviews,
    check_accounting,
)
from fer_pipeline.schema import EXCLUDED_COLUMNS, REVIEW_COLUMNS


def _sha(i: int) -> str:
    return f"{i:064x}"


def _manifest(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"id{i}" for i in range(n)], "source": "a",
                         "source_path": [f"Angry/{i}.png" for i in range(n)], "face_index": 0,
                         "sha256": [_sha(i) for i in range(n)], "original_label": "angry", "label": "Angry"})


def _excluded() -> pd.DataFrame:
    return pd.DataFrame([{"source": "a", "source_path": "Angry/dup.png", "stage": "deduplication",
                          "reason": "duplicate of id0", "raw_label": "angry", "label": "Angry",
                          "duplicate_of": "id0", "face_index": 0}], columns=list(EXCLUDED_COLUMNS))


def _review(task: int, sha: str, decision: str, time: str, path: str = "", refused: str | None = None) -> dict:
    return {"sha256": sha, "face_index": 0, "image_id": None, "source": "a", "source_path": path,
            "decision": decision, "reviewer": "r@example.com", "time": time, "task_id": task,
            "annotation_id": task * 10, "project": "p", "refused": refused}


def test_decisions_apply_with_provenance_and_accounting_holds() -> None:
    manifest, excluded = _manifest(), _excluded()
    reviews = pd.DataFrame([
        _review(1, _sha(0), "Tired", "2026-01-01T00:00:00+00:00", "Angry/0.png"),  # relabel
        _review(2, _sha(1), "Angry", "2026-01-01T00:00:00+00:00", "Angry/1.png"),  # confirm
        _review(3, _sha(2), "not a face", "2026-01-01T00:00:00+00:00", "Angry/2.png"),
        _review(4, _sha(3), "exclude", "2026-01-01T00:00:00+00:00", "Angry/3.png"),
        _review(5, _sha(99), "Tired", "2026-01-01T00:00:00+00:00", "Angry/4.png"),  # Angry/4 holds other bytes now
        _review(6, _sha(98), "Tired", "2026-01-01T00:00:00+00:00", "Angry/dup.png"),  # an excluded duplicate
        _review(7, _sha(97), "Tired", "2026-01-01T00:00:00+00:00", "gone.png"),  # nowhere
        _review(8, _sha(5), "Focused", "2026-01-01T00:00:00+00:00", "Angry/5.png"),  # superseded by 9
        _review(9, _sha(5), "Neutral", "2026-02-01T00:00:00+00:00", "Angry/5.png"),
        _review(10, _sha(4), "exclude", "2026-03-01T00:00:00+00:00", "Angry/4.png", refused="unknown label"),
    ], columns=list(REVIEW_COLUMNS))
    kept, out, report = apply_reviews(manifest, excluded, reviews)
    outcome = report.set_index("task_id")["outcome"]
    assert outcome.to_dict() == {1: APPLIED, 2: CONFIRMED, 3: EXCLUDED, 4: EXCLUDED, 5: STALE, 6: NOT_KEPT,
                                 7: UNKNOWN, 8: SUPERSEDED, 9: APPLIED}  # the refused row is not applied at all
    row = kept.set_index("image_id").loc["id0"]
    assert (row["label"], row["label_before_review"], row["reviewed_label"]) == ("Tired", "Angry", "Tired")
    assert row["review_source"] == ("label-studio p task 1 annotation 10 by r@example.com at "
                                    "2026-01-01T00:00:00+00:00")
    assert kept.set_index("image_id").loc["id5", "label"] == "Neutral"
    assert kept.set_index("image_id").loc["id1", "review_source"].startswith("label-studio p task 2")
    assert pd.isna(kept.set_index("image_id").loc["id4", "review_source"])  # stale review not applied
    assert set(kept["image_id"]) == {"id0", "id1", "id4", "id5"}
    review_rows = out[out["stage"] == "review"].set_index("source_path")
    assert review_rows.loc["Angry/2.png", "reason"].startswith("review: not a face (label-studio p task 3")
    assert review_rows.loc["Angry/3.png", "reason"].startswith("review: excluded by the reviewer (")
    assert review_rows.loc["Angry/3.png", "label"] == "Angry"
    inputs = pd.concat([manifest, excluded])[["source", "source_path", "face_index"]]
    assert check_accounting(inputs, kept, out)["balanced"]


def test_no_reviews_adds_empty_provenance() -> None:
    kept, out, report = apply_reviews(_manifest(), _excluded(), None)
    assert kept["review_source"].isna().all() and kept["label_before_review"].isna().all()
    assert len(out) == 1 and report.empty
    assert (kept["label"] == "Angry").all()
