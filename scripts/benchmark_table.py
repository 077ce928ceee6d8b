"""Generate the benchmark tables in README.md and docs/benchmarks.md from benchmarks/results/*.json.

    .venv/bin/python scripts/benchmark_table.py           # rewrite the tables (make benchmark-table)
    .venv/bin/python scripts/benchmark_table.py --check   # exit 1 when a table is out of sync

Why: a figure typed into the README drifts from what the code does, gets rounded toward its
target and outlives the torch it was measured with. Here every figure is printed from the file
a benchmark wrote (``benchmarks/record.py``), with that run's command, commit, date and device,
to 4 significant digits of the recorded value, and a target's verdict is computed on the
recorded value itself. A benchmark whose file is missing says "not measured at this commit";
a GPU benchmark without a GPU measurement says "not re-measured at this commit".

The tables sit between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``. What they
show is :data:`BENCHMARKS`, one entry per results file; a results file with no entry still gets
rows (every scalar figure it records), so a new benchmark slots in before anyone writes its spec.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
NOT_MEASURED = "not measured at this commit"
NOT_REMEASURED = "not re-measured at this commit"
SIGNIFICANT = 4
AUTO_ROWS = 12  # at most this many rows for a results file without a spec
PROVENANCE = {"name", "command", "commit", "working_tree_dirty", "date", "device", "cpu_count", "platform",
              "versions", "targets", "load_average"}


@dataclass(frozen=True)
class Figure:
    """One number of a results file: ``path`` into its figures (dots; list items by index)."""

    path: str
    label: str
    unit: str = ""
    target: str | None = None  # "<= 20", ">= 0.75"; default: the results file's own target for the path


@dataclass(frozen=True)
class Benchmark:
    """One results file (``benchmarks/results/<result>.json``) and the figures to show from it."""

    result: str
    what: str
    command: str  # how to produce the file (the file's own command is shown once it exists)
    figures: tuple[Figure, ...] = ()  # empty: every scalar figure the file records
    gpu: bool = False  # measured on a GPU: a CPU-only file does not count as a measurement
    readme: bool = False  # also in the README's short table
    history: str = ""  # GPU only: the last hand-recorded measurement (with its torch), shown while not re-measured


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("bench_demo", "`make demo` from a fresh clone (venv + install, then the whole graph on the "
              "synthetic data)", ".venv/bin/python benchmarks/bench_demo.py",
              (Figure("total_seconds", "setup + first run", "s"), Figure("setup_seconds", "venv + install", "s"),
               Figure("demo_seconds", "`fer-pipeline run` (the whole graph)", "s"),
               Figure("second_demo_seconds", "second `make demo` (nothing out of date)", "s"),
               Figure("best_test_macro_f1", "best model's test macro-F1 on the synthetic faces")),
              readme=True),
    Benchmark("train_affectnet", "the shipped model on `affectnet-4class.zip` (48×48, the benchmark's split)",
              ".venv/bin/python benchmarks/train_affectnet.py",
              (Figure("rows.shipped.test_macro_f1_mean", "shipped model: test macro-F1, mean of 3 seeds", "",
                      ">= 0.75"),
               Figure("rows.shipped.test_macro_f1_std", "shipped model: sample std over the seeds", "", "<= 0.015"),
               Figure("rows.shipped.kinds", "shipped model per seed (validation's choice)"),
               Figure("rows.shipped.test_accuracy_mean", "shipped model: test accuracy, mean"),
               Figure("rows.single.test_macro_f1_mean", "single fine-tuned model: test macro-F1, mean"),
               Figure("rows.single.test_macro_f1_std", "single fine-tuned model: std"),
               Figure("rows.fold_ensemble.test_macro_f1_mean", "fold ensemble: test macro-F1, mean"),
               Figure("rows.fold_ensemble.test_macro_f1_std", "fold ensemble: std"),
               Figure("rows.scratch.test_macro_f1_mean", "from scratch (no pretraining): test macro-F1, mean"),
               Figure("rows.scratch.test_macro_f1_std", "from scratch: std"),
               Figure("recipe_chosen_by_validation.pool_images", "pretraining recipe chosen on validation: pool "
                      "images"),
               Figure("recipe_chosen_by_validation.pretrain_epochs", "pretraining recipe chosen on validation: "
                      "epochs"),
               Figure("minutes", "wall time of the run", "min")),
              readme=True),
    Benchmark("bench_predict", "`fer-pipeline predict` end to end on 2 cores, start-up included (a fresh "
              "interpreter per run; the shipped model from its checkpoint and its ONNX export)",
              ".venv/bin/python benchmarks/bench_predict.py",
              (Figure("crops_best_s", "2,000 face crops, the faster engine", "s", "<= 4"),
               Figure("crops_onnx.seconds_median", "2,000 face crops, onnxruntime", "s"),
               Figure("crops_torch.seconds_median", "2,000 face crops, PyTorch", "s"),
               Figure("photos_onnx.faces_per_s", "100 scenes with detection, onnxruntime", "faces/s"),
               Figure("photos_torch.faces_per_s", "100 scenes with detection, PyTorch", "faces/s"),
               Figure("crops_onnx.stages_s.inference", "crops on onnxruntime: inference", "s"),
               Figure("crops_onnx.stages_s.decode", "crops on onnxruntime: header + decode", "s"),
               Figure("crops_torch.stages_s.import", "crops on PyTorch: imports", "s"),
               Figure("crops_torch.stages_s.inference", "crops on PyTorch: inference", "s"),
               Figure("photos_onnx.stages_s.detection", "scenes: detection (decode, detector, align)", "s"),
               Figure("photos_onnx.stages_s.detector load", "scenes: loading the (PyTorch) detector", "s"),
               Figure("load_average_at_start.0", "load average at the start (shared machine)")),
              readme=True),
    Benchmark("bench_view_duplicates", "re-cropped copies pHash misses (issue 20): the de-duplication's multi-view "
              "descriptor and margin test (`fer_pipeline/dedup/views.py`) on AffectNet, 200 planted copies per "
              "half, rule chosen on the calibration half", "PYTHONPATH=. .venv/bin/python "
              "benchmarks/bench_view_duplicates.py",
              (Figure("view_recall", "planted copies found (evaluation half)", "", ">= 0.9"),
               Figure("view_false_pair_rate", "pairs among distinct faces, per face (AffectNet's own re-crops "
                      "count as false; listed in the file)", "", "<= 0.01"),
               Figure("phash_recall", "pHash rule on the same copies"),
               Figure("margin_threshold", "rule chosen on the calibration half: margin"),
               Figure("similarity_floor", "rule chosen on the calibration half: similarity floor"),
               Figure("default_rule_is_calibrated", "the pipeline's defaults are that rule"),
               Figure("hnsw_view_recall", "recall through the HNSW index (used above 20,000 faces)"),
               Figure("similarity_only_recall", "similarity threshold alone: recall"),
               Figure("similarity_only_false_pair_rate", "similarity threshold alone: false pairs per face"),
               Figure("outside_views_view_recall", "copies beyond the views (shift 12 %, scale 0.85, 8°): recall"),
               Figure("outside_views_view_false_pair_rate", "copies beyond the views: false pairs per face"))),
    Benchmark("bench_bad_faces", "non-faces and damaged faces planted among 2,362 real AffectNet faces (issue 20): "
              "what the quality flags, the backbone-embedding outliers and the face check catch, and the real faces they "
              "flag",
              "PYTHONPATH=. .venv/bin/python benchmarks/bench_bad_faces.py",
              (Figure("flags_non_faces_caught", "quality flags: non-faces caught (of 50)"),
               Figure("flags_caught_clutter", "quality flags: clutter crops"),
               Figure("flags_caught_scrambled", "quality flags: scrambled faces"),
               Figure("flags_damaged_caught", "quality flags: damaged faces caught (of 50)"),
               Figure("flags_caught_blurred", "quality flags: blurred"),
               Figure("flags_caught_dark", "quality flags: under-exposed"),
               Figure("flags_caught_over_exposed", "quality flags: over-exposed"),
               Figure("flags_caught_noisy", "quality flags: sensor noise"),
               Figure("flags_caught_half_lost", "quality flags: half the picture lost"),
               Figure("flags_real_flagged_share", "quality flags: share of real faces flagged"),
               Figure("outliers_non_faces_caught", "embedding outliers: non-faces caught (of 50)"),
               Figure("outliers_damaged_caught", "embedding outliers: damaged faces caught (of 50)"),
               Figure("outliers_real_flagged_share", "embedding outliers: share of real faces flagged"),
               Figure("non_faces_in_top_100_by_distance", "non-faces among the 100 most atypical by embedding"),
               Figure("either_non_faces_caught", "flags or outliers: non-faces caught (of 50)"),
               Figure("either_damaged_caught", "flags or outliers: damaged faces caught (of 50)"),
               Figure("detector_80_non_faces_caught", "no_face flag (face_check: MTCNN finds no face scoring 0.8 "
                      "in the upscaled crop): non-faces caught (of 50)"),
               Figure("detector_80_damaged_caught", "the same: damaged faces caught (of 50)"),
               Figure("detector_80_real_flagged_share", "the same: share of real faces flagged"),
               Figure("detector_60_real_flagged_share", "the same at score 0.6: share of real faces flagged"),
               Figure("detector_60_non_faces_caught", "the same at score 0.6: non-faces caught (of 50)"),
               Figure("detector_ms_per_face", "the same: time per face, one thread", "ms"),
               Figure("pool_images", "backbone: FER2013 pool images"),
               Figure("pretrain_epochs", "backbone: epochs"))),
    Benchmark("train_throughput_cuda", "training throughput of the main model on one GPU (`train_model`, batch 64, "
              "default mode: deterministic, bf16, CUDA graphs)", ".venv/bin/python benchmarks/train_throughput.py "
              "--device cuda",
              (Figure("cnn4_default_images_per_s", "training images/s, default mode", "images/s"),),
              gpu=True, readme=True,
              history="46,890 images/s on one H100 with torch 2.11.0, 2026-11-26, `benchmarks/GPU_NOTES.md`"),
    Benchmark("train_throughput_cpu", "training throughput of the main model on the CPU (`train_model`, batch 64)",
              ".venv/bin/python benchmarks/train_throughput.py --device cpu --threads 1 2",
              (Figure("cnn4_threads_1_images_per_s", "1 thread", "images/s"),
               Figure("cnn4_threads_2_images_per_s", "2 threads", "images/s"))),
    Benchmark("bench_faces", "faces + de-duplication over FER2013 (40,263 images) vs a single-core "
              "decode + resize + pHash floor, pairs measured in one run", "PYTHONPATH=. .venv/bin/python "
              "benchmarks/bench_faces.py --repeat 3",
              (Figure("ratio_median", "pipeline (faces + exact/pHash de-duplication) / floor, median of the pairs",
                      target=">= 1.8"),
               Figure("ratio_with_views_median", "the same with the re-cropped-copy search (on by default)"),
               Figure("views_s_median", "the re-cropped-copy search alone", "s"),
               Figure("ratios.0", "pair 1"), Figure("ratios.1", "pair 2"), Figure("ratios.2", "pair 3"),
               Figure("runs.0.pipeline_images_per_s", "pipeline, pair 1", "images/s"),
               Figure("runs.0.floor_images_per_s", "floor, pair 1", "images/s"),
               Figure("peak_parent_mb", "peak RSS, parent", "MB")), readme=True),
    Benchmark("bench_faces_memory", "peak memory of the faces stage (parent + workers): 10,000 JPEGs of ~2 MB "
              "vs 10,000 of ~20 KB", "PYTHONPATH=. .venv/bin/python benchmarks/bench_faces_memory.py",
              (Figure("ratio", "big / small", target="<= 1.3"),
               Figure("big.peak_sum_mb", "~2 MB files", "MB"), Figure("small.peak_sum_mb", "~20 KB files", "MB"),
               Figure("big.peak_bytes_in_flight", "bytes in flight, ~2 MB files", "B"),
               Figure("budget_bytes", "max_bytes_in_flight", "B")), readme=True),
    Benchmark("bench_incremental", "incremental re-run of the data assets on FER2013 after +400 images",
              ".venv/bin/python benchmarks/bench_incremental.py --wait-idle 600",
              (Figure("full_seconds", "full materialization", "s"),
               Figure("no_change_seconds", "no-change re-run (fixed overhead)", "s"),
               Figure("incremental_seconds", "+400 images", "s"),
               Figure("extra_share_of_full", "extra cost of the new images / full run"))),
    Benchmark("bench_hostile_memory", "peak memory of inventory + faces with and without a 1 GiB zero-filled zip "
              "entry (3,000 synthetic faces)", ".venv/bin/python benchmarks/bench_hostile_memory.py --uncapped",
              (Figure("peak_mb_without", "peak RSS without the entry", "MB"),
               Figure("peak_mb_with", "peak RSS with it", "MB"),
               Figure("with_over_without", "with / without"),
               Figure("peak_mb_uncapped", "with it and the size cap lifted", "MB"))),
    Benchmark("bench_dedup_scale", "de-duplication at scale: `near_pairs` over 1,000,000 hashes; N near-identical "
              "frames (a static camera) vs N distinct faces through the `deduplicated_faces` stage (face store, "
              "grouping, cache and table writes), also with 2 % outsiders and a next day's 10 % new frames",
              ".venv/bin/python benchmarks/bench_dedup_scale.py",
              (Figure("near_pairs.seconds", "`near_pairs`, 1,000,000 hashes", "s", "<= 20"),
               Figure("dedup.0.dense.stage.seconds", "2,000 near-identical frames", "s"),
               Figure("dedup.0.distinct.stage.seconds", "2,000 distinct faces", "s"),
               Figure("dedup.0.dense_over_distinct_stage", "near-identical / distinct, N = 2,000", "", "<= 1.5"),
               Figure("dedup.1.dense.stage.seconds", "20,000 near-identical frames", "s"),
               Figure("dedup.1.distinct.stage.seconds", "20,000 distinct faces", "s"),
               Figure("dedup.1.dense_over_distinct_stage", "near-identical / distinct, N = 20,000", "", "<= 1.5"),
               Figure("dedup.1.dense_over_distinct_grouping", "grouping alone (pixels in memory), N = 20,000", ""),
               Figure("dedup.1.dense_outsiders.stage.seconds", "20,000 frames, 2 % outsiders", "s"),
               Figure("dedup.1.dense_next_day.stage.seconds", "next day: 2,000 new frames vs 18,000 cached", "s")), readme=True),
    Benchmark("bench_cv_distributed", "10 cross-validation folds of the main model (3 epochs each): in one process "
              "vs the Dask executor with 2 single-thread workers", ".venv/bin/python benchmarks/bench_cv_distributed.py "
              "--folds 10 --epochs 3 --workers 2 --estimate-workers 4",
              (Figure("in_process_seconds", "in-process", "s"), Figure("dask_seconds", "Dask, 2 workers", "s"),
               Figure("estimate_seconds", "estimate for 4 workers", "s"))),
    Benchmark("bench_detect", "face detection speed (detect + align + preprocess) on real AffectNet faces in "
              "640×480 clutter", ".venv/bin/python benchmarks/bench_detect.py",
              (Figure("detect_1_threads.ms_per_image", "per canvas, 1 thread", "ms"),
               Figure("detect_2_threads.ms_per_image", "per canvas, 2 threads", "ms"),
               Figure("detect_2_threads.faces_per_s", "2 threads", "faces/s"),
               Figure("decode_crops.faces_per_s", "`decode_face` on 96 px crops (no detection)", "faces/s"))),
)

COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


class SpecError(ValueError):
    """A spec names a figure its results file does not record."""


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` in ``results_dir`` by name (a file that is not a JSON object is an error)."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        body = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(body, dict):
            raise SpecError(f"{path}: not a JSON object")
        out[path.stem] = body
    return out


def figures_of(body: dict[str, Any]) -> dict[str, Any]:
    """The figures of a results file (files written before ``record.py`` keep them at the top level)."""
    if isinstance(body.get("figures"), dict):
        return body["figures"]
    return {k: v for k, v in body.items() if k not in PROVENANCE}


def lookup(figures: Any, path: str) -> Any:
    """The value at a dotted ``path`` (a list item by its index); KeyError when it is not there."""
    value = figures
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(path)
    return value


def scalar_paths(figures: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the numbers (not inside lists) in ``figures``, in file order."""
    out: list[str] = []
    if isinstance(figures, dict):
        for key, value in figures.items():
            out += scalar_paths(value, f"{prefix}{key}.")
    elif isinstance(figures, (int, float)) and not isinstance(figures, bool):
        out.append(prefix[:-1])
    return out


