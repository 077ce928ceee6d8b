"""Deep evaluation assets (group ``evaluation``): can the model's numbers be trusted?

Lineage in the UI::

    splits ──► cv_fold (one partition per fold) ──► cross_validation ──► label_issues
    splits ──► held_out_sources ──► loso_fold (one partition per source) ──► cross_source_generalisation
    model_<main> ──► bias_report, source_confound, mitigation_comparison, cross_source_generalisation
    splits ──► mitigated_model ──► mitigation_comparison

The training work (CV folds, held-out sources) is partitioned (:mod:`fer_pipeline.defs.jobs`):
each partition trains one unit and stores its result with the recipe it was trained with; the
aggregates publish the reports from the stored results of the current recipe and refuse the
others. Every knob (epochs, thresholds, mitigation) is in the ``analysis`` resource, editable in
the launchpad (``resources: analysis: config: ...``); the number of CV folds is ``FER_CV_FOLDS``.
The core logic is plain Python in :mod:`fer_pipeline.analysis`; these functions read inputs,
call it, write ``reports/`` files and turn the results into metadata a user looks at.
"""


import functools

import dagster as dg
import numpy as np
import pandas as pd

from fer_pipeline.analysis import bias as bias_core
from fer_pipeline.analysis import confound as confound_core
from fer_pipeline.analysis import generalisation as loso_core
from fer_pipeline.analysis import plots as aplots
from fer_pipeline.analysis.cross_validation import (
    CVResult,
    FoldRecipe,
    FoldStore,
    TrainingRecipe,
    collect_folds,
    combine_arrays,
    read_cv_outputs,
    stable_hash,
    train_fold,
    write_cv_outputs,
)
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
from fer_pipeline.defs.assets.models import model_start
from fer_pipeline.defs.assets.pretrain import pretrained_backbone
from fer_pipeline.defs.executors import GPU_OP_TAGS
from fer_pipeline.defs.jobs import (
    CV_FOLD,
    HELD_OUT_SOURCES,
    LOSO_FOLD,
    cv_fold_count,
    cv_fold_partitions,
    held_out_partitions,
    held_out_source_keys,
    partition_key_problem,
)
from fer_pipeline.defs.metadata import md_image, md_table
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL
from fer_pipeline.ml.evaluate import Evaluation, evaluate_checkpoint, staleness
from fer_pipeline.ml.pretrain import Start
from fer_pipeline.ml.train import TrainConfig, train_model
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
# cross-validation: one partition per fold, then the aggregate
# --------------------------------------------------------------------------------------------


def main_start(fer: FerSettings, training: TrainSettings, with_weights: bool = True) -> Start:
    """Where the main architecture's analysis trainings start: the models' own start
    (the pretrained backbone under ``init: pretrained``), so CV and LOSO judge the same recipe.
    Aggregates only name the start in a recipe: ``with_weights=False`` skips loading it."""
    return model_start(fer.paths, training.init, ARCHITECTURES[MAIN_MODEL], with_weights)


def cv_recipe(version: str, training: TrainSettings, analysis: AnalysisSettings,
              n_cv_folds: int, start: Start) -> tuple[TrainConfig, FoldRecipe]:
    """The training config of a CV fold and the recipe its result is stored (and checked) with
    (the backbone it starts from is part of the recipe)."""
    config = analysis.recipe(training, analysis.cv_epochs, analysis.cv_patience)
    return config, FoldRecipe.of(version, ARCHITECTURES[MAIN_MODEL], config, n_cv_folds=n_cv_folds,
                                 init=start.init, backbone=start.backbone)


