"""Privacy accounting for DP-SGD, delegated to Opacus' RDP and PRV accountants (no privacy math is done here)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from privacy.errors import (
    PrivacyConfigError,
    check_delta,
    check_float,
    check_int,
    check_mechanism,
    check_noise_multiplier,
    check_sample_rate,
)

Mechanism = Literal["rdp", "prv"]


def _make_accountant(mechanism: str) -> IAccountant:
    return RDPAccountant() if check_mechanism(mechanism) == "rdp" else PRVAccountant()


@contextmanager
def _quiet_alpha_warnings() -> Iterator[None]:
    # Opacus' RDP conversion warns whenever the optimal order sits at the edge of its alpha grid; that is
    # routine for tiny or huge budgets and would flood a training log once per step.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


class PrivacyAccountant:
    """Tracks the (ε, δ) spent by a sequence of Poisson-subsampled Gaussian steps.

    A thin, validating wrapper around one Opacus accountant ("rdp" or "prv"); `epsilon(delta)` returns exactly
    what that Opacus accountant returns for the same history. Unlike Opacus' `len()` (the number of distinct
    (σ, q) segments), `len()` here is the number of steps taken.
    """

    def __init__(self, mechanism: Mechanism = "rdp") -> None:
        self.mechanism: str = check_mechanism(mechanism)
        self._opacus = _make_accountant(self.mechanism)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step that added N(0, (noise_multiplier·C)²) noise to a batch sampled at `sample_rate`."""
        self._opacus.step(
            noise_multiplier=check_noise_multiplier(noise_multiplier), sample_rate=check_sample_rate(sample_rate)
        )

    def epsilon(self, delta: float) -> float:
        """ε spent so far at `delta`: 0 before any step, inf if any step added no noise."""
        delta = check_delta(delta)
        if not self._opacus.history:
            return 0.0
        # σ = 0 releases the exact gradient: no finite ε exists (and Opacus' PRV code would divide by zero).
        if any(noise == 0.0 for noise, _, _ in self._opacus.history):
            return math.inf
        with _quiet_alpha_warnings():
            return float(self._opacus.get_epsilon(delta=delta))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) segments, in Opacus' format (consecutive equal steps merged)."""
        return [(float(s), float(q), int(n)) for s, q, n in self._opacus.history]

    def __len__(self) -> int:
        return sum(n for _, _, n in self._opacus.history)


def noise_for_target_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Mechanism = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The noise multiplier σ (Opacus' `get_noise_multiplier`) for which `steps` steps at `sample_rate` spend
    at most `target_epsilon` at `delta`, and within `epsilon_tolerance` of it."""
    target_epsilon = check_float("target_epsilon", target_epsilon, low=0.0, low_open=True, high_open=True)
    epsilon_tolerance = check_float("epsilon_tolerance", epsilon_tolerance, low=0.0, low_open=True, high_open=True)
    delta, sample_rate = check_delta(delta), check_sample_rate(sample_rate)
    steps, mechanism = check_int("steps", steps, 1), check_mechanism(accountant)
    try:
        with _quiet_alpha_warnings():
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=mechanism,
                    epsilon_tolerance=epsilon_tolerance,
                )
            )
    except ValueError as e:  # Opacus' "The privacy budget is too low." when even σ = 10⁶ is not enough
        raise PrivacyConfigError(
            f"no noise multiplier reaches ε={target_epsilon} at δ={delta} for {steps} steps at q={sample_rate}: {e}"
        ) from e