def fmt(value: Any) -> str:
    """The recorded value to :data:`SIGNIFICANT` significant digits (integers whole), nothing else."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        decimals = max(0, SIGNIFICANT - 1 - math.floor(math.log10(abs(value))))
        text = f"{value:,.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text  # no digits the run did not record
    return str(value)


def verdict(value: Any, target: str | None) -> str:
    """The target and whether the recorded value (unrounded) meets it: ``≤ 20: met``."""
    if not target:
        return ""
    m = re.fullmatch(r"\s*(<=|>=|<|>|==)\s*([-+0-9.eE]+)\s*", target)
    if not m or not isinstance(value, (int, float)):
        return target
    met = COMPARE[m.group(1)](float(value), float(m.group(2)))
    sign = {"<=": "≤", ">=": "≥"}.get(m.group(1), m.group(1))
    return f"{sign} {m.group(2)}: {'met' if met else '**not met**'}"


def file_target(body: dict[str, Any], path: str) -> str | None:
    """The results file's target for ``path`` (list indices ignored: ``dedup.0.x`` reads ``dedup.x``)."""
    targets = body.get("targets") or {}
    generic = ".".join(p for p in path.split(".") if not p.isdigit())
    target = targets.get(path, targets.get(generic))
    return None if target is None else str(target)


