"""Real Dagster materializations of the evaluation assets on a small generated dataset with a
planted source confound (Angry only from source ``b``) and a planted label flip (applied through
``relabels.csv``), with 1-epoch training, run the way ``python -m fer_pipeline.defs.refresh``
runs them: ``main``, one run per ``cv_fold`` and ``loso_fold`` partition, then the aggregates.
Every asset materializes, the partitions are recorded by Dagster, the reports are consistent,
the confound check warns, Dagster reports trained partitions fresh (and unsynced under another
recipe), and after the data changes the folds show as stale, declarative automation requests
them, and the aggregate refuses the folds of the old data."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleStatus,
)
from dagster._core.loader import LoadingContextForTest

from fer_pipeline.classes import CLASSES
from fer_pipeline.publish import publish_tables
from fer_pipeline.demo.synthetic_faces import generate_demo_source
from fer_pipeline.defs.assets.evaluation import cross_source_generalisation
from fer_pipeline.defs.definitions import build_definitions
from fer_pipeline.defs.jobs import CV_FOLDS_JOB, LOSO_FOLDS_JOB, MAIN_JOB, REPORTS_JOB
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.ml.architectures import MAIN_MODEL
from fer_pipeline.paths import DataPaths
from fer_pipeline.settings import Settings
from fer_pipeline.schema import EXCLUDED_COLUMNS

pytestmark = pytest.mark.slow

N_FOLDS = 2
DATA = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits"]
UNPARTITIONED = ["bias_report", "mitigated_model", "mitigation_comparison", "source_confound", "held_out_sources"]
AGGREGATES = ["cross_validation", "cross_source_generalisation", "label_issues"]
EVALUATION = [*UNPARTITIONED, "cv_fold", "loso_fold", *AGGREGATES]
# view_duplicates off: the re-cropped-copy rule, calibrated on real faces, links a few generated faces to
# one another (fer_pipeline_tests/dedup/test_views.py tests it; the demo turns it off for the same reason)
RUN_CONFIG = {"resources": {
    "fer": {"config": {"view_duplicates": False}},
    "training": {"config": {"epochs": 1, "patience": 0}},
    "analysis": {"config": {"min_group_size": 5, "mitigation": "oversample", "label_issue_grid": 8}},
}}
SOURCES = ["a", "b"]
DEFS = build_definitions(dg.in_process_executor, n_cv_folds=N_FOLDS, settings=Settings(), held_out=SOURCES)


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


@pytest.fixture(scope="module")
def data_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("analysis")
    flip_id = build_sources(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("FER_DATA_DIR", str(root))
    yield root, flip_id
    mp.undo()


def run(job: str, instance: dg.DagsterInstance, selection: list[str] | None = None, partition: str | None = None,
        config: dict | None = None, tags: dict[str, str] | None = None) -> dg.ExecuteInProcessResult:
    """One run of a job of the code location (a partition of a partitioned one)."""
    return DEFS.resolve_job_def(job).execute_in_process(
        run_config=config or RUN_CONFIG, instance=instance, raise_on_error=False, partition_key=partition,
        asset_selection=[dg.AssetKey(k) for k in selection] if selection else None, tags=tags)


@pytest.fixture(scope="module")
def materialized(data_env: tuple[Path, str]):
    root, flip_id = data_env
    instance = dg.DagsterInstance.ephemeral()
    results = [run(MAIN_JOB, instance, [*DATA, f"model_{MAIN_MODEL}", *UNPARTITIONED])]
    assert results[0].success
    results += [run(CV_FOLDS_JOB, instance, partition=str(k)) for k in range(N_FOLDS)]
    results += [run(LOSO_FOLDS_JOB, instance, partition=s) for s in SOURCES]
    results.append(run(REPORTS_JOB, instance, AGGREGATES))
    return root, flip_id, results, instance


def _meta(results, key: str) -> dict:
    return next(e for r in reversed(results) for e in r.get_asset_materialization_events()
                if e.asset_key.path[-1] == key).materialization.metadata


def _checks(results) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for r in results for e in r.get_asset_check_evaluations()}


def _stale(instance: dg.DagsterInstance, key: str, partition: str | None = None,
           defs: dg.Definitions = DEFS) -> StaleStatus:
    """What the UI shows as the asset's (partition's) status: fresh, stale or missing."""
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(dg.AssetKey(key), partition)


def test_every_evaluation_asset_materializes_and_partitions_are_recorded(materialized) -> None:
    _, _, results, instance = materialized
    assert all(r.success for r in results)
    done = {e.asset_key.path[-1] for r in results for e in r.get_asset_materialization_events()}
    assert set(EVALUATION) <= done
    assert DEFS.resolve_asset_graph().get(dg.AssetKey("loso_fold")).partitions_def.get_partition_keys() == SOURCES
    assert instance.get_materialized_partitions(dg.AssetKey("cv_fold")) == {"0", "1"}
    assert instance.get_materialized_partitions(dg.AssetKey("loso_fold")) == {"a", "b"}
    assert _stale(instance, "cv_fold", "1") == StaleStatus.FRESH and _stale(instance, "cross_validation") == \
        StaleStatus.FRESH


def test_relabel_applied_and_recorded(materialized) -> None:
    root, flip_id, results, _ = materialized
    kept = pd.read_parquet(root / "manifest" / "manifest.parquet").set_index("image_id")
    assert kept.loc[flip_id, "label"] == "Angry" and kept.loc[flip_id, "relabelled_from"] == "Focused"
    assert kept["relabelled_from"].notna().sum() == 1
    assert _meta(results, "manifest")["relabels_applied"].value == 1


def test_cv_table_and_out_of_fold_predictions(materialized) -> None:
    root, _, results, _ = materialized
    table = pd.read_parquet(root / "reports" / "cv_folds.parquet")
    assert list(table["fold"]) == ["0", "1", "mean", "std"]
    for col in ("accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "micro_precision"):
        assert table.loc[2, col] == pytest.approx(table.loc[:1, col].mean())
    fold_runs = {r.run_id for r in results if r.job_def.name == CV_FOLDS_JOB}
    assert set(table.loc[:1, "run_id"]) == fold_runs  # each fold from its partition's run
    splits = pd.read_parquet(root / "manifest" / "splits.parquet")
    oof = pd.read_parquet(root / "reports" / "cv_oof.parquet")
    assert sorted(oof["image_id"]) == sorted(splits.loc[splits["split"] != "test", "image_id"])
    meta = _meta(results, "cross_validation")
    assert meta["folds_run"].value == [0, 1] and meta["folds_missing"].value == []
    assert "cv_folds.png" in meta["files"].value["plot"] and (root / "reports" / "cv_folds.csv").is_file()
    assert _checks(results)["cv_folds_current"].passed
    fold = _meta(results, "cv_fold")
    assert fold["data_version"].value == meta["data_version"].value
    summary = json.loads((root / "reports" / "cv_summary.json").read_text())
    assert summary["n_cv_folds"] == N_FOLDS and summary["folds_refused"] == {}


def test_bias_tables_add_up(materialized) -> None:
    root, _, results, _ = materialized
    bias = pd.read_csv(root / "reports" / "bias_report.csv")
    n_test = int((pd.read_parquet(root / "manifest" / "splits.parquet")["split"] == "test").sum())
    assert set(bias["attribute"]) == {"gender", "age_group"}
    assert (bias.groupby("attribute")["n"].sum() == n_test).all()
    assert "bias_group_gap" in _checks(results) and (root / "reports" / "bias_macro_f1.png").stat().st_size > 1000


def test_planted_confound_trips_the_check(materialized) -> None:
    root, _, results, _ = materialized
    check = _checks(results)["source_confound_check"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "Angry" in check.metadata["confounded_classes"].value
    per_source = pd.read_csv(root / "reports" / "source_metrics.csv")
    assert set(per_source["source"]) == {"a", "b", "(all)"}


def test_mitigation_and_loso_reports(materialized) -> None:
    root, _, results, _ = materialized
    comparison = pd.read_csv(root / "reports" / "mitigation_comparison.csv")
    assert comparison.loc[0, "scope"] == "overall" and comparison["after_macro_f1"].notna().all()
    assert (root / "models" / f"{MAIN_MODEL}_mitigated.safetensors").is_file()
    assert _meta(results, "mitigated_model")["mode"].value == "oversample"
    loso = pd.read_csv(root / "reports" / "cross_source_generalisation.csv").set_index("held_out_source")
    assert list(loso["status"]) == ["evaluated", "evaluated"]
    assert loso.loc["b", "classes_held_out"] == "Neutral, Angry" and loso["in_domain_macro_f1"].notna().all()
    assert set(loso["run_id"]) == {r.run_id for r in results if r.job_def.name == LOSO_FOLDS_JOB}
    assert _checks(results)["loso_sources_current"].passed


def test_label_issue_ranking(materialized) -> None:
    root, flip_id, results, _ = materialized
    ranked = pd.read_csv(root / "reports" / "label_issues.csv")
    oof = pd.read_parquet(root / "reports" / "cv_oof.parquet")
    assert len(ranked) == len(oof) and ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    splits = pd.read_parquet(root / "manifest" / "splits.parquet").set_index("image_id")
    if splits.loc[flip_id, "split"] != "test":
        assert ranked.set_index("image_id").loc[flip_id, "given_label"] == "Angry"
    meta = _meta(results, "label_issues")
    assert meta["implementation"].value.startswith("cleanlab")
    assert "relabels.csv" in meta["how_to_relabel"].value
    assert (root / "reports" / "label_issues_top.png").stat().st_size > 1000
    assert list(pd.read_csv(root / "reports" / "relabels_suggested.csv").columns) == ["image_id", "label", "note"]


def test_shipped_model_from_validation_and_out_of_fold_estimates(materialized) -> None:
    """model_evaluation (best single model by validation) and shipped_model (single vs the CV fold
    ensemble, members calibrated out-of-fold) through real runs; shipped.json, metrics.json and
    the card agree, and predict's default is the shipped model."""
    from fer_pipeline.cli import default_model
    from fer_pipeline.ml.shipped import ShippedSpec, load_shipped

    root, _, _, instance = materialized
    evaluated = run(MAIN_JOB, instance, ["model_evaluation"])
    assert evaluated.success
    shipped_run = run(REPORTS_JOB, instance, ["shipped_model", "model_card"])
    assert shipped_run.success
    paths = DataPaths(root)
    report = json.loads(paths.metrics_json.read_text())
    assert report["selected_by"] == "validation macro-F1" and report["best_model"] == MAIN_MODEL  # the one trained
    assert 0.0 <= report["validation"][MAIN_MODEL]["macro_f1"] <= 1.0

    spec = ShippedSpec.read(paths.shipped_json)
    by_name = {c["name"]: c for c in spec.candidates}
    assert set(by_name) == {MAIN_MODEL, "cv_fold_ensemble"}  # both folds kept their model
    ens, single = by_name["cv_fold_ensemble"], by_name[MAIN_MODEL]
    assert single["estimate"] == pytest.approx(report["validation"][MAIN_MODEL]["macro_f1"])
    n_validation = int((pd.read_parquet(paths.splits)["split"] == "validation").sum())
    assert ens["oof_validation_images_n"] == n_validation  # judged on the single model's validation images
    assert ens["estimate"] == pytest.approx(ens["oof_validation_images_macro_f1"])
    winner = "cv_fold_ensemble" if ens["estimate"] > single["estimate"] else MAIN_MODEL
    assert spec.name == winner and by_name[winner]["shipped"]
    assert spec.selected_by == ("out-of-fold macro-F1 (cross-validation)" if winner != MAIN_MODEL
                                else "validation macro-F1")
    for c in spec.candidates:  # the test split reported for every candidate, after the choice
        assert 0.0 <= c["test"]["macro_f1"] <= 1.0
    assert single["test"]["macro_f1"] == pytest.approx(report["models"][MAIN_MODEL]["f1"]["macro"])

    # the members: each fold checkpoint carries the temperature its own held-out rows gave
    from fer_pipeline.ml.checkpoint import load_checkpoint

    for k in range(N_FOLDS):
        fold = json.loads((root / "reports" / "cv_fold_results" / f"fold_{k:02d}.json").read_text())
        member = load_checkpoint(paths.fold_checkpoint(k))
        assert member.temperature == pytest.approx(fold["calibration"]["temperature"])
        assert member.metadata["calibration"]["n"] == fold["n_test"]
        assert member.metadata["calibration"]["fitted_on"].startswith("out-of-fold")
    assert len(load_shipped(paths).members) == (N_FOLDS if winner != MAIN_MODEL else 1)

    chosen, origin = default_model(root)
    assert origin == str(paths.shipped_json)
    faces = np.random.default_rng(0).integers(0, 255, (3, 48, 48), dtype=np.uint8)
    np.testing.assert_allclose(chosen.predict_proba(faces), load_shipped(paths).model.predict_proba(faces))
    card = (root / "reports" / "model_card.md").read_text()
    assert f"# Model card: {winner}" in card and "## Model selection" in card and spec.selected_by in card


