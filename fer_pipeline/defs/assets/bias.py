"""Is the main model fair, and does balancing help? ``bias_report`` (test metrics per demographic
group), ``mitigated_model`` and ``mitigation_comparison`` (reweighting or oversampling the
smallest groups, compared before and after), and ``source_confound`` (a class taken mostly from
one source lets a model learn the source instead of the face). Lineage in the UI::

    model_<main> ──► bias_report, source_confound, mitigation_comparison
    splits ──► mitigated_model ──► mitigation_comparison
"""


import dagster as dg
import numpy as np
import pandas as pd

from fer_pipeline.analysis import bias as bias_core
from fer_pipeline.analysis import confound as confound_core
from fer_pipeline.analysis import plots as aplots
from fer_pipeline.analysis.mitigation import (
    HOW_TO_ENABLE,
    STATUS_OFF,
    comparison_table,
    describe_mitigated,
    same_recipe,
    train_mitigated_model,
)
from fer_pipeline.analysis.recipes import main_start
from fer_pipeline.atomic import write_csv, write_table
from fer_pipeline.defs.assets.data import manifest, splits
from fer_pipeline.defs.assets.inputs import (
    GROUP,
    MAIN_MODEL_ASSET,
    MITIGATED_NAME,
    load_data,
    main_test_predictions,
    rounded,
    warn_stale,
)
from fer_pipeline.defs.assets.pretrain import pretrained_backbone
from fer_pipeline.defs.metadata import md_image, md_table
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL
from fer_pipeline.ml.evaluate import evaluate_checkpoint


@fer_asset(group_name=GROUP, deps=[MAIN_MODEL_ASSET, manifest, splits],
          description=f"Test metrics of the main model ({MAIN_MODEL}) per demographic group (gender, age group, "
                      "race): n, accuracy, macro precision/recall/F1, gap to the overall; coverage; small groups "
                      "marked, not hidden.",
          check_specs=[dg.AssetCheckSpec("bias_group_gap", asset="bias_report",
                                         description="Warn when a judged group's test macro-F1 is more than "
                                                     "analysis.max_group_gap_points below the overall.")])
