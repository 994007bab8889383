"""Configs given as a name, a dict, or JSON text (optimizers, schedules, CLI flags)."""
from __future__ import annotations

import json

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
