"""Hostile stored results and published tables: the readers of ``reports/cv_fold_results``
(:class:`FoldStore`), ``reports/loso_results`` (:class:`LosoStore`) and the published pool
(:func:`read_pool`) refuse a damaged file with a reason naming it, never with a raw exception,
a hang on a device, or by reading through a link (the stores write regular files only)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fer_pipeline.analysis.cross_validation import (
    FoldRecipe,
    FoldStore,
    collect_folds,
    train_fold,
)
from fer_pipeline.analysis.generalisation import LosoStore, TrainingRecipe, collect_rows
from fer_pipeline.publish import (
    MixedSetError,
    publish_tables,
    read_pool,
    read_published,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.schema import EXCLUDED_COLUMNS, POOL_COLUMNS
from fer_pipeline_tests.analysis.test_cross_validation import (
    FAST,
    TINY,
    CountingTrainer,
    make_pool,
)

pytestmark = pytest.mark.timeout(120)  # a reader that follows a link to /dev/zero would never end

MAGIC = ("Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.")
NOT_AN_OBJECT = "the recipe is not an object with architecture and train_config objects"
LINK = "is a symbolic link, not a stored result: remove it and re-materialize"


def _link(path: Path, target: str | Path) -> None:
    path.unlink()
    os.symlink(target, path)


def _edit(path: Path, change: Callable[[dict], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


# --- FoldStore -------------------------------------------------------------------------------


@pytest.fixture()
def folds(tmp_path: Path) -> tuple[FoldStore, FoldRecipe]:
    recipe = FoldRecipe.of("v1", TINY, FAST, n_cv_folds=2)
    store = FoldStore(tmp_path / "cv_fold_results")
    pool = make_pool()
    for fold in (0, 1):
        store.save(train_fold(pool, fold, TINY, FAST, n_cv_folds=2, train_fn=CountingTrainer()), recipe)
    (tmp_path / "outside.json").write_text(store.paths(0)[0].read_text())
    return store, recipe


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (damage to fold 0's files, the exact reason with {meta}/{oof} for its paths)
FOLD_CASES = {
    "truncated json": (lambda m, o: m.write_text('{"fold": 0, "reci'),
                       ("unreadable stored result (JSONDecodeError: Unterminated string starting at: "
                       "line 1 column 13 (char 12)): {meta}")),
    "json list": (lambda m, o: m.write_text("[1, 2]"),
                  "unreadable stored result (TypeError: list indices must be integers or slices, not str): {meta}"),
    "json null": (lambda m, o: m.write_text("null"),
                  "unreadable stored result (TypeError: 'NoneType' object is not subscriptable): {meta}"),
    "only identity": (lambda m, o: _edit(m, lambda d: {"identity": d["identity"]}),
                      "unreadable stored result (KeyError: 'recipe'): {meta}"),
    "no metrics": (lambda m, o: _edit(m, lambda d: {k: v for k, v in d.items() if k != "metrics"}),
                   "unreadable stored result (KeyError: 'metrics'): {meta}"),
    "metrics a list": (lambda m, o: _edit(m, lambda d: {**d, "metrics": [0.5]}),
                       "unreadable stored result (AttributeError: 'list' object has no attribute 'items'): {meta}"),
    "recipe a string": (lambda m, o: _edit(m, lambda d: {**d, "recipe": "data_version"}),
                        f"unreadable stored result (TypeError: {NOT_AN_OBJECT}): {{meta}}"),
    # used to pass load and crash collect_folds (AttributeError in mismatch)
    "architecture a list": (lambda m, o: _edit(m, lambda d: {**d, "recipe": {**d["recipe"], "architecture": [1]}}),
                            f"unreadable stored result (TypeError: {NOT_AN_OBJECT}): {{meta}}"),
    "truncated oof": (lambda m, o: _truncate(o),
                      (f"unreadable stored result (ArrowInvalid: Could not open Parquet input source '{{oof}}': "
                      f"{MAGIC}): {{oof}}")),
    "garbage oof": (lambda m, o: _garbage(o),
                    (f"unreadable stored result (ArrowInvalid: Could not open Parquet input source '{{oof}}': "
                    f"{MAGIC}): {{oof}}")),
    "no oof": (lambda m, o: o.unlink(), "unreadable stored result (FileNotFoundError: {oof}): {oof}"),
    # links are refused unread: a link to /dev/zero used to count as "missing" and hang stored_identity
    "json -> /dev/zero": (lambda m, o: _link(m, "/dev/zero"), f"{{meta}} {LINK}"),
    "oof -> /dev/zero": (lambda m, o: _link(o, "/dev/zero"), f"{{oof}} {LINK}"),
    "json -> file outside": (lambda m, o: _link(m, m.parent.parent / "outside.json"), f"{{meta}} {LINK}"),
    "dangling json link": (lambda m, o: _link(m, m.parent / "nowhere.json"), f"{{meta}} {LINK}"),
}


@pytest.mark.parametrize("case", FOLD_CASES)
def test_a_damaged_fold_is_refused_naming_its_file(folds: tuple[FoldStore, FoldRecipe], case: str) -> None:
    store, recipe = folds
    meta, oof = store.paths(0)
    assert store.stored_identity(0) == recipe.identity(0)
    damage, reason = FOLD_CASES[case]
    damage(meta, oof)
    expected = reason.format(meta=meta, oof=oof)
    assert store.load(0) == expected
    collected = collect_folds(store, recipe)
    assert collected.refused == {0: expected} and collected.missing == [] and [r.fold for r in collected.used] == [1]
    assert store.stored_identity(0) is None  # a refused result is never current: the partition reruns


def test_a_fifo_in_place_of_a_fold_is_refused_without_blocking(folds: tuple[FoldStore, FoldRecipe]) -> None:
    store, recipe = folds
    meta, _ = store.paths(0)
    meta.unlink()
    os.mkfifo(meta)
    assert store.stored_identity(0) is None
    assert collect_folds(store, recipe).refused == {0: f"{meta} is not a regular file: remove it and re-materialize"}


# --- LosoStore -------------------------------------------------------------------------------


@pytest.fixture()
def loso(tmp_path: Path) -> tuple[LosoStore, TrainingRecipe]:
    recipe = TrainingRecipe.of("v1", TINY, FAST)
    store = LosoStore(tmp_path / "loso_results")
    for source in ("a", "b"):
        store.save({"held_out_source": source, "loso_macro_f1": 0.5}, recipe)
    (tmp_path / "outside.json").write_text(store.path("a").read_text())
    return store, recipe


LOSO_CASES = {
    "truncated json": (lambda p: p.write_text('{"row": {"held_'),
                       ("unreadable stored result (JSONDecodeError: Unterminated string starting at: "
                       "line 1 column 10 (char 9)): {path}")),
    "json list": (lambda p: p.write_text("[]"),
                  "unreadable stored result (TypeError: list indices must be integers or slices, not str): {path}"),
    "json number": (lambda p: p.write_text("7"),
                    "unreadable stored result (TypeError: 'int' object is not subscriptable): {path}"),
    "empty object": (lambda p: p.write_text("{}"), "unreadable stored result (KeyError: 'row'): {path}"),
    "no recipe": (lambda p: _edit(p, lambda d: {k: v for k, v in d.items() if k != "recipe"}),
                  "unreadable stored result (KeyError: 'recipe'): {path}"),
    "row a list": (lambda p: _edit(p, lambda d: {**d, "row": [["held_out_source", "a"]]}),
                   "unreadable stored result (TypeError: the row is not an object): {path}"),
    "row of another source": (lambda p: _edit(p, lambda d: {**d, "row": {"held_out_source": "b"}}),
                              "unreadable stored result (ValueError: holds source 'b'): {path}"),
    # used to pass load and crash collect_rows (AttributeError in mismatch)
    "architecture a list": (lambda p: _edit(p, lambda d: {**d, "recipe": {**d["recipe"], "architecture": [1]}}),
                            f"unreadable stored result (TypeError: {NOT_AN_OBJECT}): {{path}}"),
    "train_config a string": (lambda p: _edit(p, lambda d: {**d, "recipe": {**d["recipe"], "train_config": "lr"}}),
                              f"unreadable stored result (TypeError: {NOT_AN_OBJECT}): {{path}}"),
    # used to count as "missing" (load) and hang stored_identity reading /dev/zero
    "-> /dev/zero": (lambda p: _link(p, "/dev/zero"), f"{{path}} {LINK}"),
    "-> file outside": (lambda p: _link(p, p.parent.parent / "outside.json"), f"{{path}} {LINK}"),
}


@pytest.mark.parametrize("case", LOSO_CASES)
def test_a_damaged_loso_row_is_refused_naming_its_file(loso: tuple[LosoStore, TrainingRecipe], case: str) -> None:
    store, recipe = loso
    path = store.path("a")
    assert store.stored_identity("a") == recipe.identity("a")
    damage, reason = LOSO_CASES[case]
    damage(path)
    expected = "refused: " + reason.format(path=path)
    assert store.load("a") == expected
    collected = collect_rows(store, {"a": "eligible", "b": "eligible"}, recipe)
    assert collected.refused == {"a": expected} and collected.missing == []
    assert collected.rows == [{"held_out_source": "a", "status": expected},
                              {"held_out_source": "b", "loso_macro_f1": 0.5}]
    assert store.stored_identity("a") is None  # a refused row is never current: the partition reruns


# --- read_pool -------------------------------------------------------------------------------


@pytest.fixture()
def published(tmp_path: Path) -> DataPaths:
    paths = DataPaths(tmp_path)
    ids = [f"{i:016x}" for i in range(8)]
    kept = pd.DataFrame({"image_id": ids, "source": "demo", "source_path": ids,
                         "label": ["Angry", "Happy", "Sad", "Neutral"] * 2})
    splits = pd.DataFrame({"image_id": ids, "split": ["train"] * 6 + ["test"] * 2, "fold": [0, 1] * 3 + [-1] * 2})
    excluded = pd.DataFrame({c: pd.Series(dtype="object") for c in EXCLUDED_COLUMNS})
    pool = pd.DataFrame({c: [f"p{i}" for i in range(5)] for c in POOL_COLUMNS})
    publish_tables(paths, kept, excluded, splits, pool=pool)
    assert len(read_pool(paths)) == 5
    return paths


def _garble_pages(path: Path) -> None:
    """Overwrite the data pages, keeping the footer: the schema reads, the rows do not."""
    data = bytearray(path.read_bytes())
    footer = struct.unpack("<I", data[-8:-4])[0]
    data[4: len(data) - 8 - footer] = b"\xff" * (len(data) - 12 - footer)
    path.write_bytes(bytes(data))


POOL_CASES = {
    "truncated": (_truncate, f"(ArrowInvalid: {MAGIC})"),
    "random bytes": (_garbage, f"(ArrowInvalid: {MAGIC})"),
    "empty": (lambda p: p.write_bytes(b""), "(ArrowInvalid: Parquet file size is 0 bytes)"),
    # footer intact: used to escape read_pool as a raw pyarrow OSError without the path
    "garbled pages": (_garble_pages, ("(OSError: Couldn't deserialize thrift: don't know what type: \x0f\n"
                                     "Deserializing page header failed.\n)")),
}


@pytest.mark.parametrize("case", POOL_CASES)
def test_a_damaged_pool_is_refused_naming_it(published: DataPaths, case: str) -> None:
    damage, detail = POOL_CASES[case]
    damage(published.pool)
    with pytest.raises(MixedSetError) as refused:
        read_pool(published)
    assert str(refused.value) == (f"{published.pool} is not a readable Parquet table {detail}: "
                                  "re-materialize manifest and splits")
    if case != "garbled pages":  # the set check reads every table's footer; the pages only read_pool
        with pytest.raises(MixedSetError, match="pool.parquet is not a readable Parquet table"):
            read_published(published)
    else:
        assert len(read_published(published).manifest) == 8