def build_cv_assets(n_cv_folds: int) -> list[dg.AssetsDefinition]:
    """``cv_fold`` (``n_cv_folds`` partitions) and its aggregate ``cross_validation``; built when
    the code location loads, since the partitions are fixed then."""
    arch = ARCHITECTURES[MAIN_MODEL]

    @fer_asset(name=CV_FOLD, group_name=GROUP, deps=[splits, pretrained_backbone], partitions_def=cv_fold_partitions(n_cv_folds),
              op_tags=GPU_OP_TAGS,  # no backfill policy: a backfill is one run per fold, side by side
              description=f"One fold of the {n_cv_folds}-fold cross-validation of the main model ({MAIN_MODEL}) "
                          "over train+validation (partition = fold number): trains it, scores the held-out "
                          "fold, stores its out-of-fold probabilities with the data version and recipe. "
                          "Materialize missing partitions (a backfill) to run a subset or resume.")
    def cv_fold(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                analysis: AnalysisSettings) -> dg.MaterializeResult:
        fold = int(context.partition_key)
        _, _, arrays, version = _load(fer, ("train", "validation"))
        pool = combine_arrays([arrays["train"], arrays["validation"]])
        start = main_start(fer, training)
        config, recipe = cv_recipe(version, training, analysis, n_cv_folds, start)
        result = train_fold(pool, fold, arch, config, n_cv_folds=n_cv_folds, run_id=context.run.run_id,
                            train_fn=functools.partial(train_model, init_state=start.state),
                            log=context.log.info, train_log=context.log.debug)
        files = FoldStore(fer.paths.report("cv_fold_results")).save(result, recipe)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(recipe.identity(fold)),  # what downstream staleness compares
            metadata={**{k: round(v, 4) for k, v in result.metrics.items()},
                      "fold": fold, "n_cv_folds": n_cv_folds, "n_train": result.n_train,
                      "n_inner_validation": result.n_inner_validation, "n_test": result.n_test,
                      "held_out_stored_folds": list(result.held_out_stored_folds),
                      "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                      "train_seconds": round(result.train_seconds, 1), "architecture": arch.name,
                      "data_version": version, "recipe_identity": recipe.identity(fold),
                      "files": dg.MetadataValue.json(files)})

    @fer_asset(name="cross_validation", group_name=GROUP, deps=[cv_fold, splits],
              description=f"{n_cv_folds}-fold cross-validation of the main model ({MAIN_MODEL}) from the cv_fold "
                          "partitions: per-fold accuracy and macro/micro precision/recall/F1, mean ± std, "
                          "out-of-fold probabilities. Folds trained on other data (or another recipe) are refused.",
              check_specs=[dg.AssetCheckSpec("cv_folds_current", asset="cross_validation",
                                             description="Every fold is materialized for the published data and "
                                                         "the current recipe (warns when some are missing or "
                                                         "refused: the table then covers fewer folds).")])
    def cross_validation(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                         analysis: AnalysisSettings) -> dg.MaterializeResult:
        paths = fer.paths
        published = read_published(paths)
        version = published.data_version
        n_pool = int((published.splits["split"] != "test").sum())
        config, recipe = cv_recipe(version, training, analysis, n_cv_folds, main_start(fer, training, with_weights=False))
        collected = collect_folds(FoldStore(paths.report("cv_fold_results")), recipe)
        refused = {str(k): v for k, v in collected.refused.items()}
        for fold, why in refused.items():
            context.log.warning(f"fold {fold} refused: {why}; re-materialize partition {fold} of {CV_FOLD}")
        if not collected.used:
            raise dg.Failure(
                description=f"no fold of the {n_cv_folds}-fold cross-validation is materialized for the published "
                            f"data (version {version}) and this recipe: materialize the {CV_FOLD} partitions first "
                            f"(UI: {CV_FOLD} → Materialize, all or missing partitions; or "
                            "`python -m fer_pipeline.defs.refresh`)",
                metadata={"folds_missing": collected.missing, "folds_refused": dg.MetadataValue.json(refused)})
        if collected.missing:
            context.log.warning(f"folds {collected.missing} are not materialized: the table covers "
                                f"{len(collected.used)} of {n_cv_folds} folds")
        cv = CVResult(collected.used, n_cv_folds)
        files = write_cv_outputs(paths, cv, arch, config, data_version=version, n_pool=n_pool,
                                 missing=collected.missing, refused=collected.refused)
        table = cv.table
        mean = table[table["fold"] == "mean"].iloc[0]
        std = table[table["fold"] == "std"].iloc[0]
        folds_used = [r.fold for r in cv.folds]
        context.log.info(f"cross-validation: macro-F1 {mean['macro_f1']:.4f} ± {std['macro_f1']:.4f}, accuracy "
                         f"{mean['accuracy']:.4f} ± {std['accuracy']:.4f} over folds {folds_used}")
        shown = ["fold", "n_train", "n_inner_validation", "n_test", "accuracy", "macro_precision", "macro_recall",
                 "macro_f1", "micro_precision", "micro_recall", "micro_f1", "best_epoch", "train_seconds", "run_id"]
        return dg.MaterializeResult(metadata={
            "folds_table": md_table(_round(table[shown]), 40),
            "macro_f1_mean": float(mean["macro_f1"]), "macro_f1_std": float(std["macro_f1"]),
            "accuracy_mean": float(mean["accuracy"]), "accuracy_std": float(std["accuracy"]),
            "plot": md_image(files["plot"], "per-fold scores"),
            "n_cv_folds": n_cv_folds,
            "folds_run": folds_used,
            "folds_missing": collected.missing,
            "folds_refused": dg.MetadataValue.json(refused),
            "epochs_per_fold": config.epochs,
            "architecture": arch.name,
            "data_version": version,
            "out_of_fold_predictions": len(cv.oof),
            "files": dg.MetadataValue.json(files),
        }, check_results=[dg.AssetCheckResult(
            check_name="cv_folds_current", passed=collected.complete, severity=dg.AssetCheckSeverity.WARN,
            metadata={"folds_used": folds_used, "folds_missing": collected.missing,
                      "folds_refused": dg.MetadataValue.json(refused)})])

    return [cv_fold, cross_validation]


