"""The shipped model asset: which model ``fer-pipeline predict`` uses by default, chosen without
the test split (:mod:`fer_pipeline.analysis.shipping`), written as ``models/shipped.json``.
Lineage in the UI::

    model_evaluation (best single model by validation) ──┐
    cv_fold ──► cross_validation (fold models, OOF) ─────┴──► shipped_model ──► model_card

Downstream of the fold partitions, so it runs in ``training_reports``."""

import dagster as dg

from fer_pipeline.analysis.cross_validation import FoldStore, collect_folds
from fer_pipeline.analysis.recipes import cv_recipe, main_start
from fer_pipeline.analysis.shipping import (
    ENSEMBLE_NAME,
    Candidate,
    decide,
    ensemble_test_scores,
    fold_members,
    oof_scores,
    shipped_spec,
    single_candidate,
    single_test_scores,
)
from fer_pipeline.atomic import write_json
from fer_pipeline.defs.assets.cross_validation import cv_config
from fer_pipeline.defs.assets.inputs import load_data
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.ml.shipped import ENSEMBLE, EnsembleModel, load_members, load_shipped
from fer_pipeline.schema import MetricsReport

GROUP = "models"


def build_shipped_asset(n_cv_folds: int) -> dg.AssetsDefinition:
    """``shipped_model`` for a ``n_cv_folds``-fold cross-validation (its members' count)."""

    @fer_asset(name="shipped_model", group_name=GROUP,
               deps=[dg.AssetKey("model_evaluation"), dg.AssetKey("cross_validation")],
               description="The model predict uses by default (models/shipped.json): the best single model by "
                           "validation macro-F1, or the CV fold ensemble (members calibrated out-of-fold) when "
                           "its out-of-fold macro-F1 on the validation images is higher. The test split is read "
                           "after the choice, to report.")
    def shipped_model(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                      analysis: AnalysisSettings) -> dg.MaterializeResult:
        paths = fer.paths
        report = MetricsReport.read(paths.metrics_json)
        _, _, arrays, version = load_data(fer, ("validation", "test"))
        single = single_candidate(report, paths)
        recipe = cv_recipe(version, cv_config(training, analysis), n_cv_folds,
                           main_start(paths, training.init, with_weights=False))
        collected = collect_folds(FoldStore(paths.report("cv_fold_results")), recipe)
        members, unavailable = fold_members(paths, collected, {f: recipe.identity(f) for f in range(n_cv_folds)},
                                            n_cv_folds)
        ensemble = None
        if members:
            oof = oof_scores(collected.used, set(arrays["validation"].image_ids))
            ensemble = Candidate(ENSEMBLE_NAME, ENSEMBLE, oof["oof_validation_images_macro_f1"],
                                 f"out-of-fold predictions on the validation images "
                                 f"({oof['oof_validation_images_n']} images)", members, oof)
        decision = decide(single, ensemble, unavailable)  # no test image has been read for this
        context.log.info(f"shipped: {decision.chosen.name} ({decision.selected_by}): {decision.reason}")
        for note in decision.notes:
            context.log.warning(note)
        # the test split, once, to report
        test = {single.name: single_test_scores(report, single.name)}
        if ensemble is not None:
            model = EnsembleModel.of(load_members(members, paths, version, "the fold ensemble"), ENSEMBLE_NAME)
            test[ENSEMBLE_NAME] = ensemble_test_scores(model, arrays["test"])
        spec = shipped_spec(decision, test, version)
        write_json(paths.shipped_json, spec.to_json())
        load_shipped(paths)  # what predict will load: refuses a record its members do not match
        chosen_test = spec.scores["test"]
        return dg.MaterializeResult(
            data_version=dg.DataVersion(f"{spec.kind}:{spec.name}:{version}:"
                                        + ",".join(f"{m.checkpoint}@{m.temperature:.6g}" for m in spec.members)),
            metadata={
                "shipped": spec.name, "kind": spec.kind, "selected_by": spec.selected_by, "reason": decision.reason,
                "selection_macro_f1": round(decision.chosen.estimate, 4),
                "test_macro_f1": round(float(chosen_test["macro_f1"]), 4) if chosen_test.get("macro_f1") is not None
                else None,
                "members": len(spec.members), "data_version": version,
                "candidates": dg.MetadataValue.json(spec.candidates),
                "notes": dg.MetadataValue.json(spec.notes),
                "shipped_json": dg.MetadataValue.path(str(paths.shipped_json)),
            })

    return shipped_model
