import os

import zipfile
from pathlib import Path

import pandas as pd
import pytest

from fer_pipeline.sources.catalog import parse_catalog
from fer_pipeline.sources.inventory import build_inventory
from fer_pipeline_tests.conftest import asset_metadata, face_png, write, write_catalogue


def test_csv_with_windows_paths_partial_coverage(data_root: Path) -> None:
    src = data_root / "raw" / "race"
    for cls in ("Angry", "Neutral"):
        for i in range(3):
            write(src / "Cleaned Dataset" / cls / f"{i}.jpg", face_png(hash((cls, i)) % 1000, fmt="JPEG"))
    (src / "DataAnnotations.csv").write_text(
        "Indices,Path,Gender,Race\n"
        "1,Cleaned Dataset\\Angry\\0.jpg,Female,Black\n"
        "2,Cleaned Dataset\\Neutral\\2.jpg,M,Asian\n"
        "3,Cleaned Dataset\\Happy\\9.jpg,Male,White\n")
    cat = parse_catalog({"sources": [{"name": "race", "kind": "image_folders", "path": "raw/race",
                                      "label_map": {"angry": "Angry", "neutral": "Neutral"},
                                      "demographics": {"csv": "DataAnnotations.csv", "key": "Path",
                                                       "columns": {"gender": "Gender", "race": "Race"}}}]},
                        data_root)
    report = build_inventory(cat, data_root)
    inv = report.table.set_index("source_path")
    assert inv.loc["Cleaned Dataset/Angry/0.jpg", ["gender", "race"]].tolist() == ["female", "black"]
    assert inv.loc["Cleaned Dataset/Neutral/2.jpg", ["gender", "race"]].tolist() == ["male", "asian"]
    assert inv.loc["Cleaned Dataset/Angry/1.jpg", ["gender", "race"]].isna().all()
    assert inv["age_group"].isna().all()
    assert report.demographics_notes["race"]["csv_keys_unmatched"] == 1  # the Happy row has no file


def test_csv_inside_zip_keyed_by_file_name(data_root: Path) -> None:
    with zipfile.ZipFile(data_root / "eng.zip", "w") as zf:
        zf.writestr("Data/engaged/engaged_1.jpg", face_png(1, fmt="JPEG"))
        zf.writestr("Data/neutral/neutral_1.jpg", face_png(2, fmt="JPEG"))
        zf.writestr("Labels/engaged_labels.csv", "Image,Gender,Age\nengaged_1.jpg,Other/Non-binary,Middle-aged\n")
        zf.writestr("Labels/neutral_labels.csv", "Image,Gender,Age\nneutral_1.jpg,Female,Senior\n")
    cat = parse_catalog({"sources": [{"name": "eng", "kind": "image_folders", "path": "eng.zip",
                                      "label_map": {"engaged": "Focused", "neutral": "Neutral"},
                                      "demographics": {"csv": "Labels/*.csv", "key": "Image",
                                                       "columns": {"gender": "Gender", "age_group": "Age"}}}]},
                        data_root)
    inv = build_inventory(cat, data_root).table.set_index("source_path")
    assert inv.loc["Data/engaged/engaged_1.jpg", ["gender", "age_group"]].tolist() == ["other", "middle"]
    assert inv.loc["Data/neutral/neutral_1.jpg", ["gender", "age_group"]].tolist() == ["female", "senior"]


def test_filename_regex(data_root: Path) -> None:
    src = data_root / "raw" / "other"
    write(src / "Bored" / "female_young_01.png", face_png(1))
    write(src / "Focused" / "Male_Senior_02.png", face_png(2))
    write(src / "Focused" / "anon.png", face_png(3))
    cat = parse_catalog({"sources": [{"name": "o", "kind": "image_folders", "path": "raw/other",
                                      "label_map": {"Bored": "Tired", "Focused": "Focused"},
                                      "demographics": {"filename_regex":
                                                       "(?i)(?P<gender>female|male)_(?P<age_group>young|middle|senior)"}}]},
                        data_root)
    inv = build_inventory(cat, data_root).table.set_index("source_path")
    assert inv.loc["Bored/female_young_01.png", ["gender", "age_group"]].tolist() == ["female", "young"]
    assert inv.loc["Focused/Male_Senior_02.png", ["gender", "age_group"]].tolist() == ["male", "senior"]
    assert inv.loc["Focused/anon.png", ["gender", "age_group"]].isna().all()


