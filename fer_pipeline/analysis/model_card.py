"""The model card (``reports/model_card.md``): what the model is for, what it must not be used
for, what it was trained on and how well it works, generated from the pipeline's published
outputs only. Nothing in it is written by hand per run: every number comes from a file an asset
wrote (metrics.json, the test predictions, the manifest, the bias / confound / cross-validation /
leave-one-source-out reports) or from the catalogue (licences); an analysis that has not run is
said to be "not run". The fixed text (intended use, the EU AI Act, inherent limitations) is the
same for every run.

Test metrics carry 95 % percentile-bootstrap intervals over the test images
(:func:`fer_pipeline.ml.evaluate.bootstrap_intervals`, 1,000 resamples, seed 0), so a reader sees
how much of a difference between two models is sampling noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fer_pipeline.analysis.bias import STATUS_GAP, STATUS_SMALL
from fer_pipeline.analysis.confound import confound_findings
from fer_pipeline.analysis.generalisation import STATUS_DONE
from fer_pipeline.atomic import write_text
from fer_pipeline.classes import CLASSES
from fer_pipeline.sources.catalog import Catalog
from fer_pipeline.publish import read_pool, read_published
from fer_pipeline.ml.architectures import MAIN_MODEL
from fer_pipeline.ml.calibration import N_BINS
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.ml.evaluate import (
    BASELINE_NAME,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_intervals,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import SPLITS, STAGE_REVIEW, MetricsReport, ShippedSpec

NOT_RUN = "not run"
NOT_DECLARED = "not declared"

SECTIONS: tuple[str, ...] = (
    "Model details", "Model selection", "Intended use", "Out-of-scope and prohibited uses", "Training data",
    "Test results",
    "Calibration", "Cross-validation", "Per-group results", "Source confound", "Leave-one-source-out",
    "Known limitations",
)
"""The card's ``##`` sections, in order."""

AI_ACT = (
    "**Prohibited in the European Union:** inferring the emotions of a natural person in the areas of "
    "the workplace and education institutions is prohibited in the EU since 2 February 2025 (AI Act, "
    "Regulation (EU) 2024/1689, Article 5(1)(f)), except where the system is intended for medical or safety "
    "reasons. Do not use this model to watch employees, job applicants, pupils or students: no "
    "\"focus\", \"engagement\" or \"tiredness\" scores in offices, call centres, classrooms, online exams or "
    "video interviews. Its class names (Focused, Tired) make exactly that use tempting; it is not allowed."
)

INTENDED_USE = [
    "Research, teaching and demonstration of a reproducible data-and-model pipeline for facial-expression "
    "classification: data accounting, de-duplication, leakage-free splits, evaluation, bias and confound analysis.",
    "Classifying the *visible facial expression* in face crops into Neutral / Focused / Tired / Angry, on images "
    "of people who agreed to it, for aggregate analysis where no decision about a person follows.",
    "Benchmarking: comparing datasets, recipes and architectures under the same protocol.",
]

OUT_OF_SCOPE = [
    AI_ACT,
    "Outside those areas, emotion recognition systems are high-risk AI systems under the AI Act (Annex III, "
    "point 1(c)) and whoever deploys one must inform the people exposed to it (Article 50(3)); this model has "
    "not been assessed for any of that.",
    "Any decision about an individual: hiring, grading, promotion, credit, insurance, benefits, policing, border "
    "control, security screening.",
    "Lie or deception detection, inferring mental health, personality, intent or any internal state: a face shows "
    "an expression, not a feeling.",
    "Identifying people or sorting them by demographic attributes; use on children.",
    "Medical or safety use (e.g. drowsiness alerts) without its own clinical or safety validation: the AI Act's "
    "exception for such reasons does not make this model fit for them.",
]

INHERENT_LIMITATIONS = [
    "Inputs are small grayscale face crops (48×48 by default: a dataset's crop, or a face the detector found); "
    "colour, context, body posture and time (video) are not used.",
    "Labels are the source datasets' own, mapped onto four classes by the catalogue's `label_map`; posed and "
    "spontaneous expressions, and each dataset's labelling conventions, are mixed.",
    "There is no \"none of these\" class: every face gets one of the four labels. `fer-pipeline predict "
    "--min-confidence P` answers \"uncertain\" below a calibrated probability P.",
    "The temperature is fitted on the validation split, which also chose the kept training epoch; calibration on "
    "other cameras, people or datasets is not guaranteed.",
]


