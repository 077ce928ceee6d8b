"""``fer-pipeline`` command line: argparse subcommands, one ``add_*_command`` function each.

To add a subcommand (e.g. ``demo``), write ``add_demo_command(subparsers)`` that builds its
parser and sets ``func`` (a callable taking the parsed args and returning an exit status),
and append it to :data:`COMMANDS`. Heavy imports (torch) happen inside the handlers, so
``fer-pipeline --help`` stays fast.

Exit status: 0 success, 1 some inputs failed, 2 usage error or no model.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fer_pipeline.ml.predict import Prediction

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


def format_predictions(preds: Sequence[Prediction], fmt: str, classes: Sequence[str]) -> str:
    """Render predictions as an aligned table, CSV or JSON text."""
    if fmt == "json":
        return json.dumps([p.to_dict() for p in preds], indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["input", "prediction", *[f"p_{c}" for c in classes], "error"])
        for p in preds:
            probs = [f"{p.probabilities[c]:.6f}" for c in classes] if p.probabilities else [""] * len(classes)
            w.writerow([p.input, p.label or "", *probs, p.error or ""])
        return buf.getvalue()
    header = ["input", "prediction", *classes]
    rows = []
    for p in preds:
        if p.ok and p.probabilities:
            rows.append([p.input, p.label or "", *[f"{p.probabilities[c]:.3f}" for c in classes]])
        else:
            rows.append([p.input, f"ERROR: {p.error}"])
    # Error rows (input + message only) do not widen the prediction column.
    widths = [max(len(r[0]) for r in [header, *rows]), max(len(r[1]) for r in [header, *rows] if len(r) > 2)]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]) if len(r) > 2 else r[1]]
        cells += [v.rjust(max(len(c), 5)) for v, c in zip(r[2:], classes)]
        lines.append("  ".join(cells).rstrip())
    ok = sum(p.ok for p in preds)
    lines.append(f"\n{ok} of {len(preds)} inputs classified" + ("" if ok == len(preds) else f", {len(preds) - ok} failed"))
    return "\n".join(lines) + "\n"


def _run_predict(args: argparse.Namespace) -> int:
    try:
        model = Path(args.model) if args.model else default_model_path(args.data_root)
    except NoModelError as exc:
        print(f"fer-pipeline predict: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not model.is_file():
        print(f"fer-pipeline predict: model checkpoint not found: {model}", file=sys.stderr)
        return EXIT_USAGE

    from fer_pipeline.ml.checkpoint import load_checkpoint
    from fer_pipeline.ml.predict import predict_images

    try:
        loaded = load_checkpoint(model)
    except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint is a usage problem here
        print(f"fer-pipeline predict: cannot load model {model}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    preds = predict_images(args.paths, loaded)
    sys.stdout.write(format_predictions(preds, args.format, loaded.classes))
    for p in preds:
        if not p.ok and args.format != "table":
            print(f"error: {p.input}: {p.error}", file=sys.stderr)
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
