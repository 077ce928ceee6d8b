"""Application mode: classify image files, folders (recursively) and .zip archives.

Every input is prepared for prediction exactly as the model's training faces were, as its
checkpoint records (:class:`fer_pipeline.ml.checkpoint.Framing`): a model trained on face crops
gets each image through the pipeline's own :func:`fer_pipeline.faces.preprocess.decode_face`
(centre crop, grayscale, resize); a model trained on detected faces ("detect") gets
every face the detector finds in each image, aligned with the recorded margin
(:func:`fer_pipeline.faces.detect.align_face`) and then the same grayscale/resize
(``preprocess_image``): one :class:`Prediction` per face, with its box, and one saying
"no face found" for an image without any. A model trained on both ("mixed") decides per image
(:func:`_mixed_input`): an image framed like a face crop near the input size is a crop, and the
detector is made only when an image needs it. ``annotate_dir`` writes a copy of each image with
the boxes and labels drawn (:mod:`fer_pipeline.ml.annotate`).

The model is a checkpoint on PyTorch or an exported ``.onnx`` file on onnxruntime
(:func:`load_model`, :class:`Classifier`); this module imports neither torch nor onnxruntime
itself, so the onnxruntime path never loads torch unless a photo needs the (PyTorch) detector.

Unattended on hostile data: one bad input yields one :class:`Prediction` whose ``error`` says
what is wrong, and never stops the others. Inputs are listed and read by the pipeline's own
readers (:mod:`fer_pipeline.sources.readers`: a folder with ``FolderReader``, a .zip with
``ZipReader``, a single file with ``read_regular``), so predict follows the same rules, in the
same words, as the inventory: which files are images is judged by content with the one format
policy (:mod:`fer_pipeline.sources.formats`), links followed with loop protection, FIFOs/sockets/devices never
opened, nothing read past ``max_bytes`` (:data:`MAX_INPUT_BYTES`, 64 MiB), encrypted, corrupt,
bzip2/lzma, unsafe-path and oversized zip entries refused. Of several zip entries with one name
the last is classified and each earlier one is an error row (``duplicate entry name in archive``).
"""

from __future__ import annotations

import io
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fer_pipeline.faces.framing import NO_FACE, Detection
from fer_pipeline.limits import MAX_FILE_BYTES
from fer_pipeline.ml.framing import Framing
from fer_pipeline.sources.catalog import SourceSpec
from fer_pipeline.sources.files import (
    MemberError,
    Problem,
    SourceError,
    file_kind,
    read_regular,
    stat_path,
)
from fer_pipeline.sources.formats import (
    ACCEPTED_FORMATS,
    SNIFF_BYTES,
    refusal,
    sniff_format,
)
from fer_pipeline.sources.framing import CROP, DETECT
from fer_pipeline.sources.names import is_image_name, junk_reason
from fer_pipeline.sources.readers import (
    FolderReader,
    Member,
    SourceReader,
    ZipReader,
    is_folder_fault,
)

if TYPE_CHECKING:
    from fer_pipeline.faces.detect import FaceDetector
    from fer_pipeline.faces.preprocess import PreprocessSettings

ZIP_SEPARATOR = "::"  # "photos.zip::folder/face.jpg" names a zip member
MAX_INPUT_BYTES = MAX_FILE_BYTES  # no face image is this large; anything above is not read
FRAMING_CHOICES = ("auto", DETECT, CROP)  # auto: what the checkpoint records
UNCERTAIN = "uncertain"  # the label of a face whose top calibrated probability is below min_confidence
CROP_SIDE_RATIO = 2.0
"""A "mixed" model takes an image as a face crop, without detection, when it is roughly square
(:data:`CROP_ASPECT`) and its longer side is at most this many times the model's input side: a
face that fills a frame near the input size (the demo's 64 px crops, AffectNet's 96 px for 48 px
input). Detection on such images mostly fails (MTCNN needs context around a face) and is slow."""
CROP_FALLBACK_RATIO = 6.0
"""Larger, still roughly square images are searched for faces; when none is found in one at most
this many times the input side, it is taken as a crop (a face filling a bigger frame, e.g. the
256 px crops of expressions-race) rather than reported as "no face found"."""
CROP_ASPECT = 1.25  # longer side / shorter side of a face crop at most this (photos are 4:3, 16:9)


