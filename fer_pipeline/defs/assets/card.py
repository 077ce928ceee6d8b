"""The model card asset: ``reports/model_card.md`` generated from what the model and analysis
assets published (:mod:`fer_pipeline.analysis.model_card`), shown in the UI as markdown.

Its upstream assets are named by key, so the card follows them wherever they are defined; an
analysis that has not been materialized appears in the card as "not run"."""

import dagster as dg

from fer_pipeline.analysis.model_card import build_model_card, write_model_card
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings
from fer_pipeline.defs.settings import fer_asset

CARD_INPUTS = ("manifest", "splits", "model_evaluation", "shipped_model", "cross_validation", "bias_report", "source_confound",
               "cross_source_generalisation")
"""The assets whose outputs the card reads (lineage in the UI)."""


@fer_asset(group_name="evaluation", deps=[dg.AssetKey(k) for k in CARD_INPUTS],
          description="Model card (reports/model_card.md): intended and prohibited uses (EU AI Act Art. 5(1)(f)), "
                      "data sources with counts and licences, test metrics with 95% bootstrap intervals, "
                      "calibration, cross-validation, per-group, confound and leave-one-source-out findings, "
                      "limitations. Generated from the published outputs only.")
def model_card(context: dg.AssetExecutionContext, fer: FerSettings, analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    catalog = fer.catalog() if paths.catalog.is_file() else None  # a broken catalogue fails naming the field
    card = build_model_card(paths, catalog, confound_max_share=analysis.confound_max_share)
    path = write_model_card(paths, card)
    for warning in card.warnings:
        context.log.warning(warning)
    facts = card.facts
    return dg.MaterializeResult(metadata={
        "model_card": dg.MetadataValue.md(card.markdown),
        "path": dg.MetadataValue.path(str(path)),
        "best_model": facts["best_model"],
        "selected_by": facts["selected_by"],
        "shipped": dg.MetadataValue.json(facts["shipped"] or {}),
        "test_macro_f1": facts["test_macro_f1"],
        "test_macro_f1_ci95": dg.MetadataValue.json(facts["test_macro_f1_ci"]),
        "temperature": facts["temperature"],
        "ece_before": facts["ece_before"],
        "ece_after": facts["ece_after"],
        "licences": dg.MetadataValue.json(facts["licences"]),
        "not_run": facts["not_run"],
        "data_version": facts["data_version"],
    })
