"""Sensors and schedules that keep the assets up to date (filled in by the automation work)."""

from __future__ import annotations

import dagster as dg

SENSORS: list[dg.SensorDefinition] = []
SCHEDULES: list[dg.ScheduleDefinition] = []
