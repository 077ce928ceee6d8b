"""Application mode: classify image files, folders (recursively) and .zip archives.

Every input is decoded with the pipeline's own :func:`fer_pipeline.dataset.preprocess.decode_face`,
so a face is prepared for prediction exactly as training faces were.

Unattended on hostile data: one bad input yields one :class:`Prediction` whose ``error`` says
what is wrong, and never stops the others. Inputs are checked before they are read:

* a missing path, a dangling symbolic link or a symbolic link loop is reported as such;
* a FIFO, socket or device is "not a regular file" and is never opened for reading (opening a
  FIFO would block forever); files are opened non-blocking and checked again after opening;
* a folder is walked without following a symbolic link back into an enclosing folder (reported
  as a loop); a folder that cannot be listed is one error, its siblings are still classified;
* nothing is read whole blindly: a file or zip entry larger than ``max_bytes``
  (:data:`MAX_INPUT_BYTES`, 64 MiB) is reported and not read, and zip entries are decompressed
  in small chunks, so a decompression bomb cannot exhaust memory;
* zip entries that are encrypted, fail their CRC or cannot be decompressed are one error each;
  two entries with the same name are two inputs (``(entry 1 of 2)``, ``(entry 2 of 2)``).
"""

from __future__ import annotations

import errno
import os
import stat
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from fer_pipeline.dataset.source_readers import is_image_name, junk_reason
from fer_pipeline.ml.checkpoint import LoadedModel, check_model, load_checkpoint

if TYPE_CHECKING:
    from fer_pipeline.dataset.preprocess import PreprocessSettings

ZIP_SEPARATOR = "::"  # "photos.zip::folder/face.jpg" names a zip member
MAX_INPUT_BYTES = 64 * 1024 * 1024  # no face image is this large; anything above is not read
_CHUNK = 64 * 1024  # zip entries are decompressed this much compressed input at a time
_O_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class InputError(Exception):
    """A fault of one input; its message is the reason shown to the user, as is."""


@dataclass(frozen=True)
class Prediction:
    """One input's outcome: a class and probabilities, or an error message."""

    input: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def confidence(self) -> float | None:
        return max(self.probabilities.values()) if self.probabilities else None

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "label": self.label, "probabilities": self.probabilities, "error": self.error}


@dataclass(frozen=True)
class _Source:
    name: str
    read: Callable[[], bytes] | None  # None: the input failed before decoding (see error)
    error: str | None = None


def is_junk(name: str) -> bool:
    """Archive/OS debris, by the same rules the pipeline's inventory uses."""
    return junk_reason(name.replace("\\", "/")) is not None


def _is_image_name(name: str) -> bool:
    return is_image_name(name) and not is_junk(name)


# ---------------------------------------------------------------- reasons


def file_type(mode: int) -> str:
    """What a non-regular file is, for messages ("a FIFO/named pipe", "a socket", ...)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO/named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a special file"


def os_error_reason(exc: OSError, path: str | Path | None = None) -> str:
    """A short reason for a failed stat/open/list; a missing ``path`` that is a link says so."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return _missing_reason(path)
    if exc.errno == errno.ENAMETOOLONG:
        return "name too long"
    return exc.strerror or str(exc)


def _missing_reason(path: str | Path | None) -> str:
    try:
        target = os.readlink(path) if path is not None else None
    except (OSError, ValueError):
        target = None
    if target is None:
        return "no such file or folder"
    return f"dangling symbolic link (its target {target!r} does not exist)"


def _too_big(size: int, max_bytes: int, what: str = "file") -> str:
    return f"{what} is {size} bytes, above the {max_bytes}-byte cap (--max-bytes): not read"


def _stat(path: Path) -> os.stat_result | str:
    """The stat of ``path`` (links followed), or why it cannot be used."""
    try:
        return os.stat(path)
    except OSError as exc:
        return os_error_reason(exc, path)
    except ValueError:  # an embedded NUL byte (Python callers only: argv cannot hold one)
        return "invalid path (contains a NUL byte)"


