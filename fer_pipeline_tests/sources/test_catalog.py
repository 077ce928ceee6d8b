from pathlib import Path

import pytest

from fer_pipeline.sources.catalog import CatalogError, load_catalog, parse_catalog


def _parse(entries: list[dict], root: Path):
    return parse_catalog({"sources": entries}, root)


def test_example_catalogue_parses(data_root: Path) -> None:
    (data_root / "raw" / "other").mkdir(parents=True)
    (data_root / "raw" / "a.zip").write_bytes(b"")
    text = """
sources:
  - name: affectnet4
    kind: image_folders
    path: raw/a.zip
    label_map: {Anger: Angry, Bored_Tired: Tired, Focused_Engaged: Focused, Neutral: Neutral}
  - name: faces_by_name
    kind: image_folders
    path: raw/other
    label_map: {Bored: Tired, Focused: focused}
    demographics:
      filename_regex: '(?i)(?P<gender>female|male)_(?P<age_group>young|middle|senior)'
  - name: engaged
    kind: image_folders
    path: raw/other
    label_map: {engaged: Focused}
    demographics:
      csv: "labels/*.csv"
      key: Image
      columns: {gender: Gender, age_group: Age}
"""
    (data_root / "sources.yaml").write_text(text)
    cat = load_catalog(data_root / "sources.yaml")
    assert [s.name for s in cat.sources] == ["affectnet4", "faces_by_name", "engaged"]
    aff = cat.source("affectnet4")
    assert aff.path == data_root / "raw" / "a.zip"
    assert aff.map_label("ANGER") == "Angry" and aff.map_label("happy") is None
    assert cat.source("faces_by_name").map_label("focused") == "Focused"  # target case-insensitive
    assert cat.source("engaged").demographics.columns == {"gender": "Gender", "age_group": "Age"}


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"kind": "image_folders", "path": ".", "label_map": {"a": "Angry"}}, "field 'name'"),
        ({"name": "s", "path": ".", "label_map": {"a": "Angry"}}, "source 's', field 'kind'"),
        ({"name": "s", "kind": "tarball", "path": ".", "label_map": {"a": "Angry"}}, "unknown kind 'tarball'"),
        ({"name": "s", "kind": "image_folders", "label_map": {"a": "Angry"}}, "source 's', field 'path'"),
        ({"name": "s", "kind": "image_folders", "path": "nope", "label_map": {"a": "Angry"}}, "does not exist"),
        ({"name": "s", "kind": "image_folders", "path": "."}, "field 'label_map'"),
        ({"name": "s", "kind": "image_folders", "path": ".", "label_map": {"happy": "Happy"}},
         "field 'label_map.happy'"),
        ({"name": "s", "kind": "image_folders", "path": ".", "label_map": {"a": "Angry"},
          "demographics": {"csv": "x.csv", "columns": {"gender": "G"}}}, "field 'demographics.key'"),
        ({"name": "s", "kind": "image_folders", "path": ".", "label_map": {"a": "Angry"},
          "demographics": {"csv": "x.csv", "key": "k", "columns": {"height": "H"}}},
         "field 'demographics.columns.height'"),
        ({"name": "s", "kind": "image_folders", "path": ".", "label_map": {"a": "Angry"}, "colour": 1},
         "field 'colour'"),
    ],
)
def test_malformed_catalogue_names_source_and_field(data_root: Path, entry: dict, fragment: str) -> None:
    with pytest.raises(CatalogError) as err:
        _parse([entry], data_root)
    assert fragment in str(err.value)


def test_duplicate_source_names_rejected(data_root: Path) -> None:
    entry = {"name": "s", "kind": "image_folders", "path": ".", "label_map": {"a": "Angry"}}
    with pytest.raises(CatalogError, match="used by two sources"):
        _parse([entry, entry], data_root)


def test_invalid_yaml_and_missing_file(data_root: Path) -> None:
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(data_root / "sources.yaml")
    (data_root / "sources.yaml").write_text("sources: [\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(data_root / "sources.yaml")


def test_synthetic_defaults(data_root: Path) -> None:
    cat = _parse([{"name": "demo", "kind": "synthetic", "path": "raw/demo", "n_images": 100}], data_root)
    spec = cat.sources[0]
    assert spec.label_map == {"neutral": "Neutral", "focused": "Focused", "tired": "Tired", "angry": "Angry"}
    assert spec.options == {"n_images": 100}
    assert spec.demographics is not None and spec.demographics.key == "file"


def test_label_keys_fold_case_and_fer_codes_stay_numbers(data_root: Path) -> None:
    (data_root / "fer.csv").write_text("emotion,pixels,Usage\n")
    (data_root / "sources.yaml").write_text(
        "sources:\n"
        "  - {name: fer, kind: fer2013_csv, path: fer.csv, label_map: {0: Angry, 6: Neutral}}\n"
        "  - {name: numbered, kind: image_folders, path: ., label_map: {'1': Angry, STRASSE: Tired}}\n")
    cat = load_catalog(data_root / "sources.yaml")
    assert cat.source("fer").label_map == {"angry": "Angry", "neutral": "Neutral"}
    numbered = cat.source("numbered")
    assert numbered.map_label("1") == "Angry" and numbered.map_label("Straße") == "Tired"  # case-folded
