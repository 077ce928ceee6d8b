"""Real Dagster materializations of the evaluation assets on a small generated dataset with a
planted source confound (Angry only from source ``b``) and a planted label flip (applied through
``relabels.csv``), with 1-epoch training: every asset materializes, the reports are consistent,
the confound check warns, and a re-run reuses the cached CV folds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from fer_pipeline.classes import CLASSES
from fer_pipeline.dataset.publish import publish_tables
from fer_pipeline.dataset.synthetic_faces import generate_demo_source
from fer_pipeline.definitions import defs
from fer_pipeline.defs.assets.evaluation import (
    EVALUATION_ASSETS,
    cross_source_generalisation,
)
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.ml.architectures import MAIN_MODEL
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import EXCLUDED_COLUMNS

pytestmark = pytest.mark.slow

DATA = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits"]
EVALUATION = [a.key.path[-1] for a in EVALUATION_ASSETS]
RUN_CONFIG = {"resources": {
    "training": {"config": {"epochs": 1, "patience": 0}},
    "analysis": {"config": {"cv_folds": 2, "min_group_size": 5, "mitigation": "oversample", "label_issue_grid": 8}},
}}


def build_sources(root: Path) -> str:
    """Two image-folder sources from one generated set; returns the planted flip's image id."""
    gen = root / "generated"
    generate_demo_source(gen, n_images=200, seed=5)
    defects = json.loads((gen / ".defects.json").read_text())
    tainted = {d["file"] for d in defects} | {d["source"] for d in defects if d["source"]}
    demo = pd.read_csv(gen / "demographics.csv", dtype=str)
    rows: dict[str, list[dict[str, str]]] = {"a": [], "b": []}
    neutral_in_b = 0
    for rec in demo.sort_values("file").to_dict("records"):
        if rec["file"] in tainted or not (gen / rec["file"]).is_file():
            continue
        label = rec["file"].split("/")[0]
        to_b = label == "Angry" or (label == "Neutral" and neutral_in_b < 8)
        neutral_in_b += label == "Neutral" and to_b
        name = "b" if to_b else "a"
        dest = root / "raw" / name / rec["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(gen / rec["file"], dest)
        rows[name].append(rec)
    for name, recs in rows.items():
        pd.DataFrame(recs).to_csv(root / "raw" / name / "demographics.csv", index=False)
    shutil.rmtree(gen)
    label_map = {c.lower(): c for c in CLASSES}
    demographics = {"csv": "demographics.csv", "key": "file", "columns": {"gender": "gender", "age_group": "age_group"}}
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": n, "kind": "image_folders", "path": f"raw/{n}", "label_map": label_map, "demographics": demographics}
        for n in ("a", "b")]}))
    flip = sorted((root / "raw" / "a" / "Focused").glob("*"))[3]
    flip_id = hashlib.sha256(flip.read_bytes()).hexdigest()[:16]
    (root / "relabels.csv").write_text(f"image_id,label,note\n{flip_id},Angry,planted flip for the test\n")
    return flip_id


