"""The model card through a real Dagster materialization on a tiny two-source dataset (one source
declares a licence, the other does not): every section is there, and its numbers are those of
the published outputs (metrics.json, test_predictions.parquet, the manifest, the analysis
reports), read back here, never literals. Evaluation's calibration outputs are checked on the
way (metrics.json / metrics.csv extras, reliability diagrams). Cross-validation and
leave-one-source-out are not materialized, so the card must say "not run"; the cross-validation
section is then checked against a table in the published layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from fer_pipeline.analysis.model_card import (
    AI_ACT,
    NOT_DECLARED,
    NOT_RUN,
    SECTIONS,
    build_model_card,
)
from fer_pipeline.classes import CLASSES
from fer_pipeline.sources.catalog import CatalogError, load_catalog, parse_catalog
from fer_pipeline.definitions import defs
from fer_pipeline.defs.assets.card import CARD_INPUTS
from fer_pipeline.ml.calibration import expected_calibration_error
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.ml.evaluate import bootstrap_intervals
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import TEST_PREDICTION_COLUMNS, MetricsReport

LICENCE = "CC BY-NC 4.0 (test fixture)"
SELECTION = ["raw_sources", "faces", "deduplicated_faces", "manifest", "splits", "model_cnn4", "model_cnn3",
             "model_cnn4_k5", "model_evaluation", "bias_report", "source_confound", "model_card"]
RUN_CONFIG = {"resources": {"training": {"config": {"epochs": 1, "patience": 0}},
                            "analysis": {"config": {"min_group_size": 5}}}}
OLD_METRICS_COLUMNS = ["model", "accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "n",
                       "is_best"]


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("card")
    (root / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "licensed", "kind": "synthetic", "path": "raw/a", "n_images": 130, "seed": 11, "licence": LICENCE},
        {"name": "unlicensed", "kind": "synthetic", "path": "raw/b", "n_images": 130, "seed": 12}]}))
    mp = pytest.MonkeyPatch()
    mp.setenv("FER_DATA_DIR", str(root))
    try:
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            run_config=RUN_CONFIG, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
            asset_selection=[dg.AssetKey(k) for k in SELECTION])
    finally:
        mp.undo()
    paths = DataPaths(root)
    text = paths.report("model_card").read_text(encoding="utf-8") if result.success else ""
    return paths, result, text


def section(text: str, title: str) -> str:
    """The body of one ``## title`` section."""
    parts = re.split(r"^## ", text, flags=re.M)
    return next(p for p in parts if p.startswith(title + "\n"))


def row(body: str, first_cell: str) -> str:
    """The markdown table row whose first cell starts with ``first_cell``."""
    return next(line for line in body.splitlines() if line.startswith(f"| {first_cell}"))


@pytest.mark.slow
def test_card_materializes_and_is_shown_in_the_ui(card) -> None:
    paths, result, text = card
    assert result.success
    meta = next(e for e in result.get_asset_materialization_events()
                if e.asset_key.path[-1] == "model_card").materialization.metadata
    assert meta["model_card"].value == text  # the markdown itself, in the UI
    assert meta["path"].value == str(paths.report("model_card"))
    assert not list(paths.reports_dir.glob(".*.tmp"))  # written atomically
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    assert titles == list(SECTIONS)


@pytest.mark.slow
def test_intended_use_says_the_eu_prohibition_plainly(card) -> None:
    _, _, text = card
    body = section(text, "Out-of-scope and prohibited uses")
    assert AI_ACT in body and "2 February 2025" in body and "Article 5(1)(f)" in body
    assert "workplace" in body and "education" in body and "medical or safety" in body


@pytest.mark.slow
def test_sources_with_counts_and_licences(card) -> None:
    paths, _, text = card
    body = section(text, "Training data")
    kept = pd.read_parquet(paths.manifest)
    excluded = pd.read_parquet(paths.excluded)
    for name, licence in (("licensed", LICENCE), ("unlicensed", NOT_DECLARED)):
        cells = [c.strip() for c in row(body, name).strip("|").split("|")]
        assert cells[2] == licence
        assert int(cells[3]) == int((kept["source"] == name).sum()) > 0
        assert int(cells[-1]) == int((excluded["source"] == name).sum())
    total = [c.strip() for c in row(body, "**all**").strip("|").split("|")]
    assert int(total[3]) == len(kept) and int(total[-1]) == len(excluded)
    assert "Synthetic data" in body


@pytest.mark.slow
def test_test_metrics_and_intervals_come_from_the_published_predictions(card) -> None:
    paths, _, text = card
    report = MetricsReport.read(paths.metrics_json)
    preds = pd.read_parquet(paths.report("test_predictions"))
    assert list(preds.columns) == [*TEST_PREDICTION_COLUMNS, *[f"p_{c}" for c in CLASSES]]
    body = section(text, "Test results")
    index = {c: i for i, c in enumerate(CLASSES)}
    for name, m in report.models.items():
        mine = preds[preds["model"] == name]
        assert len(mine) == report.n_test and mine["correct"].mean() == pytest.approx(m["accuracy"])
        ci = bootstrap_intervals(mine["true"].map(index), mine["predicted"].map(index), len(CLASSES))
        line = row(body, f"**{name}** (best)" if name == report.best_model else name)
        assert f"| {m['accuracy']:.3f} | [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}] |" in line
        assert f"| {m['f1']['macro']:.3f} | [{ci['macro_f1'][0]:.3f}, {ci['macro_f1'][1]:.3f}] |" in line
        assert ci["macro_f1"][0] <= ci["macro_f1"][1]
    assert f"{report.n_test} images" in body


