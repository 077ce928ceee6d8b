"""Data-quality validations of the pipeline's tables, run as Great Expectations (GX Core 1.x) suites.

Every rule is a real GX expectation run against a pandas DataFrame, so results look the same in
every report. Where GX has no built-in expectation for a rule (class counts, group leakage, split
shares, file accounting) a small derived DataFrame is computed in pandas and *that* is validated,
with an identifying column (``label``, ``split``, ``dup_group``, ...) passed as GX's
``unexpected_index_column_names`` so the failure examples say which class/split/group failed.

GX is slow to import and to build a context, so one ephemeral context (with progress bars and
usage analytics off) is created lazily per process and reused: all validations share one pandas
data source, one dataframe asset and one whole-dataframe batch definition, and pass their frame as
a batch parameter. Validation is serialised with a lock because GX contexts are not thread-safe.

This module is plain Python (no Dagster); the Dagster layer turns a :class:`ValidationOutcome`
into asset-check results via :meth:`ValidationOutcome.to_metadata` and ``blocking``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

# Must be set before great_expectations is imported anywhere: no usage-statistics calls home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fer_pipeline.classes import CLASSES  # noqa: E402

if TYPE_CHECKING:
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.expectations import Expectation

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_KEY_COLUMNS",
    "SPLIT_NAMES",
    "ExpectationOutcome",
    "ValidationOutcome",
    "validate_manifest_schema",
    "validate_image_size",
    "validate_class_counts",
    "validate_class_balance",
    "validate_accounting",
    "validate_split_proportions",
    "validate_no_group_leakage",
    "validate_folds",
]

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "source", "source_path", "original_label", "label", "split_hint",
    "width", "height", "face_path", "face_height", "face_width", "phash",
    "dup_group", "dup_group_size", "mean_intensity", "std_intensity",
    "gender", "age_group", "race",
)  # fmt: skip
"""Columns every manifest must have (extra columns are allowed)."""

MANIFEST_KEY_COLUMNS: tuple[str, ...] = (
    "image_id", "source", "source_path", "label", "face_path", "phash",
)  # fmt: skip
"""Manifest columns that may never be null."""

SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")

#: How many unexpected values GX keeps per expectation (we report at most 5 in metadata).
_PARTIAL_UNEXPECTED = 20
_METADATA_EXAMPLES = 5


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectationOutcome:
    """One evaluated GX expectation, reduced to JSON-able fields."""

    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_in_set"
    column: str | None  # column(s) it ran on; pair/compound columns joined with ","
    success: bool
    unexpected_count: int | None  # None for aggregate expectations (row count, column set, ...)
    unexpected_examples: list[Any]  # identifying rows/values of failures (JSON-able)
    details: dict[str, Any]  # observed value, expectation kwargs, exception message, ...

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``expect_column_values_to_be_unique(image_id)``."""
        return f"{self.expectation}({self.column})" if self.column else self.expectation


@dataclass(frozen=True)
class ValidationOutcome:
    """Result of one named validation (one GX suite, possibly over several derived frames)."""

    name: str
    success: bool
    outcomes: list[ExpectationOutcome]
    blocking: bool = True  # False: meant as a warning, a failure should not stop the pipeline
    details: dict[str, Any] = field(default_factory=dict)  # validation-level context (counts...)

    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_metadata(self) -> dict[str, object]:
        """JSON-able summary for asset-check metadata: counts, failed names, a few examples each."""
        failed = self.failed()
        return {
            "validation": self.name,
            "success": self.success,
            "blocking": self.blocking,
            "evaluated": len(self.outcomes),
            "failed": len(failed),
            "failed_expectations": [o.label for o in failed],
            "failures": [
                {
                    "expectation": o.expectation,
                    "column": o.column,
                    "unexpected_count": o.unexpected_count,
                    "examples": o.unexpected_examples[:_METADATA_EXAMPLES],
                    **({"observed": o.details["observed_value"]} if "observed_value" in o.details else {}),
                    **({"exception": o.details["exception"]} if "exception" in o.details else {}),
                }
                for o in failed
            ],
            "details": self.details,
        }

    def summary(self) -> str:
        """One line for logs, e.g. ``class_counts: FAILED 1/1 (expect_column_values_to_be_between(count))``."""
        failed = self.failed()
        if not failed:
            return f"{self.name}: passed {len(self.outcomes)} expectations"
        names = ", ".join(o.label for o in failed)
        return f"{self.name}: FAILED {len(failed)}/{len(self.outcomes)} ({names})"


