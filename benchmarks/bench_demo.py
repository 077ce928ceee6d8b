"""Benchmark: `make demo` from a fresh clone of this commit (venv + install + the whole graph).

    .venv/bin/python benchmarks/bench_demo.py [--keep DIR]

Clones the repository's HEAD (committed files only) into a temporary folder, then times
`make setup` (create the venv, install everything) and `make demo` (now only
`fer-pipeline run --settings configs/demo.yaml` and the outputs listing), and a second
`make demo` (observation only: nothing is out of date). Records the best model of the run and
its test macro-F1 on the synthetic demo data (numbers on drawn faces say nothing about real
ones). Needs network access for pip. Results: ``benchmarks/results/bench_demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.record import write_result  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    """Run ``cmd`` in ``cwd`` (output streamed), fail loudly, return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, env={**os.environ, "DAGSTER_HOME": str(cwd / "dagster_home")})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_demo."))
    clone = work / "fer-pipeline"
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        setup = timed(["make", "setup"], clone)
        run = timed(["make", "demo"], clone)
        again = timed(["make", "demo"], clone)
        metrics = json.loads((clone / "data" / "reports" / "metrics.json").read_text(encoding="utf-8"))
        best = str(metrics["best_model"])
        figures = {"setup_seconds": round(setup, 1), "demo_seconds": round(run, 1),
                   "total_seconds": round(setup + run, 1), "second_demo_seconds": round(again, 1),
                   "best_model": best, "best_test_macro_f1": metrics["models"][best]["macro_f1"],
                   "load_average_after": round(os.getloadavg()[0], 2)}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    print(f"wrote {write_result('bench_demo', figures)}")


if __name__ == "__main__":
    main()