def test_trained_partitions_are_fresh_and_another_recipe_unsyncs_them(materialized) -> None:
    """Dagster's one definition of current: every partition trained is fresh; settings with another
    CV recipe change the folds' code version (unsynced), not the held-out sources' or the models'
    data."""
    _, _, _, instance = materialized
    for asset, keys in (("cv_fold", ["0", "1"]), ("loso_fold", SOURCES)):
        assert {_stale(instance, asset, k) for k in keys} == {StaleStatus.FRESH}
    other = build_definitions(dg.in_process_executor, n_cv_folds=N_FOLDS, held_out=SOURCES,
                              settings=Settings(sections={"analysis": {"cv_epochs": 2}}))
    assert {_stale(instance, "cv_fold", k, other) for k in ("0", "1")} == {StaleStatus.STALE}
    assert _stale(instance, f"model_{MAIN_MODEL}", None, other) == StaleStatus.FRESH
    assert _stale(instance, "splits", None, other) == StaleStatus.FRESH


def test_changed_data_makes_folds_stale_and_refused(materialized) -> None:
    """New splits (another seed): Dagster shows the folds as stale, the aggregate refuses folds
    of the old data, and with one fold retrained it uses that one and flags the other."""
    root, _, _, instance = materialized
    before = json.loads((root / "reports" / "cv_summary.json").read_text())["data_version"]
    quiet = dg.evaluate_automation_conditions(defs=DEFS, instance=instance)
    assert quiet.total_requested == 0  # everything is up to date: automation requests nothing
    reseed = {"resources": {**RUN_CONFIG["resources"], "fer": {"config": {"split_seed": 1, "view_duplicates": False}}}}
    assert run(MAIN_JOB, instance, ["splits"], config=reseed).success
    assert _stale(instance, "cv_fold", "0") == StaleStatus.STALE == _stale(instance, "cv_fold", "1")
    # declarative automation sees the new data version and requests what depends on it
    woke = dg.evaluate_automation_conditions(defs=DEFS, instance=instance, cursor=quiet.cursor)
    requested = {r.key.to_user_string() for r in woke.results if r.true_subset.size}
    assert {f"model_{MAIN_MODEL}", "pretrained_backbone", "held_out_sources", "bias_report"} <= requested
    assert not requested & {"raw_sources", "splits"}  # the data half is the sources sensor's
    # the folds' other input, the backbone, was never built here: they wait for it, then follow
    assert not requested & {"cv_fold", "loso_fold"}
    assert run(MAIN_JOB, instance, ["pretrained_backbone"]).success
    then = dg.evaluate_automation_conditions(defs=DEFS, instance=instance, cursor=woke.cursor)
    assert {"cv_fold", "loso_fold"} <= {r.key.to_user_string() for r in then.results if r.true_subset.size}
    refused = run(REPORTS_JOB, instance, ["cross_validation"])
    assert not refused.success
    failure = next(e for e in refused.all_events if e.is_step_failure).step_failure_data.user_failure_data
    assert "no fold of the 2-fold cross-validation is materialized for the published data" in failure.description
    assert json.loads((root / "reports" / "cv_summary.json").read_text())["data_version"] == before  # untouched
    assert run(CV_FOLDS_JOB, instance, partition="0").success
    assert _stale(instance, "cv_fold", "0") == StaleStatus.FRESH and _stale(instance, "cv_fold", "1") == \
        StaleStatus.STALE
    partial = run(REPORTS_JOB, instance, ["cross_validation"])
    assert partial.success
    meta = _meta([partial], "cross_validation")
    assert meta["folds_run"].value == [0] and meta["data_version"].value != before
    assert meta["folds_refused"].value == {"1": f"trained on data version {before}, the published data is "
                                                 f"{meta['data_version'].value}"}
    check = _checks([partial])["cv_folds_current"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN


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
    meta = _meta([result], "cross_source_generalisation")
    assert meta["status"].value == "not applicable: only one source (demo)"
    table = pd.read_csv(tmp_path / "reports" / "cross_source_generalisation.csv")
    assert table.loc[0, "status"] == "not applicable: only one source"
