"""User-level DP accounting for federated rounds (DP-FedAvg), delegated to Opacus' accountants.

One round releases ``θ + (Σ_{k participants} (clip_C(Δ_i) + n_i)) / k`` where each client adds its own share
n_i ~ N(0, (σC)²/m · I), m being the minimum group size. The sum of k ≥ m shares has std σC·sqrt(k/m) ≥ σC while
one client's clipped update changes the sum by at most C (its data removed: its update becomes 0), so the round
is a Gaussian mechanism with noise multiplier σ·sqrt(k/m), sampled at the participation rate q. That is the
Poisson-subsampled Gaussian mechanism Opacus accounts for (one "step" per round, with the client as the unit),
so the (ε, δ) of the released adapters is Opacus' figure for that history. Dividing by k is post-processing:
the number of participants is public (they see each other on the network).

The other participants see more than the average: each client's noisy update itself, which carries only its own
share (noise multiplier σ/sqrt(m)), and they know their own shares. `exchange_epsilon` accounts for that view
(one unsubsampled step per round the client took part in): what a curious fellow participant can learn about
this client's data. Secure aggregation would remove that gap; it is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privacy.accounting import Mechanism, PrivacyAccountant, noise_for_target_epsilon
from privacy.errors import check_delta, check_int, check_noise_multiplier, check_sample_rate


def client_noise_std(noise_multiplier: float, clip_norm: float, min_clients: int) -> float:
    """Std of the Gaussian noise each client adds per coordinate: σC/sqrt(m), so that any m shares sum to σC."""
    check_noise_multiplier(noise_multiplier)
    return noise_multiplier * clip_norm / math.sqrt(check_int("min_clients", min_clients, 1))


def round_noise_multiplier(noise_multiplier: float, participants: int, min_clients: int) -> float:
    """Noise multiplier of a round's sum that `participants` clients (each adding σC/sqrt(m)) took part in."""
    check_noise_multiplier(noise_multiplier)
    participants, min_clients = check_int("participants", participants, 1), check_int("min_clients", min_clients, 1)
    return noise_multiplier * math.sqrt(participants / min_clients)


def noise_for_federated_target(
    target_epsilon: float,
    delta: float,
    participation_rate: float,
    rounds: int,
    accountant: Mechanism = "rdp",
) -> float:
    """σ such that `rounds` rounds of m participants at participation rate q spend at most `target_epsilon`
    (rounds with more participants only carry more noise, so this bounds every run of that many rounds)."""
    return noise_for_target_epsilon(target_epsilon, delta, participation_rate, rounds, accountant)


@dataclass(frozen=True)
class FederatedPrivacyReport:
    """The guarantee after a round: the adapters released so far are (epsilon, delta)-DP w.r.t. any one client's
    whole data set; `exchange_epsilon` is the weaker one against the other participants (see module doc)."""

    round: int
    participants: int
    epsilon: float
    exchange_epsilon: float
    delta: float
    noise_multiplier: float
    round_noise_multiplier: float
    participation_rate: float


class FederatedAccountant:
    """Tracks the rounds a run released (the same on every client) and the updates this client sent."""

    def __init__(
        self, noise_multiplier: float, min_clients: int, participation_rate: float, delta: float, mechanism: Mechanism
    ) -> None:
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.min_clients = check_int("min_clients", min_clients, 1)
        self.participation_rate = check_sample_rate(participation_rate)
        self.delta = check_delta(delta)
        self.release = PrivacyAccountant(mechanism)
        self.exchange = PrivacyAccountant(mechanism)

    def record_round(self, round_index: int, participants: int, sent_update: bool) -> FederatedPrivacyReport:
        """Account for one completed round of `participants` clients (whoever actually took part); `sent_update`:
        this client's own noisy update went to the others in it."""
        z = round_noise_multiplier(self.noise_multiplier, participants, self.min_clients)
        self.release.step(z, self.participation_rate)
        if sent_update:
            self.exchange.step(self.noise_multiplier / math.sqrt(self.min_clients), 1.0)
        return self.report(round_index, participants, z)

    def report(self, round_index: int, participants: int, z: float) -> FederatedPrivacyReport:
        return FederatedPrivacyReport(
            round=round_index,
            participants=participants,
            epsilon=self.release.epsilon(self.delta),
            exchange_epsilon=self.exchange.epsilon(self.delta),
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            round_noise_multiplier=z,
            participation_rate=self.participation_rate,
        )
