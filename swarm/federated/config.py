"""FederatedConfig: the settings of one client in a federated run (all clients of a run share the privacy ones)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from privacy.accounting import Mechanism
from privacy.errors import check_delta, check_mechanism, check_sample_rate
from privacy.federated_accounting import noise_for_federated_target
from swarm.federated.errors import FederatedConfigError

_RUN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _positive(name: str, value: object, *, integer: bool = False) -> None:
    kind = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise FederatedConfigError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


@dataclass(frozen=True)
class FederatedConfig:
    """Settings of one client in a federated run; all clients of a run must use the same privacy settings.

    Exactly one of `noise_multiplier` (σ; 0 = no DP) and `target_epsilon` (σ then calibrated so that `rounds`
    rounds spend it) is given. `clip_norm` None turns clipping off, allowed only without noise. `seed` makes the
    noise and participation coins reproducible (tests only: whoever knows it can subtract the noise).
    """

    run_name: str
    min_clients: int = 2  # m: a round needs this many; each client's noise is σC/sqrt(m)
    expected_clients: int = 3  # joining ends early once this many have announced themselves
    clip_norm: float | None = 1.0
    noise_multiplier: float | None = 0.0
    target_epsilon: float | None = None
    rounds: int | None = None  # rounds planned (required with target_epsilon; more are refused then)
    delta: float = 1e-5
    participation_rate: float = 1.0  # q: each round, each client takes part with this probability (its own coin)
    accountant: Mechanism = "rdp"
    join_timeout: float = 30.0  # s to wait for `expected_clients` announcements
    exchange_timeout: float = 60.0  # s to wait for another client's update (it may still be training)
    agree_timeout: float = 30.0  # s to wait for the confirmations of the clients whose updates we accepted
    record_ttl: float = 600.0  # s the run's DHT records live
    poll_interval: float = 0.1  # s between DHT reads while waiting
    max_update_numel: int = 1 << 28  # refuse adapters larger than this
    part_numel: int = 1 << 18  # floats per stream message (1 MiB; hivemind's frames are limited)
    norm_failure_probability: float = 1e-9  # chance that an honest noisy update exceeds `norm_bound` (refused)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_name, str) or not _RUN_NAME.fullmatch(self.run_name):
            raise FederatedConfigError(f"run_name must be 1-64 of [A-Za-z0-9_-], got {self.run_name!r}")
        _positive("min_clients", self.min_clients, integer=True)
        _positive("expected_clients", self.expected_clients, integer=True)
        if self.expected_clients < self.min_clients:
            raise FederatedConfigError(f"expected_clients={self.expected_clients} < min_clients={self.min_clients}")
        if self.clip_norm is not None:
            _positive("clip_norm", self.clip_norm)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise FederatedConfigError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and (
            isinstance(self.noise_multiplier, bool)
            or not isinstance(self.noise_multiplier, int | float)
            or not math.isfinite(self.noise_multiplier)
            or self.noise_multiplier < 0
        ):
            raise FederatedConfigError(f"noise_multiplier must be a number >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
            if self.rounds is None:
                raise FederatedConfigError("target_epsilon needs rounds: σ is calibrated for a number of rounds")
        if self.rounds is not None:
            _positive("rounds", self.rounds, integer=True)
        if self.clip_norm is None and (self.target_epsilon is not None or self.noise_multiplier):
            raise FederatedConfigError("clip_norm is required with noise: it is the sensitivity the noise is for")
        for name in ("delta", "participation_rate", "norm_failure_probability"):
            try:
                (check_sample_rate if name == "participation_rate" else check_delta)(getattr(self, name))
            except ValueError as e:
                raise FederatedConfigError(f"{name}: {e}") from None
        try:
            check_mechanism(self.accountant)
        except ValueError as e:
            raise FederatedConfigError(str(e)) from None
        for name in ("join_timeout", "exchange_timeout", "agree_timeout", "record_ttl", "poll_interval"):
            _positive(name, getattr(self, name))
        _positive("max_update_numel", self.max_update_numel, integer=True)
        _positive("part_numel", self.part_numel, integer=True)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise FederatedConfigError(f"seed must be an integer >= 0, got {self.seed!r}")

    def resolved_noise_multiplier(self) -> float:
        """σ: as given, or calibrated for `target_epsilon` over `rounds` rounds."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None and self.rounds is not None  # __post_init__ guarantees it
        return noise_for_federated_target(
            self.target_epsilon, self.delta, self.participation_rate, self.rounds, self.accountant
        )
