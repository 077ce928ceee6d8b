"""No check-then-use races where runs share a data root (write, audit, publish).

Real files and, where it matters, real processes (multiprocessing, spawn): two runs publishing
from the same base at once (one publishes, the other is refused naming the winner, the published
set is whole), a publication lock held by another process (waited for, or refused naming the
holder), readers that open each table once and never return a mix, even while another process
publishes over and over.
"""

from __future__ import annotations

import builtins
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fer_pipeline.atomic import read_parquet_meta
from fer_pipeline import publish as pub
from fer_pipeline.publish import (
    POOL,
    UNLABELLED,
    Candidate,
    MixedSetError,
    PublishConflict,
    data_version,
    empty_pool,
    manifest_version,
    pool_content_version,
    publish,
    publish_tables,
    read_pool,
    read_published,
)
from fer_pipeline.paths import DataPaths
from fer_pipeline.publish_lock import PublishLockTimeout, publication_lock

SET_TABLES = ("manifest", "excluded", POOL, UNLABELLED, "splits")
CTX = mp.get_context("spawn")


def _tables(tag: str, n: int = 6) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ids = [f"{tag}-{i}" for i in range(n)]
    kept = pd.DataFrame({"image_id": ids, "source": "s", "source_path": [f"{tag}/{i}.png" for i in ids],
                         "label": ["Angry", "Happy", "Sad", "Neutral", "Angry", "Happy"][:n]})
    excluded = pd.DataFrame({"source": ["s"], "source_path": [f"{tag}/bad.png"], "reason": ["not an image"]})
    splits = pd.DataFrame({"image_id": ids, "split": ["train"] * (n - 2) + ["test"] * 2,
                           "fold": list(range(n - 2)) + [-1, -1]})
    return kept, excluded, splits


def _write_candidate(paths: DataPaths, run_id: str, tag: str) -> Candidate:
    """What a run's manifest and splits stages leave: a whole candidate (its base recorded by the
    first write)."""
    kept, excluded, splits = _tables(tag)
    version, split_version = manifest_version(kept, excluded, empty_pool()), data_version(kept, splits)
    meta = {"manifest_version": version, "run_id": run_id}
    candidate = Candidate(paths, run_id)
    candidate.write("manifest", kept, meta)
    candidate.write("excluded", excluded, meta)
    candidate.write(POOL, empty_pool(), {**meta, "data_version": split_version,
                                         "pool_version": pool_content_version(empty_pool())})
    candidate.write("splits", splits, {**meta, "data_version": split_version})
    return candidate


def _slow_renames(seconds: float) -> None:
    """Widen the window between a publication's renames (what a race needs to show)."""
    real = pub.replace_synced

    def slow(src: Any, target: Any) -> Path:
        time.sleep(seconds)
        return real(src, target)

    pub.replace_synced = slow  # this (child) process only


def _race_publisher(root: str, run_id: str, barrier: Any, results: Any) -> None:
    paths = DataPaths(Path(root))
    _slow_renames(0.05)
    candidate = _write_candidate(paths, run_id, run_id)
    barrier.wait(timeout=60)
    try:
        results.put((run_id, "published", publish(candidate, wait=60)))
    except PublishConflict as exc:
        results.put((run_id, "conflict", str(exc)))
    except Exception as exc:  # noqa: BLE001 -- reported to the test, which fails on it
        results.put((run_id, "error", f"{type(exc).__name__}: {exc}"))


def _run_ids_published(paths: DataPaths) -> dict[str, str]:
    return {t: read_parquet_meta(getattr(paths, t))["run_id"] for t in SET_TABLES}


