"""The model card counts the images a person reviewed (kept and relabelled or confirmed, excluded)."""

from __future__ import annotations

import pandas as pd

from fer_pipeline.analysis.model_card import _reviewed


def test_card_counts_reviewed_images() -> None:
    kept = pd.DataFrame({"label": ["Tired", "Angry", "Angry"], "label_before_review": ["Angry", "Angry", None],
                         "reviewed_label": ["Tired", "Angry", None],
                         "review_source": ["label-studio p task 1", "label-studio p task 2", None]})
    excluded = pd.DataFrame({"stage": ["review", "deduplication", "review"]})
    assert _reviewed(kept, excluded) == ("Reviewed by a person: 4 images (2 kept, 1 of them relabelled, 1 confirmed; "
                                         "2 excluded as not a face or by the reviewer).")
    nobody = kept.assign(review_source=None, reviewed_label=None, label_before_review=None)
    assert _reviewed(nobody, excluded.iloc[1:2]).startswith("Reviewed by a person: none")