class Classifier(Protocol):
    """What prediction needs of a model: a checkpoint on PyTorch
    (:class:`fer_pipeline.ml.checkpoint.LoadedModel`) or an exported file on onnxruntime
    (:class:`fer_pipeline.ml.exported.OnnxModel`)."""

    classes: tuple[str, ...]
    preprocess: PreprocessSettings
    framing: Framing

    def predict_proba(self, faces: np.ndarray) -> np.ndarray: ...


class DetectorSetupError(ValueError):
    """The model's recorded detector settings do not make a detector (the model cannot be applied)."""


def load_model(path: str | Path) -> Classifier:
    """A checkpoint (``.safetensors``, PyTorch) or an exported model (``.onnx``, onnxruntime:
    torch is not imported). ``ValueError`` for a broken one."""
    if Path(path).suffix.lower() == ".onnx":
        from fer_pipeline.ml.exported import load_onnx

        return load_onnx(path)
    from fer_pipeline.ml.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _checked(model: Classifier) -> Classifier:
    """The load-time checks for a checkpoint built in memory (an exported file was checked when opened)."""
    from fer_pipeline.ml.exported import OnnxModel

    if not isinstance(model, OnnxModel):
        from fer_pipeline.ml.checkpoint import check_model

        check_model(model)  # type: ignore[arg-type]
    return model


@dataclass(frozen=True)
class Prediction:
    """One input's outcome (one face's, with detection): a class and probabilities, or an error.

    With detection, ``face_index`` (0 = the largest face), ``faces_found``, ``box`` (left, top,
    right, bottom in pixels of the EXIF-oriented image; it may reach past the border) and
    ``detector_score`` say which face; an image without a face is one row with ``faces_found``
    0 and the error :data:`NO_FACE`. ``annotated`` is the annotated copy written for the input
    (``annotation_error`` when that failed)."""

    input: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None
    face_index: int | None = None
    faces_found: int | None = None
    box: tuple[float, float, float, float] | None = None
    detector_score: float | None = None
    annotated: str | None = None
    annotation_error: str | None = None

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


def _is_candidate(reader: SourceReader, member: Member, name: str) -> bool:
    """Whether a listed file is an image to classify, by the one format policy
    (:func:`fer_pipeline.sources.formats.refusal`, judged from its first bytes as the inventory
    judges it): accepted content whatever the name (a PNG named ``.ico``), and a file named like
    an image whose content is refused or damaged (one row saying why, in the inventory's words).
    Other files (notes, sheets, an ICO icon) are not images and are skipped."""
    if is_junk(name):
        return False
    if member.problem is None:
        try:
            if refusal(reader.head(member, SNIFF_BYTES), name) is None:
                return True
        except (MemberError, OSError):
            pass  # unreadable: the name decides, and reading it says why
    return is_image_name(name)


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
        members = [m for m in reader.members() if _is_candidate(reader, m, reader.entry_name(m.path))]
        if not members:
            yield _Source(shown, None, "no images found in zip archive")
        for member in members:
            yield _member_source(f"{shown}{ZIP_SEPARATOR}{member.path}", reader, member)


def _kind(reader: FolderReader, member: Member) -> str | None:
    """What a folder member is to predict: "image" (also a folder fault, a row), "zip", or None (skipped)."""
    if is_folder_fault(member.problem):  # a loop or an unlistable folder; nothing under __MACOSX/ is wanted
        return None if is_junk(f"{member.path}/x") else "image"
    if is_junk(member.path):
        return None
    if member.path.lower().endswith(".zip"):
        return "zip"
    return "image" if _is_candidate(reader, member, member.path) else None