@dataclass
class ModelCard:
    """The generated markdown, the headline numbers (for the asset's metadata) and what was missing."""

    markdown: str
    facts: dict[str, Any]
    not_run: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- helpers


def _num(value: Any, digits: int = 3) -> str:
    """A number for the card (``—`` for missing / NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


def _ci(interval: tuple[float, float] | None) -> str:
    return "—" if interval is None or not all(map(math.isfinite, interval)) else \
        f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _cell(value: Any) -> str:
    text = _num(value) if isinstance(value, float) else "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub markdown table (floats with 3 decimals, ``|`` escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _read_table(paths: DataPaths, key: str) -> pd.DataFrame | None:
    """A report table (``<stem>.parquet``, else ``.csv``), or None when it was never written."""
    base = paths.report(key)
    for path in (base.with_suffix(".parquet"), base.with_suffix(".csv"), base):
        if path.is_file() and path.suffix in (".parquet", ".csv"):
            return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return None


def _bullets(items: Sequence[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


# ----------------------------------------------------------------------------------- sections


def _start_text(extra: dict[str, Any]) -> str:
    """How the model's weights started: a pretrained backbone (named) or random."""
    if extra.get("init") == "pretrained":
        return f"fine-tuned from the pretrained backbone `{extra.get('backbone')}` (pretraining pool)"
    return f"random (from scratch{': ' + str(extra['init_reason']) if extra.get('init_reason') else ''})"


def _model_details(report: MetricsReport, paths: DataPaths) -> tuple[str, dict[str, Any]]:
    best = report.best_model
    recorded = report.checkpoints.get(best)
    ckpt = paths.resolve(recorded) if recorded else paths.checkpoint(best)
    meta: dict[str, Any] = {}
    if ckpt.is_file():
        try:
            meta = read_checkpoint_metadata(ckpt)
        except (OSError, ValueError) as exc:
            meta = {"error": str(exc)}
    arch = meta.get("architecture") or {}
    train = meta.get("train_config") or {}
    size = meta.get("input_size") or []
    rows = [
        (f"best single model (by {report.selected_by})", best),
        ("checkpoint", f"`{ckpt}`" if ckpt.is_file() else f"`{ckpt}` (missing)"),
        ("architecture", f"{arch.get('name', '—')}: channels {arch.get('channels', '—')}, kernel "
                         f"{arch.get('kernel_size', '—')}" if arch else "—"),
        ("classes", ", ".join(meta.get("classes") or CLASSES)),
        ("input", f"{size[0]}×{size[1]} grayscale" if len(size) == 2 else "—"),
        ("training", f"{train.get('epochs', '—')} epochs max, best epoch {meta.get('best_epoch', '—')}, "
                     f"seed {train.get('seed', '—')}" if train else "—"),
        ("data version", f"`{report.data_version}`"),
        ("calibration temperature", _num((meta.get("calibration") or {}).get("temperature"))),
        ("initial weights", _start_text(meta.get("extra") or {})),
    ]
    if "error" in meta:
        rows.append(("checkpoint problem", meta["error"]))
    return md_table(rows, ["", ""]), meta


def _reviewed(kept: pd.DataFrame, excluded: pd.DataFrame) -> str:
    """How many images a person reviewed (Label Studio), and what came of it."""
    reviewed = kept[kept["review_source"].notna()] if "review_source" in kept.columns else kept.iloc[0:0]
    relabelled = int((reviewed["reviewed_label"] != reviewed["label_before_review"]).sum()) if len(reviewed) else 0
    out = int((excluded["stage"].astype(str) == STAGE_REVIEW).sum())
    if not len(reviewed) and not out:
        return "Reviewed by a person: none (no review applied; docs/review.md)."
    return (f"Reviewed by a person: {len(reviewed) + out} images ({len(reviewed)} kept, {relabelled} of them "
            f"relabelled, {len(reviewed) - relabelled} confirmed; {out} excluded as not a face or by the reviewer).")