# ---------------------------------------------------------------- reading


def _open_regular(path: Path, max_bytes: int | None = None) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file (at most ``max_bytes`` long).

    Non-blocking open plus ``fstat`` on the opened descriptor: a FIFO swapped in after the
    folder was listed is refused instead of blocking forever."""
    try:
        fd = os.open(path, _O_FLAGS)
    except OSError as exc:
        raise InputError(os_error_reason(exc, path)) from None
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"not a regular file ({file_type(st.st_mode)})")
        if max_bytes is not None and st.st_size > max_bytes:
            raise InputError(_too_big(st.st_size, max_bytes))
    except BaseException:
        f.close()
        raise
    return f


def _read_regular(path: Path, max_bytes: int) -> bytes:
    with _open_regular(path, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InputError(f"read failed: {os_error_reason(exc, path)}") from None
    if len(data) > max_bytes:  # grew after it was checked
        raise InputError(_too_big(len(data), max_bytes))
    return data


def _read_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """The entry's bytes, decompressed a chunk at a time and never beyond ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:  # zipfile stops at the declared size; this guards that promise
                    raise InputError(f"zip entry decompresses to more than the {max_bytes}-byte cap "
                                     "(--max-bytes; a possible decompression bomb): not read")
                chunks.append(chunk)
    except InputError:
        raise
    except zipfile.BadZipFile as exc:
        raise InputError(f"corrupt zip entry ({exc})") from None
    except NotImplementedError as exc:
        raise InputError(f"unsupported zip entry ({exc})") from None
    except RuntimeError as exc:  # zipfile: "... is encrypted, password required"
        raise InputError(f"unreadable zip entry ({exc})") from None
    except Exception as exc:  # noqa: BLE001 -- zlib/bz2/lzma/EOF errors of a damaged entry
        raise InputError(f"corrupt zip entry ({type(exc).__name__}: {exc})") from None
    return b"".join(chunks)


# ---------------------------------------------------------------- archives


def _zip_entry_error(info: zipfile.ZipInfo, max_bytes: int) -> str | None:
    """Why an entry is not even attempted (from the central directory alone)."""
    if info.flag_bits & 0x1:
        return "encrypted zip entry (password-protected): not read"
    if info.file_size > max_bytes:
        return (f"zip entry declares {info.file_size} bytes uncompressed, above the {max_bytes}-byte cap "
                "(--max-bytes; a possible decompression bomb): not read")
    return None


