"""Uniform access to the files of a catalogued source: a folder, a .zip archive, or a FER2013 CSV.

Readers list *members* (a POSIX path inside the source plus a cheap fingerprint) and read their
bytes on demand, so the inventory can skip re-reading members whose fingerprint is unchanged and
nothing ever loads a whole dataset into memory.

Unattended on hostile data: nothing a source contains raises out of a reader. A member that
cannot be read carries a :class:`Problem` (the inventory status and a reason that says what is
wrong) when listing finds it, or :meth:`SourceReader.read` raises :class:`MemberError` with one;
a source that cannot be listed at all raises :class:`SourceError` from ``members()``.

* **Size cap** (``max_file_bytes``, 64 MiB by default): a file or archive entry whose declared
  size (``os.stat``, the zip header) is above the cap is listed with status ``too_large`` and
  never read; reads are bounded as well (a file that grows, an entry whose header lies), so
  memory stays bounded whatever the sources hold. Zip entries are never decompressed past
  their declared size (Python's ``zipfile`` stops there and reports the CRC mismatch).
* **Links** (folder sources): symbolic links to files and to folders are followed, wherever
  they point. Each real folder is listed once per source: folders reached without a link come
  first, then linked folders in path order. A link whose target contains the link itself is
  one row ``symlink loop``; a link to a folder already listed is one row ``symlink to a folder
  already listed as '<path>'`` (its files are listed under that path); a link whose target does
  not exist is one row ``dangling link``; a cycle of file links is one row per link, ``symlink
  loop``. A FIFO, socket or device is one row ``not a regular file (...)`` and is never opened;
  a folder that cannot be listed is one row ``cannot list folder: ...``. No folder is listed
  twice and no file is dropped; a file reachable under two names (a file link) is two rows, and
  de-duplication keeps one. A name that is not valid UTF-8 is shown with ``\\xNN`` escapes and
  still read: member paths are :func:`~fer_pipeline.sources.names.fs_name`, one to one, and a
  file is re-opened by its inverse, never by guessing which of two files is meant.
* **Archives**: encrypted entries, entries with a bad CRC or a corrupt header, entries compressed
  with bzip2/lzma (``zipfile`` inflates those without an output limit, so only stored and
  deflated entries are read), entries with an unsafe path (absolute or ``..``) and all but the
  last of several entries with the same name (after ``\\`` -> ``/``; their paths get a
  ``[duplicate entry k of n]`` suffix that never takes a real entry's name), an entry whose name
  is flagged UTF-8 but is not, and a directory entry that carries data are rows with their
  reason; empty directory entries are not files; archives inside archives are not opened (not
  an image file).
  An archive that cannot be opened (not a zip, truncated) is one ``source_error`` row.
* **FER2013 CSV**: read as UTF-8 (a byte-order mark is skipped, undecodable bytes become U+FFFD),
  header names matched case-insensitively; every data row is one member, and a bad row (wrong
  pixel count, non-integer or out-of-range pixel, emotion outside 0..6, an oversized field or
  line) is a row with its reason, never a failed source. Blank lines are skipped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import stat
import threading
import warnings
import zipfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fer_pipeline.limits import MAX_FILE_BYTES, READ_CHUNK
from fer_pipeline.sources.catalog import FER2013_EMOTIONS, SourceSpec
from fer_pipeline.sources.files import (
    NO_LABEL,
    SOURCE_ERROR,
    TOO_LARGE,
    UNREADABLE,
    MemberError,
    Problem,
    SourceError,
    describe_error,
    link_problem,
    link_target,
    not_regular,
    open_regular,
    read_regular,
    require_regular_file,
    too_large,
)
from fer_pipeline.sources.names import (
    fs_name,
    printable,
    unescape_name,
)

DEFAULT_MAX_FILE_BYTES = MAX_FILE_BYTES  # the name readers' callers know

MAX_CSV_LINE = 1 << 20  # characters; a longer CSV line is one bad row, never a line held in memory
FER_PIXELS = 48 * 48

@dataclass(frozen=True)
class Member:
    """One file of a source. ``fingerprint`` changes whenever the content may have changed."""

    path: str  # POSIX path inside the source
    size: int
    fingerprint: str
    label: str | None = None  # set by readers that know the label (FER2013 CSV)
    split_hint: str | None = None
    problem: Problem | None = None  # set when listing already knows the member cannot be read


class SourceReader:
    """Base class: list members and read their bytes (never more than ``max_file_bytes``)."""

    empty_reason = "empty source: no files"

    def __init__(self, spec: SourceSpec, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.spec = spec
        self.max_file_bytes = max_file_bytes
        self.links = 0  # symbolic links met while listing (their targets can change unseen)

    def members(self) -> Iterator[Member]:
        raise NotImplementedError

    def read(self, member: Member) -> bytes:
        """The member's bytes; raises :class:`MemberError` (with the reason) when it cannot be read."""
        raise NotImplementedError

    def sha256(self, member: Member) -> str:
        """SHA-256 of the member's bytes (readers stream it in chunks where they can)."""
        return hashlib.sha256(self.read(member)).hexdigest()

    def head(self, member: Member, n: int) -> bytes:
        """The member's first ``n`` bytes (its format is judged from them), read without reading it
        whole where the reader can; raises :class:`MemberError` like :meth:`read`."""
        return self.read(member)[:n]

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BrokenSource(SourceReader):
    """A source that cannot be opened: listing raises, reading any member says why."""

    def __init__(self, spec: SourceSpec, reason: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        super().__init__(spec, max_file_bytes)
        self.reason = reason

    def members(self) -> Iterator[Member]:
        raise SourceError(self.reason)

    def read(self, member: Member) -> bytes:
        raise MemberError(Problem(SOURCE_ERROR, self.reason))


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------


def _scan(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


_FOLDER_LOOP = "symlink loop: "  # a link to a folder that contains the link
_UNLISTABLE = "cannot list folder: "


def is_folder_fault(problem: Problem | None) -> bool:
    """Whether a :class:`FolderReader` row stands for a folder whose files cannot be listed: a
    link looping back onto an enclosing folder or a folder that cannot be listed. (A link to a
    folder already listed is not one: its files are listed, under the folder's first path.)"""
    return problem is not None and problem.reason.startswith((_FOLDER_LOOP, _UNLISTABLE))


def _contains(folder: str, path: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class FolderReader(SourceReader):
    """A directory tree; fingerprint = size, mtime, ctime and inode. Links: see the module docs."""

    empty_reason = "empty source: the folder has no files"

    def members(self) -> Iterator[Member]:
        root = str(self.spec.path)
        try:
            top, items = os.stat(root), _scan(root)
        except OSError as exc:
            raise SourceError(f"cannot list folder {printable(root)}: {describe_error(exc)}") from exc
        seen = {(top.st_dev, top.st_ino): "."}  # real folders listed so far -> their path in the source
        linked: deque[tuple[str, str]] = deque()  # (path in the source, fs path) of links to folders
        yield from self._walk("", items, seen, linked)
        while linked:
            yield from self._follow(*linked.popleft(), seen, linked)

    def _walk(self, prefix: str, items: list[os.DirEntry[str]], seen: dict[tuple[int, int], str],
              linked: deque[tuple[str, str]]) -> Iterator[Member]:
        """Members under one folder, depth first; links to folders are queued in ``linked``."""
        stack = [(prefix, items)]
        while stack:
            prefix, items = stack.pop()
            folders: list[tuple[str, list[os.DirEntry[str]]]] = []
            for item in items:
                rel = prefix + fs_name(item.name)
                try:
                    is_link, is_dir = item.is_symlink(), item.is_dir(follow_symlinks=False)
                    st = None if is_link or is_dir else item.stat(follow_symlinks=False)
                except OSError as exc:
                    yield Member(rel, 0, "error", problem=Problem(UNREADABLE, describe_error(exc)))
                    continue
                if is_link:
                    self.links += 1
                    found = self._link(rel, item.path, linked)
                    if found is not None:
                        yield found
                elif is_dir:
                    listed = self._list_folder(rel, item.path, seen, via_link=False)
                    if isinstance(listed, Member):
                        yield listed
                    else:
                        folders.append((rel + "/", listed))
                else:
                    assert st is not None
                    yield self._file(rel, st)
            stack.extend(reversed(folders))

    def _file(self, rel: str, st: os.stat_result) -> Member:
        # size, mtime, ctime and inode: a file replaced by one of the same size with its mtime set
        # back (cp -p, rsync -t) still gets a new ctime or inode, so its hash is computed again
        fingerprint = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
        if not stat.S_ISREG(st.st_mode):
            return Member(rel, 0, fingerprint, problem=not_regular(st.st_mode))
        if st.st_size > self.max_file_bytes:
            return Member(rel, st.st_size, fingerprint, problem=too_large(st.st_size, self.max_file_bytes))
        return Member(rel, st.st_size, fingerprint)

    def _link(self, rel: str, path: str, linked: deque[tuple[str, str]]) -> Member | None:
        """A symbolic link: the file it points to, a dangling/loop row, or None (a folder, queued)."""
        target = link_target(path) or "?"
        try:
            st = os.stat(path)
        except OSError as exc:
            return Member(rel, 0, f"link:{target}", problem=link_problem(exc, target))
        if stat.S_ISDIR(st.st_mode):
            linked.append((rel, path))
            return None
        return self._file(rel, st)

    def _list_folder(self, rel: str, path: str, seen: dict[tuple[int, int], str],
                     via_link: bool = True) -> list[os.DirEntry[str]] | Member:
        """A folder's entries, or the row saying why it is not listed (again)."""
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                what = "symlink to a folder" if via_link else "folder (a bind mount?)"
                return Member(rel, 0, "folder", problem=Problem(UNREADABLE, f"{what} already listed as '{seen[key]}'"))
            seen[key] = rel
            return _scan(path)
        except OSError as exc:
            return Member(rel, 0, "folder", problem=Problem(UNREADABLE, f"{_UNLISTABLE}{describe_error(exc)}"))

    def _follow(self, rel: str, path: str, seen: dict[tuple[int, int], str],
                linked: deque[tuple[str, str]]) -> Iterator[Member]:
        """The members under a link to a folder, unless it loops back onto itself."""
        target, here = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
        if _contains(target, here):
            yield Member(rel, 0, "loop", problem=Problem(
                UNREADABLE, f"{_FOLDER_LOOP}'{link_target(path) or '?'}' is a folder that contains the link"))
            return
        listed = self._list_folder(rel, path, seen)
        if isinstance(listed, Member):
            yield listed
        else:
            yield from self._walk(rel + "/", listed, seen, linked)

    def _fs_path(self, rel: str) -> str:
        # the one inverse of fs_name: never a guess by which file exists
        return os.path.join(self.spec.path, unescape_name(rel))

    def fs_path(self, rel: str) -> Path:
        """The file-system path of a member path (escapes of :func:`~fer_pipeline.sources.names.fs_name` undone)."""
        return Path(self._fs_path(rel))

    def read(self, member: Member) -> bytes:
        return read_regular(self._fs_path(member.path), self.max_file_bytes)

    def head(self, member: Member, n: int) -> bytes:
        fd, _ = open_regular(self._fs_path(member.path), self.max_file_bytes)
        try:
            return os.read(fd, n)
        except OSError as exc:
            raise MemberError(Problem(UNREADABLE, describe_error(exc))) from exc
        finally:
            os.close(fd)

    def sha256(self, member: Member) -> str:
        fd, _ = open_regular(self._fs_path(member.path), self.max_file_bytes)
        h, total = hashlib.sha256(), 0
        try:
            while chunk := os.read(fd, READ_CHUNK):
                total += len(chunk)
                if total > self.max_file_bytes:
                    raise MemberError(too_large(total, self.max_file_bytes))
                h.update(chunk)
        except OSError as exc:
            raise MemberError(Problem(UNREADABLE, describe_error(exc))) from exc
        finally:
            os.close(fd)
        return h.hexdigest()


# --------------------------------------------------------------------------------------------
# zip archives
# --------------------------------------------------------------------------------------------


_DRIVE = re.compile(r"[A-Za-z]:")


def _unsafe_entry_path(name: str) -> bool:
    """An absolute or ``..`` path: extracting it would write outside the folder (zip slip)."""
    if name.startswith("/") or (name[1:2] == ":" and _DRIVE.match(name) is not None):
        return True
    return ".." in name and ".." in name.split("/")


# zipfile inflates deflate in bounded steps; its bzip2/lzma decompressors take no output limit, so
# a few KB of input can expand to gigabytes before the declared size is checked
_BOUNDED_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma", 9: "deflate64", 99: "AES"}


class _PatchedFile:
    """A read-only file whose bytes at a few offsets read as ``patches`` says: the archive as
    ``zipfile`` should see it (see :func:`_open_zip`), the file itself untouched."""

    def __init__(self, fh: io.BufferedReader, patches: dict[int, bytes]) -> None:
        self._fh, self._patches = fh, sorted(patches.items())
        self.name = fh.name

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._fh.seek(pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def read(self, n: int = -1) -> bytes:
        start = self._fh.tell()
        data = self._fh.read(n)
        end = start + len(data)
        if not any(at < end and at + len(new) > start for at, new in self._patches):
            return data
        out = bytearray(data)
        for at, new in self._patches:
            for i, byte in enumerate(new):
                if start <= at + i < end:
                    out[at + i - start] = byte
        return bytes(out)


def _utf8_flag_lies(fh: io.BufferedReader) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Central-directory records whose name is flagged UTF-8 (bit 0x800) but is not: (offset of
    the flags field -> the flags without that bit, record index -> raw name). Located as
    ``zipfile`` does (its end-record reader, prepended data allowed)."""
    endrec = zipfile._EndRecData(fh)  # type: ignore[attr-defined]
    if not endrec:
        return {}, {}
    size_cd, offset_cd = endrec[zipfile._ECD_SIZE], endrec[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd  # type: ignore[attr-defined]
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    start = offset_cd + concat
    fh.seek(start)
    cd = fh.read(size_cd)
    patches: dict[int, bytes] = {}
    names: dict[int, bytes] = {}
    pos = index = 0
    while pos + 46 <= len(cd) and cd[pos:pos + 4] == b"PK\x01\x02":
        flags = int.from_bytes(cd[pos + 8:pos + 10], "little")
        n, m, k = (int.from_bytes(cd[pos + at:pos + at + 2], "little") for at in (28, 30, 32))
        raw = cd[pos + 46:pos + 46 + n]
        if flags & 0x800:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                patches[start + pos + 8] = (flags & ~0x800).to_bytes(2, "little")
                names[index] = raw
        pos, index = pos + 46 + n + m + k, index + 1
    return patches, names


def _open_zip(path: Path) -> tuple[zipfile.ZipFile, io.BufferedReader | None, dict[int, bytes]]:
    """(archive, file to close with it, entry index -> raw name of each entry flagged UTF-8 whose
    name is not). ``zipfile`` refuses a whole archive for one such name; it is opened again
    with those entries' flag cleared (their names read as cp437, never used), so each is one
    row instead of a failed source."""
    try:
        return zipfile.ZipFile(path), None, {}
    except UnicodeDecodeError:
        fh = open(path, "rb")  # noqa: SIM115 - handed to the reader, closed with it
        try:
            patches, names = _utf8_flag_lies(fh)
            if not patches:
                raise
            return zipfile.ZipFile(_PatchedFile(fh, patches)), fh, names  # type: ignore[arg-type]
        except BaseException:
            fh.close()
            raise


class ZipReader(SourceReader):
    """A .zip archive; fingerprint = CRC-32 + size from the central directory (no decompression)."""

    empty_reason = "empty source: the archive has no files"

    def __init__(self, spec: SourceSpec, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        super().__init__(spec, max_file_bytes)
        require_regular_file(spec.path)
        try:
            self._zip, self._fh, bad_names = _open_zip(spec.path)
            infos = self._zip.infolist()
        except Exception as exc:  # BadZipFile, a truncated or lying directory, undecodable names...
            raise SourceError(f"{printable(spec.path.name)} is not a readable zip archive "
                              f"({type(exc).__name__}: {printable(str(exc))})") from exc
        self._lock = threading.Lock()
        # path -> (entry, problem known from the listing); problems of the entry itself are checked
        # when it is listed or read (cheap, but not worth doing for 40k entries a read never asks for)
        self._entries: dict[str, tuple[zipfile.ZipInfo, Problem | None]] = {}
        self._generated: dict[str, str] = {}  # a path made for an earlier duplicate -> its entry name
        earlier: dict[str, list[tuple[zipfile.ZipInfo, Problem | None]]] = {}
        for k, info in enumerate(infos):
            raw = bad_names.get(k)
            if raw is not None:  # flagged UTF-8 but not: zipfile could not have named it at all
                name = fs_name(raw.decode("utf-8", "surrogateescape").replace("\\", "/"))
                problem: Problem | None = Problem(UNREADABLE, "entry name is flagged UTF-8 but is not valid UTF-8 "
                                                              "(shown with \\xNN escapes): not read")
            else:
                name = fs_name(info.filename.replace("\\", "/"))  # no backslash left: unchanged
                problem = None
            if info.filename.endswith("/"):  # a directory entry: not a file, unless it carries data
                if not info.file_size:
                    continue
                problem = problem or Problem(UNREADABLE, f"directory entry that carries data ({info.file_size} "
                                                         "bytes): not a file, not read")
            if name in self._entries:
                earlier.setdefault(name, []).append(self._entries[name])
            self._entries[name] = (info, problem)
        for name, before in sorted(earlier.items()):  # the last entry of a name is what unzip would leave
            n = len(before) + 1
            dup = Problem(UNREADABLE, f"duplicate entry name in archive: only the last entry named '{name}' is read")
            for k, (info, problem) in enumerate(before, 1):
                path = f"{name} [duplicate entry {k} of {n}]"
                again = 1
                while path in self._entries:  # a real entry may bear that name: it keeps it
                    again += 1
                    path = f"{name} [duplicate entry {k} of {n}, #{again}]"
                self._entries[path] = (info, problem or dup)
                self._generated[path] = name

    def _entry_problem(self, name: str, info: zipfile.ZipInfo) -> Problem | None:
        cap = self.max_file_bytes
        if info.flag_bits & 0x1:
            return Problem(UNREADABLE, "encrypted entry")
        if info.compress_type not in _BOUNDED_METHODS:  # bzip2/lzma: zipfile inflates whole input blocks
            method = _METHOD_NAMES.get(info.compress_type, str(info.compress_type))
            return Problem(UNREADABLE, f"unreadable archive member (compression method {method} is not read: "
                                       "only stored and deflated entries)")
        if _unsafe_entry_path(name):
            return Problem(UNREADABLE, "unsafe path in archive (absolute or '..'): not read")
        if info.file_size > cap:
            if info.compress_size <= cap:
                return Problem(TOO_LARGE, f"decompression bomb: entry declares {info.file_size} bytes > cap {cap}")
            return Problem(TOO_LARGE, f"file larger than cap: entry declares {info.file_size} bytes > cap {cap}")
        return None

    def members(self) -> Iterator[Member]:
        for name in sorted(self._entries):
            info, problem = self._entries[name]
            yield Member(name, info.file_size, f"{info.CRC:08x}:{info.file_size}",
                         problem=problem or self._entry_problem(name, info))

    def _entry(self, member: Member) -> zipfile.ZipInfo:
        found = self._entries.get(member.path)
        if found is None:
            raise MemberError(Problem(UNREADABLE, "entry not in the archive (removed since it was listed?)"))
        problem = found[1] or self._entry_problem(member.path, found[0])
        if problem is not None:
            raise MemberError(problem)
        return found[0]

    def read(self, member: Member) -> bytes:
        info = self._entry(member)
        with self._lock:
            try:
                with self._zip.open(info) as f:  # zipfile stops at the declared size, then checks the CRC
                    return f.read(info.file_size + 1)
            except Exception as exc:  # one unreadable entry is that entry's outcome, whatever it raises
                raise MemberError(Problem(UNREADABLE, describe_error(exc))) from exc

    def head(self, member: Member, n: int) -> bytes:
        info = self._entry(member)
        with self._lock:
            try:
                with self._zip.open(info) as f:  # inflates about n bytes, not the entry
                    return f.read(min(n, info.file_size))
            except Exception as exc:  # one unreadable entry is that entry's outcome, whatever it raises
                raise MemberError(Problem(UNREADABLE, describe_error(exc))) from exc

    def sha256(self, member: Member) -> str:
        info = self._entry(member)
        h = hashlib.sha256()
        with self._lock:
            try:
                with self._zip.open(info) as f:  # never inflate more than the header declares
                    want = min(READ_CHUNK, info.file_size + 1)
                    while True:
                        chunk = f.read(want)
                        h.update(chunk)
                        if len(chunk) < want:  # the end (one read for an entry under READ_CHUNK)
                            break
            except Exception as exc:
                raise MemberError(Problem(UNREADABLE, describe_error(exc))) from exc
        return h.hexdigest()

    def names(self) -> list[str]:
        return [name for name, (_, problem) in self._entries.items() if problem is None]  # readable ones

    def entry_name(self, path: str) -> str:
        """The entry name (``\\`` -> ``/``) a member path stands for: a duplicate's path carries a
        ``[duplicate entry k of n]`` suffix, its entry name does not."""
        return self._generated.get(path, path)

    def close(self) -> None:
        self._zip.close()
        if self._fh is not None:
            self._fh.close()


# --------------------------------------------------------------------------------------------
# FER2013 CSV
# --------------------------------------------------------------------------------------------


class _BoundedLines:
    """Lines of a text file, none longer than ``limit`` characters: a longer line is cut (the
    rest skipped without being held) and flagged in ``overlong`` for the row being parsed."""

    def __init__(self, fh: io.TextIOBase, limit: int) -> None:
        self._fh, self._limit = fh, limit
        self.overlong = False

    def __iter__(self) -> "_BoundedLines":
        return self

    def __next__(self) -> str:
        line = self._fh.readline(self._limit)
        if not line:
            raise StopIteration
        if len(line) == self._limit and not line.endswith("\n"):
            self.overlong = True
            while (rest := self._fh.readline(self._limit)) and not rest.endswith("\n"):
                pass
            line += "\n"
        return line


def _fer_emotion(text: str) -> tuple[str | None, str | None]:
    """(FER2013 emotion name, problem) of an ``emotion`` field."""
    try:
        code = int(text.strip())
    except ValueError:
        return None, f"emotion {printable(text.strip())!r} is not a FER2013 code"
    if not 0 <= code < len(FER2013_EMOTIONS):
        return None, f"emotion {code} is not a FER2013 code"
    return FER2013_EMOTIONS[code], None


def _fer_pixels(text: str) -> tuple[np.ndarray | None, str | None]:
    """(48×48 uint8 pixels, problem) of a ``pixels`` field."""
    values = text.split()
    if len(values) != FER_PIXELS:
        return None, f"pixels has {len(values)} values, expected {FER_PIXELS}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            arr = np.fromstring(text, dtype=np.int64, sep=" ")  # 8x faster than int() per value
        if len(arr) != FER_PIXELS:
            raise ValueError
    except (ValueError, DeprecationWarning):
        bad = next((v for v in values if not re.fullmatch(r"[+-]?\d+", v)), None)
        if bad is not None:
            return None, f"non-integer pixel value {printable(bad)!r}"
        arr = np.array([int(v) for v in values], dtype=object)
    out = np.flatnonzero((arr < 0) | (arr > 255))
    if len(out):
        return None, f"pixel value {values[out[0]]} out of range 0..255"
    return arr.astype(np.uint8).reshape(48, 48), None


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Fer2013CsvReader(SourceReader):
    """Kaggle FER2013 CSV (``emotion,pixels,Usage``): each row becomes a 48×48 PNG member.

    Rows are encoded as PNG in memory so they flow through the same decode/validate path as
    image files; a malformed row is a member with a problem that says what is wrong with it.
    """

    empty_reason = "empty source: the CSV has no data rows"

    def __init__(self, spec: SourceSpec, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        super().__init__(spec, max_file_bytes)
        require_regular_file(spec.path)
        self._rows: dict[str, bytes] = {}
        self._listed = False

    def members(self) -> Iterator[Member]:
        try:
            fh = open(self.spec.path, newline="", encoding="utf-8-sig", errors="replace")
        except OSError as exc:
            raise SourceError(f"cannot open {printable(self.spec.path.name)}: {describe_error(exc)}") from exc
        with fh:
            lines = _BoundedLines(fh, MAX_CSV_LINE)
            reader = csv.reader(lines)
            columns = self._columns(reader)
            i = 0
            while True:
                lines.overlong = False
                try:
                    row = next(reader)
                except StopIteration:
                    self._listed = True
                    return
                except csv.Error as exc:
                    yield self._bad_row(i, reader.line_num, exc)
                    i += 1
                    continue
                except OSError as exc:
                    raise SourceError(f"reading {printable(self.spec.path.name)} stopped at line "
                                      f"{reader.line_num}: {describe_error(exc)}") from exc
                if not any(field.strip() for field in row):
                    continue  # a blank line
                yield self._row(i, row, columns, lines.overlong)
                i += 1

    def _columns(self, reader: "csv._reader") -> dict[str, int]:
        try:
            header = next(reader, None) or []
        except (csv.Error, OSError) as exc:
            raise SourceError(f"{printable(self.spec.path.name)}: unreadable header ({exc})") from exc
        columns = {name.strip().lower(): i for i, name in reversed(list(enumerate(header)))}
        missing = [c for c in ("emotion", "pixels") if c not in columns]
        if missing:
            raise SourceError(f"{printable(self.spec.path.name)} lacks column(s) {missing} "
                              f"(header: {printable(','.join(header))[:200]!r})")
        return columns

    def _bad_row(self, i: int, line: int, exc: csv.Error) -> Member:
        reason = f"CSV field too large (line {line})" if "field larger" in str(exc) else \
            f"malformed CSV row (line {line}: {exc})"
        return Member(f"rows/{i:06d}.png", 0, f"csv-error:{line}", problem=Problem(UNREADABLE, reason))

    def _row(self, i: int, row: list[str], columns: dict[str, int], overlong: bool) -> Member:
        def field(name: str) -> str:
            idx = columns.get(name)
            return row[idx] if idx is not None and idx < len(row) else ""

        usage = printable(field("usage").strip().replace("/", "_")) or None
        path = f"{usage or 'rows'}/{i:06d}.png"
        if overlong:
            problem = Problem(UNREADABLE, f"CSV line longer than {MAX_CSV_LINE} characters")
            return Member(path, 0, f"overlong:{i}", split_hint=usage, problem=problem)
        label, emotion_problem = _fer_emotion(field("emotion"))
        pixels, pixel_problem = _fer_pixels(field("pixels"))
        if emotion_problem or pixel_problem:
            reason = "; ".join(p for p in (emotion_problem, pixel_problem) if p)
            problem = Problem(UNREADABLE if pixel_problem else NO_LABEL, reason)
            fingerprint = hashlib.sha1("\0".join(row).encode("utf-8", "replace")).hexdigest()
            return Member(path, 0, fingerprint, label=label, split_hint=usage, problem=problem)
        data = _png(pixels)  # type: ignore[arg-type]
        self._rows[path] = data
        return Member(path, len(data), hashlib.sha1(data).hexdigest(), label=label, split_hint=usage)

    def read(self, member: Member) -> bytes:
        if not self._listed:  # rows are encoded while listing; list once when read first
            try:
                for _ in self.members():
                    pass
            except SourceError as exc:
                raise MemberError(Problem(SOURCE_ERROR, str(exc))) from exc
        data = self._rows.get(member.path)
        if data is None:
            raise MemberError(Problem(UNREADABLE, "row not in the CSV (changed since it was listed?)"))
        return data


# --------------------------------------------------------------------------------------------
# opening sources
# --------------------------------------------------------------------------------------------


def source_row_path(spec: SourceSpec) -> str:
    """``source_path`` of the one row that stands for a whole source that cannot be listed."""
    return printable(spec.path.name) or printable(str(spec.path))


def open_reader(spec: SourceSpec, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> SourceReader:
    """The reader for a source spec (synthetic sources are read as the folder they generate).

    Never raises for a source that cannot be opened: that is a :class:`BrokenSource`."""
    try:
        if spec.kind == "fer2013_csv":
            return Fer2013CsvReader(spec, max_file_bytes)
        if not os.path.lexists(spec.path):
            raise SourceError(f"source path does not exist: {printable(str(spec.path))}")
        if spec.path.is_dir():
            return FolderReader(spec, max_file_bytes)
        if spec.path.suffix.lower() == ".zip":
            return ZipReader(spec, max_file_bytes)
        raise SourceError(f"path {printable(str(spec.path))} is neither a folder nor a .zip archive")
    except SourceError as exc:
        return BrokenSource(spec, str(exc), max_file_bytes)


class SourceBytes:
    """Read any (source, source_path) of a catalogue, keeping one open reader per source.

    Raises :class:`MemberError` for a file that cannot be read (including one whose source is no
    longer catalogued)."""

    def __init__(self, specs: dict[str, SourceSpec], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self._specs = specs
        self._max_file_bytes = max_file_bytes
        self._readers: dict[str, SourceReader] = {}

    def __call__(self, source: str, path: str) -> bytes:
        reader = self._readers.get(source)
        if reader is None:
            spec = self._specs.get(source)
            if spec is None:
                raise MemberError(Problem(SOURCE_ERROR, f"source '{source}' is no longer in sources.yaml"))
            reader = self._readers[source] = open_reader(spec, self._max_file_bytes)
        return reader.read(Member(path, 0, ""))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> "SourceBytes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