def _training_data(paths: DataPaths, catalog: Catalog | None, kept: pd.DataFrame, splits: pd.DataFrame,
                   excluded: pd.DataFrame, pool: pd.DataFrame | None = None) -> tuple[str, dict[str, Any]]:
    specs = {s.name: s for s in catalog.sources} if catalog is not None else {}
    split_of = splits.set_index("image_id")["split"]
    kept = kept.assign(split=kept["image_id"].map(split_of))
    pool = pool if pool is not None else pd.DataFrame(columns=["source", "pool_label"])
    names = sorted(set(kept["source"].astype(str)) | set(excluded["source"].astype(str)) | set(specs)
                   | set(pool["source"].astype(str)))
    classes = [c for c in CLASSES if c in set(kept["label"])] or list(CLASSES)
    rows, licences = [], {}
    for name in names:
        spec = specs.get(name)
        mine = kept[kept["source"].astype(str) == name]
        licence = spec.licence if spec is not None and spec.licence else (
            NOT_DECLARED if spec is not None else f"{NOT_DECLARED} (no longer in the catalogue)")
        licences[name] = licence
        by_class = mine["label"].value_counts()
        by_split = mine["split"].value_counts()
        rows.append([name, spec.kind if spec else "—", licence, len(mine), *[int(by_class.get(c, 0)) for c in classes],
                     *[int(by_split.get(s, 0)) for s in SPLITS],
                     int((pool["source"].astype(str) == name).sum()),
                     int((excluded["source"].astype(str) == name).sum())])
    rows.append(["**all**", "", "", len(kept), *[int((kept["label"] == c).sum()) for c in classes],
                 *[int((kept["split"] == s).sum()) for s in SPLITS], len(pool), len(excluded)])
    header = ["source", "kind", "licence (catalogue)", "images kept", *classes, *SPLITS, "pretraining pool",
              "files not kept"]
    text = [md_table(rows, header), "",
            f"Every source file is accounted for: {len(kept)} kept (`{paths.manifest.name}`), {len(pool)} in the "
            f"pretraining pool (`{paths.pool.name}`), {len(excluded)} not kept with a reason "
            f"(`{paths.excluded.name}`)."]
    if len(pool):
        labels = pool["pool_label"].astype(str).value_counts().sort_index()
        text.append("Pretraining pool labels (not the four classes; the backbone learns face features from them, "
                    "and no pool image duplicates a four-class image): "
                    + ", ".join(f"{k} {v}" for k, v in labels.items()) + ".")
    if len(excluded):
        stages = excluded["stage"].astype(str).value_counts()
        text.append("Not kept, by stage: " + ", ".join(f"{k} {v}" for k, v in stages.items()) + ".")
    text.append(_reviewed(kept, excluded))
    synthetic = [n for n, s in specs.items() if s.kind == "synthetic" and n in set(kept["source"].astype(str))]
    if synthetic:
        text.append(f"\n**Synthetic data:** {', '.join(synthetic)} are procedurally generated cartoon faces, "
                    "for demonstration only: they are not real people, and numbers measured on them say nothing "
                    "about real faces.")
    n_reviewed = int(kept["review_source"].notna().sum()) if "review_source" in kept.columns else 0
    return "\n".join(text), {"licences": licences, "synthetic_sources": synthetic,
                             "reviewed_images": n_reviewed + int((excluded["stage"].astype(str) == STAGE_REVIEW).sum())}


