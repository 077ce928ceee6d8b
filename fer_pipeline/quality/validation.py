"""Data-quality validations of the pipeline's tables, as Great Expectations (GX Core 1.x) suites.

Every rule is a GX expectation run on a pandas frame. Where GX has no built-in expectation (class
counts, group leakage, split shares, file accounting) a small frame is derived in pandas and
validated, with identifying columns as GX's ``unexpected_index_column_names`` so that failing
rows say which class/split/group failed. Results stay as GX describes them (``describe_dict()``);
:meth:`ValidationOutcome.to_metadata` only picks from that. Whether a failure blocks the pipeline
is for the Dagster check to say, not this plain-Python module.

One quiet ephemeral GX context (no progress bars, no analytics) is built lazily and reused, as
building it is slow; a lock serialises validations because GX contexts are not thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before GX is first imported: no calls home

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fer_pipeline.classes import CLASSES  # noqa: E402
from fer_pipeline.schema import (  # noqa: E402
    MANIFEST_COLUMNS,
    MANIFEST_KEY_COLUMNS,
    SPLITS,
    TEST_FOLD,
)

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.core.expectation_validation_result import (
        ExpectationValidationResult,
    )
    from great_expectations.expectations import Expectation

_EXAMPLES = 5  # failing rows/values GX keeps per expectation; all go into the check metadata
_STATISTICS = ("element_count", "unexpected_count", "unexpected_percent", "missing_count", "observed_value")
_CV_SPLITS = [s for s in SPLITS if s != "test"]
_KEY = ["source", "source_path"]
_Part = tuple[pd.DataFrame, list["Expectation"], Sequence[str]]  # frame, expectations, identifying columns


@dataclass(frozen=True)
class ValidationOutcome:
    """One named validation: GX's ``describe_dict()`` of each expectation run, plus derived context."""

    name: str
    expectations: list[dict[str, Any]]
    details: dict[str, Any]

    @property
    def success(self) -> bool:
        return all(e["success"] for e in self.expectations)

    def failed(self) -> list[dict[str, Any]]:
        return [e for e in self.expectations if not e["success"]]

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able check metadata: what ran, what failed, with GX's statistics and examples."""
        failed = self.failed()
        return {"validation": self.name, "success": self.success,
                "evaluated": len(self.expectations), "failed": len(failed),
                "evaluated_expectations": [label(e) for e in self.expectations],
                "failed_expectations": [label(e) for e in failed],
                "failures": [_failure(e) for e in failed], "details": self.details}


def label(described: Mapping[str, Any]) -> str:
    """``type(columns)`` of a described expectation, e.g. ``expect_column_values_to_be_unique(image_id)``."""
    kwargs, name = described["kwargs"], described["expectation_type"]
    columns = kwargs.get("column_list") or [kwargs[c] for c in ("column", "column_A", "column_B") if c in kwargs]
    return f"{name}({','.join(map(str, columns))})" if columns else name


def examples(described: Mapping[str, Any]) -> list[Any]:
    """The most telling failures GX gave: rows with identifying columns, else values, else mismatches."""
    result = described["result"]
    rows = result.get("partial_unexpected_index_list") or []
    if rows and isinstance(rows[0], dict):
        return rows
    mismatched = result.get("details", {}).get("mismatched")
    return (result.get("partial_unexpected_list") or ([mismatched] if mismatched else [])
            or [{"missing": v} for v in result.get("partial_missing_list", [])])


def _failure(described: Mapping[str, Any]) -> dict[str, Any]:
    result = described["result"]
    failure = {"expectation": label(described),
               "kwargs": {k: v for k, v in described["kwargs"].items() if k != "batch_id"},
               **{k: result[k] for k in _STATISTICS if k in result}, "examples": examples(described)}
    return {**failure, "exception": described["exception"]} if "exception" in described else failure


