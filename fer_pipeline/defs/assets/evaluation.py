"""Deep evaluation assets (group ``evaluation``): can the model's numbers be trusted?

Lineage in the UI::

    splits ──► cross_validation ──► label_issues
    model_<main> ──► bias_report, source_confound, mitigation_comparison, cross_source_generalisation
    splits ──► mitigated_model ──► mitigation_comparison

Every knob (folds, epochs, thresholds, mitigation) is in the ``analysis`` resource, editable in
the launchpad (``resources: analysis: config: ...``). The core logic is plain Python in
:mod:`fer_pipeline.analysis`; these functions read inputs, call it, write ``reports/`` files and
turn the results into metadata a user looks at.
"""


import dagster as dg
import numpy as np
import pandas as pd

from fer_pipeline.analysis import bias as bias_core
from fer_pipeline.analysis import confound as confound_core
from fer_pipeline.analysis import plots as aplots
from fer_pipeline.analysis.cross_validation import (
    combine_arrays,
    read_cv_outputs,
    run_cross_validation,
    write_cv_outputs,
)
from fer_pipeline.analysis.generalisation import run_leave_one_source_out
from fer_pipeline.analysis.label_issues import RELABEL_HOWTO, label_issue_report
from fer_pipeline.analysis.mitigation import (
    HOW_TO_ENABLE,
    STATUS_OFF,
    comparison_table,
    describe_mitigated,
    same_recipe,
    train_mitigated_model,
)
from fer_pipeline.atomic import write_csv, write_table
from fer_pipeline.dataset.face_store import load_faces
from fer_pipeline.dataset.publish import read_published
from fer_pipeline.defs.assets.data import manifest, splits
from fer_pipeline.defs.metadata import md_image, md_table
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL
from fer_pipeline.ml.evaluate import Evaluation, evaluate_checkpoint, staleness
from fer_pipeline.ml.workflow import load_pipeline_data
from fer_pipeline.schema import SPLITS

