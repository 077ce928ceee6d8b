"""The benchmark tables in README.md and docs/benchmarks.md are generated from
benchmarks/results/*.json (scripts/benchmark_table.py) and in sync with them; a missing result
never shows a number, a GPU figure measured on the CPU is not re-measured, and values are the
recorded ones (not rounded toward a target). Fast: text only."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fer_pipeline_tests.conftest import REPO


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_table", REPO / "scripts" / "benchmark_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_table"] = module
    spec.loader.exec_module(module)
    return module


bt = _load()


def _tree(tmp_path: Path, results: dict[str, dict]) -> Path:
    """A copy of the files the script reads and writes, with ``results`` as the results files."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for rel in ("README.md", "docs/benchmarks.md", "pyproject.toml"):
        shutil.copy(REPO / rel, tmp_path / rel)
    for name, body in results.items():
        (tmp_path / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps(body))
    return tmp_path


def _result(figures: dict, **provenance: object) -> dict:
    return {"command": "python benchmarks/x.py", "commit": "0123456789abcdef", "working_tree_dirty": False,
            "date": "2026-12-07T10:00:00+00:00", "device": "cpu", "cpu_count": 2,
            "versions": {"torch": "2.14.1"}, "targets": {}, "figures": figures, **provenance}


def test_readme_and_docs_tables_are_in_sync_with_the_results_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert bt.main(["--check"]) == 0, capsys.readouterr().out + " (run make benchmark-table)"


def test_check_fails_when_a_table_is_edited_by_hand(tmp_path: Path) -> None:
    root = _tree(tmp_path, {})
    assert bt.main(["--root", str(root)]) == 0  # regenerate for the empty results folder
    assert bt.main(["--root", str(root), "--check"]) == 0
    docs = root / "docs" / "benchmarks.md"
    docs.write_text(docs.read_text().replace("**not measured at this commit**", "2.32×", 1))
    assert bt.main(["--root", str(root), "--check"]) == 1
    assert bt.main(["--root", str(root)]) == 0 and "2.32×" not in docs.read_text().split(bt.END)[0]


def test_a_missing_result_shows_no_number(tmp_path: Path) -> None:
    root = _tree(tmp_path, {})
    table = bt.render({}, readme=False, root=root)
    incremental = next(line for line in table.splitlines() if "incremental re-run" in line)
    assert bt.NOT_MEASURED in incremental and not any(ch.isdigit() for ch in incremental.split("|")[3])


def test_a_gpu_figure_measured_on_the_cpu_is_not_re_measured(tmp_path: Path) -> None:
    body = _result({"cnn4_default_images_per_s": 31234.6})
    table = bt.render({"train_throughput_cuda": body}, readme=True, root=_tree(tmp_path, {}))
    row = next(line for line in table.splitlines() if "one GPU" in line)
    assert bt.NOT_REMEASURED in row and "31,23" not in row and "torch 2.11.0" in row
    on_gpu = bt.render({"train_throughput_cuda": {**body, "device": "NVIDIA H100 80GB HBM3"}}, readme=True,
                       root=tmp_path)
    assert "31,235 images/s" in on_gpu and bt.NOT_REMEASURED not in on_gpu


def test_values_are_the_recorded_ones_with_commit_date_and_verdict(tmp_path: Path) -> None:
    body = _result({"extra_share_of_full": 0.04996, "full_seconds": 13.2, "no_change_seconds": 4.47,
                    "incremental_seconds": 4.84}, targets={"extra_share_of_full": "<= 0.0499"},
                   working_tree_dirty=True, versions={"torch": "2.11.0"})
    table = bt.render({"bench_incremental": body}, readme=False, root=_tree(tmp_path, {}))
    assert "| 0.04996 |" in table and "≤ 0.0499: **not met**" in table  # not rounded to 0.05, nor to the target
    assert "| 13.2 s |" in table and "`01234567` + uncommitted changes, 2026-12-07, cpu, 2 CPUs" in table
    assert "torch 2.11.0, not the pinned 2.14.1" in table


def test_a_results_file_without_a_spec_slots_in(tmp_path: Path) -> None:
    body = _result({"crops_seconds": 3.21, "nested": {"faces_per_s": 41.0}, "note": "text is skipped"})
    table = bt.render({"bench_new": body}, readme=False, root=_tree(tmp_path, {}))
    assert "`bench_new`" in table and "| crops_seconds | 3.21 |" in table and "| nested.faces_per_s | 41 |" in table


def test_a_spec_naming_an_absent_figure_is_an_error(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"bench_hostile_memory": _result({"peak_mb_without": 198.0})})
    assert bt.main(["--root", str(root), "--check"]) == 2


@pytest.mark.parametrize(("value", "shown"), [(0.7295, "0.7295"), (46890.0, "46,890"), (7.31, "7.31"),
                                              (0.064, "0.064"), (1228.6, "1,229"), (2000, "2,000"), (True, "yes")])
def test_format_keeps_at_most_four_significant_digits(value: object, shown: str) -> None:
    assert bt.fmt(value) == shown
