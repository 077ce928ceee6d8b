"""``fer-pipeline`` command line: argparse subcommands, one ``add_*_command`` function each.

To add a subcommand (e.g. ``demo``), write ``add_demo_command(subparsers)`` that builds its
parser and sets ``func`` (a callable taking the parsed args and returning an exit status),
and append it to :data:`COMMANDS`. Heavy imports (torch) happen inside the handlers, so
``fer-pipeline --help`` stays fast.

Exit status: 0 success, 1 some inputs failed, 2 usage error, no model or a broken model.
Whatever the inputs are (hostile names, FIFOs, loops, corrupt archives), each fault is one
error row and the output stays valid table / CSV / JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from fer_pipeline.dataset.source_readers import escape_char, escape_text

if TYPE_CHECKING:
    from fer_pipeline.ml.checkpoint import LoadedModel
    from fer_pipeline.ml.predict import Prediction

MAX_INPUT_BYTES = 64 * 1024 * 1024  # = fer_pipeline.ml.predict.MAX_INPUT_BYTES (not imported: --help stays fast)

EXIT_OK, EXIT_INPUT_FAILED, EXIT_USAGE = 0, 1, 2


class NoModelError(RuntimeError):
    """No checkpoint was given and none is recorded as the best model."""


def default_model_path(data_root: Path | None = None) -> Path:
    """The best model recorded in ``<data root>/reports/metrics.json``
    (:class:`fer_pipeline.schema.MetricsReport`): its recorded checkpoint (relative paths are
    under the data root), else ``models/<best_model>.safetensors``."""
    from fer_pipeline.paths import DataPaths, default_data_root
    from fer_pipeline.schema import MetricsReport

    paths = DataPaths(Path(data_root) if data_root else default_data_root())
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


def _unicode_safe(text: str) -> str:
    """Lone surrogates (non-UTF-8 file name bytes) as ``\\xNN``: they cannot be encoded as text."""
    return "".join(escape_char(c) if "\ud800" <= c <= "\udfff" else c for c in text)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_row(p: Prediction) -> dict[str, object]:
    probs = {_unicode_safe(c): _finite_or_none(v) for c, v in p.probabilities.items()} if p.probabilities else None
    return {"input": _unicode_safe(p.input), "label": _unicode_safe(p.label) if p.label is not None else None,
            "probabilities": probs, "error": _unicode_safe(p.error) if p.error is not None else None}


def _format_json(preds: Sequence[Prediction]) -> str:
    return json.dumps([_json_row(p) for p in preds], indent=2, allow_nan=False) + "\n"


def _format_csv(preds: Sequence[Prediction], classes: Sequence[str]) -> str:
    """RFC 4180 quoting; the csv module leaves a field with a bare CR unquoted when lines end
    in LF, so a row holding one is written fully quoted."""
    buf = io.StringIO()
    minimal = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    rows = [["input", "prediction", *[f"p_{c}" for c in classes], "error"]]
    for p in preds:
        probs = [_csv_number(p.probabilities[c]) for c in classes] if p.probabilities else [""] * len(classes)
        rows.append([p.input, p.label or "", *probs, p.error or ""])
    for row in rows:
        row = [_unicode_safe(v) for v in row]
        (quoted if any("\r" in v for v in row) else minimal).writerow(row)
    return buf.getvalue()


def _csv_number(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else ""


def _format_table(preds: Sequence[Prediction], classes: Sequence[str]) -> str:
    """Aligned text for people: one line per input, whatever its name holds."""
    names = [escape_text(c) for c in classes]
    header = ["input", "prediction", *names]
    rows = []
    for p in preds:
        if p.ok and p.probabilities:
            probs = [f"{p.probabilities[c]:.3f}" for c in classes]
            rows.append([escape_text(p.input), escape_text(p.label or ""), *probs])
        else:
            rows.append([escape_text(p.input), f"ERROR: {escape_text(str(p.error))}"])
    # Error rows (input + message only) do not widen the prediction column.
    widths = [max(len(r[0]) for r in [header, *rows]), max(len(r[1]) for r in [header, *rows] if len(r) > 2)]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]) if len(r) > 2 else r[1]]
        cells += [v.rjust(max(len(c), 5)) for v, c in zip(r[2:], names)]
        lines.append("  ".join(cells).rstrip())
    ok = sum(p.ok for p in preds)
    lines.append(f"\n{ok} of {len(preds)} inputs classified" + ("" if ok == len(preds) else f", {len(preds) - ok} failed"))
    return "\n".join(lines) + "\n"


def format_predictions(preds: Sequence[Prediction], fmt: str, classes: Sequence[str]) -> str:
    """Render predictions as an aligned table, CSV or JSON text.

    Every format stays valid whatever the inputs are called: the table escapes control
    characters, CSV quotes, JSON escapes and never holds NaN/Infinity; file-name bytes that are
    not UTF-8 become ``\\xNN`` in all three."""
    if fmt == "json":
        return _format_json(preds)
    if fmt == "csv":
        return _format_csv(preds, classes)
    return _format_table(preds, classes)


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


def _load_model(model: Path) -> LoadedModel | str:
    """The checkpoint, or why it cannot be used (missing, not a file, unreadable, broken)."""
    from fer_pipeline.ml.checkpoint import load_checkpoint

    if not model.exists():
        return f"model checkpoint not found: {model}"
    if not model.is_file():
        return f"model checkpoint is not a regular file: {model}"
    try:
        return load_checkpoint(model)
    except Exception as exc:  # noqa: BLE001 -- any unreadable or broken checkpoint is a usage problem here
        return f"cannot load model {model}: {exc}"


def _run_predict(args: argparse.Namespace) -> int:
    try:
        model = Path(args.model) if args.model else default_model_path(args.data_root)
    except NoModelError as exc:
        print(f"fer-pipeline predict: {exc}", file=sys.stderr)
        return EXIT_USAGE
    loaded = _load_model(model)
    if isinstance(loaded, str):
        _write(sys.stderr, f"fer-pipeline predict: {escape_text(loaded)}\n")
        return EXIT_USAGE

    from fer_pipeline.ml.predict import predict_images

    preds = predict_images(args.paths, loaded, max_bytes=args.max_bytes)
    _write(sys.stdout, format_predictions(preds, args.format, loaded.classes))
    for p in preds:
        if not p.ok and args.format != "table":
            _write(sys.stderr, f"error: {escape_text(p.input)}: {escape_text(str(p.error))}\n")
    return EXIT_OK if all(p.ok for p in preds) else EXIT_INPUT_FAILED


def add_predict_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify face images, folders or .zip archives",
        description="Classify face images (files, folders searched recursively, .zip archives) "
        "into Neutral / Focused / Tired / Angry with a trained checkpoint.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or .zip archive")
    p.add_argument("--model", metavar="CKPT", help="checkpoint (.safetensors); default: best model in reports/metrics.json")
    p.add_argument("--data-root", type=Path, default=None, help="data root (default: $FER_DATA_DIR or ./data)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-bytes", type=_positive_int, default=MAX_INPUT_BYTES, metavar="N",
                   help="skip (and report) any file or zip entry larger than N bytes "
                        f"(default {MAX_INPUT_BYTES}: {MAX_INPUT_BYTES >> 20} MiB)")
    p.set_defaults(func=_run_predict)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_predict_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer-pipeline", description="Facial emotion recognition pipeline tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status instead of exiting, so tests can call it."""
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
