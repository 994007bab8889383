"""Learning-rate schedules: ``lr = schedule(step)``.

``step`` is the number of batches already applied (0 for the first update; a
sync round that averages N batches advances it by N), so
``schedule(0)`` is the rate of the very first step.  Every schedule is a small
object with ``__call__(step) -> float`` and ``config() -> dict``; the config
holds everything but the base learning rate (which belongs to the optimizer),
so ``build_schedule(s.config(), s.base_lr)`` rebuilds ``s`` exactly.

Configs (a dict, a name, JSON text of a dict, or ``None`` for constant)::

    {"name": "constant"}
    {"name": "step", "step_size": 1000, "gamma": 0.5}      # lr * gamma ** (step // step_size)
    {"name": "cosine", "total_steps": 5000, "min_lr": 0.0} # half cosine, then min_lr
    {"name": "cosine", "total_steps": 5000, "warmup_steps": 200}

``warmup_steps`` may be added to any of them: the rate is then scaled by
``(step + 1) / warmup_steps`` during the first ``warmup_steps`` updates.  The
wrapped schedule keeps counting global steps underneath (its ``step_size`` and
``total_steps`` are in the same units as the training loop's), so warm-up only
ramps the start and does not shift the rest of the schedule.
"""
from __future__ import annotations

import math
import numbers

from .config import is_number, is_real, named_config
from .errors import ConfigError


def _positive_float(value, what: str) -> float:
    if not is_real(value):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if not (is_number(value) and value > 0):
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


# The most steps a schedule may name: exact in a float and in JSON, within
# msgpack's 64-bit integers (1e300 would reach a checkpoint and the wire).
MAX_STEPS = 2**53 - 1


def _int_at_least(value, lowest: int, what: str) -> int:
    # Floats such as 1000.0 from a hand-written JSON file are accepted when integral.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if value < lowest:
        raise ConfigError(f"{what} must be >= {lowest}, got {value}")
    if value > MAX_STEPS:
        raise ConfigError(f"{what} must be at most {MAX_STEPS}, got {value:.3g}")
    return value


def _check_step(step) -> int:
    # Python or NumPy integers, not a bool: True passed as step 1 (its __index__, read before, is 1).
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ConfigError(f"schedule step must be an integer, got {step!r}")
    step = int(step)
    if step < 0:
        raise ConfigError(f"schedule step must be >= 0, got {step}")
    return step