def _test_results(report: MetricsReport, predictions: pd.DataFrame | None,
                  n_resamples: int, seed: int) -> tuple[str, dict[str, tuple[float, float]]]:
    intervals: dict[str, dict[str, tuple[float, float]]] = {}
    if predictions is not None:
        index = {c: i for i, c in enumerate(CLASSES)}
        for name, rows in predictions.groupby("model", sort=False):
            intervals[str(name)] = bootstrap_intervals(rows["true"].map(index), rows["predicted"].map(index),
                                                       len(CLASSES), n_resamples=n_resamples, seed=seed)
    table = []
    order = sorted(report.models, key=lambda n: (-float(report.models[n]["f1"]["macro"]), n))
    for name in order:
        m, ci = report.models[name], intervals.get(name, {})
        shown = f"**{name}** (best)" if name == report.best_model else name
        val = report.validation.get(name) or {}
        table.append([shown, val.get("macro_f1"), m["accuracy"], _ci(ci.get("accuracy")), m["f1"]["macro"],
                      _ci(ci.get("macro_f1")), m["f1"]["weighted"], m["n"]])
    base = report.majority_baseline
    if base:
        table.append([f"{BASELINE_NAME} (always the most frequent training class)", "", base.get("accuracy"), "",
                      (base.get("f1") or {}).get("macro"), "", (base.get("f1") or {}).get("weighted"), base.get("n")])
    note = (f"Test split: {report.n_test} images, never used for training, early stopping, calibration or choosing "
            f"a model: the best model is chosen by {report.selected_by}, the test columns only report. "
            f"95% intervals: percentile bootstrap over the test images ({n_resamples} resamples, seed {seed}), "
            f"from `test_predictions.parquet`.")
    if predictions is None:
        note += " **Intervals not available:** the test predictions were not found (re-materialize model_evaluation)."
    header = ["model", "validation macro-F1", "test accuracy", "95% CI", "test macro-F1", "95% CI", "weighted F1",
              "n"]
    return md_table(table, header) + "\n\n" + note, intervals.get(report.best_model, {})


def _selection(paths: DataPaths, report: MetricsReport) -> tuple[str, dict[str, Any] | None]:
    """How the shipped model was chosen (``models/shipped.json``): every candidate with the
    estimate it was judged on beside its test score."""
    if not paths.shipped_json.is_file():
        text = (f"{NOT_RUN} (materialize `shipped_model`): `fer-pipeline predict` uses the best single model, "
                f"**{report.best_model}**, chosen by {report.selected_by}.")
        return text, None
    try:
        spec = ShippedSpec.read(paths.shipped_json)
    except ValueError as exc:
        return f"{NOT_RUN}: {exc}", None
    rows = []
    for c in spec.candidates:
        test = c.get("test") or {}
        rows.append([f"**{c['name']}** (shipped)" if c.get("shipped") else c["name"], c["kind"], c["estimate_on"],
                     c["estimate"], c.get("oof_macro_f1", ""), test.get("macro_f1"), test.get("ece")])
    header = ["candidate", "kind", "judged on", "selection macro-F1", "pooled out-of-fold macro-F1",
              "test macro-F1", "test ECE"]
    text = (f"Shipped (the default of `fer-pipeline predict`, `models/shipped.json`): **{spec.name}** "
            f"({spec.kind}, {len(spec.members)} member{'s' if len(spec.members) != 1 else ''}), selected by "
            f"{spec.selected_by}: {spec.scores.get('reason', '')}.\n\n" + md_table(rows, header) + "\n\n"
            "The choice is made on validation (single models) or out-of-fold predictions (the cross-validation fold "
            "ensemble, each member calibrated on its own held-out fold) before the test split is read; the test "
            "columns only report. An out-of-fold score estimates one fold model, not the ensemble, and a validation "
            "score is slightly optimistic (early stopping and the choice among models used it).")
    if spec.notes:
        text += "\n\n" + _bullets(spec.notes)
    facts = {"name": spec.name, "kind": spec.kind, "selected_by": spec.selected_by, "members": len(spec.members),
             "selection_macro_f1": (spec.scores.get("selection") or {}).get("macro_f1"),
             "test_macro_f1": (spec.scores.get("test") or {}).get("macro_f1")}
    return text, facts