@pytest.mark.slow
def test_calibration_in_metrics_and_card(card) -> None:
    paths, _, text = card
    report = MetricsReport.read(paths.metrics_json)
    preds = pd.read_parquet(paths.report("test_predictions"))
    table = pd.read_csv(paths.report("metrics_csv"))
    assert list(table.columns[: len(OLD_METRICS_COLUMNS)]) == OLD_METRICS_COLUMNS  # existing columns untouched
    body = section(text, "Calibration")
    for name, cal in report.calibration.items():
        ckpt = read_checkpoint_metadata(paths.checkpoint(name))["calibration"]
        assert cal["temperature"] == ckpt["temperature"] and cal["recorded"] and cal["fitted_on"] == "validation"
        mine = preds[preds["model"] == name]
        probs = mine[[f"p_{c}" for c in CLASSES]].to_numpy()
        labels = mine["true"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
        assert expected_calibration_error(probs, labels) == pytest.approx(cal["ece_after"])
        csv_row = table.set_index("model").loc[name]
        assert csv_row["ece"] == pytest.approx(cal["ece_before"]) and csv_row["temperature"] == pytest.approx(
            cal["temperature"])
        fitted = f"{ckpt['n']}" + (" (T at the search bound)" if ckpt["at_bound"] else "")
        assert (f"| {name} | {cal['temperature']:.3f} | {fitted} | {cal['ece_before']:.3f} | "
                f"{cal['ece_after']:.3f} |") in body
        assert paths.reliability(name).stat().st_size > 1000


@pytest.mark.slow
def test_groups_confound_and_what_was_not_run(card) -> None:
    paths, _, text = card
    bias = pd.read_csv(paths.report("bias_report").with_suffix(".csv"))
    groups = section(text, "Per-group results")
    assert len(bias)
    for _, r in bias.iterrows():
        assert (f"| {r['attribute']} | {r['group']} | {int(r['n'])} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                f"{r['macro_f1_gap_pts']:+.1f} | {r['status']} |") in groups
    per_source = pd.read_csv(paths.report("source_metrics"))
    confound = section(text, "Source confound")
    for _, r in per_source.iterrows():
        assert f"| {r['source']} | {int(r['n'])} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |" in confound
    for title, asset in (("Cross-validation", "cross_validation"),
                         ("Leave-one-source-out", "cross_source_generalisation")):
        assert section(text, title).strip() == f"{title}\n\n{NOT_RUN} (materialize `{asset}`)."
    limitations = section(text, "Known limitations")
    assert "Not run, so not known: cross-validation, leave-one-source-out" in limitations and "synthetic" in limitations


@pytest.mark.slow
def test_cross_validation_numbers_come_from_its_table(card, tmp_path: Path) -> None:
    """A cross-validation table in the layout the asset publishes (fold rows, then mean and std)
    beside the run's outputs: the card quotes its mean ± std and counts its folds."""
    paths, _, _ = card
    root = tmp_path / "root"
    shutil.copytree(paths.root, root, ignore=shutil.ignore_patterns("raw", "faces"))
    copy = DataPaths(root)
    scores = pd.DataFrame({"fold": ["0", "1", "2"], "accuracy": [0.5, 0.6, 0.7], "macro_f1": [0.41, 0.52, 0.66]})
    stats = pd.DataFrame({"fold": ["mean", "std"], "accuracy": [0.6, 0.0816], "macro_f1": [0.53, 0.1028]})
    pd.concat([scores, stats]).to_parquet(copy.report("cv_folds").with_suffix(".parquet"))
    card_text = build_model_card(copy, load_catalog(copy.catalog, root)).markdown
    assert "3 folds" in section(card_text, "Cross-validation") and "0.530 ± 0.103" in card_text


def test_card_lineage_names_real_assets() -> None:
    """The card's upstream assets are named by key: each must be an asset of the code location."""
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(CARD_INPUTS) <= keys and "model_card" in keys
    parents = defs.resolve_asset_graph().get(dg.AssetKey("model_card")).parent_keys
    assert {k.to_user_string() for k in parents} == set(CARD_INPUTS)


def test_licence_must_be_text() -> None:
    base = {"name": "s", "kind": "synthetic", "path": "raw/s"}
    assert parse_catalog({"sources": [base]}, Path(".")).sources[0].licence is None
    assert parse_catalog({"sources": [{**base, "licence": " MIT "}]}, Path(".")).sources[0].licence == "MIT"
    for bad in (5, "", ["MIT"]):
        with pytest.raises(CatalogError, match="source 's', field 'licence'"):
            parse_catalog({"sources": [{**base, "licence": bad}]}, Path("."))


def test_demo_catalogue_declares_its_licence() -> None:
    from fer_pipeline.paths import REPO_ROOT

    catalog = load_catalog(REPO_ROOT / "data" / "sources.yaml")
    assert all(s.licence for s in catalog.sources if s.kind == "synthetic")


def test_metrics_report_reads_calibration_and_old_files(tmp_path: Path) -> None:
    """metrics.json written before calibration existed still reads (no calibration key)."""
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"best_model": "cnn4", "models": {}}))
    assert MetricsReport.read(path).calibration == {}
    path.write_text(json.dumps({"best_model": "cnn4", "calibration": {"cnn4": {"temperature": 1.5}}}))
    assert MetricsReport.read(path).calibration["cnn4"]["temperature"] == 1.5
    assert np.isfinite(MetricsReport.read(path).calibration["cnn4"]["temperature"])
