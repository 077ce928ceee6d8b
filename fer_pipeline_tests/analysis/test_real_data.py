"""Evaluation logic on real, partially annotated data (../shared/datasets; skipped when absent):
the data half runs on three hand-assembled sources, then the confound, bias and
leave-one-source-out logic is checked on the real manifest and splits with given predictions
(no training)."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from fer_pipeline.analysis.bias import STATUS_UNKNOWN, bias_report
from fer_pipeline.analysis.confound import confound_findings
from fer_pipeline.analysis.generalisation import eligibility
from fer_pipeline.classes import CLASS_TO_INDEX
from fer_pipeline.definitions import defs
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline_tests.conftest import shared_dataset

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

CATALOGUE = """
sources:
  - name: affectnet4
    kind: image_folders
    path: raw/affectnet-4class.zip
    label_map: {Anger: Angry, Bored_Tired: Tired, Focused_Engaged: Focused, Neutral: Neutral}
  - name: engaged
    kind: image_folders
    path: raw/engaged-neutral-demographics.zip
    label_map: {engaged: Focused, neutral: Neutral}
    demographics: {csv: "COMP472Age_Gender_Labels/*.csv", key: Image, columns: {gender: Gender, age_group: Age}}
  - name: race
    kind: image_folders
    path: raw/expressions-race.zip
    label_map: {Angry: Angry, Focused: Focused, Neutral: Neutral}
    demographics: {csv: DataAnnotations.csv, key: Path, columns: {gender: Gender, race: Race}}
"""


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("real_eval")
    (root / "raw").mkdir()
    for name in ("affectnet-4class.zip", "engaged-neutral-demographics.zip", "expressions-race.zip"):
        (root / "raw" / name).symlink_to(shared_dataset(name))
    (root / "sources.yaml").write_text(CATALOGUE)
    mp = pytest.MonkeyPatch()
    mp.setenv("FER_DATA_DIR", str(root))
    try:
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
                                        asset_selection=[dg.AssetKey(k) for k in
                                                         ("raw_sources", "faces", "deduplicated_faces", "manifest",
                                                          "splits")])
    finally:
        mp.undo()
    assert result.success
    kept = pd.read_parquet(root / "manifest" / "manifest.parquet")
    splits = pd.read_parquet(root / "manifest" / "splits.parquet")
    return kept.merge(splits, on="image_id")


def test_tired_only_from_affectnet_is_a_confound(real) -> None:
    findings = confound_findings(real, 0.9).set_index("label")
    assert "Tired" in findings.index and findings.loc["Tired", "source"] == "affectnet4"
    assert findings.loc["Tired", "share"] == 1.0


def test_bias_with_partial_demographics(real) -> None:
    test = real[real["split"] == "test"].reset_index(drop=True)
    y = test["label"].map(CLASS_TO_INDEX).to_numpy()
    pred = np.where(np.arange(len(y)) % 5 == 0, (y + 1) % 4, y)  # 80% right
    report = bias_report(test, y, pred, min_group_size=30)
    assert {"gender", "age_group", "race"} <= set(report.tables)
    cov = report.coverage.set_index("attribute")
    assert 0 < cov.loc["race", "coverage"] < 0.3  # race for a subset of one source only
    for attr, table in report.tables.items():
        assert table["n"].sum() == len(test), attr
        assert table.set_index("group").loc["unknown", "status"] == STATUS_UNKNOWN
    assert set(report.tables["race"]["group"]) <= {"white", "black", "asian", "unknown", "White", "Black", "Asian"}


def test_every_source_is_eligible_for_leave_one_source_out(real) -> None:
    arrays = {}
    for name in ("train", "validation", "test"):
        part = real[real["split"] == name].reset_index(drop=True)
        arrays[name] = SplitArrays(np.zeros((len(part), 1, 1), np.uint8),
                                   part["label"].map(CLASS_TO_INDEX).to_numpy(), list(part["image_id"]), part)
    status = eligibility(arrays)
    assert status == {"affectnet4": "eligible", "engaged": "eligible", "race": "eligible"}
