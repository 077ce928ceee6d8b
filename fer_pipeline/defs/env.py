"""Whole-number settings read from environment variables when the code location loads."""

from __future__ import annotations

import os
from collections.abc import Mapping


def env_int(name: str, default: int, minimum: int, unit: str, *, environ: Mapping[str, str] | None = None,
            error: type[Exception] = ValueError) -> int:
    """``$name`` as an int of at least ``minimum`` (unset or empty: ``default``); a bad value
    raises ``error`` naming the variable and what it expects."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise error(f"{name}={raw!r}: expected a whole number of {unit} ({minimum} or more)") from exc
    if value < minimum:
        raise error(f"{name}={raw!r}: must be at least {minimum} {unit}")
    return value
