"""dagster-dask's executor, with each step's Dask task named after its run.

dagster-dask 0.29 names the task of a step ``<job>.<step>``. Dask treats two tasks with one key
as one computation, so when two runs of one job are in flight at once (two partitions of
``cv_folds``, as a backfill launches them) the second run's step attaches to the first run's
task: it reports the first partition's events and the second partition is never trained. Here
the key is ``<job>.<run id>.<step>``; everything else is dagster-dask's executor as it is.
Imported only when ``FER_EXECUTOR=dask`` (it needs the ``dask`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
import dask.distributed
from dagster._core.errors import raise_execution_interrupts
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._utils import iterate_with_context
from dagster_dask import dask_executor
from dagster_dask.executor import (
    DaskExecutor,
    get_dask_resource_requirements,
    query_on_dask_worker,
)


class RunScopedDaskExecutor(DaskExecutor):
    """:class:`dagster_dask.executor.DaskExecutor` on an existing cluster, task keys scoped to the run."""

    def execute(self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan) -> Iterator[Any]:
        if self.cluster_type != "existing":  # a cluster of its own per run: keys cannot collide
            yield from super().execute(plan_context, execution_plan)
            return
        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("Dask execution requires a persistent DagsterInstance")
        run = plan_context.dagster_run
        with dask.distributed.Client(self.cluster_configuration["address"]) as client:
            futures: dict[str, Any] = {}
            for step_level in execution_plan.get_steps_to_execute_by_level():
                for step in step_level:
                    dependencies = [futures[key] for step_input in step.step_inputs
                                    for key in step_input.dependency_keys]
                    futures[step.key] = client.submit(
                        query_on_dask_worker, dependencies, plan_context.reconstructable_job, run,
                        plan_context.run_config, [step.key], plan_context.instance.get_ref(),
                        execution_plan.known_state,
                        key=f"{plan_context.job_name}.{run.run_id}.{step.key}",
                        resources=get_dask_resource_requirements(step.tags))
            results = dask.distributed.as_completed(list(futures.values()), with_results=True)
            for _future, events in iterate_with_context(raise_execution_interrupts, results):
                yield from events


@dg.executor(name="dask", config_schema=dask_executor.config_schema,
             requirements=dg.multiple_process_executor_requirements())
def run_scoped_dask_executor(init_context: dg.InitExecutorContext) -> RunScopedDaskExecutor:
    ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
    return RunScopedDaskExecutor(cluster_type, cluster_configuration)
