"""The relabel CSV: applied and recorded in ``relabelled_from``; bad rows stop with the line named."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fer_pipeline.dataset.manifest import RelabelError, apply_relabels, read_relabels


def small_manifest() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["a1", "b2", "c3"], "source": "demo",
                         "source_path": ["Angry/1.png", "Tired/2.png", "Neutral/3.png"],
                         "label": ["Angry", "Tired", "Neutral"]})


def test_relabels_applied_and_recorded(tmp_path: Path) -> None:
    csv = tmp_path / "relabels.csv"
    csv.write_text("image_id,label,note\nb2, focused ,eyes open\nc3,Neutral,already right\n")
    kept, report = apply_relabels(small_manifest(), read_relabels(csv))
    row = kept.set_index("image_id")
    assert row.loc["b2", "label"] == "Focused" and row.loc["b2", "relabelled_from"] == "Tired"
    assert pd.isna(row.loc["a1", "relabelled_from"]) and pd.isna(row.loc["c3", "relabelled_from"])
    assert report["applied"].tolist() == [True, False]
    assert report.loc[0, "line"] == 2 and report.loc[0, "note"] == "eyes open"
    assert report.loc[0, "label_before"] == "Tired" and report.loc[0, "label_after"] == "Focused"


def test_no_file_adds_empty_column(tmp_path: Path) -> None:
    assert read_relabels(tmp_path / "relabels.csv") is None
    kept, report = apply_relabels(small_manifest(), None)
    assert "relabelled_from" in kept.columns and kept["relabelled_from"].isna().all() and report.empty
    kept.to_parquet(tmp_path / "m.parquet")  # the column survives Parquet


@pytest.mark.parametrize("body, message", [
    ("image_id,label\na1,Focused\nzz9,Tired\n", "line 3: image_id 'zz9' is not in the manifest"),
    ("image_id,label\na1,Happy\n", "line 2: label 'Happy'"),
    ("image_id,label\na1,Tired\na1,Focused\n", "line 3: image_id 'a1' is relabelled to Focused here but to Tired on line 2"),
])
def test_bad_rows_raise_naming_the_line(tmp_path: Path, body: str, message: str) -> None:
    csv = tmp_path / "relabels.csv"
    csv.write_text(body)
    with pytest.raises(RelabelError, match=message.replace("(", r"\(")):
        apply_relabels(small_manifest(), read_relabels(csv))


def test_missing_column(tmp_path: Path) -> None:
    csv = tmp_path / "relabels.csv"
    csv.write_text("id,new_label\na1,Tired\n")
    with pytest.raises(RelabelError, match="missing column"):
        read_relabels(csv)
