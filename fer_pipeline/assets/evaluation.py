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


import json
from dataclasses import replace
from typing import Optional

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from fer_pipeline.analysis import bias as bias_core
from fer_pipeline.analysis import confound as confound_core
from fer_pipeline.analysis import plots as aplots
from fer_pipeline.analysis.cross_validation import combine_arrays, run_cross_validation
from fer_pipeline.analysis.generalisation import run_leave_one_source_out
from fer_pipeline.analysis.label_issues import rank_label_issues
from fer_pipeline.analysis.mitigation import MODES, choose_attribute, comparison_table, plan_mitigation
from fer_pipeline.assets.data import manifest, splits
from fer_pipeline.assets.metadata import md_image, md_table
from fer_pipeline.assets.models import TrainSettings
from fer_pipeline.atomic import write_csv, write_json, write_parquet
from fer_pipeline.classes import CLASSES
from fer_pipeline.face_store import load_faces
from fer_pipeline.manifest import RELABELS_FILE
from fer_pipeline.ml.architectures import ARCHITECTURES, MAIN_MODEL
from fer_pipeline.ml.checkpoint import save_checkpoint
from fer_pipeline.ml.inference import predict_proba
from fer_pipeline.ml.metrics import evaluate_predictions
from fer_pipeline.ml.plots import plot_training_curves
from fer_pipeline.ml.train import TrainConfig, train_model
from fer_pipeline.ml.workflow import data_version, evaluate_checkpoint, load_pipeline_data
from fer_pipeline.resources import FerSettings

GROUP = "evaluation"
MAIN_MODEL_ASSET = dg.AssetKey(f"model_{MAIN_MODEL}")
MITIGATED_NAME = f"{MAIN_MODEL}_mitigated"


