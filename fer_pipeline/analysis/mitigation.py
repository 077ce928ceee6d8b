"""Bias mitigation by demographic group: oversampling and/or loss re-weighting of the training set.

Both strategies aim at the same *target share* per group of one attribute: every known group
below ``min_share`` of the training set is raised to ``min_share``, and the other groups
(``unknown`` included, which is never raised) give up mass in proportion to their size.

* ``oversample``: under-represented groups are repeated (rows drawn with replacement, seeded)
  until they make up their target share. The training loop augments every batch (flip,
  rotation, shift, brightness/contrast), so a repeated face is seen under a different
  augmentation each time.
* ``reweight``: no rows are added; each row's loss weight is ``target share / actual share``
  of its group (normalised to mean 1), passed to ``train_model(..., sample_weights=...)``.
* ``both``: oversample half-way to the target, re-weight the rest.

:func:`comparison_table` puts the main model's and the mitigated model's overall and
per-group test metrics side by side, so the trade-off is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.analysis.bias import (
    ATTRIBUTES,
    UNKNOWN,
    group_labels,
    group_metrics,
    present_attributes,
)
from fer_pipeline.classes import CLASSES
from fer_pipeline.faces.preprocess import PreprocessSettings
from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.pretrain import Start
from fer_pipeline.ml.train import TrainConfig
from fer_pipeline.ml.workflow import TrainedModel, train_and_save
from fer_pipeline.paths import DataPaths

MODES: tuple[str, ...] = ("off", "oversample", "reweight", "both")


def choose_attribute(frame: pd.DataFrame, attributes: Sequence[str] = ATTRIBUTES) -> str | None:
    """The attribute whose smallest known group has the smallest share ("auto"); None when no
    attribute has at least two known groups."""
    best: tuple[float, str] | None = None
    for attr in present_attributes(frame, attributes):
        g = pd.Series(group_labels(frame, attr))
        known = g[g != UNKNOWN]
        counts = known.value_counts()
        if len(counts) < 2:
            continue
        share = float(counts.min() / len(g))
        if best is None or share < best[0]:
            best = (share, attr)
    return best[1] if best else None


def target_shares(groups: np.ndarray, min_share: float) -> pd.DataFrame:
    """Per group: n, share, target share (see module doc). ``min_share`` above 1/number of known
    groups is capped there (every known group equal)."""
    g = pd.Series(np.asarray(groups, dtype=object))
    counts = g.value_counts().sort_index()
    share = counts / counts.sum()
    known = [k for k in share.index if k != UNKNOWN]
    m = min(float(min_share), 1.0 / len(known)) if known else 0.0
    target = share.copy()
    raised: set[str] = set()
    # Raise the groups below m; scale the others down; repeat while scaling pushes one below m.
    for _ in range(len(share) + 1):
        low = {k for k in known if k not in raised and target[k] < m - 1e-12}
        if not low:
            break
        raised |= low
        rest = [k for k in share.index if k not in raised]
        free = 1.0 - m * len(raised)
        base = share[rest].sum()
        for k in raised:
            target[k] = m
        for k in rest:
            target[k] = share[k] * free / base if base > 0 else 0.0
    return pd.DataFrame({"group": share.index.astype(str), "n": counts.to_numpy(), "share": share.to_numpy(),
                         "target_share": target.to_numpy()})


@dataclass
class MitigationPlan:
    mode: str
    attribute: str | None
    min_share: float
    rows: np.ndarray  # training row indices to use (with repeats when oversampling)
    weights: np.ndarray | None  # per selected row; None = uniform
    shares: pd.DataFrame  # group, n, share, target_share, n_after, weight, effective_share

    @property
    def active(self) -> bool:
        return self.mode != "off" and self.attribute is not None


def plan_mitigation(frame: pd.DataFrame, mode: str, attribute: str | None, min_share: float,
                    seed: int = 0) -> MitigationPlan:
    """Rows (and weights) to train the mitigated model on, from the training split's ``frame``."""
    if mode not in MODES:
        raise ValueError(f"mitigation mode must be one of {', '.join(MODES)}, got {mode!r}")
    n = len(frame)
    identity = np.arange(n)
    if mode == "off" or attribute is None:
        return MitigationPlan(mode if attribute else "off", attribute, min_share, identity, None, pd.DataFrame())
    if not 0.0 < min_share < 1.0:
        raise ValueError(f"min_share must be in (0, 1), got {min_share}")
    groups = group_labels(frame, attribute)
    table = target_shares(groups, min_share)
    share = dict(zip(table["group"], table["share"]))
    target = dict(zip(table["group"], table["target_share"]))
    rows = identity
    if mode in ("oversample", "both"):
        # oversample toward the target (half-way for "both"); groups not raised keep their rows
        goal = {k: target[k] if mode == "oversample" else (share[k] + target[k]) / 2 for k in share}
        raised = [k for k in share if goal[k] > share[k] + 1e-12]
        kept = [k for k in share if k not in raised]
        n_kept = sum(int((groups == k).sum()) for k in kept)
        total = n_kept / sum(goal[k] for k in kept) if kept else n
        rng = np.random.default_rng(seed)
        extra = []
        for k in sorted(raised):
            members = np.flatnonzero(groups == k)
            add = int(round(goal[k] * total)) - len(members)
            if add > 0:
                extra.append(rng.choice(members, size=add, replace=True))
        rows = np.concatenate([identity, *extra]) if extra else identity
    weights = None
    after = pd.Series(groups[rows]).value_counts()
    if mode in ("reweight", "both"):
        after_share = after / after.sum()
        w_group = {k: target[k] / after_share[k] for k in after_share.index}
        weights = np.array([w_group[k] for k in groups[rows]], dtype=np.float64)
        weights /= weights.mean()
    w_sel = weights if weights is not None else np.ones(len(rows))
    eff = pd.Series(w_sel).groupby(groups[rows]).sum() / w_sel.sum()
    mean_w = pd.Series(w_sel).groupby(groups[rows]).mean()
    table["n_after"] = table["group"].map(after).fillna(0).astype(int)
    table["weight"] = table["group"].map(mean_w).fillna(0.0)
    table["effective_share"] = table["group"].map(eff).fillna(0.0)
    return MitigationPlan(mode, attribute, min_share, rows, weights, table)