# --------------------------------------------------------------------------------------------
# GX plumbing
# --------------------------------------------------------------------------------------------

_GX_LOCK = threading.RLock()


@lru_cache(maxsize=1)
def _batch_definition() -> BatchDefinition:
    """The process-wide whole-dataframe batch definition on a lazily created ephemeral context."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # tqdm "Calculating Metrics" bars would otherwise be written to stderr on every validation.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas(name="fer_pipeline")
    asset = source.add_dataframe_asset(name="frame")
    return asset.add_batch_definition_whole_dataframe("whole_frame")


@dataclass(frozen=True)
class _Part:
    """A frame to validate, the expectations to run on it and its identifying columns."""

    frame: pd.DataFrame
    expectations: list[Expectation]
    index_columns: tuple[str, ...] = ()


def _run(
    name: str,
    parts: Sequence[_Part],
    *,
    blocking: bool = True,
    details: Mapping[str, Any] | None = None,
) -> ValidationOutcome:
    """Validate each part's frame with its expectations (one GX suite per part) and merge results."""
    import great_expectations as gx

    outcomes: list[ExpectationOutcome] = []
    for i, part in enumerate(parts):
        if not part.expectations:
            continue
        frame = part.frame.reset_index(drop=True)
        index_cols = [c for c in part.index_columns if c in frame.columns]
        result_format: dict[str, Any] = {
            "result_format": "SUMMARY",
            "partial_unexpected_count": _PARTIAL_UNEXPECTED,
        }
        if index_cols:
            result_format["unexpected_index_column_names"] = index_cols
        suite = gx.ExpectationSuite(name=f"{name}.{i}", expectations=list(part.expectations))
        with _GX_LOCK:
            batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
            result = batch.validate(suite, result_format=result_format)
        outcomes.extend(_sorted_outcomes(part.expectations, result.results))
    return ValidationOutcome(
        name=name,
        success=all(o.success for o in outcomes),
        outcomes=outcomes,
        blocking=blocking,
        details=_jsonable(dict(details or {})),
    )


def _column_of(kwargs: Mapping[str, Any]) -> str | None:
    if kwargs.get("column") is not None:
        return str(kwargs["column"])
    if "column_A" in kwargs:
        return f"{kwargs['column_A']},{kwargs['column_B']}"
    if kwargs.get("column_list"):
        return ",".join(map(str, kwargs["column_list"]))
    return None


def _sorted_outcomes(expectations: Sequence[Expectation], results: Iterable[Any]) -> list[ExpectationOutcome]:
    """Convert GX results and restore the order the expectations were declared in."""
    order = {(e.expectation_type, _column_of(e.configuration.kwargs)): i for i, e in enumerate(expectations)}
    converted = [_to_outcome(r) for r in results]
    return sorted(converted, key=lambda o: order.get((o.expectation, o.column), len(order)))


def _to_outcome(res: Any) -> ExpectationOutcome:
    config = res.expectation_config
    kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id"}
    result: dict[str, Any] = dict(res.result or {})
    details: dict[str, Any] = {"kwargs": _jsonable(kwargs)}
    for key in ("observed_value", "element_count", "unexpected_percent", "missing_count", "details"):
        if key in result:
            details[key] = _jsonable(result[key])
    exception = _exception_message(res.exception_info)
    if exception:
        details["exception"] = exception
    unexpected = result.get("unexpected_count")
    return ExpectationOutcome(
        expectation=str(config.type),
        column=_column_of(kwargs),
        success=bool(res.success),
        unexpected_count=None if unexpected is None else int(unexpected),
        unexpected_examples=_jsonable(_examples(result)),
        details=details,
    )


