"""Cross-validation as partitions (``cv_fold``: one fold each; trains it, scores the held-out
fold, stores its out-of-fold probabilities with the data version and recipe, and keeps the fold
model as a checkpoint calibrated on its held-out rows: an ensemble member), the aggregate
``cross_validation`` (refuses folds of other data or another recipe), and ``label_issues``
(confident learning on the out-of-fold probabilities). Lineage in the UI::

    splits ──► cv_fold (one partition per fold) ──► cross_validation ──► label_issues
"""

import functools

import dagster as dg
import numpy as np

from fer_pipeline.analysis import plots as aplots
from fer_pipeline.analysis.cross_validation import (
    CVResult,
    FoldStore,
    collect_folds,
    combine_arrays,
    read_cv_outputs,
    train_fold,
    write_cv_outputs,
)
from fer_pipeline.analysis.label_issues import RELABEL_HOWTO, label_issue_report
from fer_pipeline.analysis.recipes import cv_recipe, main_start
from fer_pipeline.atomic import write_csv, write_table
from fer_pipeline.defs.assets.data import manifest, splits
from fer_pipeline.defs.assets.inputs import (
    GROUP,
    load_data,
    rounded,
    warn_stale,
)
from fer_pipeline.defs.assets.pretrain import pretrained_backbone
from fer_pipeline.defs.executors import GPU_OP_TAGS
from fer_pipeline.defs.jobs import CV_FOLD, cv_fold_partitions
from fer_pipeline.defs.metadata import md_image, md_table
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.defs.settings import fer_asset
from fer_pipeline.faces.store import load_faces
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL
from fer_pipeline.ml.checkpoint import non_finite_tensors, save_checkpoint
from fer_pipeline.ml.train import TrainConfig, train_model
from fer_pipeline.ml.workflow import framing_of
from fer_pipeline.publish import read_published


def cv_config(training: TrainSettings, analysis: AnalysisSettings) -> TrainConfig:
    """The training config of a CV fold: the main recipe with the analysis' fold budget."""
    return analysis.recipe(training, analysis.cv_epochs, analysis.cv_patience)


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
        _, _, arrays, version = load_data(fer, ("train", "validation"))
        pool = combine_arrays([arrays["train"], arrays["validation"]])
        start = main_start(fer.paths, training.init)
        config = cv_config(training, analysis)
        recipe = cv_recipe(version, config, n_cv_folds, start)
        result = train_fold(pool, fold, arch, config, n_cv_folds=n_cv_folds, run_id=context.run.run_id,
                            train_fn=functools.partial(train_model, init_state=start.state),
                            log=context.log.info, train_log=context.log.debug)
        # the fold model is an ensemble member (shipped_model): its checkpoint carries the temperature
        # fitted on its held-out rows and the recipe identity, written before the result that marks the
        # fold complete
        member = fer.paths.fold_checkpoint(fold)
        if non_finite_tensors(result.trained.state_dict):
            member.unlink(missing_ok=True)
            context.log.error(f"fold {fold} has NaN/inf weights: no checkpoint, it cannot be an ensemble member")
        else:
            save_checkpoint(member, result.trained, data_version=version, preprocess=fer.preprocess,
                            metrics={"out_of_fold": result.metrics}, model_name=f"{MAIN_MODEL}_cv_fold_{fold}",
                            framing=framing_of(fer.paths, pool.frame), calibration=result.calibration,
                            extra={**start.describe(), "cv_fold": fold, "n_cv_folds": n_cv_folds,
                                   "recipe_identity": recipe.identity(fold), "n_held_out": result.n_test})
        files = FoldStore(fer.paths.report("cv_fold_results")).save(result, recipe)
        files["checkpoint"] = str(member)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(recipe.identity(fold)),  # what downstream staleness compares
            metadata={**{k: round(v, 4) for k, v in result.metrics.items()},
                      "fold": fold, "n_cv_folds": n_cv_folds, "n_train": result.n_train,
                      "n_inner_validation": result.n_inner_validation, "n_test": result.n_test,
                      "held_out_stored_folds": list(result.held_out_stored_folds),
                      "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                      "train_seconds": round(result.train_seconds, 1), "architecture": arch.name,
                      "oof_temperature": result.calibration.get("temperature"),
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
        config = cv_config(training, analysis)
        recipe = cv_recipe(version, config, n_cv_folds, main_start(fer.paths, training.init, with_weights=False))
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
            "folds_table": md_table(rounded(table[shown]), 40),
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


@fer_asset(group_name=GROUP, deps=[dg.AssetKey("cross_validation"), manifest],
          description="Images most likely mislabelled: confident learning (cleanlab) on the cross-validation's "
                      "out-of-fold probabilities; a thumbnail grid of the top suspects; nothing is relabelled.")
def label_issues(context: dg.AssetExecutionContext, fer: FerSettings, analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    published = read_published(paths)
    kept, version = published.manifest, published.data_version
    cv = read_cv_outputs(paths)
    if cv.summary.get("data_version") is not None:
        warn_stale(context, "the cross-validation", cv.summary["data_version"], version, "cross_validation")
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
        "top_suspects": md_table(rounded(ranked.head(30))),
        "thumbnails": md_image(png, "top suspects"),
        "how_to_relabel": dg.MetadataValue.md(RELABEL_HOWTO),
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
        "data_version": version,
    })
