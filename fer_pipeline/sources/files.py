"""Reading files safely: what a path is (regular file, FIFO, device, dangling or looping link),
the reason a member cannot be read in words a user understands, and reads that never block on a
FIFO nor go past the size cap. Every reader of untrusted paths (sources, demographics sheets,
``predict``) uses these, so the rules are the same everywhere."""

from __future__ import annotations

import errno
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fer_pipeline.limits import READ_CHUNK
from fer_pipeline.sources.names import printable

# inventory statuses a reader assigns (the inventory adds candidate/junk/not_image/unmapped)
NO_LABEL = "no_label"  # no (valid) label: outside a class folder, or a FER2013 emotion code outside 0..6
UNREADABLE = "unreadable"  # the file, entry or row cannot be read: the reason says why
TOO_LARGE = "too_large"  # declared or actual size above max_file_bytes
SOURCE_ERROR = "source_error"  # the whole source cannot be listed (one row for the source)


@dataclass(frozen=True)
class Problem:
    """Why a member is not an image candidate: its inventory status and a precise reason."""

    status: str
    reason: str


class MemberError(Exception):
    """Reading one member failed; ``problem`` says how (the run goes on without it)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


class SourceError(Exception):
    """A whole source cannot be opened or listed (the message says why)."""


def describe_error(exc: BaseException) -> str:
    """A short, precise reason for an exception raised while reading a file or an entry."""
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found (removed since it was listed?)"
    if isinstance(exc, zipfile.BadZipFile):
        return "corrupt entry (CRC)" if "CRC" in str(exc) else f"unreadable archive member ({printable(str(exc))})"
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc):
        return "encrypted entry"
    if isinstance(exc, EOFError):
        return "unreadable archive member (data ends before its declared size)"
    if isinstance(exc, OSError):
        return f"I/O error ({exc.strerror or type(exc).__name__})"
    return f"unreadable archive member ({type(exc).__name__}: {printable(str(exc))})"


def too_large(size: int, cap: int) -> Problem:
    return Problem(TOO_LARGE, f"file larger than cap: {size} bytes > {cap}")


def file_kind(mode: int) -> str:
    """What a stat mode that is not a regular file is, in words."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def not_regular(mode: int) -> Problem:
    return Problem(UNREADABLE, f"not a regular file ({file_kind(mode)})")


def require_regular_file(path: Path) -> None:
    """Raise :class:`SourceError` unless ``path`` is a regular file (a FIFO would block ``open``)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceError(f"cannot open {printable(str(path))}: {describe_error(exc)}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"cannot open {printable(str(path))}: not a regular file ({file_kind(st.st_mode)})")


def link_target(path: str | Path) -> str | None:
    """Where a symbolic link points (printable), or None when ``path`` is not a link."""
    try:
        return printable(os.readlink(path))
    except (OSError, ValueError):
        return None


def link_problem(exc: OSError, target: str) -> Problem:
    """Why a symbolic link to ``target`` cannot be followed (``os.stat`` raised ``exc``)."""
    if isinstance(exc, FileNotFoundError):
        return Problem(UNREADABLE, f"dangling link (to '{target}')")
    return Problem(UNREADABLE, f"{describe_error(exc)} (link to '{target}')")


def stat_path(path: str | Path) -> os.stat_result | Problem:
    """``os.stat(path)`` (links followed), or why ``path`` cannot be used, in the words a folder
    member gets (``dangling link (to '…')``, ``symlink loop (link to '…')``, ``permission
    denied``); a missing path that is not a link is ``no such file or folder``."""
    try:
        return os.stat(path)
    except ValueError:  # an embedded NUL byte (Python callers only: argv cannot hold one)
        return Problem(UNREADABLE, "invalid path (contains a NUL byte)")
    except OSError as exc:
        target = link_target(path)
        if target is not None:
            return link_problem(exc, target)
        return Problem(UNREADABLE, "no such file or folder" if isinstance(exc, FileNotFoundError)
                       else describe_error(exc))


def open_regular(path: str | bytes | Path, max_bytes: int) -> tuple[int, int]:
    """(fd, size) of ``path`` if it is a regular file of at most ``max_bytes``; else raises
    :class:`MemberError`. Opened non-blocking and checked with ``fstat`` on the open descriptor,
    so a FIFO (even one swapped in after listing) is refused instead of blocking forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise MemberError(Problem(UNREADABLE, describe_error(exc))) from exc
    st = os.fstat(fd)
    problem = not_regular(st.st_mode) if not stat.S_ISREG(st.st_mode) else \
        too_large(st.st_size, max_bytes) if st.st_size > max_bytes else None
    if problem is not None:
        os.close(fd)
        raise MemberError(problem)
    return fd, st.st_size


def read_regular(path: str | bytes | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file, never more than ``max_bytes`` (a file that grew since it was
    checked is refused at the cap); raises :class:`MemberError` with the reason otherwise."""
    fd, size = open_regular(path, max_bytes)
    try:
        parts, total, want = [], 0, size + 1  # one read for the file, one to see its end
        while chunk := os.read(fd, want):
            parts.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew since stat: stop at the cap
                raise MemberError(too_large(total, max_bytes))
            want = min(READ_CHUNK, max_bytes + 1 - total)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    except OSError as exc:
        raise MemberError(Problem(UNREADABLE, describe_error(exc))) from exc
    finally:
        os.close(fd)