def _calibration(report: MetricsReport) -> str:
    if not report.calibration:
        return f"{NOT_RUN}: metrics.json records no calibration (re-materialize the models and model_evaluation)."
    rows = []
    for name in sorted(report.calibration):
        c = report.calibration[name]
        fit = c.get("fit") or {}
        fitted = f"{fit.get('n', '—')}" + (" (T at the search bound)" if fit.get("at_bound") else "")
        rows.append([name, c.get("temperature"), fitted if c.get("recorded") else "not fitted (older checkpoint)",
                     c.get("ece_before"), c.get("ece_after"), c.get("nll_before"), c.get("nll_after")])
    header = ["model", "temperature T", "fitted on validation images", "test ECE before", "test ECE after",
              "test NLL before", "test NLL after"]
    bins = next(iter(report.calibration.values())).get("n_bins", N_BINS)
    return (md_table(rows, header) + "\n\n"
            f"Temperature scaling divides the logits by T (fitted on the validation split by minimising the negative "
            f"log-likelihood); predictions do not change, probabilities do. ECE: top-label expected calibration "
            f"error over {bins} equal-width confidence bins (0 = a stated 80% is right 80% of the time). Reliability "
            f"diagrams: `reports/reliability_<model>.png`. `fer-pipeline predict` prints the calibrated "
            f"probabilities.")


def _cross_validation(paths: DataPaths) -> tuple[str, dict[str, float] | None]:
    table = _read_table(paths, "cv_folds")
    if table is None or not len(table):
        return f"{NOT_RUN} (materialize `cross_validation`).", None
    folds = table[~table["fold"].astype(str).isin(["mean", "std"])]
    mean = folds[["accuracy", "macro_f1"]].astype(float).mean()
    std = folds[["accuracy", "macro_f1"]].astype(float).std(ddof=0 if len(folds) < 2 else 1)
    stored = table.set_index(table["fold"].astype(str))
    if {"mean", "std"} <= set(stored.index):  # what the asset published
        mean, std = stored.loc["mean", ["accuracy", "macro_f1"]].astype(float), \
            stored.loc["std", ["accuracy", "macro_f1"]].astype(float)
    summary_path = paths.report("cv_summary")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    arch = summary.get("architecture", MAIN_MODEL)
    text = (f"{len(folds)} folds of the main architecture ({arch}) over train+validation: macro-F1 "
            f"**{mean['macro_f1']:.3f} ± {std['macro_f1']:.3f}**, accuracy {mean['accuracy']:.3f} ± "
            f"{std['accuracy']:.3f} (mean ± std over folds).")
    return text, {"macro_f1_mean": float(mean["macro_f1"]), "macro_f1_std": float(std["macro_f1"])}


def _per_group(paths: DataPaths) -> tuple[str, pd.DataFrame | None]:
    table = _read_table(paths, "bias_report")
    if table is None:
        return f"{NOT_RUN} (materialize `bias_report`).", None
    if not len(table):
        return "No demographic attribute is recorded for the test images: no per-group result.", table
    rows = [[r["attribute"], r["group"], int(r["n"]), r["accuracy"], r["macro_f1"], f"{r['macro_f1_gap_pts']:+.1f}",
             r["status"]] for _, r in table.iterrows()]
    text = (f"Main model ({MAIN_MODEL}; the analyses run on the main architecture, which may not be the best model "
            "above) on the test split, per demographic group (macro scores over the classes present in the group; "
            "macro-F1 gap in percentage points to the overall):\n\n"
            + md_table(rows, ["attribute", "group", "test images", "accuracy", "macro-F1", "gap (pts)", "status"]))
    coverage = _read_table(paths, "bias_coverage")
    if coverage is not None and len(coverage):
        text += "\n\nCoverage: " + ", ".join(
            f"{r['attribute']} known for {int(r['n_with_attribute'])} of {int(r['n_total'])}"
            for _, r in coverage.iterrows()) + "."
    return text, table