def _folder_sources(root: Path, max_bytes: int) -> Iterator[_Source]:
    """Images (and faults) first, then zip archives, each sorted by path, like ``sorted(rglob)``."""
    reader = FolderReader(_spec(root), max_bytes)
    try:
        members = list(reader.members())
    except SourceError as exc:
        yield _Source(str(root), None, str(exc))
        return
    found = sorted(((m.path.split("/"), kind, m) for m in members if (kind := _kind(reader, m))),
                   key=lambda f: f[0])
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


# ---------------------------------------------------------------- framing


def detector_from_settings(settings: Mapping[str, Any]) -> FaceDetector:
    """The detector a checkpoint's recorded ``settings()`` describe (``ValueError`` when they
    do not make one)."""
    from fer_pipeline.faces.detect import BoxCalibration, make_detector

    options = dict(settings)
    name = options.pop("detector", None)
    if isinstance(options.get("calibration"), dict):
        options["calibration"] = BoxCalibration(**options["calibration"])
    if isinstance(options.get("stage_thresholds"), list):
        options["stage_thresholds"] = tuple(options["stage_thresholds"])
    try:
        return make_detector(str(name), **options)
    except TypeError as exc:  # a setting this detector does not take
        raise ValueError(f"recorded detector settings do not make a {name!r} detector: {exc}") from None


def resolve_framing(loaded: Classifier, choice: str = "auto") -> Framing:
    """The framing to apply: the model's ("auto"; "mixed" decides per image), or forced to "crop"
    or "detect" (a crop model forced to detect uses the default detector and margin)."""
    if choice not in FRAMING_CHOICES:
        raise ValueError(f"framing must be one of {', '.join(FRAMING_CHOICES)}, got {choice!r}")
    if choice == CROP:
        return Framing(CROP)
    if choice == DETECT and not loaded.framing.detects:
        default = Detection()  # a catalogue's `faces: detect` without options
        return Framing(DETECT, default.settings(), default.margin)
    if choice == DETECT:  # a "mixed" model forced to detect in every image
        return replace(loaded.framing, mode=DETECT)
    return loaded.framing


# ---------------------------------------------------------------- prediction


def _read(src: _Source) -> bytes | str:
    """The input's bytes, or why they cannot be read."""
    if src.read is None:
        return str(src.error)
    try:
        return src.read()
    except MemberError as exc:
        return exc.problem.reason
    except Exception as exc:  # noqa: BLE001 -- one bad input must not stop the rest
        return f"{type(exc).__name__}: {exc}"


def _decode(data: bytes, settings: PreprocessSettings) -> np.ndarray | str:
    """The decoded face ("crop" framing), or the reason this input cannot be classified."""
    from fer_pipeline.faces.preprocess import decode_face

    try:
        decoded = decode_face(data, settings)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return decoded.face if decoded.ok else str(decoded.reason)


def _prediction(template: Prediction, probs: np.ndarray, classes: Sequence[str],
                min_confidence: float | None = None) -> Prediction:
    if not np.all(np.isfinite(probs)):  # refused models cannot get here; keep outputs valid anyway
        return replace(template, error="the model produced non-finite probabilities (NaN or infinity)")
    sure = min_confidence is None or float(np.max(probs)) >= min_confidence
    return replace(template, label=classes[int(np.argmax(probs))] if sure else UNCERTAIN,
                   probabilities={c: float(v) for c, v in zip(classes, probs)})


@dataclass
class _Input:
    """One source's rows: templates (detection fields, or an error) and faces still to classify."""

    rows: list[Prediction]
    faces: dict[int, np.ndarray]  # row position -> face


def _crop_input(src: _Source, data: bytes, settings: PreprocessSettings) -> _Input:
    face = _decode(data, settings)  # exactly what the training faces went through
    if isinstance(face, str):
        return _Input([Prediction(src.name, error=face)], {})
    return _Input([Prediction(src.name)], {0: face})