def pinned(package: str, root: Path) -> str | None:
    """The version ``pyproject.toml`` pins for ``package`` (``name==X``), if any."""
    try:
        deps = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    for dep in deps:
        name, _, version = dep.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    return None


def measured(body: dict[str, Any], torch_pin: str | None) -> str:
    """Commit, date, device and CPUs of a measurement, and its torch when it is not the pinned one."""
    commit = str(body.get("commit") or "unknown")[:8]
    dirty = " + uncommitted changes" if body.get("working_tree_dirty") else ""
    date = str(body.get("date") or "undated")[:10]
    device = body.get("device") or "device not recorded"
    cpus = body.get("cpu_count")
    torch = (body.get("versions") or {}).get("torch")
    note = f"; torch {torch}, not the pinned {torch_pin}" if torch and torch_pin and torch != torch_pin else ""
    return f"`{commit}`{dirty}, {date}, {device}{f', {cpus} CPUs' if cpus else ''}{note}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def benchmark_rows(spec: Benchmark, body: dict[str, Any] | None, torch_pin: str | None,
                   compact: bool) -> list[list[str]]:
    """Table rows for one benchmark: one per figure, or one saying it was not (re-)measured."""
    gpu_missing = spec.gpu and (body is None or str(body.get("device", "cpu")).lower() == "cpu")
    if body is None or gpu_missing:
        status = NOT_REMEASURED if spec.gpu else NOT_MEASURED
        pin = f"; the project pins torch {torch_pin}" if torch_pin else ""
        history = f" (last hand-recorded, no results file: {spec.history}{pin})" if spec.gpu and spec.history else ""
        text = f"**{status}**{history}"
        row = [spec.what, "", text, ""] if compact else [spec.what, "", text, "", f"`{spec.command}`"]
        return [row]
    figures = figures_of(body)
    wanted = spec.figures or tuple(Figure(p, p) for p in scalar_paths(figures)[:AUTO_ROWS])
    if compact:  # the README: the figures with a target, else the first one
        wanted = tuple(f for f in wanted if f.target) or wanted[:1]
    rows = []
    for i, fig in enumerate(wanted):
        try:
            value = lookup(figures, fig.path)
        except KeyError:
            raise SpecError(f"benchmarks/results/{spec.result}.json records no figure {fig.path!r}") from None
        shown = f"{fmt(value)} {fig.unit}".strip()
        target = verdict(value, fig.target or file_target(body, fig.path))
        first = i == 0
        what = spec.what if first else ""
        if compact:
            rows.append([what, fig.label, shown, measured(body, torch_pin) if first else ""])
        else:
            how = f"`{body.get('command') or spec.command}`; {measured(body, torch_pin)}" if first else ""
            rows.append([what, fig.label, shown, target, how])
    return rows