@pytest.mark.parametrize("published_before", [True, False], ids=["over-a-set", "empty-root"])
def test_two_runs_publishing_at_once_one_wins_the_other_names_it(tmp_path: Path, published_before: bool) -> None:
    paths = DataPaths(tmp_path)
    if published_before:
        publish_tables(paths, *_tables("base"), run_id="base-run")
    barrier, results = CTX.Barrier(2), CTX.Queue()
    procs = [CTX.Process(target=_race_publisher, args=(str(tmp_path), run, barrier, results))
             for run in ("run-a", "run-b")]
    for proc in procs:
        proc.start()
    outcomes = {}
    for _ in procs:
        run_id, what, detail = results.get(timeout=120)
        outcomes[run_id] = (what, detail)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    winners = [r for r, (what, _) in outcomes.items() if what == "published"]
    losers = [r for r, (what, _) in outcomes.items() if what == "conflict"]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    (winner,), (loser,) = winners, losers
    message = outcomes[loser][1]
    assert f"run {loser} did not publish" in message and f"run {winner} published manifest version" in message
    assert "Run again" in message
    # the published set is the winner's, whole: every table from one run, and readable as one set
    assert _run_ids_published(paths) == dict.fromkeys(SET_TABLES, winner)
    current = read_published(paths)
    assert current.manifest["image_id"].str.startswith(winner).all()
    # the loser's candidate stays for inspection; the winner's is gone
    assert (paths.candidates_dir / loser / "manifest.parquet").is_file()
    assert not (paths.candidates_dir / winner).exists()


def test_single_runs_publish_one_after_another(tmp_path: Path) -> None:
    """The normal case is unaffected: an empty root, then runs that each publish over the last."""
    paths = DataPaths(tmp_path)
    for run in ("r1", "r2", "r3"):
        publish_tables(paths, *_tables(run), run_id=run)
        assert _run_ids_published(paths) == dict.fromkeys(SET_TABLES, run)
    adopting = Candidate(paths, "splits-alone")
    adopting.adopt_published()  # a splits-alone run starts from the published set, r3's
    kept, _, splits = _tables("r3")
    meta = {"manifest_version": adopting.meta("manifest")["manifest_version"], "run_id": "splits-alone"}
    adopting.write("splits", splits, {**meta, "data_version": data_version(kept, splits)})
    adopting.write(POOL, empty_pool(), {**meta, "data_version": data_version(kept, splits)})
    adopting.write("excluded", adopting.read("excluded"), meta)
    publish(adopting)
    assert read_parquet_meta(paths.splits)["run_id"] == "splits-alone"


def test_a_splits_alone_run_is_refused_when_another_run_published_meanwhile(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path)
    publish_tables(paths, *_tables("old"), run_id="old-run")
    adopting = Candidate(paths, "splits-alone")
    adopting.adopt_published()
    publish_tables(paths, *_tables("new"), run_id="new-run")  # another run publishes meanwhile
    kept, _, splits = _tables("old")
    meta = {"manifest_version": adopting.meta("manifest")["manifest_version"], "run_id": "splits-alone"}
    adopting.write("splits", splits, {**meta, "data_version": data_version(kept, splits)})
    adopting.write(POOL, empty_pool(), {**meta, "data_version": data_version(kept, splits)})
    adopting.write("excluded", adopting.read("excluded"), meta)
    before = {t: getattr(paths, t).read_bytes() for t in SET_TABLES}
    with pytest.raises(PublishConflict, match="built from run old-run's set .* run new-run published"):
        publish(adopting)
    assert {t: getattr(paths, t).read_bytes() for t in SET_TABLES} == before  # new-run's set, untouched


def _hold_lock(root: str, held: Any, release: Any) -> None:
    with publication_lock(root, run_id="holder-run", what="publishing the manifest set"):
        held.set()
        release.wait(timeout=60)


def test_a_lock_held_by_another_process_is_waited_for_or_refused_naming_it(tmp_path: Path) -> None:
    paths = DataPaths(tmp_path)
    publish_tables(paths, *_tables("base"), run_id="base-run")
    candidate = _write_candidate(paths, "waiting-run", "waiting")
    held, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_lock, args=(str(tmp_path), held, release))
    holder.start()
    try:
        assert held.wait(timeout=60)
        start = time.monotonic()
        with pytest.raises(PublishLockTimeout) as refused:
            publish(candidate, wait=0.5)
        assert time.monotonic() - start >= 0.5
        assert f"held by run holder-run (pid {holder.pid} on " in str(refused.value)
        assert _run_ids_published(paths) == dict.fromkeys(SET_TABLES, "base-run")  # nothing published
        # waited for: the holder lets go after a second, the publication then goes ahead
        CTX.Process(target=_release_later, args=(release, 1.0)).start()
        start = time.monotonic()
        publish(candidate, wait=60)
        assert time.monotonic() - start >= 0.8
    finally:
        release.set()
        holder.join(timeout=60)
    assert _run_ids_published(paths) == dict.fromkeys(SET_TABLES, "waiting-run")