def run(root: Path, selection: list[str], instance: dg.DagsterInstance):
    mp = pytest.MonkeyPatch()
    mp.setenv("FER_DATA_DIR", str(root))
    try:
        job = defs.resolve_implicit_global_asset_job_def()
        return job.execute_in_process(run_config=RUN_CONFIG, instance=instance, raise_on_error=False,
                                      asset_selection=[dg.AssetKey(k) for k in selection])
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def materialized(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("analysis")
    flip_id = build_sources(root)
    instance = dg.DagsterInstance.ephemeral()
    result = run(root, [*DATA, f"model_{MAIN_MODEL}", *EVALUATION], instance)
    return root, flip_id, result, instance


def _meta(result, key: str) -> dict:
    return next(e for e in result.get_asset_materialization_events()
                if e.asset_key.path[-1] == key).materialization.metadata


def test_every_evaluation_asset_materializes(materialized) -> None:
    _, _, result, _ = materialized
    assert result.success
    done = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert set(EVALUATION) <= done


def test_relabel_applied_and_recorded(materialized) -> None:
    root, flip_id, result, _ = materialized
    kept = pd.read_parquet(root / "manifest" / "manifest.parquet").set_index("image_id")
    assert kept.loc[flip_id, "label"] == "Angry" and kept.loc[flip_id, "relabelled_from"] == "Focused"
    assert kept["relabelled_from"].notna().sum() == 1
    assert _meta(result, "manifest")["relabels_applied"].value == 1


def test_cv_table_and_out_of_fold_predictions(materialized) -> None:
    root, _, result, _ = materialized
    table = pd.read_parquet(root / "reports" / "cv_folds.parquet")
    assert list(table["fold"]) == ["0", "1", "mean", "std"]
    for col in ("accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "micro_precision"):
        assert table.loc[2, col] == pytest.approx(table.loc[:1, col].mean())
    splits = pd.read_parquet(root / "manifest" / "splits.parquet")
    oof = pd.read_parquet(root / "reports" / "cv_oof.parquet")
    assert sorted(oof["image_id"]) == sorted(splits.loc[splits["split"] != "test", "image_id"])
    meta = _meta(result, "cross_validation")
    assert meta["folds_trained_this_run"].value == [0, 1] and "cv_folds.png" in meta["files"].value["plot"]
    assert (root / "reports" / "cv_folds.csv").is_file()


def test_bias_tables_add_up(materialized) -> None:
    root, _, result, _ = materialized
    bias = pd.read_csv(root / "reports" / "bias_report.csv")
    n_test = int((pd.read_parquet(root / "manifest" / "splits.parquet")["split"] == "test").sum())
    assert set(bias["attribute"]) == {"gender", "age_group"}
    assert (bias.groupby("attribute")["n"].sum() == n_test).all()
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert "bias_group_gap" in checks and (root / "reports" / "bias_macro_f1.png").stat().st_size > 1000


def test_planted_confound_trips_the_check(materialized) -> None:
    root, _, result, _ = materialized
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "source_confound_check")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "Angry" in check.metadata["confounded_classes"].value
    per_source = pd.read_csv(root / "reports" / "source_metrics.csv")
    assert set(per_source["source"]) == {"a", "b", "(all)"}


def test_mitigation_and_loso_reports(materialized) -> None:
    root, _, result, _ = materialized
    comparison = pd.read_csv(root / "reports" / "mitigation_comparison.csv")
    assert comparison.loc[0, "scope"] == "overall" and comparison["after_macro_f1"].notna().all()
    assert (root / "models" / f"{MAIN_MODEL}_mitigated.safetensors").is_file()
    assert _meta(result, "mitigated_model")["mode"].value == "oversample"
    loso = pd.read_csv(root / "reports" / "cross_source_generalisation.csv").set_index("held_out_source")
    assert list(loso["status"]) == ["evaluated", "evaluated"]
    assert loso.loc["b", "classes_held_out"] == "Neutral, Angry" and loso["in_domain_macro_f1"].notna().all()


def test_label_issue_ranking(materialized) -> None:
    root, flip_id, result, _ = materialized
    ranked = pd.read_csv(root / "reports" / "label_issues.csv")
    oof = pd.read_parquet(root / "reports" / "cv_oof.parquet")
    assert len(ranked) == len(oof) and ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    splits = pd.read_parquet(root / "manifest" / "splits.parquet").set_index("image_id")
    if splits.loc[flip_id, "split"] != "test":
        assert ranked.set_index("image_id").loc[flip_id, "given_label"] == "Angry"
    meta = _meta(result, "label_issues")
    assert meta["implementation"].value.startswith("cleanlab")
    assert "relabels.csv" in meta["how_to_relabel"].value
    assert (root / "reports" / "label_issues_top.png").stat().st_size > 1000
    assert list(pd.read_csv(root / "reports" / "relabels_suggested.csv").columns) == ["image_id", "label", "note"]


def test_rerun_reuses_cached_folds(materialized) -> None:
    root, _, _, instance = materialized
    again = run(root, ["cross_validation", "label_issues"], instance)
    assert again.success
    meta = _meta(again, "cross_validation")
    assert meta["folds_trained_this_run"].value == [] and meta["folds_from_cache"].value == [0, 1]


def test_one_source_loso_is_not_applicable_without_training(tmp_path: Path) -> None:
    """With a single source the asset trains nothing (and needs no faces or model)."""
    ids = [f"{i:016x}" for i in range(40)]
    manifest = pd.DataFrame({"image_id": ids, "source": "demo", "source_path": ids,
                             "label": [CLASSES[i % 4] for i in range(40)],
                             "face_path": "missing.npy#0"})
    splits = pd.DataFrame({"image_id": ids, "split": ["train", "train", "validation", "test"] * 10,
                           "fold": [0, 1, 2, -1] * 10})
    excluded = pd.DataFrame({c: pd.Series(dtype="object") for c in EXCLUDED_COLUMNS})
    publish_tables(DataPaths(tmp_path), manifest, excluded, splits)
    result = dg.materialize([cross_source_generalisation], resources={
        "fer": FerSettings(data_root=str(tmp_path)), "training": TrainSettings(), "analysis": AnalysisSettings()})
    assert result.success
    meta = _meta(result, "cross_source_generalisation")
    assert meta["status"].value == "not applicable: only one source (demo)"
    table = pd.read_csv(tmp_path / "reports" / "cross_source_generalisation.csv")
    assert table.loc[0, "status"] == "not applicable: only one source"