@lru_cache(maxsize=1)
def _batch_definition() -> BatchDefinition:
    """The process-wide whole-dataframe batch definition on a quiet ephemeral context."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # tqdm "Calculating Metrics" bars would otherwise be written to stderr on every validation.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas(name="fer_pipeline").add_dataframe_asset(name="frame")
    return asset.add_batch_definition_whole_dataframe("whole_frame")


_GX_LOCK = threading.RLock()


class _Expectations:
    """``great_expectations.expectations``, imported on first use: GX takes seconds to import."""

    def __getattr__(self, name: str) -> Any:
        import great_expectations.expectations as gxe

        return getattr(gxe, name)


_gxe = _Expectations()


def _describe(result: ExpectationValidationResult) -> dict[str, Any]:
    """``describe_dict()`` plus the message of a metric that raised (e.g. on a missing column),
    which GX files per metric id, where describe_dict does not look."""
    info = result.exception_info
    messages = sorted({str(i["exception_message"]) for i in (info, *info.values())
                       if isinstance(i, dict) and i.get("exception_message")})
    described = {k: v for k, v in result.describe_dict().items() if k != "exception_info"}
    return {**described, "exception": "; ".join(messages)} if messages else described


def _run(name: str, parts: Sequence[_Part], details: Mapping[str, Any]) -> ValidationOutcome:
    """Validate each part's frame with its expectations (one GX suite each) and pool the results."""
    import great_expectations as gx
    from great_expectations.util import convert_to_json_serializable

    described: list[dict[str, Any]] = []
    for i, (frame, expectations, index_columns) in enumerate(parts):
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": _EXAMPLES,
                         "unexpected_index_column_names": [c for c in index_columns if c in frame.columns]}
        suite = gx.ExpectationSuite(name=f"{name}.{i}", expectations=expectations)
        with _GX_LOCK:
            batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
            described += [_describe(r) for r in batch.validate(suite, result_format=result_format).results]
    return ValidationOutcome(name, described, convert_to_json_serializable(dict(details)))


def _missing(frame: pd.DataFrame, required: Sequence[str]) -> list[str]:
    return [c for c in required if c not in frame.columns]


def _columns_check(frame: pd.DataFrame, required: Sequence[str]) -> _Part:
    return frame, [_gxe.ExpectTableColumnsToMatchSet(column_set=list(required), exact_match=False)], ()


def _require(name: str, frame: pd.DataFrame, required: Sequence[str]) -> ValidationOutcome | None:
    """A failed GX column check when ``frame`` lacks columns that a derived frame needs, else None."""
    missing = _missing(frame, required)
    return _run(name, [_columns_check(frame, required)], {"missing_columns": missing}) if missing else None


def _class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per class in CLASSES order, 0 for classes absent from the manifest."""
    counts = manifest["label"].value_counts().reindex(list(CLASSES), fill_value=0)
    return pd.DataFrame({"label": list(CLASSES), "count": counts.to_numpy(dtype=np.int64)})


def validate_manifest_schema(manifest: pd.DataFrame) -> ValidationOutcome:
    """Columns, non-null keys, unique ids, known labels, sane values: what everything downstream trusts.
    A missing column fails the column-set expectation and, with GX's message, those on the column."""
    exps = [
        _gxe.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=False),
        *(_gxe.ExpectColumnValuesToNotBeNull(column=c) for c in (*MANIFEST_KEY_COLUMNS, "dup_group")),
        _gxe.ExpectColumnValuesToBeUnique(column="image_id"),
        _gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(CLASSES)),
        _gxe.ExpectColumnValuesToMatchRegex(column="phash", regex=r"^[0-9a-fA-F]{16}$"),
        # Relative to the data root, so that the data directory can move.
        _gxe.ExpectColumnValuesToNotMatchRegex(column="face_path", regex=r"^(?:/|\\|[A-Za-z]:)"),
        *(_gxe.ExpectColumnValuesToBeBetween(column=c, min_value=1)
          for c in ("width", "height", "face_height", "face_width", "dup_group_size")),
        _gxe.ExpectColumnValuesToBeBetween(column="mean_intensity", min_value=0.0, max_value=255.0),
        _gxe.ExpectColumnValuesToBeBetween(column="std_intensity", min_value=0.0, max_value=128.0),
    ]
    details = {"rows": len(manifest), "missing_columns": _missing(manifest, MANIFEST_COLUMNS)}
    return _run("manifest_schema", [(manifest, exps, ("image_id",))], details)