COMPARISON_COLUMNS = ["scope", "group", "n", "before_accuracy", "after_accuracy", "delta_accuracy_pts",
                      "before_macro_f1", "after_macro_f1", "delta_macro_f1_pts", "before_gap_pts", "after_gap_pts"]


def comparison_table(frame: pd.DataFrame, y_true: np.ndarray, before_pred: np.ndarray, after_pred: np.ndarray | None,
                     attributes: Sequence[str] = ATTRIBUTES, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Overall and per-group test metrics before (main model) and after (mitigated model).

    ``*_gap_pts`` is the group's macro-F1 minus that model's overall macro-F1, in points;
    ``after_pred`` None (mitigation off) leaves the "after" columns empty.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    before_all = group_metrics(y_true, before_pred, classes)
    after_all = group_metrics(y_true, after_pred, classes) if after_pred is not None else None
    rows = []

    def row(scope: str, group: str, mask: np.ndarray) -> dict[str, object]:
        b = group_metrics(y_true[mask], np.asarray(before_pred)[mask], classes)
        a = group_metrics(y_true[mask], np.asarray(after_pred)[mask], classes) if after_pred is not None else None
        nan = float("nan")
        return {
            "scope": scope, "group": group, "n": b["n"],
            "before_accuracy": b["accuracy"], "after_accuracy": a["accuracy"] if a else nan,
            "delta_accuracy_pts": 100 * (a["accuracy"] - b["accuracy"]) if a else nan,
            "before_macro_f1": b["macro_f1"], "after_macro_f1": a["macro_f1"] if a else nan,
            "delta_macro_f1_pts": 100 * (a["macro_f1"] - b["macro_f1"]) if a else nan,
            "before_gap_pts": 100 * (b["macro_f1"] - before_all["macro_f1"]),
            "after_gap_pts": 100 * (a["macro_f1"] - after_all["macro_f1"]) if a and after_all else nan,
        }

    rows.append(row("overall", "(all)", np.ones(len(y_true), dtype=bool)))
    for attr in present_attributes(frame, attributes):
        g = group_labels(frame, attr)
        names = sorted(set(g) - {UNKNOWN}, key=lambda v: (-(g == v).sum(), v)) + ([UNKNOWN] if (g == UNKNOWN).any() else [])
        for name in names:
            rows.append(row(attr, name, g == name))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


# --------------------------------------------------------------------------------------------
# Training the mitigated model, and describing it for the before/after comparison
# --------------------------------------------------------------------------------------------

HOW_TO_ENABLE = ("set resources.analysis.config.mitigation to oversample, reweight or both "
                 "(and optionally mitigation_attribute / mitigation_min_share)")
STATUS_OFF = "disabled (analysis.mitigation = off)"


@dataclass
class MitigationOutcome:
    """What the mitigated_model asset did: trained (``trained`` set) or why not (``status``)."""

    status: str
    plan: MitigationPlan | None = None
    trained: TrainedModel | None = None
    original_rows: int = 0


def train_mitigated_model(arrays: dict[str, SplitArrays], *, mode: str, attribute: str, attributes: Sequence[str],
                          min_share: float, arch: ArchConfig, config: TrainConfig, paths: DataPaths,
                          data_version: str, preprocess: PreprocessSettings, name: str,
                          log: Callable[[str], None] | None = None, start: Start | None = None) -> MitigationOutcome:
    """Retrain ``arch`` with the main recipe on the training split balanced by group of
    ``attribute`` ("auto": :func:`choose_attribute`), or say why nothing was trained."""
    if mode not in MODES:
        raise ValueError(f"analysis.mitigation must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return MitigationOutcome(STATUS_OFF)
    train = arrays["train"]
    chosen = choose_attribute(train.frame, attributes) if attribute == "auto" else attribute
    if chosen is None or chosen not in present_attributes(train.frame, [chosen]):
        carried = present_attributes(train.frame, attributes) or "none"
        return MitigationOutcome(f"skipped: no demographic attribute to balance (asked: {attribute}; the training "
                                 f"split carries {carried})")
    plan = plan_mitigation(train.frame, mode, chosen, min_share, seed=config.seed)
    if log:
        log(f"mitigation '{plan.mode}' on {chosen}: {len(train)} → {len(plan.rows)} training rows\n"
            f"{plan.shares.round(3).to_string(index=False)}")
    extra = {"mitigation": {"mode": plan.mode, "attribute": chosen, "min_share": min_share,
                            "shares": plan.shares.to_dict(orient="records")}}
    trained = train_and_save(name, arch, config, arrays, paths, data_version, preprocess, train_rows=plan.rows,
                             sample_weights=plan.weights, extra=extra, log=log, start=start)
    return MitigationOutcome(f"trained ({plan.mode} on {chosen})", plan, trained, len(train))


def same_recipe(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Same architecture and training config (seed included) in two checkpoints' metadata."""
    return (before.get("architecture") == after.get("architecture")
            and before.get("train_config") == after.get("train_config"))


def describe_mitigated(mode: str, after_metadata: dict[str, Any] | None) -> tuple[str, str | None]:
    """(status line, balanced attribute) of the mitigated model for the before/after table."""
    if mode == "off":
        return f"{STATUS_OFF}: only the 'before' columns are filled", None
    if after_metadata is None:
        return "no mitigated model (see mitigated_model's metadata)", None
    mit = (after_metadata.get("extra") or {}).get("mitigation", {})
    attribute = mit.get("attribute")
    return f"{mit.get('mode')} on {attribute} (min share {mit.get('min_share')})", attribute
