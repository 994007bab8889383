"""Configs given as a name, a dict, or JSON text (optimizers, schedules, CLI flags), and their numbers."""
from __future__ import annotations

import json
import math

import numpy as np

from .errors import ConfigError


def named_config(value, what: str, error: type[Exception] = ConfigError) -> dict:
    """``"adam"`` -> ``{"name": "adam"}``; ``'{"name": ...}'`` -> the parsed dict; a dict -> a copy.

    Anything else, or JSON that does not parse, raises ``error`` naming ``what``.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            return {"name": text}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise error(f"{what} must be a name or a dict, got {type(value).__name__}")
    return dict(value)


def number_in(value, what: str, low: float, high: float | None = None, *,
              low_open: bool = False, high_open: bool = True, error: type[Exception] = ConfigError) -> float:
    """``value`` as a finite float in the interval [low, high) (ends as flagged), else ``error``.

    Not a bool (``float(True)`` is 1.0) nor a string (JSON configs come from users).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{what} must be a number, got {value!r}")
    value = float(value)
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise error(f"{what} must lie in {left}{low}, {right}, got {value!r}")
    return value
