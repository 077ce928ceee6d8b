"""Which model ships, chosen without the test split (plain Python, no Dagster).

Two kinds of candidate:

* **single**: the model ``model_evaluation`` chose by validation macro-F1 (``metrics.json``
  ``best_model``). Its estimate is its validation macro-F1. That estimate is slightly optimistic:
  the model early-stopped on the validation split and was picked as the best of several on it.
* **ensemble**: the cross-validation fold models (``models/cv_folds/``), each calibrated on its
  own held-out fold. The validation split is inside every fold model's training pool except one,
  so validation says nothing about the ensemble; its estimate is the members' **out-of-fold**
  (OOF) macro-F1: every train+validation image predicted by the one member that never saw it.

The pooled OOF score is an estimate of *one member*, not of the ensemble: no image has an
ensemble prediction that none of its members trained on. An ensemble of k members is usually at
least as good as its average member, so the OOF score tends to *under*-state the ensemble,
while the single model's validation score tends to *over*-state the single model: the comparison
leans towards the single model, and an ensemble that wins it wins conservatively.

To compare like with like, the decision uses the OOF score **on the validation images only**:
the same images the single model's validation score is computed on, each predicted by a model
that never trained on it. The pooled OOF score over all train+validation images is reported
beside it. The ensemble ships only when it is complete (every fold of the current recipe and
data, with its checkpoint) and its estimate is strictly higher. Only then is the test split
read, once, to report the shipped model's score (and, for the record, the other candidate's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.analysis.cross_validation import FoldCollection, FoldResult
from fer_pipeline.classes import CLASS_TO_INDEX
from fer_pipeline.ml.calibration import apply_temperature
from fer_pipeline.ml.checkpoint import read_checkpoint_metadata
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.metrics import evaluate_predictions
from fer_pipeline.ml.shipped import (
    ENSEMBLE,
    SINGLE,
    EnsembleModel,
    ShippedMember,
    ShippedSpec,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import SELECTED_BY_OOF, SELECTED_BY_VALIDATION, MetricsReport

ENSEMBLE_NAME = "cv_fold_ensemble"


@dataclass
class Candidate:
    """A model that could ship, with the estimate it is judged on (never a test score)."""

    name: str
    kind: str
    estimate: float  # macro-F1 the choice compares
    estimate_on: str  # what the estimate was computed on
    members: list[ShippedMember]
    detail: dict[str, Any] = field(default_factory=dict)  # more estimates, reported only


@dataclass
class Decision:
    """The chosen candidate, every candidate considered, and why."""

    chosen: Candidate
    candidates: list[Candidate]
    selected_by: str
    reason: str
    notes: list[str]


def single_candidate(report: MetricsReport, paths: DataPaths) -> Candidate:
    """``metrics.json``'s best model (chosen there by validation macro-F1) as a candidate."""
    if not report.validation:
        raise ValueError("metrics.json records no validation scores (written before selection on validation): "
                         "re-materialize model_evaluation")
    name = report.best_model
    val = report.validation[name]
    recorded = report.checkpoints.get(name)
    ckpt = Path(recorded) if recorded else paths.checkpoint(name)
    t = float((report.calibration.get(name) or {}).get("temperature") or 1.0)
    return Candidate(name, SINGLE, float(val["macro_f1"]), f"validation split ({val.get('n')} images)",
                     [ShippedMember(name, _relative(ckpt, paths), t)],
                     {"validation_accuracy": val.get("accuracy"), "validation_n": val.get("n")})


def fold_members(paths: DataPaths, collected: FoldCollection, identities: dict[int, str],
                 n_cv_folds: int) -> tuple[list[ShippedMember], str | None]:
    """The fold checkpoints of the current recipe, or why they cannot make an ensemble (folds
    missing or refused, a checkpoint missing or written for another recipe, no OOF temperature)."""
    if not collected.complete:
        return [], (f"cross-validation incomplete (folds missing {collected.missing}, refused "
                    f"{sorted(collected.refused)}): no ensemble")
    members = []
    for result in sorted(collected.used, key=lambda r: r.fold):
        ckpt = paths.fold_checkpoint(result.fold)
        if not ckpt.is_file():
            return [], f"fold {result.fold} has no checkpoint ({ckpt}): re-materialize cv_fold partition {result.fold}"
        extra = read_checkpoint_metadata(ckpt).get("extra") or {}
        if extra.get("recipe_identity") != identities[result.fold]:
            return [], (f"fold {result.fold}'s checkpoint was trained for another recipe or data version: "
                        f"re-materialize cv_fold partition {result.fold}")
        t = result.calibration.get("temperature")
        if t is None:
            return [], f"fold {result.fold} records no out-of-fold temperature: re-materialize cv_fold"
        members.append(ShippedMember(f"cv_fold_{result.fold}", _relative(ckpt, paths), float(t)))
    if len(members) != n_cv_folds:
        return [], f"{len(members)} of {n_cv_folds} fold checkpoints: no ensemble"
    return members, None