def _detect_input(src: _Source, data: bytes, settings: PreprocessSettings, framing: Framing,
                  detector: FaceDetector) -> _Input:
    """Every face in the image, through ingestion's own per-file steps (decode, detect, align with
    the margin, normalise, the near-constant check), so a face is what the model trained on."""
    from fer_pipeline.faces.batch import detect_file
    from fer_pipeline.faces.preprocess import reject_blank

    items, _ = detect_file(data, settings, Detection(margin=float(framing.margin or 0.0)), detector)
    decoded = reject_blank([item[4] for item in items], settings)
    rows, ready = [], {}
    for pos, ((index, found, box, score, _), face) in enumerate(zip(items, decoded)):
        rows.append(Prediction(src.name, error=face.reason, face_index=index if found else None, faces_found=found,
                               box=None if box is None else tuple(float(v) for v in box),
                               detector_score=score))
        if face.ok:
            ready[pos] = face.face
    return _Input(rows, ready)


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of an accepted format, or None (decoding then says why)."""
    from PIL import Image

    if sniff_format(data[:SNIFF_BYTES]) not in ACCEPTED_FORMATS:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:  # reads the header only
            return img.size
    except Exception:  # noqa: BLE001 -- a damaged header: the framing it gets reports it
        return None


def looks_like_crop(width: int, height: int, input_size: tuple[int, int], ratio: float) -> bool:
    """Whether an image this size is framed like a face crop for a model taking ``input_size``:
    roughly square (:data:`CROP_ASPECT`) and its longer side at most ``ratio`` times the input's."""
    if min(width, height) <= 0:
        return False
    return max(width, height) / min(width, height) <= CROP_ASPECT and max(width, height) <= ratio * max(input_size)


class _Detector:
    """The detector, made on first use: a "mixed" model's crops never need it (nor torch)."""

    def __init__(self, plan: Framing, given: FaceDetector | None) -> None:
        self._plan, self._detector = plan, given

    def get(self) -> FaceDetector:
        if self._detector is None:
            try:
                self._detector = detector_from_settings(self._plan.detector or {})
            except Exception as exc:
                raise DetectorSetupError(str(exc)) from exc
        return self._detector


def _mixed_input(src: _Source, data: bytes, settings: PreprocessSettings, framing: Framing,
                 detector: _Detector) -> _Input:
    """A model trained on crops and detected faces decides per image: an image framed like a
    face crop near the input size is one (no detection); a bigger one is searched, and taken as a
    crop when it is still crop-shaped and no face is found (:data:`CROP_FALLBACK_RATIO`). A row
    classified as a crop has no face index, faces found, box or score (all empty)."""
    size = _image_size(data)
    if size is not None and looks_like_crop(*size, settings.image_size, CROP_SIDE_RATIO):
        return _crop_input(src, data, settings)
    item = _detect_input(src, data, settings, framing, detector.get())
    if (size is not None and looks_like_crop(*size, settings.image_size, CROP_FALLBACK_RATIO)
            and [r.faces_found for r in item.rows] == [0]):
        return _crop_input(src, data, settings)
    return item


def _annotate(rows: list[Prediction], data: bytes, index: int, name: str, folder: Path, framing: Framing,
              settings: PreprocessSettings) -> list[Prediction]:
    """Write the annotated copy of one input; its rows say where it went (or why it did not).
    Inputs that could not be decoded get none."""
    from fer_pipeline.faces.detect import to_rgb
    from fer_pipeline.faces.preprocess import open_checked
    from fer_pipeline.ml.annotate import Mark, centre_crop_box, write_annotated

    if all(r.error is not None and r.faces_found is None for r in rows):
        return rows  # unreadable, not an image, too small, ...: nothing to draw on
    try:
        opened = open_checked(data, settings)
        if opened.image is None:
            return rows
        rgb = to_rgb(opened.image)
        marks = []
        for row in rows:
            text = f"{row.label} {row.confidence:.2f}" if row.ok else ("?" if row.error != NO_FACE else NO_FACE)
            if framing.detects and row.face_index is not None:
                marks.append(Mark(row.box, f"{row.face_index}: {text}", row.ok))
            elif framing.detects and row.faces_found is not None:  # no face found
                marks.append(Mark(None, text, row.ok))
            else:
                marks.append(Mark(centre_crop_box(rgb.width, rgb.height, settings.image_size), text, row.ok))
        path = write_annotated(rgb, marks, folder, index, name, opened.image.format)
    except Exception as exc:  # noqa: BLE001 -- a failed copy is reported, the predictions stand
        return [replace(r, annotation_error=f"{type(exc).__name__}: {exc}") for r in rows]
    return [replace(r, annotated=str(path)) for r in rows]