# --------------------------------------------------------------------------------------------
# bias
# --------------------------------------------------------------------------------------------


@fer_asset(group_name=GROUP, deps=[MAIN_MODEL_ASSET, manifest, splits],
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


@fer_asset(group_name=GROUP, deps=[manifest, splits, pretrained_backbone],
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
        preprocess=fer.preprocess, name=MITIGATED_NAME, log=context.log.info,
        start=main_start(fer, training) if needs_data else None)
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


@fer_asset(group_name=GROUP, deps=[mitigated_model, MAIN_MODEL_ASSET, splits],
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
# cross-source generalisation: the sources, one partition per held-out source, the aggregate
# --------------------------------------------------------------------------------------------


def loso_recipe(version: str, training: TrainSettings, analysis: AnalysisSettings,
                start: Start) -> tuple[TrainConfig, TrainingRecipe]:
    """The training config of a held-out source and the recipe its row is stored (and checked) with."""
    config = analysis.recipe(training, analysis.loso_epochs)
    return config, TrainingRecipe.of(version, ARCHITECTURES[MAIN_MODEL], config, init=start.init,
                                     backbone=start.backbone)


def build_loso_assets(keys: list[str]) -> list[dg.AssetsDefinition]:
    """``held_out_sources`` and ``loso_fold`` (one partition per key: the catalogue's four-class
    sources, read when the code location loads)."""

    @fer_asset(name=HELD_OUT_SOURCES, group_name=GROUP, deps=[splits],
               description="The sources of the published data and whether each can be held out (leave-one-source-"
                           f"out); names a source without a {LOSO_FOLD} partition (the catalogue changed since the "
                           "code location loaded: reload it).")
    def held_out_sources(context: dg.AssetExecutionContext, fer: FerSettings,
                         analysis: AnalysisSettings) -> dg.MaterializeResult:
        _, _, arrays, version = _load(fer, with_images=False)  # labels and sources only
        sources = loso_core.sources_of(arrays)
        status = (loso_core.eligibility(arrays, analysis.loso_min_classes) if len(sources) > 1
                  else {s: loso_core.NOT_APPLICABLE_ONE_SOURCE for s in sources})
        for source, problem in ((s, partition_key_problem(s)) for s in sources):
            if problem and status[source] == loso_core.ELIGIBLE:
                status[source] = f"skipped: {problem}"
                context.log.warning(f"source {source!r} cannot be held out: {problem}")
        wanted = sorted(s for s, state in status.items() if state == loso_core.ELIGIBLE)
        unplanned = sorted(set(wanted) - set(keys))
        if unplanned:
            context.log.warning(f"held-out sources {unplanned} have no {LOSO_FOLD} partition: the catalogue changed "
                                "since the code location loaded; reload it (UI: Deployment → Reload)")
        context.log.info(f"held-out sources: {wanted or 'none'} (partitions: {keys or 'none'})")
        table = pd.DataFrame({"source": list(status), "status": list(status.values())})
        return dg.MaterializeResult(
            data_version=dg.DataVersion(stable_hash({"data_version": version, "sources": wanted})),
            metadata={"sources": md_table(table), "eligible": wanted, "partitions": list(keys),
                      "without_partition": unplanned, "data_version": version})

    @fer_asset(name=LOSO_FOLD, group_name=GROUP, deps=[held_out_sources, splits, pretrained_backbone],
               partitions_def=held_out_partitions(keys), op_tags=GPU_OP_TAGS,
               description="Leave-one-source-out for one source (partition = source name, one per four-class "
                           "source of the catalogue): the main architecture trained on the other sources' train "
                           "split, early-stopped on their validation split, tested on every image of the held-out "
                           "source. A source that cannot be held out records why.")
    def loso_fold(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                  analysis: AnalysisSettings) -> dg.MaterializeResult:
        source = context.partition_key
        _, _, arrays, version = _load(fer)
        start = main_start(fer, training)
        config, recipe = loso_recipe(version, training, analysis, start)
        row = loso_core.held_out_row(arrays, source, ARCHITECTURES[MAIN_MODEL], config,
                                     train_fn=functools.partial(train_model, init_state=start.state),
                                     min_classes=analysis.loso_min_classes, run_id=context.run.run_id,
                                     log=context.log.info, train_log=context.log.debug)
        if row["status"] != loso_core.STATUS_DONE:
            context.log.warning(f"held-out source {source}: {row['status']}")
        path = loso_core.LosoStore(fer.paths.report("loso_results")).save(row, recipe)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "run_id"}
        return dg.MaterializeResult(data_version=dg.DataVersion(recipe.identity(source)),
                                    metadata={**shown, "data_version": version,
                                              "recipe_identity": recipe.identity(source),
                                              "file": dg.MetadataValue.path(str(path))})

    return [held_out_sources, loso_fold]


@fer_asset(group_name=GROUP, deps=[dg.AssetKey(LOSO_FOLD), dg.AssetKey(HELD_OUT_SOURCES), MAIN_MODEL_ASSET, splits],
          description="Leave-one-source-out from the loso_fold partitions: per held-out source, the score of the "
                      "main architecture trained without it, beside the main model's in-domain test score on it. "
                      "Rows trained on other data (or another recipe) are refused. Not applicable with one source.",
          check_specs=[dg.AssetCheckSpec("loso_sources_current", asset="cross_source_generalisation",
                                         description="Every eligible source's partition is materialized for the "
                                                     "published data and the current recipe (warning).")])
def cross_source_generalisation(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                                analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    sources = sorted(pd.read_parquet(paths.manifest, columns=["source"])["source"].astype(str).unique())
    missing: list[str] = []
    refused: dict[str, str] = {}
    if len(sources) < 2:  # nothing is trained: only the labels are needed, not the faces or a model
        _, _, _, version = _load(fer, with_images=False)
        table = loso_core.not_applicable_table(sources)
    else:
        _, _, arrays, version = _load(fer)
        in_domain = _main_test_predictions(context, fer, arrays, version).y_pred
        _, recipe = loso_recipe(version, training, analysis, main_start(fer, training, with_weights=False))
        status = loso_core.eligibility(arrays, analysis.loso_min_classes)
        collected = loso_core.collect_rows(loso_core.LosoStore(paths.report("loso_results")), status, recipe)
        missing, refused = collected.missing, collected.refused
        for source, why in refused.items():
            context.log.warning(f"held-out source {source} refused: {why}; re-materialize partition {source!r} of "
                                f"{LOSO_FOLD}")
        eligible = [s for s, state in status.items() if state == loso_core.ELIGIBLE]
        if eligible and len(missing) + len(refused) == len(eligible):
            raise dg.Failure(
                description=f"no held-out source is materialized for the published data (version {version}) and "
                            f"this recipe: materialize the {LOSO_FOLD} partitions first (UI: {LOSO_FOLD} → "
                            "Materialize; or `make demo`)",
                metadata={"sources_missing": missing, "sources_refused": dg.MetadataValue.json(refused)})
        table = loso_core.loso_table(collected.rows, arrays["test"], in_domain)
    files = write_table(paths.report("loso"), table)
    png = aplots.plot_loso(table, paths.report("loso_png"))
    done = table[table["status"] == loso_core.STATUS_DONE]
    status_text = (f"evaluated {len(done)} held-out source(s)" if len(done)
                   else "no source eligible (see table)" if len(sources) > 1
                   else f"not applicable: only one source ({', '.join(sources)})")
    metadata: dict[str, object] = {
        "status": status_text,
        "table": md_table(_round(table)),
        "sources": sources,
        "plot": md_image(png, "leave-one-source-out"),
        "epochs_per_source": analysis.recipe(training, analysis.loso_epochs).epochs,
        "sources_missing": missing,
        "sources_refused": dg.MetadataValue.json(refused),
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
        "data_version": version,
    }
    if len(done):
        metadata["mean_loso_macro_f1"] = float(done["loso_macro_f1"].mean())
        metadata["mean_in_domain_macro_f1"] = float(done["in_domain_macro_f1"].mean())
    return dg.MaterializeResult(metadata=metadata, check_results=[dg.AssetCheckResult(
        check_name="loso_sources_current", passed=not missing and not refused, severity=dg.AssetCheckSeverity.WARN,
        metadata={"sources_evaluated": done["held_out_source"].tolist(), "sources_missing": missing,
                  "sources_refused": dg.MetadataValue.json(refused)})])


# --------------------------------------------------------------------------------------------
# label issues
# --------------------------------------------------------------------------------------------

@fer_asset(group_name=GROUP, deps=[dg.AssetKey("cross_validation"), manifest],
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


def evaluation_assets(n_cv_folds: int | None = None, held_out: list[str] | None = None) -> list[dg.AssetsDefinition]:
    """Every evaluation asset, the CV folds sized ``n_cv_folds`` (default: the settings file's
    ``cv_folds``), one held-out source partition per name in ``held_out`` (default: the
    catalogue's four-class sources)."""
    keys = held_out if held_out is not None else held_out_source_keys()[0]
    return [*build_cv_assets(n_cv_folds or cv_fold_count()), bias_report, mitigated_model, mitigation_comparison,
            source_confound, *build_loso_assets(keys), cross_source_generalisation, label_issues]
