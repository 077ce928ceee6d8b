"""Application mode: classify image files, folders (recursively) and .zip archives.

Every input is decoded with the pipeline's own :func:`fer_pipeline.dataset.preprocess.decode_face`,
so a face is prepared for prediction exactly as training faces were. One unreadable input
yields a :class:`Prediction` with an ``error`` and never stops the others.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fer_pipeline.dataset.source_readers import is_image_name, junk_reason
from fer_pipeline.ml.checkpoint import LoadedModel, load_checkpoint

ZIP_SEPARATOR = "::"  # "photos.zip::folder/face.jpg" names a zip member


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


def _zip_sources(path: Path) -> Iterator[_Source]:
    """Members that are images; the archive stays open while the consumer reads each one."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield _Source(str(path), None, f"unreadable zip archive ({exc})")
        return
    with zf:
        members = sorted(i.filename for i in zf.infolist() if not i.is_dir() and _is_image_name(i.filename))
        if not members:
            yield _Source(str(path), None, "no images found in zip archive")
        for member in members:
            yield _Source(f"{path}{ZIP_SEPARATOR}{member}", functools.partial(zf.read, member))


def iter_sources(paths: Sequence[str | Path]) -> Iterator[_Source]:
    """Expand the given paths into individual images, in a stable order.

    A file named explicitly is always attempted (whatever its extension), except .zip files,
    which are expanded; folders contribute image files (recursively, sorted, junk skipped).
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_name(p.relative_to(path).as_posix()))
            zips = sorted(p for p in path.rglob("*.zip") if p.is_file() and not is_junk(p.relative_to(path).as_posix()))
            if not files and not zips:
                yield _Source(str(path), None, "no images found in folder")
            for f in files:
                yield _Source(str(f), f.read_bytes)
            for z in zips:
                yield from _zip_sources(z)
        elif path.is_file() and path.suffix.lower() == ".zip":
            yield from _zip_sources(path)
        elif path.is_file():
            yield _Source(str(path), path.read_bytes)
        else:
            yield _Source(str(path), None, "no such file or folder")


def predict_images(
    paths: Sequence[str | Path],
    checkpoint: str | Path | LoadedModel,
    batch_size: int = 256,
) -> list[Prediction]:
    """Classify every image in ``paths`` (files, folders, .zip archives) with a checkpoint.

    Returns one :class:`Prediction` per image found (in input order), plus one with an
    ``error`` for each unreadable file, missing path, bad archive or image-less folder.
    """
    from fer_pipeline.dataset.preprocess import decode_face

    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_checkpoint(checkpoint)
    settings = loaded.preprocess  # exactly what the training faces went through
    results: list[Prediction | None] = []
    pending: list[tuple[int, str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        probs = loaded.predict_proba(np.stack([face for _, _, face in pending]))
        for (slot, name, _), p in zip(pending, probs):
            results[slot] = Prediction(
                input=name,
                label=loaded.classes[int(np.argmax(p))],
                probabilities={c: float(v) for c, v in zip(loaded.classes, p)},
            )
        pending.clear()

    for src in iter_sources(paths):
        results.append(None)
        slot = len(results) - 1
        if src.read is None:
            results[slot] = Prediction(src.name, error=src.error)
            continue
        try:
            decoded = decode_face(src.read(), settings)
        except Exception as exc:  # noqa: BLE001 -- one bad input must not stop the rest
            results[slot] = Prediction(src.name, error=f"{type(exc).__name__}: {exc}")
            continue
        if not decoded.ok:
            results[slot] = Prediction(src.name, error=str(decoded.reason))
            continue
        pending.append((slot, src.name, decoded.face))
        if len(pending) >= batch_size:
            flush()
    flush()
    return [r for r in results if r is not None]