def render(results: dict[str, dict[str, Any]], *, readme: bool, root: Path,
           specs: Sequence[Benchmark] = BENCHMARKS) -> str:
    """The markdown table: the README's short one (``readme``) or the documentation's full one."""
    torch_pin = pinned("torch", root)
    known = {s.result for s in specs}
    extra = [Benchmark(name, f"`{name}` (no spec yet: every scalar figure)", str(body.get("command", "")))
             for name, body in results.items() if name not in known and not name.endswith("_quick")]
    chosen = [s for s in specs if s.readme] if readme else [*specs, *extra]
    if readme:
        head = ["benchmark", "figure", "value", "measured (commit, date, device)"]
    else:
        head = ["benchmark", "figure", "value", "target", "command; measured (commit, date, device)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in chosen:
        for row in benchmark_rows(spec, results.get(spec.result), torch_pin, compact=readme):
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines)


def splice(text: str, table: str, name: str) -> str:
    """``text`` with the block between the markers replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SpecError(f"{name}: no {BEGIN} ... {END} block")
    note = "<!-- generated by scripts/benchmark_table.py from benchmarks/results/*.json: do not edit -->"
    return f"{text[:start]}{BEGIN}\n{note}\n\n{table}\n\n{text[end:]}"


def targets(root: Path) -> dict[Path, bool]:
    """The files holding a table, and whether theirs is the README's short one."""
    return {root / "README.md": True, root / "docs" / "benchmarks.md": False}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a table differs from the results files")
    ap.add_argument("--root", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        results = load_results(args.root / "benchmarks" / "results")
        stale = []
        for path, readme in targets(args.root).items():
            text = path.read_text(encoding="utf-8")
            new = splice(text, render(results, readme=readme, root=args.root), path.name)
            if new != text:
                stale.append(path)
                if not args.check:
                    path.write_text(new, encoding="utf-8")
    except (SpecError, OSError, json.JSONDecodeError) as exc:
        print(f"benchmark_table: {exc}", file=sys.stderr)
        return 2
    for path in stale:
        rel = path.relative_to(args.root)
        print(f"{rel}: {'out of sync with benchmarks/results (run make benchmark-table)' if args.check else 'updated'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