def _confound(paths: DataPaths, max_share: float) -> tuple[str, pd.DataFrame | None]:
    shares = _read_table(paths, "source_confound")
    if shares is None:
        return f"{NOT_RUN} (materialize `source_confound`).", None
    frame = shares.loc[shares.index.repeat(shares["n"].astype(int)), ["label", "source"]]
    findings = confound_findings(frame, max_share)
    if shares["source"].nunique() < 2:
        text = "One source only: no class can be told apart by its source (and none can be checked)."
    elif findings.empty:
        text = f"No class comes more than {max_share:.0%} from one source while the others do not."
    else:
        text = "**Confounded classes** (a model can learn the source instead of the face):\n\n" + md_table(
            [[r["label"], r["source"], f"{r['share']:.0%}", r["other_classes_share"]] for _, r in findings.iterrows()],
            ["class", "source", "share of the class", "that source's share of the other classes"])
    per_source = pd.read_csv(paths.report("source_metrics")) if paths.report("source_metrics").is_file() else None
    if per_source is not None and len(per_source):
        text += "\n\nMain model's test scores per source:\n\n" + md_table(
            [[r["source"], int(r["n"]), r["accuracy"], r["macro_f1"], r["classes"]] for _, r in per_source.iterrows()],
            ["source", "test images", "accuracy", "macro-F1", "classes"])
    return text, findings


def _loso(paths: DataPaths) -> tuple[str, pd.DataFrame | None]:
    table = _read_table(paths, "loso")
    if table is None:
        return f"{NOT_RUN} (materialize `cross_source_generalisation`).", None
    done = table[table["status"] == STATUS_DONE]
    if done.empty:
        reasons = "; ".join(sorted(set(table["status"].astype(str))))
        return f"{reasons[:1].upper()}{reasons[1:]}.", table
    rows = [[r["held_out_source"], r["classes_held_out"], int(r["n_held_out"]), r["loso_macro_f1"],
             r["in_domain_macro_f1"], f"{float(r['gap_macro_f1_pts']):+.1f}"] for _, r in done.iterrows()]
    return ("The main architecture trained without one source and tested on all of it, beside the main model on "
            "that source's own test rows (in-domain):\n\n"
            + md_table(rows, ["held-out source", "classes", "images", "macro-F1 held out", "macro-F1 in-domain",
                              "gap (pts)"])), table


def _limitations(facts: dict[str, Any], bias: pd.DataFrame | None, findings: pd.DataFrame | None,
                 loso: pd.DataFrame | None, not_run: list[str], kept: pd.DataFrame) -> list[str]:
    items = []
    if facts.get("synthetic_sources"):
        items.append(f"Trained and tested on synthetic faces ({', '.join(facts['synthetic_sources'])}): every number "
                     "in this card describes cartoons, not people.")
    ci = facts.get("test_macro_f1_ci")
    if ci and all(map(math.isfinite, ci)):
        items.append(f"Test split of {facts['n_test']} images: the best model's test macro-F1 "
                     f"{facts['test_macro_f1']:.3f} lies, with 95% confidence, between {ci[0]:.3f} and {ci[1]:.3f}; "
                     "differences between models inside that range are not evidence.")
    for attr in ("gender", "age_group", "race"):
        known = int(kept[attr].notna().sum()) if attr in kept.columns else 0
        if not known:
            items.append(f"`{attr}` is not recorded for any image: nothing is known about groups by {attr}.")
        elif known < len(kept):
            items.append(f"`{attr}` is known for {known} of {len(kept)} images: per-group results cover only those.")
    if bias is not None and len(bias):
        small = bias[bias["status"] == STATUS_SMALL]
        below = bias[bias["status"] == STATUS_GAP]
        if len(small):
            items.append("Groups too small to judge: " + ", ".join(
                f"{r['attribute']}={r['group']} (n={int(r['n'])})" for _, r in small.iterrows()) + ".")
        if len(below):
            items.append("Groups scoring below the overall: " + ", ".join(
                f"{r['attribute']}={r['group']} ({r['macro_f1_gap_pts']:+.1f} pts)" for _, r in below.iterrows()) + ".")
    if findings is not None and len(findings):
        items.append("Source confound: " + ", ".join(f"{r['label']} is {r['share']:.0%} from {r['source']}"
                                                     for _, r in findings.iterrows()) + ".")
    if loso is not None and (loso["status"] == STATUS_DONE).any():
        gap = loso.loc[loso["status"] == STATUS_DONE, "gap_macro_f1_pts"].astype(float).mean()
        items.append(f"On a source it was not trained on, macro-F1 changes by {gap:+.1f} points on average "
                     "(leave-one-source-out): expect a drop on new cameras and populations.")
    if not_run:
        items.append("Not run, so not known: " + ", ".join(not_run) + ".")
    return items + INHERENT_LIMITATIONS


