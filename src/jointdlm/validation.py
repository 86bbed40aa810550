"""Checks shared by the config dataclasses: bad values fail at construction with a clear message."""

from __future__ import annotations

import math
from collections.abc import Iterable


def require_positive(config: object, names: Iterable[str]) -> None:
    """Each named field must be an integer >= 1."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_choice(name: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def require_finite(config: object, names: Iterable[str]) -> None:
    """Each named field, where set, must be a finite number (NaN and infinity slip past every comparison)."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
