"""Each GX validation passes on clean tables and fails, with named expectations and examples, on a
planted problem. Tables are tiny so the whole module runs in a few seconds (after GX's import)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fer_pipeline.classes import CLASSES
from fer_pipeline.quality.validation import (
    ValidationOutcome,
    examples,
    label,
    validate_accounting,
    validate_class_balance,
    validate_class_counts,
    validate_folds,
    validate_image_size,
    validate_manifest_schema,
    validate_no_group_leakage,
    validate_split_proportions,
)
from fer_pipeline.schema import MANIFEST_COLUMNS

SIZE = (48, 48)
TARGETS = {"train": 0.6, "validation": 0.2, "test": 0.2}


def make_manifest(per_class: int = 10) -> pd.DataFrame:
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            n = c * per_class + i
            rows.append(
                {
                    "image_id": f"img{n:04d}",
                    "source": "srcA" if n % 2 else "srcB",
                    "source_path": f"{name.lower()}/{i}.jpg",
                    "original_label": name.lower(),
                    "label": name,
                    "split_hint": None,
                    "width": 100,
                    "height": 120,
                    "face_path": f"faces/k/{n:02d}/{n:04d}.png",
                    "face_height": SIZE[0],
                    "face_width": SIZE[1],
                    "phash": f"{n:016x}",
                    "dup_group": n,
                    "dup_group_size": 1,
                    "mean_intensity": 120.5,
                    "std_intensity": 40.0,
                    "gender": None,
                    "age_group": "20-29",
                    "race": None,
                    "sha256": f"{n:064x}",
                    "bytes": 1000 + n,
                }
            )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def make_splits(manifest: pd.DataFrame, n_folds: int = 5) -> pd.DataFrame:
    """Deterministic 60/20/20 split by group, folds round-robin over train+validation."""
    pos = np.arange(len(manifest)) % 10
    split = np.where(pos < 6, "train", np.where(pos < 8, "validation", "test"))
    fold = np.where(split == "test", -1, np.arange(len(manifest)) % n_folds)
    return pd.DataFrame(
        {
            "image_id": manifest["image_id"],
            "split": split,
            "fold": fold,
            "label": manifest["label"],
            "dup_group": manifest["dup_group"],
        }
    )


def failed_names(outcome: ValidationOutcome) -> set[str]:
    return {e["expectation_type"] for e in outcome.failed()}


def assert_fails_with(outcome: ValidationOutcome, expectation: str, column: str | None = None) -> list:
    """The outcome failed on ``expectation`` (on ``column``) and carries examples; return them."""
    assert not outcome.success
    wanted = expectation if column is None else f"{expectation}({column})"
    matches = [e for e in outcome.failed() if wanted in (e["expectation_type"], label(e))]
    assert matches, f"{wanted} not among failures: {[label(e) for e in outcome.failed()]}"
    meta = outcome.to_metadata()
    json.dumps(meta)  # must be JSON-able for asset-check metadata
    assert meta["failed"] >= 1 and meta["evaluated"] >= meta["failed"]
    assert label(matches[0]) in meta["failed_expectations"]
    found = examples(matches[0])
    assert found, "a failure should carry examples"
    assert meta["failures"][meta["failed_expectations"].index(label(matches[0]))]["examples"] == found
    return found


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return make_manifest()


@pytest.fixture(scope="module")
def splits(manifest: pd.DataFrame) -> pd.DataFrame:
    return make_splits(manifest)


# ------------------------------------------------------------------ manifest schema


def test_manifest_schema_passes(manifest: pd.DataFrame) -> None:
    outcome = validate_manifest_schema(manifest)
    assert outcome.success, outcome.to_metadata()
    assert len(outcome.expectations) > 10
    meta = outcome.to_metadata()
    assert meta["failed"] == 0 and meta["failed_expectations"] == []
    assert meta["evaluated"] == len(meta["evaluated_expectations"])
    assert "expect_column_values_to_be_unique(image_id)" in meta["evaluated_expectations"]
    json.dumps(meta)


def test_manifest_schema_bad_label(manifest: pd.DataFrame) -> None:
    bad = manifest.copy()
    bad.loc[3, "label"] = "Happy"
    examples = assert_fails_with(validate_manifest_schema(bad), "expect_column_values_to_be_in_set", "label")
    assert examples[0]["label"] == "Happy" and examples[0]["image_id"] == "img0003"


def test_manifest_schema_null_key(manifest: pd.DataFrame) -> None:
    bad = manifest.copy()
    bad.loc[5, "face_path"] = None
    examples = assert_fails_with(validate_manifest_schema(bad), "expect_column_values_to_not_be_null", "face_path")
    assert examples[0]["image_id"] == "img0005"


def test_manifest_schema_duplicate_id(manifest: pd.DataFrame) -> None:
    bad = manifest.copy()
    bad.loc[7, "image_id"] = bad.loc[6, "image_id"]
    examples = assert_fails_with(validate_manifest_schema(bad), "expect_column_values_to_be_unique", "image_id")
    assert {e["image_id"] for e in examples} == {"img0006"}


def test_manifest_schema_missing_column_reported_not_raised(manifest: pd.DataFrame) -> None:
    outcome = validate_manifest_schema(manifest.drop(columns=["phash"]))
    examples = assert_fails_with(outcome, "expect_table_columns_to_match_set")
    assert "phash" in examples[0]["missing"]
    assert outcome.details["missing_columns"] == ["phash"]


def test_manifest_schema_bad_values(manifest: pd.DataFrame) -> None:
    bad = manifest.copy()
    bad.loc[0, "phash"] = "not-a-hash"
    bad.loc[1, "face_path"] = "/abs/path.png"
    bad.loc[2, "mean_intensity"] = 300.0
    names = {label(e) for e in validate_manifest_schema(bad).failed()}
    assert names == {
        "expect_column_values_to_match_regex(phash)",
        "expect_column_values_to_not_match_regex(face_path)",
        "expect_column_values_to_be_between(mean_intensity)",
    }


def test_failing_metadata_names_expectation_counts_and_examples(manifest: pd.DataFrame) -> None:
    bad = manifest.copy()
    bad.loc[:6, "label"] = "Happy"  # 7 rows: GX keeps 5 of them as examples
    meta = validate_manifest_schema(bad).to_metadata()
    assert meta["failed_expectations"] == ["expect_column_values_to_be_in_set(label)"]
    [failure] = meta["failures"]
    assert failure["expectation"] == "expect_column_values_to_be_in_set(label)"
    assert failure["kwargs"] == {"column": "label", "value_set": list(CLASSES)}
    assert failure["element_count"] == len(bad) and failure["unexpected_count"] == 7
    assert failure["unexpected_percent"] == pytest.approx(100 * 7 / len(bad))
    assert failure["examples"] == [{"label": "Happy", "image_id": f"img{i:04d}"} for i in range(5)]


# ------------------------------------------------------------------ image size


def test_image_size_passes(manifest: pd.DataFrame) -> None:
    assert validate_image_size(manifest, SIZE).success
    assert validate_image_size(manifest, 48).success


def test_image_size_wrong(manifest: pd.DataFrame) -> None:
    bad = manifest.copy()
    bad.loc[4, "face_width"] = 64
    examples = assert_fails_with(validate_image_size(bad, SIZE), "expect_column_values_to_be_in_set", "face_width")
    assert examples == [{"face_width": 64, "image_id": "img0004"}]
    assert not validate_image_size(manifest, (64, 64)).success


# ------------------------------------------------------------------ class counts / balance


def test_class_counts_pass(manifest: pd.DataFrame) -> None:
    outcome = validate_class_counts(manifest, min_per_class=10)
    assert outcome.success
    assert outcome.details["counts"] == {c: 10 for c in CLASSES}


def test_class_counts_tiny_and_missing_class(manifest: pd.DataFrame) -> None:
    bad = manifest[~((manifest["label"] == "Tired") & (manifest.index % 10 >= 3))]  # Tired: 3 left
    bad = bad[bad["label"] != "Angry"]  # Angry: absent entirely
    outcome = validate_class_counts(bad, min_per_class=5)
    examples = assert_fails_with(outcome, "expect_column_values_to_be_between", "count")
    assert {e["label"]: e["count"] for e in examples} == {"Tired": 3, "Angry": 0}
    assert outcome.details["counts"]["Angry"] == 0


def test_class_balance(manifest: pd.DataFrame) -> None:
    outcome = validate_class_balance(manifest, max_ratio=2.0)
    assert outcome.success
    assert outcome.details["ratio"] == 1.0

    extra = make_manifest(per_class=30)
    extra = extra[extra["label"] == "Neutral"].assign(image_id=lambda d: "x" + d["image_id"])
    imbalanced = pd.concat([manifest, extra], ignore_index=True)  # Neutral 40 vs 10 each
    outcome = validate_class_balance(imbalanced, max_ratio=3.0)
    examples = assert_fails_with(outcome, "expect_column_values_to_be_between", "count")
    assert {e["label"] for e in examples} == {"Focused", "Tired", "Angry"}
    assert outcome.details["ratio"] == 4.0
    assert validate_class_balance(imbalanced, max_ratio=4.0).success


# ------------------------------------------------------------------ accounting


def excluded_for(manifest: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source": ["srcA", "srcA", "srcB"],
            "source_path": ["junk/1.jpg", "junk/2.jpg", "junk/3.jpg"],
            "stage": ["ingest", "faces", "dedup"],
            "reason": ["unmapped label: happy", "no face detected", "duplicate of img0001"],
        }
    )


def inventory_for(manifest: pd.DataFrame, excluded: pd.DataFrame) -> pd.DataFrame:
    keys = ["source", "source_path"]
    return pd.concat([manifest[keys], excluded[keys]], ignore_index=True).assign(status="candidate")


def test_accounting_passes(manifest: pd.DataFrame) -> None:
    excluded = excluded_for(manifest)
    inventory = inventory_for(manifest, excluded)
    n = len(manifest)
    assert validate_accounting(n + 3, n, 3).success
    assert validate_accounting(n + 3, manifest, excluded).success
    outcome = validate_accounting(inventory, manifest, excluded)
    assert outcome.success, outcome.to_metadata()
    assert outcome.details["n_inputs"] == n + 3
    assert validate_accounting(n, manifest, pd.DataFrame()).success  # nothing excluded, no columns


def test_accounting_count_mismatch(manifest: pd.DataFrame) -> None:
    n = len(manifest)
    outcome = validate_accounting(n + 5, n, 3)
    examples = assert_fails_with(
        outcome, "expect_column_pair_values_to_be_equal", "n_inputs,n_kept_plus_excluded"
    )
    assert examples == [[n + 5, n + 3]]


def test_accounting_kept_and_excluded(manifest: pd.DataFrame) -> None:
    excluded = excluded_for(manifest)
    inventory = inventory_for(manifest, excluded)
    # the same file is both kept and excluded (and junk/3.jpg is lost): counts still balance
    excluded.loc[2, ["source", "source_path"]] = manifest.loc[0, ["source", "source_path"]].to_list()
    outcome = validate_accounting(inventory, manifest, excluded)
    examples = assert_fails_with(outcome, "expect_compound_columns_to_be_unique", "source,source_path")
    assert {e["table"] for e in examples} == {"kept", "excluded"}
    assert {e["source_path"] for e in examples} == {manifest.loc[0, "source_path"]}
    per_input = assert_fails_with(outcome, "expect_column_values_to_be_in_set", "times_accounted")
    assert {(e["source_path"], e["times_accounted"]) for e in per_input} == {
        ("junk/3.jpg", 0),
        (manifest.loc[0, "source_path"], 2),
    }
    assert outcome.details["in_both_tables"] == 1 and outcome.details["inputs_not_accounted"] == 1


def test_accounting_excluded_twice(manifest: pd.DataFrame) -> None:
    excluded = excluded_for(manifest)
    excluded.loc[1, "source_path"] = excluded.loc[0, "source_path"]
    outcome = validate_accounting(len(manifest) + 3, manifest, excluded)
    examples = assert_fails_with(outcome, "expect_compound_columns_to_be_unique")
    assert [e["table"] for e in examples] == ["excluded", "excluded"]


def test_accounting_output_not_in_inputs(manifest: pd.DataFrame) -> None:
    excluded = excluded_for(manifest)
    inventory = inventory_for(manifest, excluded)
    excluded.loc[0, "source_path"] = "never/seen.jpg"
    outcome = validate_accounting(inventory, manifest, excluded)
    examples = assert_fails_with(outcome, "expect_column_values_to_be_in_set", "in_inputs")
    assert examples[0]["source_path"] == "never/seen.jpg" and examples[0]["table"] == "excluded"


def test_accounting_missing_key_columns(manifest: pd.DataFrame) -> None:
    excluded = excluded_for(manifest).drop(columns=["source_path"])
    outcome = validate_accounting(len(manifest) + 3, manifest, excluded)
    assert_fails_with(outcome, "expect_table_columns_to_match_set")


# ------------------------------------------------------------------ splits


def test_split_proportions_pass(splits: pd.DataFrame) -> None:
    outcome = validate_split_proportions(splits, TARGETS, tolerance=0.02)
    assert outcome.success, outcome.to_metadata()
    assert outcome.details["shares"] == {"train": 0.6, "validation": 0.2, "test": 0.2}
    assert set(outcome.details["per_class"]) == set(CLASSES)


def test_split_proportions_off(splits: pd.DataFrame) -> None:
    bad = splits.copy()
    bad.loc[bad["split"] == "validation", "split"] = "train"  # 80/0/20
    outcome = validate_split_proportions(bad, TARGETS, tolerance=0.05)
    examples = assert_fails_with(outcome, "expect_column_values_to_be_between", "deviation")
    assert {e["split"] for e in examples} == {"train", "validation"}


def test_split_proportions_unknown_split_and_empty(splits: pd.DataFrame) -> None:
    bad = splits.copy()
    bad.loc[0, "split"] = "holdout"
    assert_fails_with(validate_split_proportions(bad, TARGETS, 0.05), "expect_column_values_to_be_in_set", "split")
    empty = validate_split_proportions(splits.iloc[:0], TARGETS, 0.05)
    assert "expect_table_row_count_to_be_between" in failed_names(empty)


def test_no_group_leakage(manifest: pd.DataFrame, splits: pd.DataFrame) -> None:
    assert validate_no_group_leakage(splits).success

    bad = splits.copy()
    # images 0 (train) and 9 (test) become near-duplicates of each other
    bad.loc[9, "dup_group"] = bad.loc[0, "dup_group"]
    outcome = validate_no_group_leakage(bad)
    examples = assert_fails_with(outcome, "expect_column_values_to_be_between", "n_splits")
    assert examples == [{"n_splits": 2, "dup_group": 0, "splits": "test,train"}]
    assert outcome.details["leaking_groups"] == 1


def test_no_group_leakage_duplicate_image(splits: pd.DataFrame) -> None:
    bad = pd.concat([splits, splits.iloc[[0]].assign(split="test")], ignore_index=True)
    assert {"expect_column_values_to_be_unique", "expect_column_values_to_be_between"} <= failed_names(
        validate_no_group_leakage(bad)
    )


def test_folds(splits: pd.DataFrame) -> None:
    outcome = validate_folds(splits, n_folds=5)
    assert outcome.success, outcome.to_metadata()

    bad = splits.copy()
    train_idx = bad.index[bad["split"] == "train"][0]
    test_idx = bad.index[bad["split"] == "test"][0]
    bad.loc[train_idx, "fold"] = 5
    bad.loc[test_idx, "fold"] = 2
    outcome = validate_folds(bad, n_folds=5)
    between = assert_fails_with(outcome, "expect_column_values_to_be_between", "fold")
    assert between[0]["fold"] == 5 and between[0]["split"] == "train"
    in_set = assert_fails_with(outcome, "expect_column_values_to_be_in_set", "fold")
    assert in_set[0]["fold"] == 2 and in_set[0]["split"] == "test"


def test_folds_empty_fold(splits: pd.DataFrame) -> None:
    outcome = validate_folds(splits, n_folds=6)  # data only uses folds 0..4
    examples = assert_fails_with(outcome, "expect_column_distinct_values_to_contain_set", "fold")
    assert examples == [{"missing": 5}]


def test_missing_split_columns_fail_cleanly(splits: pd.DataFrame) -> None:
    outcome = validate_folds(splits.drop(columns=["fold"]), n_folds=5)
    assert_fails_with(outcome, "expect_table_columns_to_match_set")
    outcome = validate_no_group_leakage(splits.drop(columns=["dup_group"]))
    assert_fails_with(outcome, "expect_table_columns_to_match_set")


# ------------------------------------------------------------------ Dagster checks


def test_checks_take_blocking_and_severity_from_their_definition(manifest: pd.DataFrame, tmp_path: Path) -> None:
    """A failure blocks or warns as the check's definition says, and nothing in the validation decides it."""
    import dagster as dg

    from fer_pipeline.defs import checks
    from fer_pipeline.defs.assets.data import manifest as manifest_asset
    from fer_pipeline.defs.assets.data import splits as splits_asset
    from fer_pipeline.defs.resources import FerSettings

    specs = [*manifest_asset.check_specs, *splits_asset.check_specs]
    blocking = {spec.name: spec.blocking for spec in specs}
    assert blocking["manifest_class_counts"] and blocking["split_folds"]
    assert not blocking["manifest_class_balance"] and not blocking["split_proportions"]  # as docs/data.md says
    fer = FerSettings(data_root=str(tmp_path))
    few_angry = checks.Tables(manifest[(manifest["label"] != "Angry") | (manifest.index % 10 < 2)])  # Angry: 2
    by_name = {c.name: c for c in checks.MANIFEST_CHECKS}
    balance = by_name["manifest_class_balance"].evaluate(few_angry, fer)
    counts = by_name["manifest_class_counts"].evaluate(few_angry, fer)
    assert not balance.passed and balance.severity == dg.AssetCheckSeverity.WARN
    assert balance.metadata["blocking"].value is False
    assert balance.metadata["failed_expectations"].value == ["expect_column_values_to_be_between(count)"]
    assert not counts.passed and counts.severity == dg.AssetCheckSeverity.ERROR
    assert counts.metadata["blocking"].value is True
    assert checks.blocking_failures(checks.MANIFEST_CHECKS, [balance, counts]) == ["manifest_class_counts"]


# ------------------------------------------------------------------ GX hygiene


def test_repeated_validations_and_no_progress_bars(
    manifest: pd.DataFrame, splits: pd.DataFrame, capfd: pytest.CaptureFixture[str]
) -> None:
    """Many validations of different frames in one process work and print nothing."""
    capfd.readouterr()
    for per_class in (3, 4, 5):
        m = make_manifest(per_class)
        assert validate_manifest_schema(m).success
        assert validate_class_counts(m, per_class).success
        assert not validate_class_counts(m, per_class + 1).success
    assert validate_folds(splits, 5).success
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err
    assert "%|" not in out + err  # no tqdm bar of any kind
    assert out == ""
