"""Where every benchmark figure lands: ``benchmarks/results/<name>.json``.

Each file carries the figures together with what is needed to trust or redo them: the exact
command, the commit (and whether the tree had uncommitted changes), package versions, device,
CPU count and date. The README/docs benchmark table is generated from these files by
``scripts/benchmark_table.py``; nothing is typed by hand.

    from benchmarks.record import write_result
    write_result("bench_faces", {"ratio": 1.83, ...}, targets={"ratio": ">= 1.8"})
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
PACKAGES = ("numpy", "pandas", "torch", "torchvision", "dagster", "onnxruntime", "pillow")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    """Installed versions of the packages a figure depends on ("not installed" where absent)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device() -> str:
    """The device the figures were measured on: the GPU's name, else "cpu"."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken torch install still lets CPU figures be recorded
        pass
    return "cpu"


def provenance(command: str | None = None) -> dict[str, Any]:
    """Command, commit, versions, device, CPU count and date of the run being recorded."""
    return {
        "command": command or " ".join(["python", *sys.argv]),
        "commit": _git("rev-parse", "HEAD"),
        # results files written by earlier benchmarks are not code: they do not make the tree dirty
        "working_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                        ":(exclude)benchmarks/results")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # a shared machine slows timings
        "platform": platform.platform(),
        "versions": versions(),
    }


def write_result(name: str, figures: dict[str, Any], *, targets: dict[str, Any] | None = None,
                 command: str | None = None, results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically (temp file, fsync, rename) and return its path."""
    out_dir = results_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    body = {"name": name, **provenance(command), "targets": targets or {}, "figures": figures}
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(body, indent=2, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
