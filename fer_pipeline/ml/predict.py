"""Application mode: classify image files, folders (recursively) and .zip archives.

Every input is decoded with the pipeline's own :func:`fer_pipeline.dataset.preprocess.decode_face`,
so a face is prepared for prediction exactly as training faces were.

Unattended on hostile data: one bad input yields one :class:`Prediction` whose ``error`` says
what is wrong, and never stops the others. Inputs are listed and read by the pipeline's own
readers (:mod:`fer_pipeline.dataset.source_readers`: a folder with ``FolderReader``, a .zip with
``ZipReader``, a single file with ``read_regular``), so predict follows the same rules, in the
same words, as the inventory: links followed with loop protection, FIFOs/sockets/devices never
opened, nothing read past ``max_bytes`` (:data:`MAX_INPUT_BYTES`, 64 MiB), encrypted, corrupt,
bzip2/lzma, unsafe-path and oversized zip entries refused. Of several zip entries with one name
the last is classified and each earlier one is an error row (``duplicate entry name in archive``).
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fer_pipeline.dataset.catalog import SourceSpec
from fer_pipeline.dataset.source_readers import (
    FolderReader,
    Member,
    MemberError,
    Problem,
    SourceError,
    SourceReader,
    ZipReader,
    file_kind,
    is_folder_fault,
    is_image_name,
    junk_reason,
    read_regular,
    stat_path,
)
from fer_pipeline.ml.checkpoint import LoadedModel, check_model, load_checkpoint

if TYPE_CHECKING:
    from fer_pipeline.dataset.preprocess import PreprocessSettings

ZIP_SEPARATOR = "::"  # "photos.zip::folder/face.jpg" names a zip member
MAX_INPUT_BYTES = 64 * 1024 * 1024  # no face image is this large; anything above is not read


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


def _spec(path: Path) -> SourceSpec:
    return SourceSpec(name=str(path), kind="image_folders", path=path, label_map={})


def _member_source(name: str, reader: SourceReader, member: Member) -> _Source:
    if member.problem is not None:  # known from the listing: never read
        return _Source(name, None, member.problem.reason)
    return _Source(name, lambda: reader.read(member))  # MemberError: see _read_and_decode


def _zip_sources(path: Path, max_bytes: int, shown: str | None = None) -> Iterator[_Source]:
    """Members that are images; the archive stays open while the consumer reads each one."""
    shown = str(path) if shown is None else shown
    try:
        reader = ZipReader(_spec(path), max_bytes)
    except SourceError as exc:
        yield _Source(shown, None, str(exc))
        return
    with reader:
        members = [m for m in reader.members() if _is_image_name(reader.entry_name(m.path))]
        if not members:
            yield _Source(shown, None, "no images found in zip archive")
        for member in members:
            yield _member_source(f"{shown}{ZIP_SEPARATOR}{member.path}", reader, member)


def _kind(member: Member) -> str | None:
    """What a folder member is to predict: "image" (also a folder fault, a row), "zip", or None (skipped)."""
    if is_folder_fault(member.problem):  # a loop or an unlistable folder; nothing under __MACOSX/ is wanted
        return None if is_junk(f"{member.path}/x") else "image"
    if is_junk(member.path):
        return None
    if member.path.lower().endswith(".zip"):
        return "zip"
    return "image" if is_image_name(member.path) else None


def _folder_sources(root: Path, max_bytes: int) -> Iterator[_Source]:
    """Images (and faults) first, then zip archives, each sorted by path, like ``sorted(rglob)``."""
    reader = FolderReader(_spec(root), max_bytes)
    try:
        members = list(reader.members())
    except SourceError as exc:
        yield _Source(str(root), None, str(exc))
        return
    found = sorted(((m.path.split("/"), kind, m) for m in members if (kind := _kind(m))), key=lambda f: f[0])
    if not found:
        yield _Source(str(root), None, "no images found in folder")
    for _, kind, member in found:
        if kind == "image":
            yield _member_source(str(root / member.path), reader, member)
    for _, kind, member in found:
        if kind == "zip":
            if member.problem is not None:
                yield _Source(str(root / member.path), None, member.problem.reason)
            else:
                yield from _zip_sources(reader.fs_path(member.path), max_bytes, str(root / member.path))


def iter_sources(paths: Sequence[str | Path], max_bytes: int = MAX_INPUT_BYTES) -> Iterator[_Source]:
    """Expand the given paths into individual images, in a stable order.

    A regular file named explicitly is always attempted (whatever its extension), except .zip
    files, which are expanded; folders contribute image files and zips (recursively, sorted,
    junk skipped). Anything else -- missing, a dangling link or loop, a FIFO/socket/device --
    is one source with an error.
    """
    for raw in paths:
        path = Path(raw)
        st = stat_path(path)
        if isinstance(st, Problem):
            yield _Source(str(path), None, st.reason)
        elif stat.S_ISDIR(st.st_mode):
            yield from _folder_sources(path, max_bytes)
        elif not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would block
            yield _Source(str(path), None, f"not a regular file ({file_kind(st.st_mode)})")
        elif path.suffix.lower() == ".zip":
            yield from _zip_sources(path, max_bytes)
        else:
            yield _Source(str(path), lambda path=path: read_regular(path, max_bytes))


# ---------------------------------------------------------------- prediction


def _read_and_decode(src: _Source, settings: PreprocessSettings) -> np.ndarray | str:
    """The decoded face, or the reason this input cannot be classified."""
    from fer_pipeline.dataset.preprocess import decode_face

    if src.read is None:
        return str(src.error)
    try:
        decoded = decode_face(src.read(), settings)
    except MemberError as exc:
        return exc.problem.reason
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