def _examples(result: Mapping[str, Any]) -> list[Any]:
    """The most identifying failure examples GX gave: indexed rows, then values, then mismatches."""
    indexed = result.get("partial_unexpected_index_list") or []
    if indexed and isinstance(indexed[0], dict):
        return list(indexed)
    if result.get("partial_unexpected_list"):
        return list(result["partial_unexpected_list"])
    mismatched = (result.get("details") or {}).get("mismatched")
    if mismatched:
        return [mismatched]
    if result.get("partial_missing_list"):
        return [{"missing": v} for v in result["partial_missing_list"]]
    return []


def _exception_message(info: Any) -> str | None:
    """GX nests exception info by metric id when a metric failed; flatten to one message."""
    if not info:
        return None
    if isinstance(info, Mapping) and "raised_exception" in info:
        return str(info.get("exception_message")) if info.get("raised_exception") else None
    if isinstance(info, Mapping):
        messages = [
            str(v.get("exception_message"))
            for v in info.values()
            if isinstance(v, Mapping) and v.get("raised_exception")
        ]
        return "; ".join(dict.fromkeys(messages)) or None
    return None


def _jsonable(obj: Any) -> Any:
    """Recursively convert numpy/pandas scalars, tuples and non-finite floats to JSON-safe values."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset, np.ndarray, pd.Series)):
        return [_jsonable(v) for v in (sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        return obj if math.isfinite(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _gxe() -> Any:
    import great_expectations.expectations as gxe

    return gxe


def _columns_expectation(required: Iterable[str]) -> Expectation:
    return _gxe().ExpectTableColumnsToMatchSet(column_set=sorted(set(required)), exact_match=False)


def _missing_columns(frame: pd.DataFrame, required: Iterable[str]) -> list[str]:
    return [c for c in required if c not in frame.columns]


def _schema_failure(name: str, frame: pd.DataFrame, required: Sequence[str], blocking: bool) -> ValidationOutcome:
    """When derived checks cannot even be computed, report the missing columns through GX."""
    return _run(
        name,
        [_Part(frame, [_columns_expectation(required)])],
        blocking=blocking,
        details={"missing_columns": _missing_columns(frame, required)},
    )


def _class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per class in CLASSES order, with 0 for classes absent from the manifest."""
    counts = manifest["label"].value_counts().reindex(list(CLASSES), fill_value=0)
    return pd.DataFrame({"label": list(CLASSES), "count": counts.to_numpy(dtype=np.int64)})


# --------------------------------------------------------------------------------------------
# Manifest validations
# --------------------------------------------------------------------------------------------


def validate_manifest_schema(manifest: pd.DataFrame) -> ValidationOutcome:
    """Blocking: required columns, non-null keys, unique ids, known labels, sane values.

    Everything downstream (splits, training, reports) trusts these invariants, so a failure here
    should stop the pipeline.
    """
    gxe = _gxe()
    present = set(manifest.columns)
    exps: list[Expectation] = [_columns_expectation(MANIFEST_COLUMNS)]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in MANIFEST_KEY_COLUMNS if c in present]
    if "image_id" in present:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="image_id"))
    if "label" in present:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(CLASSES)))
    if "phash" in present:
        exps.append(gxe.ExpectColumnValuesToMatchRegex(column="phash", regex=r"^[0-9a-fA-F]{16}$"))
    if "face_path" in present:
        # Stored relative to the data root so the data directory can move.
        exps.append(gxe.ExpectColumnValuesToNotMatchRegex(column="face_path", regex=r"^(?:/|\\|[A-Za-z]:)"))
    for col in ("width", "height", "face_height", "face_width", "dup_group_size"):
        if col in present:
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=1))
    if "dup_group" in present:
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column="dup_group"))
    for col, hi in (("mean_intensity", 255.0), ("std_intensity", 128.0)):
        if col in present:
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0.0, max_value=hi))
    return _run(
        "manifest_schema",
        [_Part(manifest, exps, ("image_id",))],
        details={"rows": len(manifest), "missing_columns": _missing_columns(manifest, MANIFEST_COLUMNS)},
    )