def _sheet_source(data_root: Path, sheet: str = "sheet.csv") -> object:
    src = data_root / "raw" / "d"
    write(src / "top" / "Angry" / "a.png", face_png(1))
    write(src / "top" / "Angry" / "b.png", face_png(2))
    return parse_catalog({"sources": [{"name": "d", "kind": "image_folders", "path": "raw/d",
                                       "label_map": {"Angry": "Angry"},
                                       "demographics": {"csv": sheet, "key": "Path",
                                                        "columns": {"gender": "Gender"}}}]}, data_root)


def test_prefixed_keys_join_both_ways(data_root: Path) -> None:
    """Keys with an extra leading folder, or without the top folder, still find their file."""
    cat = _sheet_source(data_root)
    (data_root / "raw" / "d" / "sheet.csv").write_text(
        "Path,Gender\nextra/top/Angry/a.png,F\nAngry/b.png,M\nAngry/zz.png,M\n")
    report = build_inventory(cat, data_root)
    inv = report.table.set_index("source_path")
    assert inv.loc["top/Angry/a.png", "gender"] == "female" and inv.loc["top/Angry/b.png", "gender"] == "male"
    assert report.demographics_notes["d"]["csv_keys_unmatched"] == 1


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_sheet_that_is_not_a_regular_file_is_refused(data_root: Path, kind: str) -> None:
    cat = _sheet_source(data_root)
    sheet = data_root / "raw" / "d" / "sheet.csv"
    if kind == "fifo":
        os.mkfifo(sheet)
    else:
        sheet.symlink_to("/dev/zero")
    with pytest.raises(Exception, match="not a regular file"):
        build_inventory(cat, data_root)


def test_conflicting_rows_leave_the_attribute_empty_and_are_reported(data_root: Path) -> None:
    """Two rows of one key that disagree: reported with the file, the value left empty (was: the
    last row won). Identical repeats, and a blank beside a value, are no conflict."""
    cat = _sheet_source(data_root)
    (data_root / "raw" / "d" / "sheet.csv").write_text(
        "Path,Gender\ntop/Angry/a.png,F\ntop/Angry/a.png,M\n"   # conflict
        "top/Angry/b.png,M\ntop/Angry/b.png,male\ntop/Angry/b.png,\n")  # the same value, and a blank
    report = build_inventory(cat, data_root)
    inv = report.table.set_index("source_path")
    assert pd.isna(inv.loc["top/Angry/a.png", "gender"])
    assert inv.loc["top/Angry/b.png", "gender"] == "male"
    notes = report.demographics_notes["d"]
    assert notes["csv_conflicting_files"] == 1
    assert notes["csv_conflict_examples"] == ["top/Angry/a.png: gender 'female' vs 'male'"]
    report.table.to_parquet(data_root / "inv.parquet")  # an unchanged source reuses its rows and its notes
    again = build_inventory(cat, data_root, pd.read_parquet(data_root / "inv.parquet"))
    assert again.hashed == 0 and again.demographics_notes["d"] == notes


def test_conflict_through_two_spellings_of_one_key(data_root: Path) -> None:
    """A full path and a prefixed path naming the same file, with different values."""
    cat = _sheet_source(data_root)
    (data_root / "raw" / "d" / "sheet.csv").write_text("Path,Gender\ntop/Angry/a.png,F\nAngry/a.png,F\n"
                                                       "extra/top/Angry/a.png,M\n")
    report = build_inventory(cat, data_root)
    assert pd.isna(report.table.set_index("source_path").loc["top/Angry/a.png", "gender"])
    assert report.demographics_notes["d"]["csv_conflicting_files"] == 1


def test_conflicts_reach_the_raw_sources_metadata(data_root: Path) -> None:
    import dagster as dg

    from fer_pipeline.defs.assets.data import raw_sources
    from fer_pipeline.defs.resources import FerSettings

    _sheet_source(data_root)  # the files
    (data_root / "raw" / "d" / "sheet.csv").write_text("Path,Gender\ntop/Angry/a.png,F\ntop/Angry/a.png,M\n")
    write_catalogue(data_root, [{"name": "d", "kind": "image_folders", "path": "raw/d",
                                 "label_map": {"Angry": "Angry"},
                                 "demographics": {"csv": "sheet.csv", "key": "Path", "columns": {"gender": "Gender"}}}])
    result = dg.materialize([raw_sources], resources={"fer": FerSettings(data_root=str(data_root), workers=1)})
    meta = asset_metadata(result, "raw_sources")
    assert meta["demographics_conflicts"] == {"d": {"files": 1, "examples": ["top/Angry/a.png: gender 'female' vs 'male'"]}}
