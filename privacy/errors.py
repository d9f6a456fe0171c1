"""Typed errors of the privacy package and the argument checks that raise them."""

from __future__ import annotations

import math


class PrivacyConfigError(ValueError):
    """A privacy setting or count is invalid (out of range, missing, or contradictory)."""


class PerExampleGradError(ValueError):
    """Per-example gradients do not match the parameters they are for (names, shapes or batch sizes)."""


class PrivacyBudgetExhausted(RuntimeError):
    """A step would exceed the number of steps the noise multiplier was calibrated for."""


def check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but True/False as a count is always a caller's mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PrivacyConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    name: str, value: object, *, low: float, high: float = math.inf, low_open: bool, high_open: bool
) -> float:
    """`value` as a finite float within the interval (or [ / ] where not open)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PrivacyConfigError(f"{name} must be a finite number, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise PrivacyConfigError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def check_sample_rate(sample_rate: object) -> float:
    return check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True, high_open=False)


def check_delta(delta: object) -> float:
    return check_float("delta", delta, low=0.0, high=1.0, low_open=True, high_open=True)


def check_noise_multiplier(noise_multiplier: object) -> float:
    # 0 is allowed (no privacy, epsilon = inf): it is how DP-SGD is compared against plain SGD.
    return check_float("noise_multiplier", noise_multiplier, low=0.0, low_open=False, high_open=True)


def check_mechanism(accountant: object) -> str:
    if accountant not in ("rdp", "prv"):
        raise PrivacyConfigError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    return str(accountant)