GROUP = "evaluation"
MAIN_MODEL_ASSET = dg.AssetKey(f"model_{MAIN_MODEL}")
MITIGATED_NAME = f"{MAIN_MODEL}_mitigated"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _round(df: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Rounded, with missing values shown blank (for markdown tables)."""
    out = df.round(digits).astype(object)
    return out.where(df.notna(), "")


def _load(fer: FerSettings, split_names: tuple[str, ...] = SPLITS, with_images: bool = True):
    return load_pipeline_data(fer.paths, split_names, with_images=with_images)


def _main_test_predictions(context: dg.AssetExecutionContext, fer: FerSettings, arrays, version: str) -> Evaluation:
    """The main model's test-split evaluation (recomputed from its checkpoint: cheap)."""
    ev = evaluate_checkpoint(fer.paths.checkpoint(MAIN_MODEL), arrays["test"])
    _warn_stale(context, MAIN_MODEL, ev.trained_on, version, f"model_{MAIN_MODEL}")
    return ev


def _warn_stale(context: dg.AssetExecutionContext, name: str, trained_on: str | None, version: str,
                asset: str) -> None:
    if warning := staleness(name, trained_on, version, f"re-materialize {asset}"):
        context.log.warning(warning)


# --------------------------------------------------------------------------------------------
# cross-validation
# --------------------------------------------------------------------------------------------


@dg.asset(group_name=GROUP, deps=[manifest, splits],
          description=f"K-fold cross-validation of the main model ({MAIN_MODEL}) over train+validation on the "
                      "stored folds: per-fold accuracy and macro/micro precision/recall/F1, mean ± std, "
                      "out-of-fold probabilities (resumable: finished folds are cached).")
def cross_validation(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                     analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    _, _, arrays, version = _load(fer, ("train", "validation"))
    pool = combine_arrays([arrays["train"], arrays["validation"]])
    arch = ARCHITECTURES[MAIN_MODEL]
    config = analysis.recipe(training, analysis.cv_epochs, analysis.cv_patience)
    cache = paths.report("cv_cache") if analysis.cv_cache else None
    cv = run_cross_validation(pool, arch, config, data_version=version, n_cv_folds=analysis.cv_folds or None,
                              folds=analysis.folds, cache_dir=cache, log=context.log.info,
                              train_log=context.log.debug)
    files = write_cv_outputs(paths, cv, arch, config, data_version=version, n_pool=len(pool))
    table = cv.table
    mean = table[table["fold"] == "mean"].iloc[0]
    std = table[table["fold"] == "std"].iloc[0]
    context.log.info(f"cross-validation: macro-F1 {mean['macro_f1']:.4f} ± {std['macro_f1']:.4f}, accuracy "
                     f"{mean['accuracy']:.4f} ± {std['accuracy']:.4f} over folds {[r.fold for r in cv.folds]}")
    shown = ["fold", "n_train", "n_inner_validation", "n_test", "accuracy", "macro_precision", "macro_recall",
             "macro_f1", "micro_precision", "micro_recall", "micro_f1", "best_epoch", "train_seconds", "from_cache"]
    return dg.MaterializeResult(metadata={
        "folds_table": md_table(_round(table[shown]), 40),
        "macro_f1_mean": float(mean["macro_f1"]), "macro_f1_std": float(std["macro_f1"]),
        "accuracy_mean": float(mean["accuracy"]), "accuracy_std": float(std["accuracy"]),
        "plot": md_image(files["plot"], "per-fold scores"),
        "n_cv_folds": cv.n_cv_folds,
        "folds_run": [r.fold for r in cv.folds],
        "folds_trained_this_run": cv.trained,
        "folds_from_cache": cv.from_cache,
        "epochs_per_fold": config.epochs,
        "architecture": arch.name,
        "data_version": version,
        "out_of_fold_predictions": len(cv.oof),
        "cache_dir": str(cv.cache_dir) if cv.cache_dir else "off",
        "files": dg.MetadataValue.json(files),
        "seconds": round(cv.seconds, 1),
    })


# --------------------------------------------------------------------------------------------
# bias
# --------------------------------------------------------------------------------------------


@dg.asset(group_name=GROUP, deps=[MAIN_MODEL_ASSET, manifest, splits],
          description=f"Test metrics of the main model ({MAIN_MODEL}) per demographic group (gender, age group, "
                      "race): n, accuracy, macro precision/recall/F1, gap to the overall; coverage; small groups "
                      "marked, not hidden.",
          check_specs=[dg.AssetCheckSpec("bias_group_gap", asset="bias_report",
                                         description="Warn when a judged group's test macro-F1 is more than "
                                                     "analysis.max_group_gap_points below the overall.")])
def bias_report(context: dg.AssetExecutionContext, fer: FerSettings, analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    _, _, arrays, version = _load(fer, ("test",))
    test = arrays["test"]
    ev = _main_test_predictions(context, fer, arrays, version)
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
        "coverage": md_table(_round(report.coverage)),
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
        metadata[f"by_{attr}"] = md_table(_round(t.drop(columns=["attribute"])))
    flagged = report.flagged
    for _, r in flagged.iterrows():
        context.log.warning(f"bias: {r['attribute']}={r['group']} (n={r['n']}) macro-F1 {r['macro_f1']:.3f} is "
                            f"{-r['macro_f1_gap_pts']:.1f} points below the overall {report.overall['macro_f1']:.3f}")
    small = report.long_table[report.long_table["status"] == bias_core.STATUS_SMALL]
    return dg.MaterializeResult(metadata=metadata, check_results=[dg.AssetCheckResult(
        check_name="bias_group_gap", passed=flagged.empty, severity=dg.AssetCheckSeverity.WARN,
        metadata={"overall_macro_f1": round(report.overall["macro_f1"], 4),
                  "max_gap_points": analysis.max_group_gap_points,
                  "groups_below": md_table(_round(flagged[["attribute", "group", "n", "macro_f1", "macro_f1_gap_pts"]])),
                  "groups_too_small_to_judge": [f"{a}={g} (n={n})" for a, g, n in
                                                zip(small["attribute"], small["group"], small["n"])]})])


# --------------------------------------------------------------------------------------------
# mitigation
# --------------------------------------------------------------------------------------------


@dg.asset(group_name=GROUP, deps=[manifest, splits],
          description=f"The main model ({MAIN_MODEL}) retrained with the same recipe on a training set balanced "
                      "by demographic group (analysis.mitigation: oversample / reweight / both; off = skipped).")
def mitigated_model(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                    analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    needs_data = analysis.mitigation != "off"
    _, _, arrays, version = _load(fer, ("train", "validation")) if needs_data else (None, None, {}, "")
    outcome = train_mitigated_model(
        arrays, mode=analysis.mitigation, attribute=analysis.mitigation_attribute,
        attributes=analysis.bias_attributes, min_share=analysis.mitigation_min_share, arch=ARCHITECTURES[MAIN_MODEL],
        config=analysis.recipe(training, analysis.mitigation_epochs), paths=paths, data_version=version,
        preprocess=fer.preprocess, name=MITIGATED_NAME, log=context.log.info)
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
        "groups": md_table(_round(plan.shares)),
        "training_rows": len(plan.rows), "original_training_rows": outcome.original_rows,
        "checkpoint": dg.MetadataValue.path(str(trained.checkpoint)),
        "published": trained.published,
        "val_macro_f1": round(trained.validation.macro_f1, 4), "val_accuracy": round(trained.validation.accuracy, 4),
        "best_epoch": r.best_epoch, "epochs_run": len(r.history),
        "train_seconds": round(r.train_seconds, 1),
        "curves": md_image(trained.curves_png, f"{MITIGATED_NAME} curves"),
        "data_version": version,
    })


@dg.asset(group_name=GROUP, deps=[mitigated_model, MAIN_MODEL_ASSET, splits],
          description="Before/after table: the main model and the mitigated model on the test split, overall "
                      "and per demographic group, side by side (reports/mitigation_comparison.csv).")
def mitigation_comparison(context: dg.AssetExecutionContext, fer: FerSettings,
                          analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    _, _, arrays, version = _load(fer, ("test",))
    test = arrays["test"]
    before = _main_test_predictions(context, fer, arrays, version)
    ckpt = paths.checkpoint(MITIGATED_NAME)
    after = evaluate_checkpoint(ckpt, test) if analysis.mitigation != "off" and ckpt.is_file() else None
    status, attribute = describe_mitigated(analysis.mitigation, after.loaded.metadata if after else None)
    like_for_like = None
    if after is not None:
        _warn_stale(context, MITIGATED_NAME, after.trained_on, version, "mitigated_model")
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
        "comparison": md_table(_round(table.drop(columns=["status"])), 40),
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


@dg.asset(group_name=GROUP, deps=[manifest, splits, MAIN_MODEL_ASSET],
          description="Per class, the share of each source (a class taken mostly from one source lets a model "
                      "learn the source instead of the face), with the main model's test metrics per source.",
          check_specs=[dg.AssetCheckSpec("source_confound_check", asset="source_confound",
                                         description="Warn when a class comes more than "
                                                     "analysis.confound_max_share from one source while other "
                                                     "classes do not.")])
def source_confound(context: dg.AssetExecutionContext, fer: FerSettings,
                    analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    kept, _, arrays, version = _load(fer, ("test",))
    test = arrays["test"]
    shares = confound_core.source_share_matrix(kept)
    long = confound_core.source_share_table(kept)
    findings = confound_core.confound_findings(kept, analysis.confound_max_share)
    ev = _main_test_predictions(context, fer, arrays, version)
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
            "share_of_class_by_source": md_table(_round(shares.reset_index().rename(columns={"label": "class"}))),
            "images_by_class_and_source": md_table(counts.reset_index()),
            "per_source_test_metrics": md_table(_round(per_source)),
            "plot": md_image(png, "source shares"),
            "sources": sorted(kept["source"].astype(str).unique().tolist()),
            "confounded_classes": md_table(_round(findings)),
            "files": dg.MetadataValue.json({**files, "plot": str(png)}),
            "data_version": version,
        },
        check_results=[dg.AssetCheckResult(
            check_name="source_confound_check", passed=findings.empty, severity=dg.AssetCheckSeverity.WARN,
            metadata={"max_share": analysis.confound_max_share,
                      "confounded_classes": md_table(_round(findings)),
                      "n_sources": int(kept["source"].nunique())})],
    )


# --------------------------------------------------------------------------------------------
# cross-source generalisation
# --------------------------------------------------------------------------------------------


@dg.asset(group_name=GROUP, deps=[manifest, splits, MAIN_MODEL_ASSET],
          description="Leave-one-source-out: the main architecture trained on all sources but one and tested "
                      "on the held-out source, beside the in-domain test score. Not applicable with one source.")
def cross_source_generalisation(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                                analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    n_sources = int(pd.read_parquet(paths.manifest, columns=["source"])["source"].nunique())
    # with one source nothing is trained: only the labels are needed, not the faces
    kept, _, arrays, version = _load(fer, with_images=n_sources > 1)
    in_domain = _main_test_predictions(context, fer, arrays, version).y_pred if n_sources > 1 else None
    config = analysis.recipe(training, analysis.loso_epochs)
    result = run_leave_one_source_out(arrays, ARCHITECTURES[MAIN_MODEL], config, data_version=version,
                                      in_domain_pred=in_domain, min_classes=analysis.loso_min_classes,
                                      sources=analysis.loso_sources, cache_dir=paths.report("loso_cache"),
                                      log=context.log.info, train_log=context.log.debug)
    table = result.table
    files = write_table(paths.report("loso"), table)
    png = aplots.plot_loso(table, paths.report("loso_png"))
    done = table[table["status"] == "evaluated"]
    status = (f"evaluated {len(done)} held-out source(s)" if result.applicable and len(done)
              else "no source eligible (see table)" if result.applicable
              else f"not applicable: only one source ({', '.join(result.sources)})")
    metadata: dict[str, object] = {
        "status": status,
        "table": md_table(_round(table)),
        "sources": result.sources,
        "plot": md_image(png, "leave-one-source-out"),
        "epochs_per_source": config.epochs,
        "trained_this_run": result.trained, "from_cache": result.from_cache,
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
        "data_version": version,
        "seconds": round(result.seconds, 1),
    }
    if len(done):
        metadata["mean_loso_macro_f1"] = float(done["loso_macro_f1"].mean())
        metadata["mean_in_domain_macro_f1"] = float(done["in_domain_macro_f1"].mean())
    return dg.MaterializeResult(metadata=metadata)


# --------------------------------------------------------------------------------------------
# label issues
# --------------------------------------------------------------------------------------------

@dg.asset(group_name=GROUP, deps=[cross_validation, manifest],
          description="Images most likely mislabelled: confident learning (cleanlab) on the cross-validation's "
                      "out-of-fold probabilities; a thumbnail grid of the top suspects; nothing is relabelled.")
def label_issues(context: dg.AssetExecutionContext, fer: FerSettings, analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    published = read_published(paths)
    kept, version = published.manifest, published.data_version
    cv = read_cv_outputs(paths)
    if cv.summary.get("data_version") is not None:
        _warn_stale(context, "the cross-validation", cv.summary["data_version"], version, "cross_validation")
    report = label_issue_report(cv.oof, kept, cv_macro_f1=cv.mean_macro_f1, n_pool=cv.summary.get("n_pool"),
                                folds_run=cv.summary.get("folds_run"), method=analysis.label_issue_ranking)
    ranked, flagged = report.ranked, report.flagged
    files = write_table(paths.report("label_issues"), ranked)
    files["relabels_suggested"] = str(write_csv(paths.report("relabels_suggested"), report.suggestions))
    top = ranked.head(analysis.label_issue_grid)
    face_paths = kept.set_index("image_id").loc[top["image_id"], "face_path"].tolist()
    faces = load_faces(paths.root, face_paths) if face_paths else np.zeros((0, 1, 1), np.uint8)
    png = aplots.plot_label_issue_grid(faces, top, paths.report("label_issues_top"))
    context.log.info(f"label issues ({report.implementation}): {len(flagged)} of {len(ranked)} images flagged")
    if report.caution:
        context.log.warning(report.caution.replace("**", ""))
    return dg.MaterializeResult(metadata={
        "reliability": dg.MetadataValue.md(report.reliability),
        "cv_macro_f1_mean": report.cv_macro_f1,
        "implementation": report.implementation,
        "ranking": analysis.label_issue_ranking,
        "images_ranked": len(ranked),
        "train_validation_images": cv.summary.get("n_pool"),
        "coverage_note": report.coverage_note,
        "flagged": len(flagged),
        "flagged_share": round(len(flagged) / len(ranked), 4) if len(ranked) else 0.0,
        "flagged_by_given_label": {str(k): int(v) for k, v in flagged["given_label"].value_counts().items()},
        "top_suspects": md_table(_round(ranked.head(30))),
        "thumbnails": md_image(png, "top suspects"),
        "how_to_relabel": dg.MetadataValue.md(RELABEL_HOWTO),
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
        "data_version": version,
    })


EVALUATION_ASSETS = [cross_validation, bias_report, mitigated_model, mitigation_comparison, source_confound,
                     cross_source_generalisation, label_issues]
