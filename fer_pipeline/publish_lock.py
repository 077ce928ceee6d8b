"""One publisher at a time per data root: the lock every publication into ``manifest/`` and
``models/`` takes, so two runs on one data root (two Dagster instances, the CLI beside the
daemon) never interleave their renames.

Publishing is a few renames (the manifest set: four tables, manifest last; a model: checkpoint
and curves). Each rename is atomic, the sequence is not: without a lock, two publishers renaming
at once can leave the manifest of one run beside the splits of the other. The lock is an
exclusive ``fcntl.flock`` on ``<data root>/.fer-publish.lock`` (at the root, so the object-store
sync never mirrors it), held only for the renames, waited for a bounded time; the holder writes
its run id, pid and host into the file so a waiter that gives up can name it. The kernel
releases a flock when its holder dies, so a killed run never leaves the root locked. The file is
never removed (removing a lock file lets two processes lock two different files).

Readers take the same lock shared (:func:`reading`) while they read a set, so they never see a
publication half done; they wait a bounded time and then read anyway (the version check of
:mod:`fer_pipeline.publish` still refuses a mixed set). flock works between processes on
one host and, on Linux, across hosts on NFS (emulated with POSIX locks); not on every network
filesystem. Plain Python: no Dagster here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from fer_pipeline.atomic import replace_synced

LOCK_FILE = ".fer-publish.lock"
WAIT_S = 120.0  # a publication is a few renames: waiting longer means the holder is stuck
READ_WAIT_S = 30.0
POLL_S = 0.05

_held = threading.local()  # roots this thread holds exclusively: nested publications do not deadlock


class PublishLockTimeout(TimeoutError):
    """Another process held the data root's publication lock for longer than we would wait."""


@dataclass(frozen=True)
class Holder:
    """Who holds the lock: written into the lock file while it is held."""

    run_id: str | None
    pid: int
    host: str
    what: str
    since: str

    def describe(self) -> str:
        run = f"run {self.run_id}" if self.run_id else "a process outside any run"
        return f"{run} (pid {self.pid} on {self.host}, {self.what}, since {self.since})"


def lock_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / LOCK_FILE


def read_holder(root: str | os.PathLike[str]) -> Holder | None:
    """Who holds (or last held) the lock, as it wrote itself; None when unknown."""
    try:
        data = json.loads(lock_path(root).read_text() or "null")
        return Holder(**data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def _try_lock(fd: int, mode: int, wait: float) -> bool:
    """flock ``fd`` in ``mode``, retrying until ``wait`` seconds passed; whether it was taken."""
    deadline = time.monotonic() + max(wait, 0.0)
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


def _held_roots() -> set[str]:
    if not hasattr(_held, "roots"):
        _held.roots = set()
    return _held.roots


@contextlib.contextmanager
def publication_lock(root: str | os.PathLike[str], run_id: str | None = None, what: str = "publishing",
                     wait: float = WAIT_S) -> Iterator[Holder]:
    """Hold the data root's publication lock exclusively; :class:`PublishLockTimeout` naming the
    holder when it is not free within ``wait`` seconds. Reentrant within one thread."""
    path = lock_path(root)
    key = str(path.resolve())
    me = Holder(run_id, os.getpid(), socket.gethostname(), what,
                datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if key in _held_roots():
        yield me
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd, fcntl.LOCK_EX, wait):
            holder = read_holder(root)
            raise PublishLockTimeout(
                f"{root}: {what} waited {wait:g} s for the publication lock ({path}), held by "
                f"{holder.describe() if holder else 'another process (it did not say which)'}; nothing was "
                "published: run again once that publication has finished")
        _held_roots().add(key)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
            yield me
        finally:
            _held_roots().discard(key)
            os.ftruncate(fd, 0)  # released: no stale name left for the next waiter to report
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def reading(root: str | os.PathLike[str], wait: float = READ_WAIT_S) -> Iterator[bool]:
    """Hold the lock shared while reading a published set, so no publication runs in between;
    yields whether it was taken. Never blocks a data root nothing was published into (no lock
    file), a read-only one, or a thread that holds the lock itself; after ``wait`` seconds the
    read goes ahead unlocked (the caller's version check still refuses a mixed set)."""
    path = lock_path(root)
    if str(path.resolve()) in _held_roots():
        yield True
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        yield _try_lock(fd, fcntl.LOCK_SH, wait)
    finally:
        os.close(fd)


def publish_files(root: str | os.PathLike[str], moves: Sequence[tuple[Path, Path]], run_id: str | None = None,
                  what: str = "publishing", wait: float = WAIT_S) -> list[Path]:
    """Rename each written (and synced) ``(source, target)`` in order under the publication lock,
    so two publishers never interleave (one model's checkpoint beside another's curves);
    returns the targets."""
    with publication_lock(root, run_id, what, wait):
        return [replace_synced(source, target) for source, target in moves]
