"""Cross-source generalisation: leave-one-source-out (LOSO) training and evaluation.

For every source that covers at least ``min_classes`` classes (and whose removal leaves
training data covering at least two classes), the main architecture is trained with the usual
recipe on the *train* split of all other sources, early-stopped on their *validation* split,
and tested on *every* image of the held-out source (none of them was seen). Beside it stands
the in-domain score: the main model on the held-out source's own test rows. On real data the
gap is often large -- a number measured inside one hand-assembled set says little about
another -- and a user must see it before trusting a number.

One held-out source is one unit of work, :func:`held_out_row` (in the pipeline: one partition
of the ``loso_fold`` asset). Its row is stored with the :class:`TrainingRecipe` it was trained
with (:class:`LosoStore`); :func:`collect_rows` refuses rows of another recipe (another data
version above all) and :func:`loso_table` adds the in-domain columns.

Macro scores average the classes present in the evaluated rows (a source may lack a class).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.analysis.bias import group_metrics
from fer_pipeline.analysis.cross_validation import (
    LogFn,
    TrainFn,
    TrainingRecipe,
    combine_arrays,
    subset,
)
from fer_pipeline.analysis.partition_store import PartitionStore
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.inference import predict_proba
from fer_pipeline.ml.train import TrainConfig, train_model
from fer_pipeline.schema import SPLITS

STATUS_DONE = "evaluated"
ELIGIBLE = "eligible"
NOT_APPLICABLE_ONE_SOURCE = "not applicable: only one source"
NOT_IN_DATA = "skipped: no image of this source in the published data"
MISSING = "missing: not trained on the published data yet"

COLUMNS = ["held_out_source", "status", "classes_held_out", "n_train", "n_early_stopping", "n_held_out",
           "loso_accuracy", "loso_macro_f1", "in_domain_n", "in_domain_accuracy", "in_domain_macro_f1",
           "gap_macro_f1_pts", "loso_model_other_sources_test_macro_f1", "run_id"]
TEXT_COLUMNS = ("held_out_source", "status", "classes_held_out", "run_id")


def sources_of(arrays: dict[str, SplitArrays]) -> list[str]:
    """The sources of the published data, sorted."""
    return sorted({s for name in SPLITS if name in arrays for s in arrays[name].frame["source"].astype(str)})


def eligibility(arrays: dict[str, SplitArrays], min_classes: int = 2) -> dict[str, str]:
    """Per source: ``"eligible"`` or the reason it is skipped."""
    everything = combine_arrays([arrays[s] for s in SPLITS])
    sources = everything.frame["source"].astype(str).to_numpy()
    out: dict[str, str] = {}
    for source in sorted(set(sources)):
        held = set(everything.labels[sources == source].tolist())
        tr = arrays["train"].frame["source"].astype(str).to_numpy() != source
        va = arrays["validation"].frame["source"].astype(str).to_numpy() != source
        train_classes = set(arrays["train"].labels[tr].tolist())
        if len(held) < min_classes:
            out[source] = f"skipped: covers {len(held)} class(es), at least {min_classes} needed"
        elif len(train_classes) < 2:
            out[source] = "skipped: the other sources' training rows cover fewer than 2 classes"
        elif tr.sum() < 2 or va.sum() < 1:
            out[source] = "skipped: the other sources have too few training/validation rows"
        else:
            out[source] = ELIGIBLE
    return out


def held_out_row(
    arrays: dict[str, SplitArrays],
    source: str,
    arch: ArchConfig,
    config: TrainConfig,
    *,
    min_classes: int = 2,
    run_id: str = "",
    log: LogFn | None = None,
    train_log: LogFn | None = None,
    train_fn: TrainFn = train_model,
) -> dict[str, Any]:
    """Train without ``source`` and test on all of it: its row of the LOSO table (without the
    in-domain columns), or a row saying why it is skipped. ``arrays`` hold every split."""
    log = log or (lambda _m: None)
    all_sources = sources_of(arrays)
    if source not in all_sources:
        return {"held_out_source": source, "status": NOT_IN_DATA, "run_id": run_id}
    if len(all_sources) < 2:
        return {"held_out_source": source, "status": NOT_APPLICABLE_ONE_SOURCE, "run_id": run_id}
    status = eligibility(arrays, min_classes)[source]
    if status != ELIGIBLE:
        log(f"held-out source {source}: {status}")
        return {"held_out_source": source, "status": status, "run_id": run_id}
    everything = combine_arrays([arrays[s] for s in SPLITS])
    test = arrays["test"]
    tr_mask = arrays["train"].frame["source"].astype(str).to_numpy() != source
    va_mask = arrays["validation"].frame["source"].astype(str).to_numpy() != source
    held_mask = everything.frame["source"].astype(str).to_numpy() == source
    train = subset(arrays["train"], np.flatnonzero(tr_mask))
    val = subset(arrays["validation"], np.flatnonzero(va_mask))
    held = subset(everything, np.flatnonzero(held_mask))
    other_test = subset(test, np.flatnonzero(test.frame["source"].astype(str).to_numpy() != source))
    log(f"held-out source {source}: training on {len(train)} images of the other sources, early stopping on "
        f"{len(val)}, testing on all {len(held)} images of {source}")
    t0 = time.perf_counter()
    result = train_fn(train.images, train.labels, val.images, val.labels, arch, config,
                      log=(lambda m: train_log(f"[loso {source}] {m}")) if train_log else None)
    model = result.build()
    held_pred = predict_proba(model, held.images, result.normalization, tta_flip=config.tta_flip).argmax(1)
    loso = group_metrics(held.labels, held_pred)
    other = (group_metrics(other_test.labels, predict_proba(model, other_test.images, result.normalization,
                                                            tta_flip=config.tta_flip).argmax(1))
             if len(other_test) else {"macro_f1": np.nan})
    log(f"held-out source {source} done in {time.perf_counter() - t0:.1f}s: macro-F1 {loso['macro_f1']:.4f} "
        f"on unseen source (other sources' test: {other['macro_f1']:.4f})")
    return {
        "held_out_source": source, "status": STATUS_DONE,
        "classes_held_out": ", ".join(CLASSES[c] for c in sorted(set(held.labels.tolist()))),
        "n_train": len(train), "n_early_stopping": len(val), "n_held_out": len(held),
        "loso_accuracy": loso["accuracy"], "loso_macro_f1": loso["macro_f1"],
        "loso_model_other_sources_test_macro_f1": other["macro_f1"], "run_id": run_id,
    }


class LosoStore(PartitionStore[str, dict[str, Any], TrainingRecipe]):
    """Stored rows, one JSON file per held-out source (name made safe for a file, plus a hash of
    the exact name), with the recipe the row was trained with."""

    recipe_type = TrainingRecipe
    missing = MISSING
    refusal = "refused: "

    def path(self, source: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", source)[:60].lstrip(".") or "source"
        return self.dir / f"{safe}-{hashlib.sha256(source.encode()).hexdigest()[:8]}.json"

    def files(self, source: str) -> tuple[Path]:
        return (self.path(source),)

    def save(self, row: dict[str, Any], recipe: TrainingRecipe) -> Path:
        return self.write(row["held_out_source"], row, recipe)[0]

    def encode(self, result: dict[str, Any], data: tuple[Path, ...]) -> dict[str, Any]:
        return {"row": result}

    def check(self, key: str, record: Any) -> None:
        if not isinstance(record["row"], dict):
            raise TypeError("the row is not an object")
        if record["row"]["held_out_source"] != key:
            raise ValueError(f"holds source {record['row']['held_out_source']!r}")

    def decode(self, key: str, record: Any, data: list[Any]) -> dict[str, Any]:
        return dict(record["row"])


@dataclass
class RowCollection:
    rows: list[dict[str, Any]]  # one per source, in the order asked: stored, skipped, missing or refused
    missing: list[str]
    refused: dict[str, str]

    @property
    def complete(self) -> bool:
        return not self.missing and not self.refused


def collect_rows(store: LosoStore, status: dict[str, str], current: TrainingRecipe) -> RowCollection:
    """The row of every source in ``status`` (its eligibility): skipped ones from the status,
    eligible ones from ``store`` when trained with ``current``, else a missing/refused row."""
    rows, missing, refused = [], [], {}
    for source, state in status.items():
        if state != ELIGIBLE:
            rows.append({"held_out_source": source, "status": state})
            continue
        loaded = store.load(source)
        if loaded == MISSING:
            missing.append(source)
            rows.append({"held_out_source": source, "status": MISSING})
            continue
        why = loaded if isinstance(loaded, str) else loaded[1].mismatch(current)
        if why:
            refused[source] = why
            rows.append({"held_out_source": source, "status": why if why.startswith("refused") else f"refused: {why}"})
        else:
            rows.append(loaded[0])
    return RowCollection(rows, missing, refused)


def not_applicable_table(sources: Sequence[str]) -> pd.DataFrame:
    """The table with a single source: nothing to hold out."""
    row: dict[str, Any] = {c: np.nan for c in COLUMNS}
    row.update(held_out_source=sources[0] if sources else "", status=NOT_APPLICABLE_ONE_SOURCE,
               classes_held_out="", run_id="")
    return _typed(pd.DataFrame([row], columns=COLUMNS))


def loso_table(rows: Iterable[dict[str, Any]], test: SplitArrays | None = None,
               in_domain_pred: np.ndarray | None = None) -> pd.DataFrame:
    """The LOSO table from per-source rows, with the in-domain columns when ``in_domain_pred``
    (the main model's predicted class indices for ``test``, same order) is given."""
    table = pd.DataFrame(list(rows), columns=COLUMNS)
    if in_domain_pred is not None and test is not None:
        in_domain_pred = np.asarray(in_domain_pred)
        test_sources = test.frame["source"].astype(str).to_numpy()
        for idx, source in table["held_out_source"].items():
            mask = test_sources == source
            gm = group_metrics(test.labels[mask], in_domain_pred[mask])
            table.loc[idx, ["in_domain_n", "in_domain_accuracy", "in_domain_macro_f1"]] = \
                [gm["n"], gm["accuracy"], gm["macro_f1"]]
        table["gap_macro_f1_pts"] = 100 * (pd.to_numeric(table["loso_macro_f1"], errors="coerce")
                                           - pd.to_numeric(table["in_domain_macro_f1"], errors="coerce"))
    return _typed(table)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    for col in COLUMNS:
        if col in TEXT_COLUMNS:
            table[col] = table[col].astype(object).where(table[col].notna(), "" if col == "run_id" else None)
        else:
            table[col] = pd.to_numeric(table[col], errors="coerce").astype("float64")
    return table.reset_index(drop=True)


@dataclass
class LosoResult:
    table: pd.DataFrame
    sources: list[str]
    applicable: bool
    trained: list[str]
    seconds: float


def run_leave_one_source_out(
    arrays: dict[str, SplitArrays],
    arch: ArchConfig,
    config: TrainConfig,
    *,
    in_domain_pred: np.ndarray | None = None,
    min_classes: int = 2,
    sources: Sequence[str] | None = None,
    log: LogFn | None = None,
    train_log: LogFn | None = None,
    train_fn: TrainFn = train_model,
) -> LosoResult:
    """Every source (or the given subset) one after the other, in this process: for scripts and
    tests. The pipeline runs each held-out source as a partition of ``loso_fold`` instead.
    ``in_domain_pred`` are the main model's predicted class indices for ``arrays["test"]``."""
    log = log or (lambda _m: None)
    start = time.perf_counter()
    all_sources = sources_of(arrays)
    if len(all_sources) < 2:
        log(f"leave-one-source-out: {NOT_APPLICABLE_ONE_SOURCE} ({', '.join(all_sources) or 'none'})")
        return LosoResult(not_applicable_table(all_sources), all_sources, False, [], 0.0)
    wanted = list(all_sources if sources is None else sources)
    unknown = sorted(set(wanted) - set(all_sources))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; the manifest has {all_sources}")
    rows = [held_out_row(arrays, s, arch, config, min_classes=min_classes, log=log, train_log=train_log,
                         train_fn=train_fn) for s in wanted]
    trained = [r["held_out_source"] for r in rows if r["status"] == STATUS_DONE]
    return LosoResult(loso_table(rows, arrays["test"], in_domain_pred), all_sources, True, trained,
                      time.perf_counter() - start)
