"""Which engine runs the steps of a run: a setting, read when the code location loads.

``FER_EXECUTOR`` (restart ``make ui`` / the code server after changing it):

* ``in_process`` (default): one process for the whole run. Right for one small machine: the
  stages parallelise internally (decoding pool, torch threads), and a process per step would pay
  Python/torch/GX start-up for every step and check.
* ``multiprocess``: one process per step on this machine (Dagster's ``multiprocess_executor``;
  ``max_concurrent`` defaults to the number of cores and can be set in the run config).
* ``dask``: each step is a task on an existing ``dask.distributed`` cluster (``dagster-dask``),
  whose scheduler is at ``FER_DASK_ADDRESS`` (e.g. ``tcp://127.0.0.1:8786``); the workers may be
  on other hosts. Needs the ``dask`` extra (``pip install -e '.[dask]'``) here and on the workers.
  Task keys carry the run id (:mod:`fer_pipeline.defs.dask_executor`), so runs of one job in
  flight at once (fold partitions) stay apart.
* ``k8s``: each step is a Kubernetes Job (``dagster-k8s``' ``k8s_job_executor``; image, namespace
  and environment come from the ``K8sRunLauncher`` of the instance unless the run config says
  otherwise). Needs the ``k8s`` extra. The model assets ask for a GPU through their op tags
  (:data:`GPU_OP_TAGS`).

An unknown value, or ``dask`` without an address, fails when the code location loads, naming the
variable and the allowed values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

EXECUTOR_ENV = "FER_EXECUTOR"
DASK_ADDRESS_ENV = "FER_DASK_ADDRESS"
DEFAULT_EXECUTOR = "in_process"
EXECUTORS = ("in_process", "multiprocess", "dask", "k8s")

# Op tags of the model assets: on Kubernetes (k8s_job_executor, or K8sRunLauncher) the step's pod
# asks for one NVIDIA GPU; every other executor ignores the tag.
GPU_OP_TAGS: dict[str, object] = {
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
}


class ExecutorSettingError(ValueError):
    """A bad ``FER_EXECUTOR`` (or a setting it needs): raised when the code location loads."""


def executor_name(environ: Mapping[str, str] | None = None) -> str:
    """The chosen engine (``FER_EXECUTOR``, case and surrounding blanks ignored; unset or empty =
    ``in_process``)."""
    env = os.environ if environ is None else environ
    raw = env.get(EXECUTOR_ENV, "")
    name = raw.strip().lower().replace("-", "_") or DEFAULT_EXECUTOR
    if name not in EXECUTORS:
        raise ExecutorSettingError(
            f"{EXECUTOR_ENV}={raw!r} is not a known executor; allowed values: {', '.join(EXECUTORS)} "
            f"(unset = {DEFAULT_EXECUTOR})")
    return name


def _missing_extra(name: str, extra: str, exc: ImportError) -> ExecutorSettingError:
    return ExecutorSettingError(
        f"{EXECUTOR_ENV}={name} needs the '{extra}' extra (pip install -e '.[{extra}]'), "
        f"here and wherever steps run: {exc}")


def executor_from_env(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor of the code location, from ``FER_EXECUTOR`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    name = executor_name(env)
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "dask":
        address = env.get(DASK_ADDRESS_ENV, "").strip()
        if not address:
            raise ExecutorSettingError(
                f"{EXECUTOR_ENV}=dask needs {DASK_ADDRESS_ENV}, the address of the Dask scheduler "
                f"(e.g. tcp://127.0.0.1:8786)")
        try:  # dagster-dask's executor, its task keys scoped to the run (concurrent partition runs)
            from fer_pipeline.defs.dask_executor import run_scoped_dask_executor
        except ImportError as exc:
            raise _missing_extra(name, "dask", exc) from exc
        return run_scoped_dask_executor.configured({"cluster": {"existing": {"address": address}}}, name="dask")
    # k8s
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as exc:
        raise _missing_extra(name, "k8s", exc) from exc
    return k8s_job_executor