def _entry_names(path: Path, infos: list[zipfile.ZipInfo]) -> list[str]:
    """Display names; entries sharing a name are told apart by ``(entry k of n)``."""
    counts: dict[str, int] = {}
    for info in infos:
        counts[info.filename] = counts.get(info.filename, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for info in infos:
        name = f"{path}{ZIP_SEPARATOR}{info.filename}"
        if counts[info.filename] > 1:
            seen[info.filename] = seen.get(info.filename, 0) + 1
            name += f" (entry {seen[info.filename]} of {counts[info.filename]})"
        names.append(name)
    return names


def _zip_sources(path: Path, max_bytes: int) -> Iterator[_Source]:
    """Members that are images; the archive stays open while the consumer reads each one."""
    with ExitStack() as stack:
        try:
            f = stack.enter_context(_open_regular(path))
            zf = stack.enter_context(zipfile.ZipFile(f))
        except InputError as exc:
            yield _Source(str(path), None, str(exc))
            return
        except zipfile.BadZipFile as exc:
            yield _Source(str(path), None, f"unreadable zip archive (truncated or not a zip archive: {exc})")
            return
        except Exception as exc:  # noqa: BLE001 -- a hostile central directory can raise almost anything
            yield _Source(str(path), None, f"unreadable zip archive ({type(exc).__name__}: {exc})")
            return
        infos = sorted((i for i in zf.infolist() if not i.is_dir() and _is_image_name(i.filename)),
                       key=lambda i: i.filename)  # stable: same-name entries keep archive order
        if not infos:
            yield _Source(str(path), None, "no images found in zip archive")
        for info, name in zip(infos, _entry_names(path, infos)):
            error = _zip_entry_error(info, max_bytes)
            if error:
                yield _Source(name, None, error)
            else:
                yield _Source(name, lambda info=info: _read_zip_entry(zf, info, max_bytes))


# ---------------------------------------------------------------- folders


@dataclass(frozen=True)
class _Found:
    """An entry of a folder walk: an image, a zip, or a fault (``error``)."""

    parts: tuple[str, ...]  # relative to the folder given; sorts like Path does
    path: Path
    is_zip: bool = False
    error: str | None = None


def _wanted(parts: tuple[str, ...]) -> tuple[bool, bool]:
    """(is an image or zip worth attempting, is a zip) for a relative path."""
    rel = "/".join(parts)
    if is_junk(rel):
        return False, False
    is_zip = rel.lower().endswith(".zip")
    return is_zip or is_image_name(rel), is_zip


def _list(folder: Path) -> list[os.DirEntry[str]] | str:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        return f"cannot list folder: {os_error_reason(exc, folder)}"


_Key = tuple[int, int]  # (st_dev, st_ino): one folder, whatever name reaches it
_Folder = tuple[tuple[str, ...], Path, _Key, tuple[tuple[_Key, Path], ...]]  # parts, path, key, ancestors


def _walk(root: Path, root_st: os.stat_result) -> list[_Found]:
    """Every image, zip and fault under ``root``.

    Symbolic links to folders are followed, except one leading back into an enclosing folder
    (a loop: reported, not followed). A folder reached twice is listed once, under its real
    name when it has one: linked folders are walked after all real ones."""
    found: list[_Found] = []
    seen: set[_Key] = set()
    real: list[_Folder] = [((), root, (root_st.st_dev, root_st.st_ino), ())]
    linked: deque[_Folder] = deque()
    while real or linked:
        parts, folder, key, ancestors = real.pop() if real else linked.popleft()
        if key in seen:
            continue
        seen.add(key)
        ancestors = (*ancestors, (key, folder))
        entries = _list(folder)
        if isinstance(entries, str):
            found.append(_Found(parts, folder, error=entries))
            continue
        subfolders: list[_Folder] = []
        for entry in entries:
            rel, path = (*parts, entry.name), folder / entry.name
            st = _stat(path)
            if isinstance(st, str) or not stat.S_ISDIR(st.st_mode):
                found.extend(_file_found(rel, path, st))
                continue
            sub_key = (st.st_dev, st.st_ino)
            loop = next((p for k, p in ancestors if k == sub_key), None)
            if loop is not None:
                found.append(_Found(rel, path, error=f"symbolic link loop: leads back to the enclosing folder "
                                                     f"{str(loop)!r} (not followed)"))
            elif not is_junk("/".join(rel) + "/x"):  # nothing under __MACOSX/ is wanted
                (linked.append if _is_link(entry) else subfolders.append)((rel, path, sub_key, ancestors))
        real.extend(reversed(subfolders))  # depth-first in sorted order
    return found


def _is_link(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _file_found(rel: tuple[str, ...], path: Path, st: os.stat_result | str) -> list[_Found]:
    """A non-folder entry: an image or zip (or why it cannot be read); nothing for other names."""
    wanted, is_zip = _wanted(rel)
    if not wanted:
        return []
    if isinstance(st, str):
        return [_Found(rel, path, is_zip, st)]
    if not stat.S_ISREG(st.st_mode):
        return [_Found(rel, path, is_zip, f"not a regular file ({file_type(st.st_mode)})")]
    return [_Found(rel, path, is_zip)]


def _folder_sources(root: Path, root_st: os.stat_result, max_bytes: int) -> Iterator[_Source]:
    """Images (and faults) first, then zip archives, each sorted by path, like ``sorted(rglob)``."""
    found = _walk(root, root_st)
    if not found:
        yield _Source(str(root), None, "no images found in folder")
        return
    for f in sorted((f for f in found if not f.is_zip), key=lambda f: f.parts):
        yield _Source(str(f.path), None, f.error) if f.error else _file_source(f.path, max_bytes)
    for f in sorted((f for f in found if f.is_zip), key=lambda f: f.parts):
        if f.error:
            yield _Source(str(f.path), None, f.error)
        else:
            yield from _zip_sources(f.path, max_bytes)


def _file_source(path: Path, max_bytes: int) -> _Source:
    return _Source(str(path), lambda: _read_regular(path, max_bytes))


def iter_sources(paths: Sequence[str | Path], max_bytes: int = MAX_INPUT_BYTES) -> Iterator[_Source]:
    """Expand the given paths into individual images, in a stable order.

    A regular file named explicitly is always attempted (whatever its extension), except .zip
    files, which are expanded; folders contribute image files and zips (recursively, sorted,
    junk skipped). Anything else -- missing, a dangling link or loop, a FIFO/socket/device --
    is one source with an error.
    """
    for raw in paths:
        path = Path(raw)
        st = _stat(path)
        if isinstance(st, str):
            yield _Source(str(path), None, st)
        elif stat.S_ISDIR(st.st_mode):
            yield from _folder_sources(path, st, max_bytes)
        elif not stat.S_ISREG(st.st_mode):
            yield _Source(str(path), None, f"not a regular file ({file_type(st.st_mode)})")
        elif path.suffix.lower() == ".zip":
            yield from _zip_sources(path, max_bytes)
        else:
            yield _file_source(path, max_bytes)


# ---------------------------------------------------------------- prediction


def _read_and_decode(src: _Source, settings: PreprocessSettings) -> np.ndarray | str:
    """The decoded face, or the reason this input cannot be classified."""
    from fer_pipeline.dataset.preprocess import decode_face

    if src.read is None:
        return str(src.error)
    try:
        decoded = decode_face(src.read(), settings)
    except InputError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 -- one bad input must not stop the rest
        return f"{type(exc).__name__}: {exc}"
    return decoded.face if decoded.ok else str(decoded.reason)


def _prediction(name: str, probs: np.ndarray, classes: Sequence[str]) -> Prediction:
    if not np.all(np.isfinite(probs)):  # refused models cannot get here; keep outputs valid anyway
        return Prediction(name, error="the model produced non-finite probabilities (NaN or infinity)")
    return Prediction(name, label=classes[int(np.argmax(probs))],
                      probabilities={c: float(v) for c, v in zip(classes, probs)})


def predict_images(
    paths: Sequence[str | Path],
    checkpoint: str | Path | LoadedModel,
    batch_size: int = 256,
    max_bytes: int = MAX_INPUT_BYTES,
) -> list[Prediction]:
    """Classify every image in ``paths`` (files, folders, .zip archives) with a checkpoint.

    Returns one :class:`Prediction` per image found (in input order), plus one with an
    ``error`` for each unreadable file, missing path, bad archive or entry, or image-less
    folder. Raises ``ValueError`` for a broken model (non-finite weights, bad normalisation).
    """
    if isinstance(checkpoint, LoadedModel):
        check_model(checkpoint)
        loaded = checkpoint
    else:
        loaded = load_checkpoint(checkpoint)
    results: list[Prediction | None] = []
    pending: list[tuple[int, str, np.ndarray]] = []

    def flush() -> None:
        if pending:
            probs = loaded.predict_proba(np.stack([face for _, _, face in pending]))
            for (slot, name, _), p in zip(pending, probs):
                results[slot] = _prediction(name, p, loaded.classes)
            pending.clear()

    for src in iter_sources(paths, max_bytes):
        face = _read_and_decode(src, loaded.preprocess)  # exactly what the training faces went through
        results.append(Prediction(src.name, error=face) if isinstance(face, str) else None)
        if not isinstance(face, str):
            pending.append((len(results) - 1, src.name, face))
            if len(pending) >= batch_size:
                flush()
    flush()
    return [r for r in results if r is not None]