def predict_images(
    paths: Sequence[str | Path],
    checkpoint: str | Path | Classifier,
    batch_size: int = 256,
    max_bytes: int = MAX_INPUT_BYTES,
    *,
    framing: str | Framing = "auto",
    detector: FaceDetector | None = None,
    annotate_dir: str | Path | None = None,
    min_confidence: float | None = None,
) -> list[Prediction]:
    """Classify every image in ``paths`` (files, folders, .zip archives) with a model: a
    checkpoint or an exported ``.onnx`` file (a path, or loaded: :func:`load_model`).

    Returns one :class:`Prediction` per image found (per face found, when the framing detects
    faces: ``framing`` "auto" follows the model, "crop"/"detect" force one, a
    :class:`Framing` is applied as it is; a "mixed" model decides per image, see
    :func:`_mixed_input`), in input
    order, plus one with an ``error`` for each unreadable file, missing path, bad archive or
    entry, image-less folder or face-less image. ``detector`` replaces the one the model
    records (tests, a GPU detector). With ``annotate_dir``, a copy of each classified image with
    boxes and labels goes there. Probabilities are calibrated with the model's temperature;
    a face whose top probability is below ``min_confidence`` is labelled :data:`UNCERTAIN`
    (its probabilities are still given). Raises ``ValueError`` for a broken model (non-finite weights,
    bad normalisation) and :class:`DetectorSetupError` for recorded detector settings that do not
    make a detector (a "mixed" model makes its detector when an image first needs it).
    """
    loaded = load_model(checkpoint) if isinstance(checkpoint, (str, Path)) else _checked(checkpoint)
    plan = framing if isinstance(framing, Framing) else resolve_framing(loaded, framing)
    per_image = plan.per_image
    detectors = _Detector(plan, detector)
    if plan.detects and not per_image:
        detectors.get()  # a broken detector is reported before any work
    folder = Path(annotate_dir) if annotate_dir is not None else None
    settings = loaded.preprocess
    results: list[list[Prediction]] = []
    pending: list[tuple[_Input, int]] = []  # faces to classify: (input, row position)

    def flush() -> None:
        if not pending:
            return
        faces = np.stack([item.faces[pos] for item, pos in pending])
        for (item, pos), p in zip(pending, loaded.predict_proba(faces)):
            item.rows[pos] = _prediction(item.rows[pos], p, loaded.classes, min_confidence)
        pending.clear()

    for index, src in enumerate(iter_sources(paths, max_bytes), start=1):
        data = _read(src)
        if isinstance(data, str):
            results.append([Prediction(src.name, error=data)])
            continue
        if per_image:
            item = _mixed_input(src, data, settings, plan, detectors)
        elif plan.detects:
            item = _detect_input(src, data, settings, plan, detectors.get())
        else:
            item = _crop_input(src, data, settings)
        results.append(item.rows)  # filled in place by flush()
        pending.extend((item, pos) for pos in item.faces)
        if folder is not None:  # one image at a time: photos are large, and the labels are drawn
            flush()
            results[-1] = _annotate(item.rows, data, index, src.name, folder, plan, settings)
        elif len(pending) >= batch_size:
            flush()
    flush()
    return [row for rows in results for row in rows]
