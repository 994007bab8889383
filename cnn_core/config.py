"""Configs given as a name, a dict, or JSON text (optimizers, schedules, CLI flags), and their numbers."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from .errors import ConfigError


# How deep maps and lists may nest in a config or model spec: 10 residual blocks
# one inside the other.  Deeper, copying or printing it would exhaust Python's
# recursion; and a welcome message carries the spec two levels down in a header
# that may nest 32 deep (pscnn.protocol.MAX_DEPTH).
MAX_CONFIG_DEPTH = 24


def nests_within(container, limit: int) -> bool:
    """Whether maps and lists nest at most ``limit`` deep, ``container`` (a map or list) being
    the first level.  Level by level, without recursion."""
    level, depth = [container], 0
    while level:
        depth += 1
        if depth > limit:
            return False
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
    return True


def named_config(value, what: str, error: type[Exception] = ConfigError) -> dict:
    """``"adam"`` -> ``{"name": "adam"}``; ``'{"name": ...}'`` -> the parsed dict; a dict -> a copy.

    Anything else, JSON that does not parse, or maps and lists nested deeper than
    :data:`MAX_CONFIG_DEPTH`, raises ``error`` naming ``what``.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("{", "[")):      # a JSON list is refused below, not taken for a name
            return {"name": text}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{what} is not valid JSON: {exc}") from None
        except RecursionError:          # thousands of brackets deep
            raise error(f"{what} nests maps and lists more than {MAX_CONFIG_DEPTH} deep") from None
    if not isinstance(value, dict):
        raise error(f"{what} must be a name or a dict, got {type(value).__name__}")
    if not nests_within(value, MAX_CONFIG_DEPTH):
        raise error(f"{what} nests maps and lists more than {MAX_CONFIG_DEPTH} deep")
    return dict(value)


def config_file_path(value: str, names) -> str | None:
    """The path of the JSON file a flag's value names (``--model``, ``--schedule``), or None for
    one of ``names`` (a preset or a schedule's name) or JSON text.

    A path is a value that names an existing file, ends in ``.json``, or holds a
    path separator; a name wins over a file of the same name.
    """
    text = value.strip()
    if text in names or text.startswith(("{", "[")):     # JSON text, refused later if not an object
        return None
    path = os.path.expanduser(text)
    return path if os.path.isfile(path) or text.endswith(".json") or os.sep in text or "/" in text else None


def read_config_file(path: str, what: str, error: type[Exception], max_bytes: int) -> dict:
    """The dict a JSON file holds; ``error`` starting with ``what`` (which names the file) if it is
    missing, unreadable, larger than ``max_bytes``, or no JSON object."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{what}: no such file") from None
    except IsADirectoryError:
        raise error(f"{what} is a folder, not a file") from None
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{what} is larger than {max_bytes:,} bytes, the most it may hold")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8 text (JSON)") from None
    if not text.startswith("{"):        # named_config would take other text for a name
        raise error(f"{what} must hold a JSON object")
    return named_config(text, what, error)


def is_real(value) -> bool:
    """An int or float, Python's or NumPy's: not a bool (``float(True)`` is 1.0, and JSON's true
    is no figure) nor a string.  NaN and infinity are reals here: see :func:`is_number`."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


def is_integer(value) -> bool:
    """An int, Python's or NumPy's, not a bool (``True`` passed for 1) nor an integral float."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))


def is_number(value) -> bool:
    """A finite :func:`is_real`: a figure read from a file or a message that can be used as one."""
    if not is_real(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:       # an int past float's range: json reads a 1 and 400 zeros as one
        return False


def finite_or_none(value) -> float | None:
    """``value`` as a float if :func:`is_number`, else None (missing, null, true, NaN, a string)."""
    return float(value) if is_number(value) else None


def number_in(value, what: str, low: float, high: float | None = None, *,
              low_open: bool = False, high_open: bool = True, error: type[Exception] = ConfigError) -> float:
    """``value`` as a finite float in the interval [low, high) (ends as flagged), else ``error``.

    Not a bool nor a string (JSON configs come from users): :func:`is_real`.
    """
    if not is_real(value):
        raise error(f"{what} must be a number, got {value!r}")
    if is_number(value) or not isinstance(value, int):      # an int past float's range, float() raises on
        value = float(value)
    ok = is_number(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise error(f"{what} must lie in {left}{low}, {right}, got {value!r}")
    return value


def seed_value(value, what: str, sequence_ok: bool = True):
    """``value`` as a NumPy seed: an int >= 0, or (``sequence_ok``) a non-empty list or tuple of
    them, a SeedSequence's entropy.

    Not a bool, a float (1.5 would silently be 1) or a string; ConfigError naming ``what`` otherwise.
    """
    def ok(v) -> bool:
        return is_integer(v) and v >= 0
    if ok(value):
        return int(value)
    if sequence_ok and isinstance(value, (list, tuple)) and value and all(ok(v) for v in value):
        return [int(v) for v in value]
    raise ConfigError(f"{what} must be an int >= 0{' (or a list of them)' if sequence_ok else ''}, got {value!r}")