def validate_image_size(manifest: pd.DataFrame, size: int | tuple[int, int]) -> ValidationOutcome:
    """Every face is exactly ``size`` = (height, width), an int meaning square: the model's input
    layer and the face store assume one size, and a stale face would crash or skew training."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    exps = [*(_gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("face_height", "face_width")),
            _gxe.ExpectColumnValuesToBeInSet(column="face_height", value_set=[height]),
            _gxe.ExpectColumnValuesToBeInSet(column="face_width", value_set=[width])]
    details = {"expected_height": height, "expected_width": width, "rows": len(manifest)}
    return _run("image_size", [(manifest, exps, ("image_id",))], details)


def validate_class_counts(manifest: pd.DataFrame, min_per_class: int) -> ValidationOutcome:
    """Each class has at least ``min_per_class`` images (an absent class counts 0)."""
    if (missing := _require("class_counts", manifest, ["label"])) is not None:
        return missing
    counts = _class_counts(manifest)
    exp = _gxe.ExpectColumnValuesToBeBetween(column="count", min_value=int(min_per_class))
    details = {"counts": dict(zip(counts["label"], counts["count"])), "min_per_class": int(min_per_class)}
    return _run("class_counts", [(counts, [exp], ("label",))], details)


def validate_class_balance(manifest: pd.DataFrame, max_ratio: float) -> ValidationOutcome:
    """Largest/smallest class count is at most ``max_ratio``, checked per class as
    ``count >= largest / max_ratio`` so that failing rows name the small classes. An empty
    manifest passes: :func:`validate_class_counts` catches it."""
    if (missing := _require("class_balance", manifest, ["label"])) is not None:
        return missing
    counts = _class_counts(manifest)
    largest, smallest = int(counts["count"].max()), int(counts["count"].min())
    floor = largest / float(max_ratio)
    exp = _gxe.ExpectColumnValuesToBeBetween(column="count", min_value=floor)
    details = {"counts": dict(zip(counts["label"], counts["count"])),
               "ratio": largest / smallest if smallest else None,  # undefined with an empty class
               "max_ratio": float(max_ratio), "min_count_allowed": floor}
    return _run("class_balance", [(counts, [exp], ("label",))], details)


def validate_accounting(
    inputs: int | pd.DataFrame, kept: int | pd.DataFrame, excluded: int | pd.DataFrame,
    pool: int | pd.DataFrame | None = None, unlabelled: int | pd.DataFrame | None = None,
) -> ValidationOutcome:
    """Every input file is either kept or excluded (or in the pretraining ``pool``, or among the
    ``unlabelled`` images, when given), exactly once. Each argument is a count or the table (inventory, manifest, excluded, pool):
    counts must add up; with the output tables, no file is in two or twice in one; with the inputs
    too, each input is accounted for once and no other file. When every table given has
    ``face_index``, the unit is a face of a file (a photo may give several)."""
    tables = {"inputs": inputs, "kept": kept, "excluded": excluded}
    for name, table in (("pool", pool), ("unlabelled", unlabelled)):
        if table is not None:
            tables[name] = table
    frames = [t for t in tables.values() if isinstance(t, pd.DataFrame) and len(t.columns)]
    key = [*_KEY, "face_index"] if frames and all("face_index" in t.columns for t in frames) else _KEY
    numbers = {f"n_{k}": len(v) if isinstance(v, pd.DataFrame) else int(v) for k, v in tables.items()}
    outputs_named = [name for name in tables if name != "inputs"]
    total = "n_" + "_plus_".join(outputs_named)  # n_kept_plus_excluded[_plus_pool][_plus_unlabelled]
    numbers[total] = sum(numbers[f"n_{name}"] for name in outputs_named)
    pair = _gxe.ExpectColumnPairValuesToBeEqual(column_A="n_inputs", column_B=total)
    parts: list[_Part] = [(pd.DataFrame([numbers]), [pair], ())]
    details: dict[str, Any] = dict(numbers)
    keys: dict[str, pd.DataFrame] = {}
    for name, table in tables.items():
        if isinstance(table, pd.DataFrame) and len(table) and _missing(table, key):
            parts.append(_columns_check(table, key))
            details[f"{name}_missing_columns"] = _missing(table, key)
        elif isinstance(table, pd.DataFrame):  # an empty table may come without columns
            keys[name] = table.reindex(columns=key)
    if "kept" in keys and "excluded" in keys:
        outs = [name for name in ("kept", "excluded", "pool", "unlabelled") if name in keys]
        outputs = pd.concat([keys[name].assign(table=name) for name in outs], ignore_index=True)
        details["in_both_tables"] = int(sum(len(keys[a].drop_duplicates().merge(keys[b].drop_duplicates()))
                                            for i, a in enumerate(outs) for b in outs[i + 1:]))
        exps = [_gxe.ExpectColumnValuesToNotBeNull(column="source_path"),
                _gxe.ExpectCompoundColumnsToBeUnique(column_list=key)]
        if "inputs" in keys:
            parts.append(_inputs_accounted(keys["inputs"], outputs, details, key))
            outputs = outputs.merge(keys["inputs"].drop_duplicates().assign(in_inputs=1), on=key, how="left")
            outputs["in_inputs"] = outputs["in_inputs"].fillna(0).astype(int)
            exps.append(_gxe.ExpectColumnValuesToBeInSet(column="in_inputs", value_set=[1]))
        parts.append((outputs, exps, ("table", *key)))
    return _run("accounting", parts, details)


def _inputs_accounted(inputs: pd.DataFrame, outputs: pd.DataFrame, details: dict[str, Any],
                      key: list[str]) -> _Part:
    """Each input file appears exactly once among kept + excluded."""
    seen = outputs.groupby(key, dropna=False).size().rename("times_accounted").reset_index()
    per_input = inputs.merge(seen, on=key, how="left").fillna({"times_accounted": 0})
    per_input["times_accounted"] = per_input["times_accounted"].astype(int)
    details["inputs_not_accounted"] = int((per_input["times_accounted"] == 0).sum())
    return per_input, [_gxe.ExpectColumnValuesToBeInSet(column="times_accounted", value_set=[1])], key


def validate_pool_leakage(matches: pd.DataFrame, details: Mapping[str, Any]) -> ValidationOutcome:
    """No pretraining-pool image duplicates a validation or test image. ``matches`` has one row per
    pool image with ``duplicate_of`` (the held-out image it duplicates, recomputed from the tables:
    :func:`fer_pipeline.dataset.pool.find_heldout_duplicates`), null when none; failing rows name
    the pool image and the held-out one."""
    required = ["image_id", "duplicate_of"]
    if (missing := _require("pool_leakage", matches, required)) is not None:
        return missing
    exp = _gxe.ExpectColumnValuesToBeNull(column="duplicate_of")
    index = ("image_id", "source", "source_path", "pool_label", "duplicate_of", "duplicate_split")
    found = matches["duplicate_of"].notna()
    by_split = matches.loc[found, "duplicate_split"].value_counts() if "duplicate_split" in matches else {}
    details = {"pool_images": len(matches), "duplicating_heldout": int(found.sum()),
               "by_split": {str(k): int(v) for k, v in dict(by_split).items()}, **details}
    return _run("pool_leakage", [(matches, [exp], index)], details)


def validate_split_proportions(
    splits: pd.DataFrame, targets: Mapping[str, float], tolerance: float
) -> ValidationOutcome:
    """Each split's share of all rows is within ``tolerance`` of its target (absent target: 0).
    Per-class shares are details only: small classes legitimately deviate more after group-aware
    splitting."""
    if (missing := _require("split_proportions", splits, ["split"])) is not None:
        return missing
    total = len(splits)
    counts = splits["split"].value_counts().reindex(list(SPLITS), fill_value=0)
    derived = pd.DataFrame({"split": list(SPLITS), "share": counts.to_numpy() / max(total, 1),
                            "target": [float(targets.get(s, 0.0)) for s in SPLITS]})
    # Rounded so that e.g. 0.2 - 0.15 == 0.05 is not rejected by floating-point noise.
    derived["deviation"] = (derived["share"] - derived["target"]).abs().round(9)
    per_class = {}
    if "label" in splits.columns and total:
        table = pd.crosstab(splits["label"], splits["split"], normalize="index").reindex(columns=SPLITS, fill_value=0)
        per_class = {str(cls): row.round(4).to_dict() for cls, row in table.iterrows()}
    parts: list[_Part] = [
        (splits, [_gxe.ExpectTableRowCountToBeBetween(min_value=1), _gxe.ExpectColumnValuesToNotBeNull(column="split"),
                  _gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS))], ("image_id",)),
        (derived, [_gxe.ExpectColumnValuesToBeBetween(column="deviation", max_value=float(tolerance))],
         ("split", "share", "target")),
    ]
    details = {"rows": total, "shares": dict(zip(SPLITS, derived["share"].round(4))),
               "targets": dict(zip(SPLITS, derived["target"])), "tolerance": float(tolerance), "per_class": per_class}
    return _run("split_proportions", parts, details)


def _splits_per_group(splits: pd.DataFrame) -> pd.DataFrame:
    """One row per dup_group: how many splits it is in, and which (joined only for leaks: it is slow)."""
    pairs = splits[["dup_group", "split"]].dropna().astype({"split": str}).drop_duplicates()
    pairs = pairs.sort_values(["dup_group", "split"])
    per_group = pairs.groupby("dup_group").agg(n_splits=("split", "size"), splits=("split", "first"))
    leaking = per_group.index[per_group["n_splits"] > 1]
    per_group.loc[leaking, "splits"] = pairs[pairs["dup_group"].isin(leaking)].groupby("dup_group")["split"].agg(",".join)
    return per_group.reset_index()


def validate_no_group_leakage(splits: pd.DataFrame) -> ValidationOutcome:
    """No duplicate group (near-identical images) spans two splits, and no image_id is listed twice:
    either leaks test images into training and inflates the metrics."""
    if (missing := _require("no_group_leakage", splits, ["image_id", "split", "dup_group"])) is not None:
        return missing
    per_group = _splits_per_group(splits)
    parts: list[_Part] = [
        (splits, [_gxe.ExpectColumnValuesToNotBeNull(column="dup_group"),
                  _gxe.ExpectColumnValuesToNotBeNull(column="image_id"),
                  _gxe.ExpectColumnValuesToBeUnique(column="image_id")], ("image_id", "split")),
        (per_group, [_gxe.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1)], ("dup_group", "splits")),
    ]
    details = {"groups": len(per_group), "leaking_groups": int((per_group["n_splits"] > 1).sum())}
    return _run("no_group_leakage", parts, details)


def validate_folds(splits: pd.DataFrame, n_folds: int) -> ValidationOutcome:
    """Train/validation rows carry a fold in ``0..n_folds-1``, each fold used; test rows TEST_FOLD."""
    if (missing := _require("folds", splits, ["split", "fold"])) is not None:
        return missing
    from great_expectations.expectations.row_conditions import Column

    in_cv = Column("split").is_in(_CV_SPLITS)
    exps = [
        _gxe.ExpectColumnValuesToNotBeNull(column="fold"),
        _gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        _gxe.ExpectColumnValuesToBeBetween(column="fold", min_value=0, max_value=n_folds - 1, row_condition=in_cv),
        _gxe.ExpectColumnValuesToBeInSet(column="fold", value_set=[TEST_FOLD], row_condition=Column("split") == "test"),
    ]
    cv_rows = splits["split"].isin(_CV_SPLITS)
    if cv_rows.any():  # an unused fold would make a CV run degenerate
        exps.append(_gxe.ExpectColumnDistinctValuesToContainSet(column="fold", value_set=list(range(n_folds)),
                                                               row_condition=in_cv))
    fold_counts = splits.loc[cv_rows, "fold"].value_counts().sort_index()
    details = {"n_folds": n_folds, "rows_per_fold": {str(k): int(v) for k, v in fold_counts.items()}}
    return _run("folds", [(splits, exps, ("image_id", "split"))], details)
