"""Cross-source generalisation: leave-one-source-out (LOSO) training and evaluation.

For every source that covers at least ``min_classes`` classes (and whose removal leaves
training data covering at least two classes), the main architecture is trained with the usual
recipe on the *train* split of all other sources, early-stopped on their *validation* split,
and tested on *every* image of the held-out source (none of them was seen). Beside it stands
the in-domain score: the main model on the held-out source's own test rows. On real data the
gap is often large -- a number measured inside one hand-assembled set says little about
another -- and a user must see it before trusting a number.

Macro scores average the classes present in the evaluated rows (a source may lack a class).
Finished sources are cached (JSON) under ``cache_dir`` keyed by data version, source,
architecture and training config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_pipeline.analysis.bias import group_metrics
from fer_pipeline.analysis.cross_validation import (
    LogFn,
    TrainFn,
    combine_arrays,
    stable_hash,
    subset,
)
from fer_pipeline.atomic import write_json
from fer_pipeline.classes import CLASSES
from fer_pipeline.ml.architectures import ArchConfig
from fer_pipeline.ml.data import SplitArrays
from fer_pipeline.ml.inference import predict_proba
from fer_pipeline.ml.train import TrainConfig, train_model
from fer_pipeline.schema import SPLITS

STATUS_DONE = "evaluated"
NOT_APPLICABLE_ONE_SOURCE = "not applicable: only one source"

COLUMNS = ["held_out_source", "status", "classes_held_out", "n_train", "n_early_stopping", "n_held_out",
           "loso_accuracy", "loso_macro_f1", "in_domain_n", "in_domain_accuracy", "in_domain_macro_f1",
           "gap_macro_f1_pts", "loso_model_other_sources_test_macro_f1", "from_cache"]


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
            out[source] = "eligible"
    return out


@dataclass
class LosoResult:
    table: pd.DataFrame
    sources: list[str]
    applicable: bool
    trained: list[str]
    from_cache: list[str]
    seconds: float


def run_leave_one_source_out(
    arrays: dict[str, SplitArrays],
    arch: ArchConfig,
    config: TrainConfig,
    *,
    data_version: str,
    in_domain_pred: np.ndarray | None = None,
    min_classes: int = 2,
    sources: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    log: LogFn | None = None,
    train_log: LogFn | None = None,
    train_fn: TrainFn = train_model,
) -> LosoResult:
    """LOSO over the eligible sources (or the given subset). ``in_domain_pred`` are the main
    model's predicted class indices for ``arrays["test"]`` (same order), for the in-domain column."""
    log = log or (lambda _m: None)
    start = time.perf_counter()
    everything = combine_arrays([arrays[s] for s in SPLITS])
    all_sources = sorted(set(everything.frame["source"].astype(str)))
    if len(all_sources) < 2:
        row = {c: np.nan for c in COLUMNS}
        row.update(held_out_source=all_sources[0] if all_sources else "", status=NOT_APPLICABLE_ONE_SOURCE,
                   classes_held_out="", from_cache=False)
        log(f"leave-one-source-out: {NOT_APPLICABLE_ONE_SOURCE} ({', '.join(all_sources) or 'none'})")
        return LosoResult(pd.DataFrame([row], columns=COLUMNS), all_sources, False, [], [], 0.0)
    status = eligibility(arrays, min_classes)
    wanted = list(all_sources if sources is None else sources)
    unknown = sorted(set(wanted) - set(all_sources))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; the manifest has {all_sources}")
    test = arrays["test"]
    test_sources = test.frame["source"].astype(str).to_numpy()
    rows, trained, cached = [], [], []
    eligible = [s for s in wanted if status[s] == "eligible"]
    for s in wanted:
        if status[s] != "eligible":
            rows.append({"held_out_source": s, "status": status[s], "from_cache": False})
    for i, source in enumerate(eligible, 1):
        key = stable_hash({"data_version": data_version, "source": source, "arch": arch.to_dict(),
                           "train_config": config.to_dict(), "min_classes": min_classes})
        cache_file = Path(cache_dir) / f"{arch.name}-{source}-{key}.json" if cache_dir else None
        if cache_file is not None and cache_file.is_file():
            try:
                rows.append({**json.loads(cache_file.read_text()), "from_cache": True})
                cached.append(source)
                log(f"held-out source {source} ({i}/{len(eligible)}): reused from cache")
                continue
            except (OSError, ValueError):
                pass
        tr_mask = arrays["train"].frame["source"].astype(str).to_numpy() != source
        va_mask = arrays["validation"].frame["source"].astype(str).to_numpy() != source
        held_mask = everything.frame["source"].astype(str).to_numpy() == source
        train = subset(arrays["train"], np.flatnonzero(tr_mask))
        val = subset(arrays["validation"], np.flatnonzero(va_mask))
        held = subset(everything, np.flatnonzero(held_mask))
        other_test = subset(test, np.flatnonzero(test_sources != source))
        log(f"held-out source {source} ({i}/{len(eligible)}): training on {len(train)} images of the other "
            f"sources, early stopping on {len(val)}, testing on all {len(held)} images of {source}")
        t0 = time.perf_counter()
        result = train_fn(train.images, train.labels, val.images, val.labels, arch, config,
                          log=(lambda m, s=source: train_log(f"[loso {s}] {m}")) if train_log else None)
        model = result.build()
        held_pred = predict_proba(model, held.images, result.normalization, tta_flip=config.tta_flip).argmax(1)
        loso = group_metrics(held.labels, held_pred)
        other = (group_metrics(other_test.labels, predict_proba(model, other_test.images, result.normalization,
                                                                tta_flip=config.tta_flip).argmax(1))
                 if len(other_test) else {"macro_f1": np.nan})
        row: dict[str, Any] = {
            "held_out_source": source, "status": STATUS_DONE,
            "classes_held_out": ", ".join(CLASSES[c] for c in sorted(set(held.labels.tolist()))),
            "n_train": len(train), "n_early_stopping": len(val), "n_held_out": len(held),
            "loso_accuracy": loso["accuracy"], "loso_macro_f1": loso["macro_f1"],
            "loso_model_other_sources_test_macro_f1": other["macro_f1"],
        }
        if cache_file is not None:
            write_json(cache_file, row)
        rows.append({**row, "from_cache": False})
        trained.append(source)
        log(f"held-out source {source} done in {time.perf_counter() - t0:.1f}s: macro-F1 {loso['macro_f1']:.4f} "
            f"on unseen source (other sources' test: {other['macro_f1']:.4f})")
    table = pd.DataFrame(rows, columns=COLUMNS)
    # in-domain: the main model on each source's own test rows
    if in_domain_pred is not None:
        in_domain_pred = np.asarray(in_domain_pred)
        for idx, source in table["held_out_source"].items():
            mask = test_sources == source
            gm = group_metrics(test.labels[mask], in_domain_pred[mask])
            table.loc[idx, ["in_domain_n", "in_domain_accuracy", "in_domain_macro_f1"]] = \
                [gm["n"], gm["accuracy"], gm["macro_f1"]]
        table["gap_macro_f1_pts"] = 100 * (table["loso_macro_f1"].astype(float) - table["in_domain_macro_f1"].astype(float))
    table["from_cache"] = table["from_cache"].fillna(False).astype(bool)
    for col in COLUMNS:
        if col not in ("held_out_source", "status", "classes_held_out", "from_cache"):
            table[col] = pd.to_numeric(table[col], errors="coerce").astype("float64")
    order = {s: i for i, s in enumerate(wanted)}
    table = table.sort_values("held_out_source", key=lambda c: c.map(order)).reset_index(drop=True)
    return LosoResult(table, all_sources, True, trained, cached, time.perf_counter() - start)
