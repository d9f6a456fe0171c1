"""Differential privacy for client-side training, and controls on what the swarm's peers get to see.

What DP-SGD protects here
    The client's trainable parameters (soft/deep prompts, LoRA matrices) are trained with DP-SGD: per-example
    gradients clipped to C, Gaussian noise of std σ·C, Poisson-sampled batches. Every parameter value the
    client ever produces (each intermediate one and the final one) is then (ε, δ)-differentially private with
    respect to adding or removing one training example, with (ε, δ) as reported by the Opacus accountant
    (RDP or PRV). So whoever later obtains those parameters, including peers that receive deep prompts, can infer
    only a bounded amount about any single example from them.

What it does NOT protect
    The peers that run the remote blocks compute on the hidden states of the client's inputs, in training and in
    inference alike, and hidden states are close to invertible back to the tokens. In backward passes they also
    see the un-noised gradients flowing into those states, per example. DP says nothing about any of this: a
    peer that serves a block sees that block's input activations of every token routed through it, in the clear.
    The guarantee is per example (not per user with many examples), assumes batches really are Poisson-sampled
    at the configured rate, does not cover choosing hyperparameters on the private data, and with a fixed `seed`
    (meant for tests) the noise is reproducible by whoever knows the seed.

What limits activation exposure
    Only placement and bookkeeping: `split_local_blocks` keeps the first and last k blocks on the client (peers
    then see neither the token embeddings nor the states that feed the LM head, though intermediate states may
    still reveal the input), routing restricted to trusted peers decides who sees the rest, and the
    `ExposureLedger` records which peer saw which blocks' activations for how many tokens, so the exposure can be
    audited, printed or saved. Local blocks do not hide the input from a peer that knows the public weights: it
    recomputes them and inverts what it receives token by token (privacy.inversion; scripts/privacy_audit.py
    measures it). The `privacy="noise"` client option (privacy.defence) adds noise to what is sent, calibrated
    on it and removed from the residual stream on the way back; it does not cover the gradients that fine-tuning
    sends back to the peers.
"""

from privacy.accounting import Mechanism, PrivacyAccountant, noise_for_target_epsilon
from privacy.defence import NoiseDefence
from privacy.dpsgd import (
    DPSGD,
    DPConfig,
    PrivacyReport,
    clip_per_example,
    per_example_norms,
    poisson_sample,
    privatize,
)
from privacy.errors import PerExampleGradError, PrivacyBudgetExhausted, PrivacyConfigError
from privacy.exposure import EXPOSURE_KINDS, ExposureKind, ExposureLedger, ExposureRow, split_local_blocks
from privacy.federated_accounting import (
    FederatedAccountant,
    FederatedPrivacyReport,
    client_noise_std,
    noise_for_federated_target,
    round_noise_multiplier,
)
from privacy.per_example import PerExampleParameters, per_example_parameters

__all__ = [
    "DPSGD",
    "EXPOSURE_KINDS",
    "DPConfig",
    "ExposureKind",
    "ExposureLedger",
    "ExposureRow",
    "FederatedAccountant",
    "FederatedPrivacyReport",
    "Mechanism",
    "NoiseDefence",
    "PerExampleGradError",
    "PerExampleParameters",
    "PrivacyAccountant",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "PrivacyReport",
    "client_noise_std",
    "clip_per_example",
    "noise_for_federated_target",
    "noise_for_target_epsilon",
    "per_example_norms",
    "per_example_parameters",
    "poisson_sample",
    "privatize",
    "round_noise_multiplier",
    "split_local_blocks",
]
