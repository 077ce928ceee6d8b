"""Benchmark: the cross-validation folds of the main model as ``cv_fold`` partitions, one run per
fold, in one process vs through the Dask executor with two workers on this machine, and what a
four-worker deployment would take.

    .venv/bin/python benchmarks/bench_cv_distributed.py [--folds 10] [--epochs 3] [--workers 2]
        [--estimate-workers 4] [--zip ../shared/datasets/affectnet-4class.zip] [--keep DIR]

Steps, against a temporary data root (the archive as an image-folders source) and a temporary
SQLite Dagster instance:

1. the data half once (``data_pipeline`` job), so both modes train on the same published splits;
2. in-process: ``FER_EXECUTOR`` unset, the fold runs one after the other in this process
   (``fer_pipeline.defs.refresh.run_partitions``, concurrency 1; torch uses its default threads);
3. Dask: ``dask scheduler`` and ``--workers`` ``dask worker`` processes (one process, one thread
   each) on loopback, ``FER_EXECUTOR=dask``, the code location imported in each worker before
   the clock starts (a deployment's workers are up before runs come); the fold runs are launched
   ``--workers`` at a time, each from its own process, and each run's one step trains on a worker;
4. the estimate for ``--estimate-workers`` workers: the per-fold step times measured on the
   workers in step 3 (one thread each), scheduled longest-first onto that many workers (the
   makespan), plus the overhead step 3 paid beyond its own makespan of those times (launching
   processes starting, runs setting up), taken to be the same with more workers.

Prints a summary table (wall time per mode, folds/minute), the per-fold table (run and training
seconds in each mode, the worker that ran it) and the load other processes put on the machine
(measured just before each mode: figures are only comparable on a quiet machine). Demo budgets (``--epochs 3``) are enough: the
point is the scheduling, not the scores.
"""

from __future__ import annotations

import argparse
import heapq
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

import yaml

from benchmarks.record import write_result

SHARED = REPO.parent / "shared" / "datasets"
AFFECTNET = {"Anger": "Angry", "Bored_Tired": "Tired", "Focused_Engaged": "Focused", "Neutral": "Neutral"}
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def run_config(epochs: int) -> dict:
    return {**QUIET, "resources": {"training": {"config": {"epochs": epochs, "patience": epochs}},
                                   "analysis": {"config": {"cv_epochs": epochs}}}}