# ----------------------------------------------------------------------------------- the card


def build_model_card(paths: DataPaths, catalog: Catalog | None = None, *, confound_max_share: float = 0.9,
                     n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> ModelCard:
    """Generate the card from the published outputs under ``paths`` (metrics.json is required)."""
    if not paths.metrics_json.is_file():
        raise FileNotFoundError(f"{paths.metrics_json} does not exist: materialize model_evaluation first")
    report = MetricsReport.read(paths.metrics_json)
    published = read_published(paths)
    kept, splits = published.manifest, published.splits
    excluded = pd.read_parquet(paths.excluded)
    warnings = []
    if report.data_version != published.data_version:
        warnings.append(f"metrics.json was computed on data version {report.data_version}, the published data is "
                        f"{published.data_version}: re-materialize the models and model_evaluation")
    pred_path = paths.report("test_predictions")
    predictions = pd.read_parquet(pred_path) if pred_path.is_file() else None

    details, _ = _model_details(report, paths)
    selection_text, shipped = _selection(paths, report)
    data_text, data_facts = _training_data(paths, catalog, kept, splits, excluded, read_pool(paths))
    test_text, best_ci = _test_results(report, predictions, n_resamples, seed)
    cv_text, cv = _cross_validation(paths)
    group_text, bias = _per_group(paths)
    confound_text, findings = _confound(paths, confound_max_share)
    loso_text, loso = _loso(paths)
    not_run = [name for name, value in (("cross-validation", cv), ("per-group results", bias),
                                        ("source confound", findings), ("leave-one-source-out", loso))
               if value is None]
    best = report.models.get(report.best_model, {})
    calibration = report.calibration.get(report.best_model, {})
    facts: dict[str, Any] = {
        "best_model": report.best_model, "selected_by": report.selected_by,
        "validation_macro_f1": report.best_validation_macro_f1(), "shipped": shipped,
        "data_version": report.data_version, "n_test": report.n_test,
        "test_accuracy": best.get("accuracy"), "test_macro_f1": (best.get("f1") or {}).get("macro"),
        "test_macro_f1_ci": list(best_ci.get("macro_f1", ())) or None,
        "test_accuracy_ci": list(best_ci.get("accuracy", ())) or None,
        "temperature": calibration.get("temperature"), "ece_before": calibration.get("ece_before"),
        "ece_after": calibration.get("ece_after"), "cross_validation": cv, "not_run": not_run, **data_facts,
    }
    body = {
        "Model details": details,
        "Model selection": selection_text,
        "Intended use": _bullets(INTENDED_USE),
        "Out-of-scope and prohibited uses": _bullets(OUT_OF_SCOPE),
        "Training data": data_text,
        "Test results": test_text,
        "Calibration": _calibration(report),
        "Cross-validation": cv_text,
        "Per-group results": group_text,
        "Source confound": confound_text,
        "Leave-one-source-out": loso_text,
        "Known limitations": _bullets(_limitations(facts, bias, findings, loso, not_run, kept)),
    }
    title = shipped["name"] if shipped else report.best_model
    head = [f"# Model card: {title} (fer-pipeline facial expression classifier)", "",
            "_Generated by the `model_card` asset from the pipeline's published outputs (metrics.json, "
            "test_predictions.parquet, the manifest, the analysis reports, the catalogue's licences); do not edit: "
            "it is rewritten with the models._"]
    head += [f"\n> **Warning:** {w}." for w in warnings]
    parts = [*head] + [f"\n## {title}\n\n{body[title]}" for title in SECTIONS]
    return ModelCard("\n".join(parts) + "\n", facts, not_run, warnings)


def write_model_card(paths: DataPaths, card: ModelCard) -> Path:
    """Publish the card as ``reports/model_card.md`` (temp file + fsync + rename)."""
    return write_text(paths.report("model_card"), card.markdown)