def _release_later(release: Any, seconds: float) -> None:
    time.sleep(seconds)
    release.set()


def test_read_published_and_read_pool_open_each_table_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = DataPaths(tmp_path)
    publish_tables(paths, *_tables("one"), run_id="one")
    opened: list[str] = []
    real_open = builtins.open

    def counting(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, Path)) and Path(file).parent == paths.manifest_dir:
            opened.append(Path(file).stem)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    published = read_published(paths)
    assert sorted(opened) == sorted(SET_TABLES)
    assert published.manifest["image_id"].str.startswith("one-").all()
    opened.clear()
    assert len(read_pool(paths)) == 0
    assert sorted(opened) == sorted(SET_TABLES)


def test_a_set_replaced_between_two_reads_is_refused_not_mixed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (here: the open hook) renames a whole new set in after the manifest was
    read: the reader refuses instead of returning one run's manifest with another's splits."""
    paths, other = DataPaths(tmp_path / "root"), DataPaths(tmp_path / "other")
    publish_tables(paths, *_tables("one"), run_id="one")
    publish_tables(other, *_tables("two"), run_id="two")
    real_open = builtins.open
    swapped: list[bool] = []

    def swapping(file: Any, *args: Any, **kwargs: Any) -> Any:
        if not swapped and isinstance(file, (str, Path)) and Path(file) == paths.splits:
            swapped.append(True)
            for table in SET_TABLES:
                getattr(paths, table).write_bytes(getattr(other, table).read_bytes())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", swapping)
    with pytest.raises(MixedSetError, match="not one set"):
        read_published(paths)
    assert swapped


def _publish_back_and_forth(root: str, tables_from: list[str], seconds: float, done: Any) -> None:
    """Publish the prepared sets in turn for ``seconds``, slowly (so a reader would see a half
    publication if it could)."""
    paths = DataPaths(Path(root))
    _slow_renames(0.01)
    deadline, i = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        source = DataPaths(Path(tables_from[i % len(tables_from)]))
        candidate = Candidate(paths, f"flip-{i}")
        for table in SET_TABLES:
            candidate.write(table, pd.read_parquet(getattr(source, table)), read_parquet_meta(getattr(source, table)))
        publish(candidate)
        i += 1
    done.put(i)


def test_readers_never_see_a_publication_half_done(tmp_path: Path) -> None:
    """One process publishes two sets in turn; this one reads all along: every read is one of
    the two sets, whole (manifest version and data version of the same set), never an error."""
    root, sets = DataPaths(tmp_path / "root"), {}
    for tag in ("one", "two"):
        source = DataPaths(tmp_path / tag)
        publish_tables(source, *_tables(tag), run_id=tag)
        sets[tag] = source
    publish_tables(root, *_tables("one"), run_id="one")
    expected = {(read_parquet_meta(s.manifest)["manifest_version"], read_parquet_meta(s.splits)["data_version"])
                for s in sets.values()}
    done = CTX.Queue()
    writer = CTX.Process(target=_publish_back_and_forth,
                         args=(str(root.root), [str(s.root) for s in sets.values()], 3.0, done))
    writer.start()
    seen: set[tuple[str, str]] = set()
    reads = 0
    try:
        while writer.is_alive() or reads == 0:
            current = read_published(root)
            pool = read_pool(root)
            assert (current.manifest_version, current.data_version) in expected
            assert len(pool) == 0
            seen.add((current.manifest_version, current.data_version))
            reads += 1
    finally:
        writer.join(timeout=60)
    publications = done.get(timeout=10)
    assert writer.exitcode == 0 and publications >= 5
    assert seen == expected and reads > publications  # both sets were read, many times