def bias_report(context: dg.AssetExecutionContext, fer: FerSettings, analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    _, _, arrays, version = load_data(fer, ("test",))
    test = arrays["test"]
    ev = main_test_predictions(context, fer, arrays, version)
    report = bias_core.bias_report(test.frame, test.labels, ev.y_pred, attributes=analysis.bias_attributes,
                                   min_group_size=analysis.min_group_size,
                                   max_gap_points=analysis.max_group_gap_points)
    files = write_table(paths.report("bias_report"), report.long_table)
    files["coverage"] = str(write_csv(paths.report("bias_coverage"), report.coverage))
    for attr, t in report.tables.items():
        files[attr] = str(write_csv(paths.bias_table(attr), t))
    png = aplots.plot_bias(report.tables, report.overall["macro_f1"], paths.report("bias_macro_f1"),
                           analysis.max_group_gap_points, title=f"{MAIN_MODEL}: test macro-F1 by group")
    metadata: dict[str, object] = {
        "overall": dg.MetadataValue.json({k: round(float(v), 4) for k, v in report.overall.items()}),
        "coverage": md_table(rounded(report.coverage)),
        "plot": md_image(png, "macro-F1 by group"),
        "attributes_absent": report.absent,
        "min_group_size": analysis.min_group_size,
        "max_group_gap_points": analysis.max_group_gap_points,
        "n_test": len(test),
        "model": MAIN_MODEL,
        "data_version": version,
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
    }
    for attr, t in report.tables.items():
        metadata[f"by_{attr}"] = md_table(rounded(t.drop(columns=["attribute"])))
    flagged = report.flagged
    for _, r in flagged.iterrows():
        context.log.warning(f"bias: {r['attribute']}={r['group']} (n={r['n']}) macro-F1 {r['macro_f1']:.3f} is "
                            f"{-r['macro_f1_gap_pts']:.1f} points below the overall {report.overall['macro_f1']:.3f}")
    small = report.long_table[report.long_table["status"] == bias_core.STATUS_SMALL]
    return dg.MaterializeResult(metadata=metadata, check_results=[dg.AssetCheckResult(
        check_name="bias_group_gap", passed=flagged.empty, severity=dg.AssetCheckSeverity.WARN,
        metadata={"overall_macro_f1": round(report.overall["macro_f1"], 4),
                  "max_gap_points": analysis.max_group_gap_points,
                  "groups_below": md_table(rounded(flagged[["attribute", "group", "n", "macro_f1", "macro_f1_gap_pts"]])),
                  "groups_too_small_to_judge": [f"{a}={g} (n={n})" for a, g, n in
                                                zip(small["attribute"], small["group"], small["n"])]})])


# --------------------------------------------------------------------------------------------
# mitigation
# --------------------------------------------------------------------------------------------


@fer_asset(group_name=GROUP, deps=[manifest, splits, pretrained_backbone],
          description=f"The main model ({MAIN_MODEL}) retrained with the same recipe on a training set balanced "
                      "by demographic group (analysis.mitigation: oversample / reweight / both; off = skipped).")
def mitigated_model(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                    analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    needs_data = analysis.mitigation != "off"
    _, _, arrays, version = load_data(fer, ("train", "validation")) if needs_data else (None, None, {}, "")
    outcome = train_mitigated_model(
        arrays, mode=analysis.mitigation, attribute=analysis.mitigation_attribute,
        attributes=analysis.bias_attributes, min_share=analysis.mitigation_min_share, arch=ARCHITECTURES[MAIN_MODEL],
        config=analysis.recipe(training, analysis.mitigation_epochs), paths=paths, data_version=version,
        preprocess=fer.preprocess, name=MITIGATED_NAME, log=context.log.info,
        start=main_start(fer.paths, training.init) if needs_data else None)
    if outcome.trained is None:
        if outcome.status == STATUS_OFF:
            context.log.info(f"mitigation is off: no model trained; to turn it on, {HOW_TO_ENABLE}")
            return dg.MaterializeResult(metadata={"status": outcome.status, "how_to_enable": HOW_TO_ENABLE})
        context.log.warning(f"mitigation {outcome.status}")
        return dg.MaterializeResult(metadata={"status": outcome.status})
    plan, trained = outcome.plan, outcome.trained
    if not trained.published:
        context.log.error(f"{MITIGATED_NAME} has NaN/inf weights ({', '.join(trained.bad_tensors)}): not "
                          f"published; the rejected checkpoint is at {trained.checkpoint}")
    write_csv(paths.report("mitigation_plan"), plan.shares)
    r = trained.result
    return dg.MaterializeResult(metadata={
        "status": outcome.status,
        "mode": plan.mode, "attribute": plan.attribute, "min_share": analysis.mitigation_min_share,
        "groups": md_table(rounded(plan.shares)),
        "training_rows": len(plan.rows), "original_training_rows": outcome.original_rows,
        "checkpoint": dg.MetadataValue.path(str(trained.checkpoint)),
        "published": trained.published,
        "val_macro_f1": round(trained.validation.macro_f1, 4), "val_accuracy": round(trained.validation.accuracy, 4),
        "best_epoch": r.best_epoch, "epochs_run": len(r.history),
        "train_seconds": round(r.train_seconds, 1),
        "curves": md_image(trained.curves_png, f"{MITIGATED_NAME} curves"),
        "data_version": version,
    })


@fer_asset(group_name=GROUP, deps=[mitigated_model, MAIN_MODEL_ASSET, splits],
          description="Before/after table: the main model and the mitigated model on the test split, overall "
                      "and per demographic group, side by side (reports/mitigation_comparison.csv).")
def mitigation_comparison(context: dg.AssetExecutionContext, fer: FerSettings,
                          analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    _, _, arrays, version = load_data(fer, ("test",))
    test = arrays["test"]
    before = main_test_predictions(context, fer, arrays, version)
    ckpt = paths.checkpoint(MITIGATED_NAME)
    after = evaluate_checkpoint(ckpt, test) if analysis.mitigation != "off" and ckpt.is_file() else None
    status, attribute = describe_mitigated(analysis.mitigation, after.loaded.metadata if after else None)
    like_for_like = None
    if after is not None:
        warn_stale(context, MITIGATED_NAME, after.trained_on, version, "mitigated_model")
        like_for_like = same_recipe(before.loaded.metadata, after.loaded.metadata)
        if not like_for_like:
            context.log.warning(f"{MAIN_MODEL} and {MITIGATED_NAME} differ in architecture or training recipe "
                                "(beyond the mitigation): re-materialize both for a like-for-like comparison")
    table = comparison_table(test.frame, test.labels, before.y_pred, after.y_pred if after else None,
                             analysis.bias_attributes)
    table.insert(0, "status", status)
    files = write_table(paths.report("mitigation_comparison"), table)
    png = aplots.plot_mitigation(table, paths.report("mitigation_comparison_png"),
                                 title=f"Test macro-F1 before ({MAIN_MODEL}) / after ({MITIGATED_NAME})")
    overall = table.iloc[0]
    focus = table[table["scope"] == attribute] if attribute else table.iloc[0:0]
    worst_before = focus["before_macro_f1"].min() if len(focus) else np.nan
    worst_after = focus["after_macro_f1"].min() if len(focus) else np.nan
    return dg.MaterializeResult(metadata={
        "status": status,
        "comparison": md_table(rounded(table.drop(columns=["status"])), 40),
        "overall_macro_f1_before": float(overall["before_macro_f1"]),
        "overall_macro_f1_after": float(overall["after_macro_f1"]) if after is not None else None,
        "worst_group_macro_f1_before": None if np.isnan(worst_before) else float(worst_before),
        "worst_group_macro_f1_after": None if np.isnan(worst_after) else float(worst_after),
        "same_architecture_and_recipe": like_for_like,
        "plot": md_image(png, "before/after"),
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
        "data_version": version,
    })


# --------------------------------------------------------------------------------------------
# source confound
# --------------------------------------------------------------------------------------------


@fer_asset(group_name=GROUP, deps=[manifest, splits, MAIN_MODEL_ASSET],
          description="Per class, the share of each source (a class taken mostly from one source lets a model "
                      "learn the source instead of the face), with the main model's test metrics per source.",
          check_specs=[dg.AssetCheckSpec("source_confound_check", asset="source_confound",
                                         description="Warn when a class comes more than "
                                                     "analysis.confound_max_share from one source while other "
                                                     "classes do not.")])
def source_confound(context: dg.AssetExecutionContext, fer: FerSettings,
                    analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    kept, _, arrays, version = load_data(fer, ("test",))
    test = arrays["test"]
    shares = confound_core.source_share_matrix(kept)
    long = confound_core.source_share_table(kept)
    findings = confound_core.confound_findings(kept, analysis.confound_max_share)
    ev = main_test_predictions(context, fer, arrays, version)
    per_source = confound_core.per_source_metrics(test.frame, test.labels, ev.y_pred)
    files = write_table(paths.report("source_confound"), long)
    files["per_source_metrics"] = str(write_csv(paths.report("source_metrics"), per_source))
    png = aplots.plot_source_shares(shares, paths.report("source_shares"), analysis.confound_max_share)
    for _, r in findings.iterrows():
        context.log.warning(f"source confound: {r['share']:.0%} of {r['label']} comes from source {r['source']} "
                            f"(other classes: {r['other_classes_share']})")
    counts = pd.crosstab(kept["label"], kept["source"])
    return dg.MaterializeResult(
        metadata={
            "share_of_class_by_source": md_table(rounded(shares.reset_index().rename(columns={"label": "class"}))),
            "images_by_class_and_source": md_table(counts.reset_index()),
            "per_source_test_metrics": md_table(rounded(per_source)),
            "plot": md_image(png, "source shares"),
            "sources": sorted(kept["source"].astype(str).unique().tolist()),
            "confounded_classes": md_table(rounded(findings)),
            "files": dg.MetadataValue.json({**files, "plot": str(png)}),
            "data_version": version,
        },
        check_results=[dg.AssetCheckResult(
            check_name="source_confound_check", passed=findings.empty, severity=dg.AssetCheckSeverity.WARN,
            metadata={"max_share": analysis.confound_max_share,
                      "confounded_classes": md_table(rounded(findings)),
                      "n_sources": int(kept["source"].nunique())})],
    )