def oof_scores(folds: Sequence[FoldResult], validation_ids: set[str]) -> dict[str, Any]:
    """Out-of-fold macro-F1 of the members: pooled over every held-out image, and over the
    validation-split images alone (the single model's validation images)."""
    oof = pd.concat([r.oof for r in folds], ignore_index=True)
    y = oof["label"].map(CLASS_TO_INDEX).to_numpy()
    pred = oof["predicted"].map(CLASS_TO_INDEX).to_numpy()
    on_val = oof["image_id"].isin(validation_ids).to_numpy()
    pooled = evaluate_predictions(y, pred)
    val = evaluate_predictions(y[on_val], pred[on_val])
    return {"oof_macro_f1": pooled.macro_f1, "oof_accuracy": pooled.accuracy, "oof_n": pooled.n,
            "oof_validation_images_macro_f1": val.macro_f1, "oof_validation_images_accuracy": val.accuracy,
            "oof_validation_images_n": val.n,
            "per_fold_macro_f1": {str(r.fold): r.metrics.get("macro_f1") for r in folds}}


def decide(single: Candidate, ensemble: Candidate | None, ensemble_unavailable: str | None = None) -> Decision:
    """Ship the ensemble only when it exists and its estimate beats the single model's."""
    notes = [ensemble_unavailable] if ensemble_unavailable else []
    candidates = [single, *([ensemble] if ensemble else [])]
    if ensemble is not None and ensemble.estimate > single.estimate:
        reason = (f"the fold ensemble's out-of-fold macro-F1 on the validation images ({ensemble.estimate:.4f}) beats "
                  f"{single.name}'s validation macro-F1 ({single.estimate:.4f})")
        return Decision(ensemble, candidates, SELECTED_BY_OOF, reason, notes)
    if ensemble is not None:
        reason = (f"{single.name}'s validation macro-F1 ({single.estimate:.4f}) is at least the fold ensemble's "
                  f"out-of-fold macro-F1 on the same images ({ensemble.estimate:.4f})")
    else:
        reason = f"{single.name} has the best validation macro-F1 ({single.estimate:.4f}); no ensemble to compare"
    return Decision(single, candidates, SELECTED_BY_VALIDATION, reason, notes)


def ensemble_test_scores(ensemble: EnsembleModel, test: SplitArrays) -> dict[str, Any]:
    """The ensemble on the test split: read after the decision, to report."""
    probs = ensemble.predict_proba(test.images)
    y = np.asarray(test.labels, dtype=np.int64)
    m = evaluate_predictions(y, probs.argmax(1), probs, classes=ensemble.classes)
    effect = apply_temperature(np.log(np.clip(probs, 1e-300, None)), y, 1.0)
    return {"macro_f1": m.macro_f1, "accuracy": m.accuracy, "n": m.n, "ece": effect.ece_after,
            "metrics": m.to_dict()}


def single_test_scores(report: MetricsReport, name: str) -> dict[str, Any]:
    """The single model's test scores as ``model_evaluation`` reported them."""
    m = report.models.get(name) or {}
    cal = report.calibration.get(name) or {}
    return {"macro_f1": (m.get("f1") or {}).get("macro"), "accuracy": m.get("accuracy"), "n": m.get("n"),
            "ece": cal.get("ece_after")}


def shipped_spec(decision: Decision, test: dict[str, dict[str, Any]], data_version: str) -> ShippedSpec:
    """The ``shipped.json`` record of a decision; ``test`` maps candidate name -> test scores."""
    chosen = decision.chosen
    strip = ("metrics",)
    candidates = [{"name": c.name, "kind": c.kind, "estimate": c.estimate, "estimate_on": c.estimate_on,
                   "shipped": c is chosen, **c.detail,
                   "test": {k: v for k, v in (test.get(c.name) or {}).items() if k not in strip}}
                  for c in decision.candidates]
    scores = {"selection": {"macro_f1": chosen.estimate, "on": chosen.estimate_on, **chosen.detail},
              "test": {k: v for k, v in (test.get(chosen.name) or {}).items() if k not in strip},
              "reason": decision.reason}
    notes = [*decision.notes]
    if chosen.kind == ENSEMBLE:
        notes.append("the out-of-fold score estimates one fold model, not the ensemble (no image has an ensemble "
                     "prediction none of its members trained on); the test score is the ensemble's own")
    return ShippedSpec(kind=chosen.kind, name=chosen.name, members=tuple(chosen.members),
                       selected_by=decision.selected_by, data_version=data_version, scores=scores,
                       candidates=candidates, notes=notes)


def _relative(path: Path, paths: DataPaths) -> str:
    """``path`` relative to the data root when it lies under it (a data root can move)."""
    try:
        return str(Path(path).resolve().relative_to(paths.root.resolve()))
    except ValueError:
        return str(path)