def validate_image_size(manifest: pd.DataFrame, size: int | tuple[int, int]) -> ValidationOutcome:
    """Blocking: every processed face is exactly ``size`` = (height, width) (an int means square).

    The model's input layer and the face store's settings key assume one size; a stale face from
    an older configuration would otherwise crash (or silently skew) training.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    required = ("face_height", "face_width")
    if _missing_columns(manifest, required):
        return _schema_failure("image_size", manifest, required, blocking=True)
    gxe = _gxe()
    exps = [
        gxe.ExpectColumnValuesToNotBeNull(column="face_height"),
        gxe.ExpectColumnValuesToNotBeNull(column="face_width"),
        gxe.ExpectColumnValuesToBeInSet(column="face_height", value_set=[height]),
        gxe.ExpectColumnValuesToBeInSet(column="face_width", value_set=[width]),
    ]
    return _run(
        "image_size",
        [_Part(manifest, exps, ("image_id",))],
        details={"expected_height": height, "expected_width": width, "rows": len(manifest)},
    )


def validate_class_counts(manifest: pd.DataFrame, min_per_class: int) -> ValidationOutcome:
    """Blocking: each of the four classes has at least ``min_per_class`` images (absent counts as 0)."""
    if _missing_columns(manifest, ["label"]):
        return _schema_failure("class_counts", manifest, ["label"], blocking=True)
    counts = _class_counts(manifest)
    exp = _gxe().ExpectColumnValuesToBeBetween(column="count", min_value=int(min_per_class))
    return _run(
        "class_counts",
        [_Part(counts, [exp], ("label",))],
        details={"counts": dict(zip(counts["label"], counts["count"])), "min_per_class": int(min_per_class)},
    )


def validate_class_balance(manifest: pd.DataFrame, max_ratio: float) -> ValidationOutcome:
    """Warning: largest/smallest class count must not exceed ``max_ratio``.

    Expressed per class as ``count >= largest / max_ratio`` (equivalent for positive counts) so
    the failure examples name the under-represented classes. An empty manifest passes here;
    :func:`validate_class_counts` is the check that catches it.
    """
    if _missing_columns(manifest, ["label"]):
        return _schema_failure("class_balance", manifest, ["label"], blocking=False)
    counts = _class_counts(manifest)
    largest, smallest = int(counts["count"].max()), int(counts["count"].min())
    floor = largest / float(max_ratio)
    ratio: float | None = (largest / smallest) if smallest > 0 else (None if largest == 0 else math.inf)
    exp = _gxe().ExpectColumnValuesToBeBetween(column="count", min_value=floor)
    return _run(
        "class_balance",
        [_Part(counts, [exp], ("label",))],
        blocking=False,
        details={
            "counts": dict(zip(counts["label"], counts["count"])),
            "ratio": ratio,
            "max_ratio": float(max_ratio),
            "min_count_allowed": floor,
        },
    )


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------

_KEY = ("source", "source_path")


def _key_frame(table: pd.DataFrame) -> pd.DataFrame | None:
    """(source, source_path) of a table; None when the columns are missing (empty tables are fine)."""
    if len(table) == 0 and _missing_columns(table, _KEY):  # an empty table may come without columns
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in _KEY})
    if _missing_columns(table, _KEY):
        return None
    return table.loc[:, list(_KEY)].reset_index(drop=True)


def validate_accounting(
    inputs: int | pd.DataFrame,
    kept: int | pd.DataFrame,
    excluded: int | pd.DataFrame,
) -> ValidationOutcome:
    """Blocking: every input file is either kept or excluded, exactly once.

    Each argument is either a count or the table itself (the raw inventory, the manifest, the
    excluded table; counts are then their row counts). Always checks
    ``inputs == kept + excluded``. With the kept and excluded tables it also checks that no
    (source, source_path) is in both or twice in one; with all three tables, that every input file
    is accounted for exactly once and nothing is kept/excluded that was never an input.
    """
    gxe = _gxe()
    count = {name: (len(v) if isinstance(v, pd.DataFrame) else int(v))
             for name, v in (("inputs", inputs), ("kept", kept), ("excluded", excluded))}
    numbers = {
        "n_inputs": count["inputs"],
        "n_kept": count["kept"],
        "n_excluded": count["excluded"],
        "n_kept_plus_excluded": count["kept"] + count["excluded"],
    }
    parts = [
        _Part(
            pd.DataFrame([numbers]),
            [gxe.ExpectColumnPairValuesToBeEqual(column_A="n_inputs", column_B="n_kept_plus_excluded")],
        )
    ]
    details: dict[str, Any] = dict(numbers)

    keys: dict[str, pd.DataFrame] = {}
    for name, table in (("inputs", inputs), ("kept", kept), ("excluded", excluded)):
        if not isinstance(table, pd.DataFrame):
            continue
        frame = _key_frame(table)
        if frame is None:  # report the missing key columns through GX instead of raising
            parts.append(_Part(table, [_columns_expectation(_KEY)]))
            details[f"{name}_missing_columns"] = _missing_columns(table, _KEY)
        else:
            keys[name] = frame

    if "kept" in keys and "excluded" in keys:
        outputs = pd.concat(
            [keys["kept"].assign(table="kept"), keys["excluded"].assign(table="excluded")], ignore_index=True
        )
        exps: list[Expectation] = [
            gxe.ExpectColumnValuesToNotBeNull(column="source_path"),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=list(_KEY)),
        ]
        if "inputs" in keys:
            inputs_keys = keys["inputs"].drop_duplicates()
            outputs = outputs.merge(inputs_keys.assign(in_inputs=1), on=list(_KEY), how="left")
            outputs["in_inputs"] = outputs["in_inputs"].fillna(0).astype(np.int64)
            exps.append(gxe.ExpectColumnValuesToBeInSet(column="in_inputs", value_set=[1]))
            # How many times each input file shows up among kept + excluded: must be exactly once.
            seen = outputs.groupby(list(_KEY), dropna=False).size().rename("times_accounted").reset_index()
            per_input = keys["inputs"].merge(seen, on=list(_KEY), how="left")
            per_input["times_accounted"] = per_input["times_accounted"].fillna(0).astype(np.int64)
            parts.append(
                _Part(
                    per_input,
                    [gxe.ExpectColumnValuesToBeInSet(column="times_accounted", value_set=[1])],
                    _KEY,
                )
            )
            details["inputs_not_accounted"] = int((per_input["times_accounted"] == 0).sum())
        parts.insert(1, _Part(outputs, exps, ("table", *_KEY)))
        details["in_both_tables"] = int(
            len(keys["kept"].drop_duplicates().merge(keys["excluded"].drop_duplicates(), on=list(_KEY)))
        )
    return _run("accounting", parts, details=details)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def validate_split_proportions(
    splits: pd.DataFrame, targets: Mapping[str, float], tolerance: float
) -> ValidationOutcome:
    """Each split's share of all rows is within ``tolerance`` of its target share.

    Per-class shares are reported in ``details['per_class']`` (informational: small classes
    legitimately deviate more after group-aware splitting).
    """
    if _missing_columns(splits, ["split"]):
        return _schema_failure("split_proportions", splits, ["split"], blocking=True)
    gxe = _gxe()
    names = list(targets)
    total = len(splits)
    counts = splits["split"].value_counts().reindex(names, fill_value=0)
    shares = counts / total if total else counts * 0.0
    derived = pd.DataFrame(
        {
            "split": names,
            "count": counts.to_numpy(dtype=np.int64),
            "share": shares.to_numpy(dtype=float),
            "target": [float(targets[n]) for n in names],
        }
    )
    # Rounded so that e.g. 0.2 - 0.15 == 0.05 is not rejected by floating-point noise.
    derived["deviation"] = (derived["share"] - derived["target"]).abs().round(9)

    per_class: dict[str, dict[str, float]] = {}
    if "label" in splits.columns and total:
        table = pd.crosstab(splits["label"], splits["split"], normalize="index")
        for label, row in table.iterrows():
            per_class[str(label)] = {n: round(float(row.get(n, 0.0)), 4) for n in names}

    parts = [
        _Part(
            splits,
            [
                gxe.ExpectTableRowCountToBeBetween(min_value=1),
                gxe.ExpectColumnValuesToNotBeNull(column="split"),
                gxe.ExpectColumnValuesToBeInSet(column="split", value_set=names),
            ],
            ("image_id",),
        ),
        _Part(
            derived,
            [gxe.ExpectColumnValuesToBeBetween(column="deviation", max_value=float(tolerance))],
            ("split", "share", "target"),
        ),
    ]
    return _run(
        "split_proportions",
        parts,
        details={
            "rows": total,
            "shares": {n: round(float(s), 4) for n, s in zip(names, derived["share"])},
            "targets": {n: float(targets[n]) for n in names},
            "tolerance": float(tolerance),
            "per_class": per_class,
        },
    )


def _splits_per_group(splits: pd.DataFrame) -> pd.DataFrame:
    """One row per dup_group: how many distinct splits it lands in and which (vectorised)."""
    pairs = (
        splits.loc[splits["dup_group"].notna() & splits["split"].notna(), ["dup_group", "split"]]
        .astype({"split": str})
        .drop_duplicates()
        .sort_values(["dup_group", "split"])
    )
    per_group = pairs.groupby("dup_group", sort=True).agg(n_splits=("split", "size"), splits=("split", "first"))
    leaking = per_group.index[per_group["n_splits"] > 1]
    if len(leaking):
        # Joining strings per group is slow, so only do it for the (few) offending groups.
        joined = pairs[pairs["dup_group"].isin(leaking)].groupby("dup_group")["split"].agg(",".join)
        per_group["splits"] = per_group["splits"].astype(object)
        per_group.loc[joined.index, "splits"] = joined
    return per_group.reset_index()


def validate_no_group_leakage(splits: pd.DataFrame) -> ValidationOutcome:
    """Blocking: no duplicate group (near-identical images) spans more than one split.

    A group split across train and test leaks test images into training and inflates metrics.
    Also requires each image_id to appear once, which is the same leak at the image level.
    """
    required = ("image_id", "split", "dup_group")
    if _missing_columns(splits, required):
        return _schema_failure("no_group_leakage", splits, required, blocking=True)
    gxe = _gxe()
    per_group = _splits_per_group(splits)
    parts = [
        _Part(
            splits,
            [
                gxe.ExpectColumnValuesToNotBeNull(column="dup_group"),
                gxe.ExpectColumnValuesToNotBeNull(column="image_id"),
                gxe.ExpectColumnValuesToBeUnique(column="image_id"),
            ],
            ("image_id", "split"),
        ),
        _Part(
            per_group,
            [gxe.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1)],
            ("dup_group", "splits"),
        ),
    ]
    leaking = int((per_group["n_splits"] > 1).sum())
    return _run("no_group_leakage", parts, details={"groups": len(per_group), "leaking_groups": leaking})


def validate_folds(splits: pd.DataFrame, n_folds: int) -> ValidationOutcome:
    """Blocking: train/validation rows carry a fold in ``0..n_folds-1`` (each fold used), test rows ``-1``."""
    required = ("split", "fold")
    if _missing_columns(splits, required):
        return _schema_failure("folds", splits, required, blocking=True)
    from great_expectations.expectations.row_conditions import Column

    gxe = _gxe()
    not_test = Column("split").is_in(["train", "validation"])
    exps = [
        gxe.ExpectColumnValuesToNotBeNull(column="fold"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLIT_NAMES)),
        gxe.ExpectColumnValuesToBeBetween(
            column="fold", min_value=0, max_value=int(n_folds) - 1, row_condition=not_test
        ),
        gxe.ExpectColumnValuesToBeInSet(column="fold", value_set=[-1], row_condition=Column("split") == "test"),
    ]
    if (splits["split"].isin(["train", "validation"])).any():
        # Only meaningful when there are CV rows at all; an empty fold would make a CV run degenerate.
        exps.append(
            gxe.ExpectColumnDistinctValuesToContainSet(
                column="fold", value_set=list(range(int(n_folds))), row_condition=not_test
            )
        )
    fold_counts = splits.loc[splits["split"] != "test", "fold"].value_counts().sort_index()
    return _run(
        "folds",
        [_Part(splits, exps, ("image_id", "split"))],
        details={"n_folds": int(n_folds), "rows_per_fold": {str(k): int(v) for k, v in fold_counts.items()}},
    )
