"""The code location's entry point: ``dagster … -m fer_pipeline.definitions``, ``workspace.yaml``
and ``[tool.dagster]`` load ``defs`` from here. The wiring itself lives in :mod:`fer_pipeline.defs`."""

from fer_pipeline.defs.definitions import defs

__all__ = ["defs"]
