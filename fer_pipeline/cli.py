"""``fer-pipeline`` command line: argparse subcommands, one ``add_*_command`` function each.

Subcommands: ``predict`` (classify images, on PyTorch or onnxruntime), ``export`` (the shipped
model as ONNX), ``run`` (bring the whole graph up to date through
Dagster: ``make demo``), ``outputs`` (where the outputs are). ``python -m fer_pipeline.defs.refresh``
and ``python -m fer_pipeline.outputs`` stay as aliases of the last two.

To add a subcommand, write ``add_demo_command(subparsers)`` that builds its
parser and sets ``func`` (a callable taking the parsed args and returning an exit status),
and append it to :data:`COMMANDS`. Heavy imports (torch) happen inside the handlers, so
``fer-pipeline --help`` stays fast.

Exit status: 0 success, 1 some inputs failed (an image without a face included), 2 usage error,
no model or a broken model. Whatever the inputs are (hostile names, FIFOs, loops, corrupt
archives), each fault is one error row and the output stays valid table / CSV / JSON.

With a model trained on detected faces (or ``--framing detect``), each row is one face: the
outputs gain the face's index, the number of faces found, its box and the detector's score
(in JSON, CSV and the table alike); with a crop-framed model they are exactly as before.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from fer_pipeline.limits import MAX_FILE_BYTES
from fer_pipeline.sources.names import escape_char, escape_text

if TYPE_CHECKING:
    from fer_pipeline.ml.checkpoint import LoadedModel
    from fer_pipeline.ml.predict import Classifier, Prediction

MAX_INPUT_BYTES = MAX_FILE_BYTES  # no face image is this large; anything above is not read

EXIT_OK, EXIT_INPUT_FAILED, EXIT_USAGE = 0, 1, 2
EXPORT_TMP_PREFIX = "fer-onnx-"  # the folder of an export made for one predict run (removed after loading)


class NoModelError(RuntimeError):
    """No checkpoint was given and none is recorded as the shipped or the best model."""


def default_model(data_root: str | Path | None = None) -> tuple[LoadedModel | Path, str]:
    """(predict's default model, where it comes from): the shipped model of
    ``<data root>/models/shipped.json`` (one checkpoint or a fold ensemble, loaded), else, for
    data roots written before it existed, the best model of ``reports/metrics.json`` (a path)."""
    from fer_pipeline.ml.shipped import load_shipped
    from fer_pipeline.storage import StoreError, open_data_root

    try:  # a folder, or an object-store URL pulled into its working copy (models and reports only)
        paths = open_data_root(data_root, trees=("models_dir", "reports_dir"))
    except StoreError as exc:
        raise NoModelError(str(exc)) from None
    if paths.shipped_json.is_file():
        try:
            shipped = load_shipped(paths)
        except (OSError, ValueError) as exc:
            raise NoModelError(f"cannot load the shipped model: {exc}; re-materialize shipped_model or pass "
                               "--model CKPT") from None
        return shipped.model, str(paths.shipped_json)
    path = default_model_path(paths.root)
    return path, str(path)


def default_model_path(data_root: str | Path | None = None) -> Path:
    """The best model recorded in ``<data root>/reports/metrics.json``
    (:class:`fer_pipeline.schema.MetricsReport`): its recorded checkpoint (relative paths are
    under the data root), else ``models/<best_model>.safetensors``. ``predict`` prefers the
    shipped model (:func:`default_model`); this is its fallback for older data roots."""
    from fer_pipeline.schema import MetricsReport
    from fer_pipeline.storage import StoreError, open_data_root

    try:  # a folder, or an object-store URL pulled into its working copy (models and reports only)
        paths = open_data_root(data_root, trees=("models_dir", "reports_dir"))
    except StoreError as exc:
        raise NoModelError(str(exc)) from None
    hint = "train a model first (materialise the pipeline's model assets) or pass --model CKPT"
    if not paths.metrics_json.is_file():
        raise NoModelError(f"no trained model found: {paths.metrics_json} does not exist; {hint}")
    try:
        report = MetricsReport.read(paths.metrics_json)
    except ValueError as exc:
        raise NoModelError(f"{exc}; {hint}") from None
    recorded = report.checkpoints.get(report.best_model)
    ckpt = paths.resolve(recorded) if recorded else paths.checkpoint(report.best_model)
    if not ckpt.is_file():
        raise NoModelError(f"best model {report.best_model!r} has no checkpoint at {ckpt}; {hint}")
    return ckpt


@dataclass(frozen=True)
class ShippedModel:
    """The shipped model named without loading it (no torch): its name, its checkpoints (one, or
    the fold ensemble's members), the data root's models folder and its record (``shipped.json``;
    None for a data root from before it existed)."""

    name: str
    checkpoints: tuple[Path, ...]
    models_dir: Path
    record: Path | None = None

    @property
    def export_path(self) -> Path:
        """Where ``fer-pipeline export`` writes it by default (``predict --engine onnx`` looks there)."""
        return self.models_dir / f"{self.name}.onnx"


def shipped_model(data_root: str | Path | None = None) -> ShippedModel:
    """Which model ships, the one place ``export`` and ``predict --engine onnx`` ask: the members of
    ``models/shipped.json`` (:class:`fer_pipeline.schema.ShippedSpec`, read without torch), else
    the best model of ``reports/metrics.json``. ``NoModelError`` when there is none."""
    from fer_pipeline.schema import ShippedSpec
    from fer_pipeline.storage import StoreError, open_data_root

    try:
        paths = open_data_root(data_root, trees=("models_dir", "reports_dir"))
    except StoreError as exc:
        raise NoModelError(str(exc)) from None
    if paths.shipped_json.is_file():
        try:
            spec = ShippedSpec.read(paths.shipped_json)
        except (OSError, ValueError) as exc:
            raise NoModelError(f"cannot read the shipped model: {exc}; re-materialize shipped_model or pass "
                               "--model CKPT") from None
        return ShippedModel(spec.name, tuple(paths.resolve(m.checkpoint) for m in spec.members), paths.models_dir,
                            paths.shipped_json)
    ckpt = default_model_path(paths.root)
    return ShippedModel(ckpt.stem, (ckpt,), paths.models_dir)


def _shipped_members(shipped: ShippedModel) -> list[LoadedModel] | str:
    """The shipped model's member checkpoints, loaded and checked against their record."""
    if shipped.record is None:
        loaded = _load_model(shipped.checkpoints[0])
        return loaded if isinstance(loaded, str) else [loaded]  # type: ignore[list-item]
    from fer_pipeline.ml.shipped import load_shipped

    try:
        return load_shipped(shipped.record).members
    except (OSError, ValueError) as exc:
        return f"cannot load the shipped model: {exc}; re-materialize shipped_model or pass --model CKPT"


def _unicode_safe(text: str) -> str:
    """Lone surrogates (non-UTF-8 file name bytes) as ``\\xNN``: they cannot be encoded as text."""
    return "".join(escape_char(c) if "\ud800" <= c <= "\udfff" else c for c in text)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


BOX_SIDES = ("left", "top", "right", "bottom")


def _box_json(p: Prediction) -> dict[str, float | None] | None:
    return None if p.box is None else {k: _finite_or_none(round(v, 1)) for k, v in zip(BOX_SIDES, p.box)}


def _json_row(p: Prediction, faces: bool = False, annotated: bool = False) -> dict[str, object]:
    probs = {_unicode_safe(c): _finite_or_none(v) for c, v in p.probabilities.items()} if p.probabilities else None
    row: dict[str, object] = {"input": _unicode_safe(p.input)}
    if faces:
        score = None if p.detector_score is None else _finite_or_none(round(p.detector_score, 6))
        row.update(face_index=p.face_index, faces_found=p.faces_found, box=_box_json(p), detector_score=score)
    row.update(label=_unicode_safe(p.label) if p.label is not None else None, probabilities=probs,
               error=_unicode_safe(p.error) if p.error is not None else None)
    if annotated:
        row["annotated"] = _unicode_safe(p.annotated) if p.annotated else None
    return row


def _format_json(preds: Sequence[Prediction], faces: bool = False, annotated: bool = False) -> str:
    return json.dumps([_json_row(p, faces, annotated) for p in preds], indent=2, allow_nan=False) + "\n"


def _format_csv(preds: Sequence[Prediction], classes: Sequence[str], faces: bool = False,
                annotated: bool = False) -> str:
    """RFC 4180 quoting; the csv module leaves a field with a bare CR unquoted when lines end
    in LF, so a row holding one is written fully quoted. Face and annotation columns come after
    today's, so readers of the crop-model columns keep working."""
    buf = io.StringIO()
    minimal = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    header = ["input", "prediction", *[f"p_{c}" for c in classes], "error"]
    header += ["face_index", "faces_found", *[f"box_{k}" for k in BOX_SIDES], "detector_score"] if faces else []
    rows = [header + (["annotated"] if annotated else [])]
    for p in preds:
        probs = [_csv_number(p.probabilities[c]) for c in classes] if p.probabilities else [""] * len(classes)
        row = [p.input, p.label or "", *probs, p.error or ""]
        if faces:
            box = [f"{v:.1f}" if math.isfinite(v) else "" for v in p.box] if p.box else [""] * 4
            score = _csv_number(p.detector_score) if p.detector_score is not None else ""
            row += ["" if p.face_index is None else str(p.face_index),
                    "" if p.faces_found is None else str(p.faces_found), *box, score]
        rows.append(row + ([p.annotated or ""] if annotated else []))
    for row in rows:
        row = [_unicode_safe(v) for v in row]
        (quoted if any("\r" in v for v in row) else minimal).writerow(row)
    return buf.getvalue()


def _csv_number(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else ""


def _face_cells(p: Prediction) -> list[str]:
    """The table's face and box cells: ``0 of 2`` and ``left,top,right,bottom`` in whole pixels."""
    face = "" if p.face_index is None else f"{p.face_index} of {p.faces_found}"
    box = "" if p.box is None else ",".join(str(round(v)) if math.isfinite(v) else "?" for v in p.box)
    return [face, box]


def _format_table(preds: Sequence[Prediction], classes: Sequence[str], faces: bool = False) -> str:
    """Aligned text for people: one line per input (per face, with ``faces``), whatever its name holds."""
    names = [escape_text(c) for c in classes]
    header = (["input", *(["face", "box"] if faces else [])], "prediction", names)
    rows: list[tuple[list[str], str, list[str] | None]] = []
    for p in preds:
        lead = [escape_text(p.input), *(_face_cells(p) if faces else [])]
        if p.ok and p.probabilities:
            rows.append((lead, escape_text(p.label or ""), [f"{p.probabilities[c]:.3f}" for c in classes]))
        else:
            rows.append((lead, f"ERROR: {escape_text(str(p.error))}", None))
    table = [header, *rows]
    lead_widths = [max(len(r[0][i]) for r in table) for i in range(len(header[0]))]
    pred_width = max(len(r[1]) for r in table if r[2] is not None)  # error messages do not widen it
    lines = []
    for lead, pred, probs in table:
        cells = [v.ljust(w) for v, w in zip(lead, lead_widths)]
        if probs is None:
            cells.append(pred)
        else:
            cells.append(pred.ljust(pred_width))
            cells += [v.rjust(max(len(c), 5)) for v, c in zip(probs, names)]
        lines.append("  ".join(cells).rstrip())
    ok = sum(p.ok for p in preds)
    if faces:
        inputs = sum(1 for p in preds if not p.face_index)  # one row per input has index 0 or none
        no_face = sum(1 for p in preds if p.faces_found == 0)
        summary = f"{ok} faces classified in {inputs} inputs" + ("" if ok == len(preds) else f", {len(preds) - ok} rows failed")
        summary += f" ({no_face} inputs with no face found)" if no_face else ""
    else:
        summary = f"{ok} of {len(preds)} inputs classified" + ("" if ok == len(preds) else f", {len(preds) - ok} failed")
    lines.append("\n" + summary)
    return "\n".join(lines) + "\n"


def format_predictions(preds: Sequence[Prediction], fmt: str, classes: Sequence[str], *, faces: bool = False,
                       annotated: bool = False) -> str:
    """Render predictions as an aligned table, CSV or JSON text.

    ``faces`` adds each row's face index, faces found, box and detector score (the model's
    framing detects faces); ``annotated`` the annotated copy's path (CSV and JSON). Every format
    stays valid whatever the inputs are called: the table escapes control characters, CSV
    quotes, JSON escapes and never holds NaN/Infinity; file-name bytes that are not UTF-8
    become ``\\xNN`` in all three."""
    if fmt == "json":
        return _format_json(preds, faces, annotated)
    if fmt == "csv":
        return _format_csv(preds, classes, faces, annotated)
    return _format_table(preds, classes, faces)


def _write(stream: TextIO, text: str) -> None:
    """Write ``text``; characters the stream's encoding lacks become escapes instead of a crash."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _probability(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {raw}")
    return value


def _load_model(model: Path) -> Classifier | str:
    """The model (a checkpoint, or an exported ``.onnx`` file), or why it cannot be used
    (missing, not a file, unreadable, broken)."""
    from fer_pipeline.ml.predict import load_model

    if not model.exists():
        return f"model checkpoint not found: {model}"
    if not model.is_file():
        return f"model checkpoint is not a regular file: {model}"
    try:
        return load_model(model)
    except Exception as exc:  # noqa: BLE001 -- any unreadable or broken checkpoint is a usage problem here
        return f"cannot load model {model}: {exc}"


def _sources_match(onnx_path: Path, checkpoints: Sequence[Path]) -> bool:
    """Whether an exported file was made from exactly these checkpoints (their SHA-256s, in order)."""
    import hashlib

    from fer_pipeline.ml.exported import load_onnx

    try:
        members = load_onnx(onnx_path).metadata["members"]
        recorded = [m.get("checkpoint_sha256") for m in members]
    except Exception:  # noqa: BLE001 -- unreadable or foreign: not a match, it is exported again
        return False
    return recorded == [hashlib.sha256(c.read_bytes()).hexdigest() for c in checkpoints]


def _onnx_model_path(checkpoints: Sequence[Path], name: str | None, ready: Path | None,
                     load: Callable[[], list[LoadedModel] | str]) -> Path | str:
    """An exported file for these checkpoints: ``ready`` when it was made from them, else an
    export of what ``load`` gives into a temporary folder (slower: torch and its exporter
    start), or why not."""
    if ready is not None and ready.is_file() and _sources_match(ready, checkpoints):
        return ready
    models = load()
    if isinstance(models, str):
        return models
    from fer_pipeline.ml.export import export_models

    hint = f" (run `fer-pipeline export` to write {ready} once)" if ready is not None else ""
    _write(sys.stderr, f"fer-pipeline predict: exporting {escape_text(', '.join(map(str, checkpoints)))} "
                       f"to ONNX for this run{escape_text(hint)}\n")
    out = Path(tempfile.mkdtemp(prefix=EXPORT_TMP_PREFIX)) / "model.onnx"
    try:
        return export_models(models, out, name=name)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 -- a model the exporter cannot take is a usage problem here
        return f"cannot export {checkpoints[0]} to ONNX: {type(exc).__name__}: {exc}"


def _predict_model(args: argparse.Namespace) -> Classifier | str:
    """The model to predict with, on the engine asked for (``--engine``; a ``.onnx`` model is
    always run on onnxruntime), or why there is none."""
    model = Path(args.model) if args.model else None
    onnx_file = model is not None and model.suffix.lower() == ".onnx"
    if args.engine == "auto":
        args.engine = "onnx" if onnx_file else "torch"
    if args.engine == "torch" and onnx_file:
        return f"--engine torch cannot run an exported model ({model}); pass its checkpoint or --engine onnx"
    if model is not None and (onnx_file or args.engine == "torch"):
        return _load_model(model)
    try:
        if model is None and args.engine == "torch":
            chosen, _ = default_model(args.data_root)  # the shipped model (an ensemble loaded as one)
            return _load_model(chosen) if isinstance(chosen, Path) else chosen
        if model is not None:
            def load() -> list[LoadedModel] | str:
                loaded = _load_model(model)
                return loaded if isinstance(loaded, str) else [loaded]  # type: ignore[list-item]

            path = _onnx_model_path((model,), None, None, load)
        else:
            shipped = shipped_model(args.data_root)
            path = _onnx_model_path(shipped.checkpoints, shipped.name, shipped.export_path,
                                    lambda: _shipped_members(shipped))
    except NoModelError as exc:
        return str(exc)
    if isinstance(path, str):
        return path
    loaded = _load_model(path)
    if path.parent.name.startswith(EXPORT_TMP_PREFIX):  # made for this run: the session holds the graph now
        shutil.rmtree(path.parent, ignore_errors=True)
    return loaded


def _run_predict(args: argparse.Namespace) -> int:
    loaded = _predict_model(args)
    if isinstance(loaded, str):
        _write(sys.stderr, f"fer-pipeline predict: {escape_text(loaded)}\n")
        return EXIT_USAGE
    model = getattr(loaded, "path", None) or args.model or "the shipped model"

    annotate = _annotation_folder(args.annotate)
    if isinstance(annotate, str):
        _write(sys.stderr, f"fer-pipeline predict: {escape_text(annotate)}\n")
        return EXIT_USAGE

    from fer_pipeline.ml.predict import (
        DetectorSetupError,
        predict_images,
        resolve_framing,
    )

    framing = resolve_framing(loaded, args.framing)
    try:
        preds = predict_images(args.paths, loaded, max_bytes=args.max_bytes, min_confidence=args.min_confidence,
                               framing=framing, annotate_dir=annotate)
    except DetectorSetupError as exc:  # unusable detector settings or weights: the model cannot be applied
        _write(sys.stderr, f"fer-pipeline predict: cannot set up face detection for model {escape_text(str(model))}: "
                           f"{escape_text(str(exc))}\n")
        return EXIT_USAGE
    _write(sys.stdout, format_predictions(preds, args.format, loaded.classes, faces=framing.detects,
                                          annotated=annotate is not None))
    for p in preds:
        if not p.ok and args.format != "table":
            _write(sys.stderr, f"error: {escape_text(p.input)}: {escape_text(str(p.error))}\n")
    failed_copies = {p.input: p.annotation_error for p in preds if p.annotation_error}
    for name, error in failed_copies.items():
        _write(sys.stderr, f"error: {escape_text(name)}: annotated copy not written: {escape_text(str(error))}\n")
    if annotate is not None:
        written = len({p.annotated for p in preds if p.annotated})
        _write(sys.stderr, f"fer-pipeline predict: {written} annotated images in {escape_text(str(annotate))}\n")
    return EXIT_OK if all(p.ok for p in preds) and not failed_copies else EXIT_INPUT_FAILED


def _annotation_folder(raw: Path | None) -> Path | None | str:
    """The --annotate folder, created if needed, or why it cannot be used."""
    if raw is None:
        return None
    if raw.exists() and not raw.is_dir():
        return f"--annotate: {raw} exists and is not a folder"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--annotate: cannot create {raw}: {exc}"
    return raw


def add_predict_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify face images, folders or .zip archives",
        description="Classify face images (files, folders searched recursively, .zip archives) "
        "into Neutral / Focused / Tired / Angry with a trained checkpoint. Probabilities are calibrated "
        "with the temperature fitted on the validation split and stored in the checkpoint.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or .zip archive")
    p.add_argument("--model", metavar="CKPT", help="checkpoint (.safetensors) or exported model (.onnx, run on "
                                                  "onnxruntime); default: the shipped model (models/shipped.json: one "
                                                  "checkpoint or the fold ensemble), else the best model in "
                                                  "reports/metrics.json")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto",
                   help="run the model on PyTorch or onnxruntime (onnx: the shipped model's export from "
                        "`fer-pipeline export` when it is up to date, else one made for this run); "
                        "auto (default): onnxruntime for a .onnx --model, else PyTorch")
    p.add_argument("--data-root", default=None, help="data root, a folder or s3://… URL (default: $FER_DATA_DIR or ./data)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--min-confidence", type=_probability, default=None, metavar="P",
                   help="answer 'uncertain' (in the prediction/label column) when the top calibrated "
                        "probability is below P; the probabilities are still printed")
    p.add_argument("--max-bytes", type=_positive_int, default=MAX_INPUT_BYTES, metavar="N",
                   help="skip (and report) any file or zip entry larger than N bytes "
                        f"(default {MAX_INPUT_BYTES}: {MAX_INPUT_BYTES >> 20} MiB)")
    p.add_argument("--framing", choices=("auto", "detect", "crop"), default="auto",
                   help="how to find the face in each image: detect every face (one row per face, with its box), "
                        "or use the whole image as a face crop; auto (default): as the model's training faces were "
                        "framed, as its checkpoint records (a model trained on both decides per image: an image "
                        "framed like a face crop near the model's input size is one)")
    p.add_argument("--annotate", type=Path, default=None, metavar="DIR",
                   help="write a copy of each classified image to DIR with the boxes and predicted labels drawn")
    p.set_defaults(func=_run_predict)


def _export_members(args: argparse.Namespace) -> tuple[str, list[Path], Path] | ShippedModel | str:
    """What ``export`` writes: the shipped model, or (name, checkpoints, default output) of the
    ``--model`` names (models recorded in metrics.json) or checkpoint paths, several making an
    ensemble; or why not."""
    if not args.model:
        try:
            return shipped_model(args.data_root)
        except NoModelError as exc:
            return str(exc)
    checkpoints = []
    for raw in args.model:
        if raw.endswith(".safetensors") or Path(raw).is_file():
            checkpoints.append(Path(raw))
            continue
        from fer_pipeline.schema import MetricsReport
        from fer_pipeline.storage import StoreError, open_data_root

        try:
            paths = open_data_root(args.data_root, trees=("models_dir", "reports_dir"))
            report = MetricsReport.read(paths.metrics_json) if paths.metrics_json.is_file() else None
        except (StoreError, ValueError) as exc:
            return str(exc)
        recorded = report.checkpoints.get(raw) if report is not None else None
        if recorded is None:
            known = ", ".join(sorted(report.checkpoints)) if report is not None else "none (no metrics.json)"
            return f"--model {raw}: not a checkpoint file nor a model recorded in metrics.json (recorded: {known})"
        checkpoints.append(paths.resolve(recorded))
    name = args.name or "+".join(c.stem for c in checkpoints)
    return name, checkpoints, checkpoints[0].parent / f"{name}.onnx"


def _run_export(args: argparse.Namespace) -> int:
    members = _export_members(args)
    if isinstance(members, str):
        _write(sys.stderr, f"fer-pipeline export: {escape_text(members)}\n")
        return EXIT_USAGE
    if isinstance(members, ShippedModel):
        name, default_out = members.name, members.export_path
        models = _shipped_members(members)
        if isinstance(models, str):
            _write(sys.stderr, f"fer-pipeline export: {escape_text(models)}\n")
            return EXIT_USAGE
    else:
        name, checkpoints, default_out = members
        models = []
        for ckpt in checkpoints:
            if ckpt.suffix.lower() == ".onnx":
                _write(sys.stderr, f"fer-pipeline export: {escape_text(str(ckpt))} is already an export\n")
                return EXIT_USAGE
            loaded = _load_model(ckpt)
            if isinstance(loaded, str):
                _write(sys.stderr, f"fer-pipeline export: {escape_text(loaded)}\n")
                return EXIT_USAGE
            models.append(loaded)
    from fer_pipeline.ml.export import export_models

    out = Path(args.out) if args.out else default_out
    try:
        written = export_models(models, out, name=args.name or name)  # type: ignore[arg-type]
    except (OSError, RuntimeError, ValueError) as exc:
        _write(sys.stderr, f"fer-pipeline export: cannot export {escape_text(name)}: {escape_text(str(exc))}\n")
        return EXIT_USAGE
    kind = f"ensemble of {len(models)}" if len(models) > 1 else "model"
    _write(sys.stdout, f"{written}\n")
    _write(sys.stderr, f"fer-pipeline export: {kind} {escape_text(name)} written to {escape_text(str(written))} "
                       f"({written.stat().st_size:,} bytes)\n")
    return EXIT_OK


def add_export_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write the shipped model as ONNX for deployment",
        description="Write the shipped model (or --model ones; several make an ensemble) as one ONNX file: "
        "uint8 faces (N, H, W) in, calibrated probabilities out, with the preprocessing, class names, "
        "temperatures, data version, model names and framing in its metadata. Prints the file's path.")
    p.add_argument("--out", metavar="PATH", help="output file (default: <data root>/models/<name>.onnx)")
    p.add_argument("--model", metavar="NAME", action="append",
                   help="a model recorded in reports/metrics.json (cnn4, ...) or a checkpoint file; repeat for an "
                        "ensemble (the mean of the members' calibrated probabilities); default: the shipped model")
    p.add_argument("--name", default=None, help="the exported model's name (default: the model's, or the members' joined by +)")
    p.add_argument("--data-root", default=None, help="data root, a folder or s3://… URL (default: $FER_DATA_DIR or ./data)")
    p.set_defaults(func=_run_export)


def _run_graph(args: argparse.Namespace) -> int:
    from fer_pipeline.defs.refresh import main as refresh_main

    return refresh_main(args.rest, prog="fer-pipeline run")


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", add_help=False,
        help="bring the whole graph up to date through Dagster (what `make demo` runs; `run --help` for options)",
        description="Observe the sources, then run what Dagster reports missing or unsynced.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_graph)


def _run_outputs(args: argparse.Namespace) -> int:
    from fer_pipeline.outputs import main as outputs_main

    return outputs_main()


def add_outputs_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("outputs", help="print where the pipeline's outputs are, with counts",
                              description="Print where the pipeline's outputs are under the data root.")
    p.set_defaults(func=_run_outputs)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_predict_command, add_export_command,
                                                                 add_run_command, add_outputs_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer-pipeline", description="Facial emotion recognition pipeline tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status instead of exiting, so tests can call it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # every option after `run` is the runner's own (argparse's REMAINDER drops `--x` first)
        return _run_graph(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
