"""The data half on real third-party datasets (../shared/datasets), configured only through
sources.yaml, as in the README example. Skipped when the datasets are absent."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from fer_pipeline.definitions import defs
from fer_pipeline_tests.conftest import shared_dataset

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

CATALOGUE = """
sources:
  - name: fer2013
    kind: image_folders
    path: {fer}
    label_map: {{angry: Angry, neutral: Neutral}}
  - name: affectnet4
    kind: image_folders
    path: raw/affectnet-4class.zip
    label_map: {{Anger: Angry, Bored_Tired: Tired, Focused_Engaged: Focused, Neutral: Neutral}}
  - name: engaged
    kind: image_folders
    path: raw/engaged-neutral-demographics.zip
    label_map: {{engaged: Focused, neutral: Neutral}}
    demographics:
      csv: "COMP472Age_Gender_Labels/*.csv"   # inside the source
      key: Image
      columns: {{gender: Gender, age_group: Age}}
"""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory):
    fer = shared_dataset("fer2013-folders.zip")
    root = tmp_path_factory.mktemp("real")
    (root / "raw").mkdir()
    for name in ("affectnet-4class.zip", "engaged-neutral-demographics.zip"):
        (root / "raw" / name).symlink_to(shared_dataset(name))
    (root / "sources.yaml").write_text(CATALOGUE.format(fer=fer))
    mp = pytest.MonkeyPatch()
    mp.setenv("FER_DATA_DIR", str(root))
    try:
        result = defs.resolve_job_def("data_pipeline").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    finally:
        mp.undo()
    tables = {name: pd.read_parquet(root / "manifest" / f"{name}.parquet")
              for name in ("raw_inventory", "manifest", "excluded", "splits")}
    return result, tables


def test_run_succeeds_with_blocking_checks_passing(real_run) -> None:
    result, _ = real_run
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    for name in ("manifest_schema", "manifest_image_size", "manifest_class_counts", "manifest_accounting",
                 "split_no_group_leakage", "split_folds", "sources_have_images"):
        assert checks[name], name


def test_accounting_per_source(real_run) -> None:
    _, t = real_run
    inv, kept, excl = t["raw_inventory"], t["manifest"], t["excluded"]
    for source in ("fer2013", "affectnet4", "engaged"):
        n_in = int((inv["source"] == source).sum())
        assert n_in == int((kept["source"] == source).sum()) + int((excl["source"] == source).sum())
    # archive sizes as published
    assert (inv["source"] == "fer2013").sum() == 40263
    assert (inv["source"] == "affectnet4").sum() == 2468
    assert (inv["source"] == "engaged").sum() == 2004


def test_affectnet_layout(real_run) -> None:
    _, t = real_run
    inv = t["raw_inventory"][t["raw_inventory"]["source"] == "affectnet4"]
    assert (inv["status"] == "junk").sum() == 4  # .DS_Store files
    assert set(inv.loc[inv["status"] == "not_image", "source_path"]) == {"Gender.zip", "datasetReadMe.md"}
    excl = t["excluded"][t["excluded"]["source"] == "affectnet4"]
    conflicts = excl[excl["reason"].str.startswith("label conflict")]
    assert len(conflicts) >= 30  # the 15 images filed under both Anger and Focused_Engaged
    assert set(t["manifest"].loc[t["manifest"]["source"] == "affectnet4", "label"]) == {"Angry", "Tired", "Focused",
                                                                                      "Neutral"}


def test_engaged_demographics_from_csv(real_run) -> None:
    _, t = real_run
    kept = t["manifest"][t["manifest"]["source"] == "engaged"]
    assert set(kept["label"]) == {"Focused", "Neutral"}
    coverage = kept["gender"].notna().mean()
    assert coverage > 0.95  # 55 files of the archive have no CSV row
    assert set(kept["gender"].dropna()) <= {"male", "female", "other"}
    assert set(kept["age_group"].dropna()) == {"young", "middle", "senior"}
    unmapped = t["excluded"][(t["excluded"]["source"] == "engaged") & (t["excluded"]["stage"] == "label_mapping")]
    assert set(unmapped["raw_label"]) == {"happy", "surprise"} and len(unmapped) == 1000


def test_fer2013_only_angry_and_neutral_kept(real_run) -> None:
    _, t = real_run
    kept = t["manifest"][t["manifest"]["source"] == "fer2013"]
    assert set(kept["original_label"]) == {"angry", "neutral"}
    excl = t["excluded"][t["excluded"]["source"] == "fer2013"]
    unmapped = excl[excl["stage"] == "label_mapping"]["raw_label"].value_counts()
    assert set(unmapped.index) == {"disgust", "fear", "happy", "sad", "surprise"}
    assert (excl["reason"].str.startswith("rejected: near-constant/blank")).sum() >= 1  # FER has blank frames
    assert set(kept["split_hint"].dropna()) <= {"train", "validation", "test"}