class Schedule:
    """Base class: a learning rate per step, derived from ``base_lr``."""

    name = ""

    def __init__(self, base_lr: float):
        self.base_lr = _positive_float(base_lr, "learning rate")

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-able description; ``build_schedule(config, base_lr)`` rebuilds it."""
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        return (isinstance(other, Schedule) and self.base_lr == other.base_lr
                and self.config() == other.config())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}(base_lr={self.base_lr!r}{', ' if args else ''}{args})"


class ConstantSchedule(Schedule):
    """``lr(step) = base_lr``."""

    name = "constant"

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.base_lr

    def config(self) -> dict:
        return {"name": self.name}


class StepSchedule(Schedule):
    """``lr(step) = base_lr * gamma ** (step // step_size)``: decay by ``gamma`` every ``step_size`` steps."""

    name = "step"

    def __init__(self, base_lr: float, step_size: int, gamma: float = 0.1):
        super().__init__(base_lr)
        self.step_size = _int_at_least(step_size, 1, "step schedule: step_size")
        self.gamma = _positive_float(gamma, "step schedule: gamma")
        if self.gamma > 1:
            raise ConfigError(f"step schedule: gamma must be in (0, 1], got {self.gamma}")

    def __call__(self, step: int) -> float:
        return self.base_lr * self.gamma ** (_check_step(step) // self.step_size)

    def config(self) -> dict:
        return {"name": self.name, "step_size": self.step_size, "gamma": self.gamma}


class CosineSchedule(Schedule):
    """Half-cosine decay from ``base_lr`` at step 0 to ``min_lr`` at ``total_steps``, then flat.

    ``lr(step) = min_lr + (base_lr - min_lr) * (1 + cos(pi * min(step, T) / T)) / 2``.
    """

    name = "cosine"

    def __init__(self, base_lr: float, total_steps: int, min_lr: float = 0.0):
        super().__init__(base_lr)
        self.total_steps = _int_at_least(total_steps, 1, "cosine schedule: total_steps")
        if not is_number(min_lr):
            raise ConfigError(f"cosine schedule: min_lr must be a finite number, got {min_lr!r}")
        self.min_lr = float(min_lr)
        if not 0 <= self.min_lr <= self.base_lr:
            raise ConfigError(f"cosine schedule: min_lr must lie in [0, lr={self.base_lr}], got {self.min_lr}")

    def __call__(self, step: int) -> float:
        progress = min(_check_step(step), self.total_steps) / self.total_steps
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def config(self) -> dict:
        return {"name": self.name, "total_steps": self.total_steps, "min_lr": self.min_lr}


class WarmupSchedule(Schedule):
    """Linear warm-up over ``warmup_steps`` on top of another schedule.

    ``lr(step) = inner(step) * min(1, (step + 1) / warmup_steps)``: the first
    update runs at ``inner(0) / warmup_steps`` and step ``warmup_steps - 1`` at
    the full ``inner`` rate.  ``inner`` sees the global step unchanged.
    """

    def __init__(self, inner: Schedule, warmup_steps: int):
        if not isinstance(inner, Schedule) or isinstance(inner, WarmupSchedule):
            raise ConfigError(f"warm-up must wrap a constant, step or cosine schedule, got {inner!r}")
        super().__init__(inner.base_lr)
        self.inner = inner
        self.warmup_steps = _int_at_least(warmup_steps, 1, "schedule: warmup_steps")
        self.name = inner.name

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        lr = self.inner(step)
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def config(self) -> dict:
        return {**self.inner.config(), "warmup_steps": self.warmup_steps}

    def __repr__(self) -> str:
        return f"WarmupSchedule({self.inner!r}, warmup_steps={self.warmup_steps})"


SCHEDULES = {cls.name: cls for cls in (ConstantSchedule, StepSchedule, CosineSchedule)}

# Keys each schedule's config accepts besides "name" (and "warmup_steps", valid everywhere),
# and the ones among them without a default.
_KEYS = {"constant": (), "step": ("step_size", "gamma"), "cosine": ("total_steps", "min_lr")}
_REQUIRED = {"constant": (), "step": ("step_size",), "cosine": ("total_steps",)}


def build_schedule(config: dict | str | Schedule | None, base_lr: float) -> Schedule:
    """A schedule from its config (see the module docs) and the optimizer's base rate.

    ``config`` may be a dict, a schedule name (``"constant"``; the others need
    arguments), JSON text of a dict, ``None`` (constant), or a Schedule, which is
    rebuilt around ``base_lr``.  Raises ConfigError naming the bad name or key.
    """
    if config is None:
        config = {"name": "constant"}
    elif isinstance(config, Schedule):
        config = config.config()
    config = named_config(config, "schedule config")
    if "name" not in config:            # "unknown schedule None" did not say what was missing
        raise ConfigError(f"schedule config needs a 'name': one of {sorted(SCHEDULES)}")
    name = config.pop("name")
    if not isinstance(name, str):       # a list or dict is unhashable: no `in`
        raise ConfigError(f"schedule name must be a string, one of {sorted(SCHEDULES)}, got {name!r}")
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}: expected one of {sorted(SCHEDULES)}")
    warmup = config.pop("warmup_steps", 0)
    unknown = sorted(set(config) - set(_KEYS[name]))
    if unknown:
        valid = ["name", *_KEYS[name], "warmup_steps"]
        raise ConfigError(f"{name} schedule: unknown key(s) {unknown}; valid keys: {valid}")
    missing = [k for k in _REQUIRED[name] if k not in config]
    if missing:
        raise ConfigError(f"{name} schedule: missing required key(s) {missing}")
    schedule = SCHEDULES[name](base_lr, **config)
    warmup = _int_at_least(warmup, 0, f"{name} schedule: warmup_steps")
    return WarmupSchedule(schedule, warmup) if warmup else schedule