class AnalysisSettings(dg.ConfigurableResource):
    """Knobs of the evaluation assets. Defaults are the full settings; ``configs/demo.yaml``
    shrinks the budget ones (folds, epochs) for the five-minute demo."""

    # cross-validation
    cv_folds: int = Field(default=0, description="CV folds; 0 = every fold in splits.parquet (fer.n_folds, "
                          "default 10). Fewer merges stored folds (CV fold = stored fold mod cv_folds)")
    folds: Optional[list[int]] = Field(default=None, description="Run only these CV folds (0-based); "
                                       "null = all. Finished folds are cached and never retrained")
    cv_epochs: int = Field(default=0, description="Max epochs per CV fold; 0 = training.epochs")
    cv_patience: int = Field(default=-1, description="Early-stopping patience per fold; -1 = training.patience")
    cv_cache: bool = Field(default=True, description="Reuse finished folds cached under reports/cv/")
    # bias
    bias_attributes: list[str] = Field(default=list(bias_core.ATTRIBUTES),
                                       description="Demographic attributes to analyse (those present)")
    min_group_size: int = Field(default=30, description="Groups with fewer test images are 'too small to judge'")
    max_group_gap_points: float = Field(default=5.0, description="Warn when a judged group's macro-F1 is more "
                                        "than this many points below the overall")
    # mitigation
    mitigation: str = Field(default="reweight", description="off | oversample | reweight | both")
    mitigation_attribute: str = Field(default="auto", description="Attribute whose groups are balanced; "
                                      "auto = the one with the smallest group share in the training split")
    mitigation_min_share: float = Field(default=0.25, description="Target minimum share of each known group "
                                        "(capped at 1/number of groups)")
    mitigation_epochs: int = Field(default=0, description="Max epochs of the mitigated model; 0 = training.epochs")
    # source confound
    confound_max_share: float = Field(default=0.9, description="Warn when a class comes more than this share "
                                      "from one source while other classes do not")
    # leave-one-source-out
    loso_epochs: int = Field(default=0, description="Max epochs per held-out source; 0 = training.epochs")
    loso_min_classes: int = Field(default=2, description="Hold out only sources covering at least this many "
                                  "classes")
    loso_sources: Optional[list[str]] = Field(default=None, description="Hold out only these sources; "
                                              "null = all eligible")
    # label issues
    label_issue_ranking: str = Field(default="self_confidence", description="self_confidence | normalized_margin")
    label_issue_grid: int = Field(default=24, description="Top suspects shown in the thumbnail grid")

    def recipe(self, training: TrainSettings, epochs: int, patience: int = -1) -> TrainConfig:
        """The main training recipe with this asset's epoch budget (0/-1 = as in ``training``)."""
        cfg = training.config()
        return replace(cfg, epochs=epochs or cfg.epochs, patience=cfg.patience if patience < 0 else patience)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _round(df: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Rounded, with missing values shown blank (for markdown tables)."""
    out = df.round(digits).astype(object)
    return out.where(df.notna(), "")


def _write_table(base, df: pd.DataFrame) -> dict[str, str]:
    """``base``.parquet and ``base``.csv; returns both paths."""
    pq = write_parquet(base.with_suffix(".parquet"), df)
    csv = write_csv(base.with_suffix(".csv"), df)
    return {"parquet": str(pq), "csv": str(csv)}


def _load(fer: FerSettings, split_names=("train", "validation", "test")):
    return load_pipeline_data(fer.paths, split_names)


def _load_labels_only(fer: FerSettings):
    """Like :func:`_load` but with empty (N, 0, 0) images: for assets that need no pixels."""
    return load_pipeline_data(fer.paths, with_images=False)


def _main_test_predictions(context: dg.AssetExecutionContext, fer: FerSettings, arrays, version: str):
    """The main model's test-split probabilities (recomputed from its checkpoint: cheap)."""
    ckpt = fer.paths.models_dir / f"{MAIN_MODEL}.safetensors"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} does not exist: materialize model_{MAIN_MODEL} first")
    ev = evaluate_checkpoint(ckpt, arrays["test"])
    trained_on = ev.loaded.metadata.get("data_version")
    if trained_on != version:
        context.log.warning(f"{MAIN_MODEL} was trained on data version {trained_on}, the splits are now {version}: "
                            f"re-materialize model_{MAIN_MODEL}")
    return ev


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
    cv = run_cross_validation(pool, arch, config, data_version=version, n_cv_folds=analysis.cv_folds or None,
                              folds=analysis.folds, cache_dir=paths.reports_dir / "cv" if analysis.cv_cache else None,
                              log=context.log.info, train_log=context.log.debug)
    table = cv.table
    out = paths.reports_dir
    files = _write_table(out / "cv_folds", table)
    write_parquet(out / "cv_oof.parquet", cv.oof)
    write_json(out / "cv_summary.json", {
        "data_version": version, "cache_key": cv.key, "architecture": arch.name, "n_cv_folds": cv.n_cv_folds,
        "folds_run": [r.fold for r in cv.folds], "trained_this_run": cv.trained, "from_cache": cv.from_cache,
        "train_config": config.to_dict(), "n_pool": len(pool), "n_oof": len(cv.oof)})
    png = aplots.plot_cv_folds(table, out / "cv_folds.png",
                               title=f"{cv.n_cv_folds}-fold CV of {arch.name} ({config.epochs} epochs max)")
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
        "plot": md_image(png, "per-fold scores"),
        "n_cv_folds": cv.n_cv_folds,
        "folds_run": [r.fold for r in cv.folds],
        "folds_trained_this_run": cv.trained,
        "folds_from_cache": cv.from_cache,
        "epochs_per_fold": config.epochs,
        "architecture": arch.name,
        "data_version": version,
        "out_of_fold_predictions": len(cv.oof),
        "cache_dir": str(cv.cache_dir) if cv.cache_dir else "off",
        "files": dg.MetadataValue.json({**files, "oof": str(out / "cv_oof.parquet"), "plot": str(png)}),
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
    pred = ev.probabilities.argmax(1)
    report = bias_core.bias_report(test.frame, test.labels, pred, attributes=analysis.bias_attributes,
                                   min_group_size=analysis.min_group_size,
                                   max_gap_points=analysis.max_group_gap_points)
    out = paths.reports_dir
    files = _write_table(out / "bias_report", report.long_table)
    write_csv(out / "bias_coverage.csv", report.coverage)
    for attr, t in report.tables.items():
        files[attr] = str(write_csv(out / f"bias_{attr}.csv", t))
    png = aplots.plot_bias(report.tables, report.overall["macro_f1"], out / "bias_macro_f1.png",
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


def _mitigation_attribute(analysis: AnalysisSettings, frame: pd.DataFrame) -> str | None:
    if analysis.mitigation_attribute != "auto":
        return analysis.mitigation_attribute
    return choose_attribute(frame, analysis.bias_attributes)


@dg.asset(group_name=GROUP, deps=[manifest, splits],
          description=f"The main model ({MAIN_MODEL}) retrained with the same recipe on a training set balanced "
                      "by demographic group (analysis.mitigation: oversample / reweight / both; off = skipped).")
def mitigated_model(context: dg.AssetExecutionContext, fer: FerSettings, training: TrainSettings,
                    analysis: AnalysisSettings) -> dg.MaterializeResult:
    if analysis.mitigation not in MODES:
        raise ValueError(f"analysis.mitigation must be one of {', '.join(MODES)}, got {analysis.mitigation!r}")
    paths = fer.paths
    how_to = ("set resources.analysis.config.mitigation to oversample, reweight or both "
              "(and optionally mitigation_attribute / mitigation_min_share)")
    if analysis.mitigation == "off":
        context.log.info(f"mitigation is off: no model trained; to turn it on, {how_to}")
        return dg.MaterializeResult(metadata={"status": "disabled (analysis.mitigation = off)",
                                              "how_to_enable": how_to})
    _, _, arrays, version = _load(fer, ("train", "validation"))
    train, val = arrays["train"], arrays["validation"]
    attribute = _mitigation_attribute(analysis, train.frame)
    if attribute is None or attribute not in bias_core.present_attributes(train.frame, [attribute]):
        msg = (f"no demographic attribute to balance (asked: {analysis.mitigation_attribute}; the training split "
               f"carries {bias_core.present_attributes(train.frame, analysis.bias_attributes) or 'none'})")
        context.log.warning(f"mitigation skipped: {msg}")
        return dg.MaterializeResult(metadata={"status": f"skipped: {msg}"})
    config = analysis.recipe(training, analysis.mitigation_epochs)
    plan = plan_mitigation(train.frame, analysis.mitigation, attribute, analysis.mitigation_min_share, seed=config.seed)
    context.log.info(f"mitigation '{plan.mode}' on {attribute}: {len(train)} → {len(plan.rows)} training rows\n"
                     f"{plan.shares.round(3).to_string(index=False)}")
    result = train_model(train.images[plan.rows], train.labels[plan.rows], val.images, val.labels,
                         ARCHITECTURES[MAIN_MODEL], config, sample_weights=plan.weights, log=context.log.info)
    probs = predict_proba(result.build(), val.images, result.normalization, tta_flip=config.tta_flip)
    validation = evaluate_predictions(val.labels, probs.argmax(1), probs)
    ckpt = save_checkpoint(paths.models_dir / f"{MITIGATED_NAME}.safetensors", result, data_version=version,
                           metrics={"validation": validation.to_dict()}, model_name=MITIGATED_NAME,
                           extra={"mitigation": {"mode": plan.mode, "attribute": attribute,
                                                 "min_share": analysis.mitigation_min_share,
                                                 "shares": plan.shares.to_dict(orient="records")}})
    curves = plot_training_curves(result.history, paths.models_dir / f"{MITIGATED_NAME}_curves.png",
                                  title=MITIGATED_NAME, best_epoch=result.best_epoch)
    write_csv(paths.reports_dir / "mitigation_plan.csv", plan.shares)
    return dg.MaterializeResult(metadata={
        "status": f"trained ({plan.mode} on {attribute})",
        "mode": plan.mode, "attribute": attribute, "min_share": analysis.mitigation_min_share,
        "groups": md_table(_round(plan.shares)),
        "training_rows": len(plan.rows), "original_training_rows": len(train),
        "checkpoint": dg.MetadataValue.path(str(ckpt)),
        "val_macro_f1": round(validation.macro_f1, 4), "val_accuracy": round(validation.accuracy, 4),
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "train_seconds": round(result.train_seconds, 1),
        "curves": md_image(curves, f"{MITIGATED_NAME} curves"),
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
    ckpt = paths.models_dir / f"{MITIGATED_NAME}.safetensors"
    after_pred, status = None, "disabled (analysis.mitigation = off): only the 'before' columns are filled"
    attribute, like_for_like = None, None
    if analysis.mitigation != "off":
        if ckpt.is_file():
            after = evaluate_checkpoint(ckpt, test)
            meta = after.loaded.metadata
            if meta.get("data_version") != version:
                context.log.warning(f"{MITIGATED_NAME} was trained on data version {meta.get('data_version')}, "
                                    f"the splits are now {version}: re-materialize mitigated_model")
            after_pred = after.probabilities.argmax(1)
            like_for_like = _same_recipe(before.loaded.metadata, meta)
            if not like_for_like:
                context.log.warning(f"{MAIN_MODEL} and {MITIGATED_NAME} differ in architecture or training recipe "
                                    "(beyond the mitigation): re-materialize both for a like-for-like comparison")
            mit = (meta.get("extra") or {}).get("mitigation", {})
            attribute = mit.get("attribute")
            status = f"{mit.get('mode')} on {attribute} (min share {mit.get('min_share')})"
        else:
            status = "no mitigated model (see mitigated_model's metadata)"
    table = comparison_table(test.frame, test.labels, before.probabilities.argmax(1), after_pred,
                             analysis.bias_attributes)
    table.insert(0, "status", status)
    out = paths.reports_dir
    files = _write_table(out / "mitigation_comparison", table)
    png = aplots.plot_mitigation(table, out / "mitigation_comparison.png",
                                 title=f"Test macro-F1 before ({MAIN_MODEL}) / after ({MITIGATED_NAME})")
    overall = table.iloc[0]
    focus = table[table["scope"] == attribute] if attribute else table.iloc[0:0]
    worst_before = focus["before_macro_f1"].min() if len(focus) else np.nan
    worst_after = focus["after_macro_f1"].min() if len(focus) else np.nan
    return dg.MaterializeResult(metadata={
        "status": status,
        "comparison": md_table(_round(table.drop(columns=["status"])), 40),
        "overall_macro_f1_before": float(overall["before_macro_f1"]),
        "overall_macro_f1_after": float(overall["after_macro_f1"]) if after_pred is not None else None,
        "worst_group_macro_f1_before": None if np.isnan(worst_before) else float(worst_before),
        "worst_group_macro_f1_after": None if np.isnan(worst_after) else float(worst_after),
        "same_architecture_and_recipe": like_for_like,
        "plot": md_image(png, "before/after"),
        "files": dg.MetadataValue.json({**files, "plot": str(png)}),
        "data_version": version,
    })


def _same_recipe(before: dict, after: dict) -> bool:
    """Same architecture and training config (seed included) in two checkpoints' metadata."""
    return (before.get("architecture") == after.get("architecture")
            and before.get("train_config") == after.get("train_config"))


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
    per_source = confound_core.per_source_metrics(test.frame, test.labels, ev.probabilities.argmax(1))
    out = paths.reports_dir
    files = _write_table(out / "source_confound", long)
    files["per_source_metrics"] = str(write_csv(out / "source_metrics.csv", per_source))
    png = aplots.plot_source_shares(shares, out / "source_shares.png", analysis.confound_max_share)
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
    out = paths.reports_dir
    n_sources = int(pd.read_parquet(paths.manifest, columns=["source"])["source"].nunique())
    # with one source nothing is trained: only the labels are needed, not the faces
    kept, _, arrays, version = _load(fer) if n_sources > 1 else _load_labels_only(fer)
    in_domain = None
    if n_sources > 1:
        in_domain = _main_test_predictions(context, fer, arrays, version).probabilities.argmax(1)
    config = analysis.recipe(training, analysis.loso_epochs)
    result = run_leave_one_source_out(arrays, ARCHITECTURES[MAIN_MODEL], config, data_version=version,
                                      in_domain_pred=in_domain, min_classes=analysis.loso_min_classes,
                                      sources=analysis.loso_sources, cache_dir=out / "loso",
                                      log=context.log.info, train_log=context.log.debug)
    table = result.table
    files = _write_table(out / "cross_source_generalisation", table)
    png = aplots.plot_loso(table, out / "cross_source_generalisation.png")
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

WEAK_CV_MACRO_F1 = 0.5  # below this, the out-of-fold probabilities say more about the model than the labels

RELABEL_HOWTO = (
    "Nothing is relabelled automatically. To correct labels: review the suspects (thumbnails above; "
    "`reports/label_issues.csv` has every ranked image with its source path), then write the corrections to "
    f"`<data root>/{RELABELS_FILE}` with the header `image_id,label,note` (label one of {', '.join(CLASSES)}; "
    "note optional), e.g. start from `reports/relabels_suggested.csv` (the flagged images with the model's label "
    "filled in) and keep only the rows you agree with. Re-materialize `manifest` (and downstream): it applies the "
    "file, records the old label in the column `relabelled_from` and lists the applied rows in its metadata. An "
    "unknown image id or label stops the manifest with an error naming the line.")


@dg.asset(group_name=GROUP, deps=[cross_validation, manifest],
          description="Images most likely mislabelled: confident learning (cleanlab) on the cross-validation's "
                      "out-of-fold probabilities; a thumbnail grid of the top suspects; nothing is relabelled.")
def label_issues(context: dg.AssetExecutionContext, fer: FerSettings, analysis: AnalysisSettings) -> dg.MaterializeResult:
    paths = fer.paths
    out = paths.reports_dir
    kept = pd.read_parquet(paths.manifest)
    oof = pd.read_parquet(out / "cv_oof.parquet")
    summary = json.loads((out / "cv_summary.json").read_text()) if (out / "cv_summary.json").is_file() else {}
    version = data_version(kept, pd.read_parquet(paths.splits))
    if summary.get("data_version") not in (None, version):
        context.log.warning(f"the cross-validation ran on data version {summary.get('data_version')}, the manifest "
                            f"is now {version}: re-materialize cross_validation")
    oof = oof[oof["image_id"].isin(kept["image_id"])]
    # the label the CV trained with is the one judged; a relabel since then shows in the manifest
    ranked, impl = rank_label_issues(oof, kept, method=analysis.label_issue_ranking)
    files = _write_table(out / "label_issues", ranked)
    flagged = ranked[ranked["is_label_issue"]]
    suggestions = pd.DataFrame({"image_id": flagged["image_id"], "label": flagged["predicted_label"],
                                "note": "label_issues: given " + flagged["given_label"] + ", model says "
                                        + flagged["predicted_label"]})
    files["relabels_suggested"] = str(write_csv(out / "relabels_suggested.csv", suggestions))
    top = ranked.head(analysis.label_issue_grid)
    face_paths = kept.set_index("image_id").loc[top["image_id"], "face_path"].tolist()
    faces = load_faces(paths.root, face_paths) if face_paths else np.zeros((0, 1, 1), np.uint8)
    png = aplots.plot_label_issue_grid(faces, top, out / "label_issues_top.png")
    n_pool = summary.get("n_pool")
    context.log.info(f"label issues ({impl}): {len(flagged)} of {len(ranked)} images flagged")
    folds = pd.read_parquet(out / "cv_folds.parquet") if (out / "cv_folds.parquet").is_file() else None
    cv_f1 = float(folds.loc[folds["fold"] == "mean", "macro_f1"].iloc[0]) if folds is not None and len(folds) else None
    reliability = ("" if cv_f1 is None or cv_f1 >= WEAK_CV_MACRO_F1 else
                   f"**Caution:** the cross-validation models are weak (mean macro-F1 {cv_f1:.3f}), so most "
                   "'suspects' are model errors rather than label errors. Give the cross-validation more epochs "
                   "(analysis.cv_epochs) before acting on this ranking.")
    if reliability:
        context.log.warning(reliability.replace("**", ""))
    return dg.MaterializeResult(metadata={
        "reliability": dg.MetadataValue.md(
            reliability if reliability else
            f"cross-validation mean macro-F1 {cv_f1:.3f}" if cv_f1 is not None else "no cross-validation table found"),
        "cv_macro_f1_mean": cv_f1,
        "implementation": impl,
        "ranking": analysis.label_issue_ranking,
        "images_ranked": len(ranked),
        "train_validation_images": n_pool,
        "coverage_note": ("every train+validation image has an out-of-fold prediction" if n_pool == len(ranked)
                          else f"only the {len(ranked)} images of the CV folds run ({summary.get('folds_run')}) are "
                               "ranked: run every fold for full coverage"),
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