def lpt_makespan(times: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of independent jobs onto ``workers``: its makespan."""
    loads = [0.0] * max(1, workers)
    heapq.heapify(loads)
    for t in sorted(times, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + t)
    return max(loads)


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)) / os.sysconf("SC_CLK_TCK")


def background_load(seconds: float = 3.0) -> float:
    """Cores other processes keep busy while this benchmark waits: measured just before a mode."""
    before = _busy_seconds()
    time.sleep(seconds)
    return (_busy_seconds() - before) / seconds


def _warm_up() -> bool:
    """Run in each Dask worker before measuring: import the code location (torch, Dagster, GX)."""
    import fer_pipeline.definitions  # noqa: F401

    return True


def fold_details(run_ids: dict[str, str]) -> dict[str, dict[str, float | int | None]]:
    """Per partition: the step's seconds (start to success), its training seconds and the PID
    that ran it, from the instance."""
    import dagster as dg

    out: dict[str, dict[str, float | int | None]] = {}
    with dg.DagsterInstance.get() as instance:
        for key, run_id in run_ids.items():
            logs = instance.all_logs(run_id)
            start = next(e for e in logs if e.dagster_event and e.dagster_event.event_type_value == "STEP_START")
            done = next((e for e in logs if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS"),
                        None)
            mat = next((e.asset_materialization for e in logs if e.asset_materialization), None)
            train = mat.metadata.get("train_seconds") if mat else None
            out[key] = {"step_s": (done.timestamp - start.timestamp) if done else None,
                        "train_s": float(train.value) if train is not None else None,
                        "pid": start.dagster_event.pid}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="max epochs per fold (demo budget)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers (one thread each)")
    parser.add_argument("--estimate-workers", type=int, default=4)
    parser.add_argument("--zip", type=Path, default=SHARED / "affectnet-4class.zip")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    if not args.zip.is_file():
        print(f"dataset {args.zip} not found", file=sys.stderr)
        return 2

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_cv_"))
    data, home = work / "data", work / "dagster_home"
    for p in (data / "raw", home):
        p.mkdir(parents=True, exist_ok=True)
    link = data / "raw" / args.zip.name
    if not link.exists():
        link.symlink_to(args.zip.resolve())
    (data / "sources.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "affectnet4", "kind": "image_folders", "path": f"raw/{args.zip.name}", "label_map": AFFECTNET}]}))
    (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    os.environ.update({"FER_DATA_DIR": str(data), "DAGSTER_HOME": str(home), "FER_CV_FOLDS": str(args.folds),
                       "FER_EXECUTOR": "in_process", "DASK_DISTRIBUTED__WORKER__DAEMON": "False"})

    from fer_pipeline.defs.jobs import CV_FOLDS_JOB, DATA_JOB
    from fer_pipeline.defs.refresh import execute, run_partitions
    from fer_pipeline_tests.servers import LOOPBACK, free_port, start_server

    config = run_config(args.epochs)
    keys = [str(k) for k in range(args.folds)]
    print(f"work folder {work}; {args.folds} folds x {args.epochs} epochs of the main model on {args.zip.name}")
    t0 = time.perf_counter()
    prep = execute(DATA_JOB, None, None, QUIET)
    if not prep.ok:
        print(f"data half failed: {prep.note}", file=sys.stderr)
        return 1
    print(f"data half: {time.perf_counter() - t0:.1f} s")

    def measure(label: str, concurrency: int) -> tuple[float, float, dict[str, dict], dict[str, float]]:
        load = background_load()
        start = time.perf_counter()
        outcomes = run_partitions(CV_FOLDS_JOB, keys, config, concurrency=concurrency)
        wall = time.perf_counter() - start
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise SystemExit(f"{label}: fold runs failed: {[(o.partition, o.note) for o in failed]}")
        print(f"{label}: {wall:.1f} s (other processes kept {load:.2f} cores busy just before)")
        return wall, load, fold_details({o.partition: o.run_id for o in outcomes}), \
            {o.partition: o.seconds for o in outcomes}

    # 2. in-process, one fold run after the other
    inproc_wall, inproc_load, inproc, inproc_runs = measure("in-process", 1)

    # 3. Dask: a scheduler and N single-threaded workers on loopback
    port = free_port()
    address = f"tcp://{LOOPBACK}:{port}"
    env = {**os.environ, "FER_EXECUTOR": "dask", "FER_DASK_ADDRESS": address, "PYTHONPATH": str(REPO)}
    bin_dir = Path(sys.executable).parent
    servers = []
    try:
        servers.append(start_server([str(bin_dir / "dask"), "scheduler", "--host", LOOPBACK, "--port", str(port),
                                     "--no-dashboard"], port=port, log=work / "logs" / "scheduler.log",
                                    name="dask scheduler", env=env, cwd=REPO))
        for i in range(args.workers):
            servers.append(start_server([str(bin_dir / "dask"), "worker", address, "--nworkers", "1", "--nthreads",
                                         "1", "--host", LOOPBACK, "--no-dashboard", "--name", f"bench-{i}"],
                                        port=port, log=work / "logs" / f"worker{i}.log", name=f"worker {i}",
                                        env=env, cwd=REPO))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(args.workers, timeout=120)
            worker_pids = client.run(os.getpid)
            client.run(_warm_up)  # a deployment's workers are up before runs come: not measured
        os.environ.update({"FER_EXECUTOR": "dask", "FER_DASK_ADDRESS": address})  # the launching processes
        dask_wall, dask_load, dask, dask_runs = measure(f"dask, {args.workers} workers", args.workers)
    finally:
        for server in reversed(servers):
            server.stop()

    # 4. the estimate, from the per-fold step times on single-thread workers + the measured overhead
    steps = [float(dask[k]["step_s"] or dask_runs[k]) for k in keys]
    overhead = max(0.0, dask_wall - lpt_makespan(steps, args.workers))
    estimate = lpt_makespan(steps, args.estimate_workers) + overhead
    worker_of = {pid: f"w{i}" for i, pid in enumerate(sorted(worker_pids.values()))}

    print()
    print(f"{'mode':<34} {'steps on':<34} {'wall s':>8} {'folds/min':>10} {'bg load':>8}")
    print(f"{'in-process (one run at a time)':<34} {'1 process, torch default threads':<34} {inproc_wall:>8.1f} "
          f"{60 * args.folds / inproc_wall:>10.2f} {inproc_load:>7.2f}c")
    print(f"{f'dask, {args.workers} workers (runs {args.workers} at a time)':<34} "
          f"{f'{args.workers} x 1 thread':<34} {dask_wall:>8.1f} {60 * args.folds / dask_wall:>10.2f} "
          f"{dask_load:>7.2f}c")
    print(f"{f'estimate, {args.estimate_workers} workers':<34} {f'{args.estimate_workers} x 1 thread':<34} "
          f"{estimate:>8.1f} {60 * args.folds / estimate:>10.2f}")
    print(f"speed-up dask/in-process {inproc_wall / dask_wall:.2f}x; estimated {args.estimate_workers} workers "
          f"{inproc_wall / estimate:.2f}x")
    print(f"estimate = longest-first makespan of the {args.folds} dask step times on {args.estimate_workers} workers "
          f"({estimate - overhead:.1f} s) + the overhead measured with {args.workers} ({overhead:.1f} s: launching "
          "processes starting, runs setting up)")
    print()
    nan = float("nan")
    print(f"{'fold':>4} {'in-proc run s':>14} {'in-proc step s':>15} {'in-proc train s':>16} {'dask run s':>11} "
          f"{'dask step s':>12} {'dask train s':>13} {'worker':>7}")
    for k in keys:
        a, b = inproc[k], dask[k]
        print(f"{k:>4} {inproc_runs[k]:>14.1f} {a['step_s'] or nan:>15.1f} {a['train_s'] or nan:>16.1f} "
              f"{dask_runs[k]:>11.1f} {b['step_s'] or nan:>12.1f} {b['train_s'] or nan:>13.1f} "
              f"{worker_of.get(b['pid'], '?'):>7}")
    print(f"per fold step: in-process mean {statistics.mean(float(inproc[k]['step_s'] or nan) for k in keys):.1f} s; "
          f"dask mean {statistics.mean(steps):.1f} s, sd {statistics.pstdev(steps):.1f} s. A dask run's time includes "
          "its launching process starting (the first run of each) and waiting for a free worker.")
    figures = {
        "folds": args.folds, "epochs": args.epochs, "workers": args.workers,
        "in_process_seconds": round(inproc_wall, 1), "dask_seconds": round(dask_wall, 1),
        "dask_speedup": round(inproc_wall / dask_wall, 2),
        "estimate_workers": args.estimate_workers, "estimate_seconds": round(estimate, 1),
        "estimate_speedup": round(inproc_wall / estimate, 2), "overhead_seconds": round(overhead, 1),
        "background_load": {"in_process": round(inproc_load, 2), "dask": round(dask_load, 2)}}
    print(f"wrote {write_result('bench_cv_distributed', figures)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
