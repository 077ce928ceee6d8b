"""The settings file (:mod:`fer_pipeline.settings`) wired into Dagster.

* :func:`bind_resources` turns the file's sections into the code location's resources, so
  every launch path (UI, sensors, schedule, automation, CLI, ``make demo``) starts from the
  same values; a run config still overrides single values in the launchpad.
* :func:`versioned` folds a fingerprint of the settings each asset computes with into its
  code version: a changed recipe shows in the UI as *Unsynced (code version changed)*, and
  declarative automation and "Materialize unsynced" pick it up. This is Dagster's one
  definition of "out of date": code versions and data versions.
* :func:`fer_asset` is ``dg.asset`` plus one thing: it records which settings file the
  materialization used and what the run overrode (``settings`` metadata on the asset, the
  ``fer/settings_overrides`` tag on the run), so an experiment is never mistaken for the recipe.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import dagster as dg
import pydantic

from fer_pipeline.config_yaml import short_repr
from fer_pipeline.defs.resources import AnalysisSettings, FerSettings, TrainSettings
from fer_pipeline.settings import (
    SECTIONS,
    Settings,
    SettingsError,
    current_settings,
    fingerprint,
    overrides,
)

RESOURCE_TYPES: dict[str, type[dg.ConfigurableResource]] = {
    "fer": FerSettings, "training": TrainSettings, "analysis": AnalysisSettings}
OVERRIDES_TAG = "fer/settings_overrides"
CODE_VERSION = "1"
"""Bump when an asset's logic changes what it computes: every asset then shows as unsynced."""

DATA_GROUP = "data"
SECTIONS_BY_GROUP: dict[str, tuple[str, ...]] = {DATA_GROUP: ("fer",), "models": ("fer", "training")}
"""Which settings an asset group computes with (other groups: all three sections)."""


def bind_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources with the file's values; an unknown or bad value fails naming file and field."""
    bound: dict[str, dg.ConfigurableResource] = {}
    for name, cls in RESOURCE_TYPES.items():
        values = settings.section(name)
        unknown = sorted(map(str, set(values) - set(cls.model_fields)))
        if unknown:
            field = unknown[0] if unknown[0].isidentifier() and len(unknown[0]) <= 40 else short_repr(unknown[0], 40)
            raise SettingsError(f"{settings.source}: {name}.{field}: unknown setting (known: "
                                f"{', '.join(cls.model_fields)})")
        try:
            bound[name] = cls(**values)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(map(str, err.get("loc", ()))) or "?"
            raise SettingsError(f"{settings.source}: {name}.{field}: {err.get('msg', 'invalid')} "
                                f"(got {short_repr(values.get(field.split('.')[0]))})") from None
    return bound


def section_values(resource: dg.ConfigurableResource) -> dict[str, Any]:
    """A resource's setting values (what the fingerprint and the overrides compare)."""
    return {k: getattr(resource, k) for k in type(resource).model_fields}


def code_version(bound: Mapping[str, dg.ConfigurableResource], sections: Iterable[str]) -> str:
    """``CODE_VERSION`` plus the fingerprint of the named sections' values (``bound``: what
    :func:`bind_resources` returned)."""
    parts = [f"{name}:{fingerprint(section_values(bound[name]), name)}" for name in sections]
    return "-".join([CODE_VERSION, *parts])


def versioned(assets: Iterable[dg.AssetsDefinition], bound: Mapping[str, dg.ConfigurableResource],
              extra: Mapping[str, str] | None = None) -> list[dg.AssetsDefinition]:
    """``assets`` with code versions that include the settings they compute with (``bound``: the
    resources as the settings file binds them; ``extra``: more to fold in per asset name, e.g.
    the number of CV folds)."""
    extra = extra or {}
    versions = {group: code_version(bound, sections) for group, sections in SECTIONS_BY_GROUP.items()}
    default = code_version(bound, SECTIONS)

    def spec(s: dg.AssetSpec) -> dg.AssetSpec:
        version = versions.get(s.group_name or "", default)
        name = s.key.to_user_string()
        return s.replace_attributes(code_version=f"{version}-{extra[name]}" if name in extra else version)

    return [a.map_asset_specs(spec) if isinstance(a, dg.AssetsDefinition) else a for a in assets]


def run_overrides(run_config: Mapping[str, Any], settings: Settings) -> dict[str, dict[str, Any]]:
    """Per section, the values a run config sets that differ from the settings file's (or from
    the defaults, where the file says nothing)."""
    out: dict[str, dict[str, Any]] = {}
    resources = (run_config or {}).get("resources") or {}
    for name, cls in RESOURCE_TYPES.items():
        given = ((resources.get(name) or {}).get("config")) or {}
        if not given:
            continue
        baseline = {k: f.default for k, f in cls.model_fields.items()} | settings.section(name)
        changed = overrides(baseline, given)
        if changed:
            out[name] = changed
    return out


def record_settings(context: dg.AssetExecutionContext) -> None:
    """Put the settings file and the run's overrides on this materialization and on the run."""
    settings = current_settings()
    changed = run_overrides(context.run.run_config, settings)
    context.add_output_metadata({
        "settings_file": settings.source,
        "settings_overrides": dg.MetadataValue.json(changed),
    }, output_name=context.assets_def.get_output_name_for_asset_key(context.asset_key))
    if changed and OVERRIDES_TAG not in context.run.tags:
        text = json.dumps(changed, sort_keys=True, default=str)
        context.instance.add_run_tags(context.run.run_id, {OVERRIDES_TAG: text[:4000]})
        context.log.warning(f"this run overrides the settings file ({settings.source}): {text[:500]}")


def fer_asset(**kwargs: Any) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """``dg.asset(**kwargs)`` whose materializations record the settings they ran with."""

    def decorate(fn: Callable[..., Any]) -> dg.AssetsDefinition:
        @functools.wraps(fn)
        def compute(context: dg.AssetExecutionContext, *args: Any, **resources: Any) -> Any:
            record_settings(context)
            return fn(context, *args, **resources)

        return dg.asset(**kwargs)(compute)

    return decorate
