"""A defence of the hidden states the client sends to the swarm against inversion by the peers that receive them.

Why noise, and why it can be large: the remote blocks are pre-norm residual blocks, so what the client sends
(x) comes back as x + Δ(x), where Δ is what the remote blocks add to the residual stream. The client adds
Gaussian noise n to what it sends and subtracts the same n from what comes back: it keeps x + Δ(x + n). The noise
itself never reaches the client's last blocks or the LM head; only the remote blocks' contributions Δ are computed
on noisy inputs. Every peer on the route sees noisy states (the noise stays in the residual stream until the client
removes it), and each request draws fresh noise from a generator only the client holds.

What it cannot do: noise cannot make a hidden state carry less than the remote blocks need, so its cost is the
part of the model's quality that comes from the remote blocks (privacy.inversion measures both). Re-sending the
same tokens with fresh noise (training for several epochs, or regenerating from the same prompt) lets a peer
average the copies (noise std / sqrt(copies)); an inference session's failover replays keep the noise drawn first.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from privacy.errors import PrivacyConfigError, check_float

# The noise std (relative to each position's RMS) that the `privacy="noise"` client option uses: the best point of
# the recovery / perplexity curve that scripts/privacy_audit.py measured on the demo model with local_blocks=1
# (multiplier: token recovery nearest / maximum-likelihood, perplexity vs undefended): 2: 11.6% / 11.9%, +0.9%;
# 4: 4.4% / 6.3%, +2.0%; 8: 1.9% / 3.4%, +2.8%. The smallest under 10% against both attackers. An attacker that
# averages 4 noisy copies of the same prompt gets 10.6% / 12.5% back at 4: use 8 where prompts are re-sent.
DEFAULT_NOISE_MULTIPLIER = 4.0
PRIVACY_OFF = "off"
PRIVACY_NOISE = "noise"


@dataclass(frozen=True)
class NoiseDefence:
    """Gaussian noise on the hidden states sent to the swarm, removed from the residual stream on their way back.

    multiplier: per position, the noise std of each coordinate is `multiplier` times that position's RMS (the
    norm / sqrt(hidden_size) of the clean hidden state), so the noise is calibrated on what is transmitted and
    scales with it: the noise vector's norm is about `multiplier` times the hidden state's.
    seed: for audits and tests only; None draws the generator's seed from the OS's CSPRNG.
    """

    multiplier: float = DEFAULT_NOISE_MULTIPLIER
    seed: int | None = None

    def __post_init__(self) -> None:
        check_float("privacy noise multiplier", self.multiplier, low=0.0, low_open=True, high_open=True)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise PrivacyConfigError(f"privacy seed must be an integer or None, got {self.seed!r}")

    def new_generator(self) -> torch.Generator:
        seed = secrets.randbits(63) if self.seed is None else self.seed
        return torch.Generator().manual_seed(seed)

    def noise(self, hidden: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise for hidden [..., H] (no gradient), in hidden's dtype: std multiplier * RMS per position."""
        clean = hidden.detach().float()
        rms = clean.pow(2).mean(dim=-1, keepdim=True).sqrt()
        draw = torch.randn(clean.shape, generator=generator, dtype=torch.float32)
        return (draw * (self.multiplier * rms)).to(hidden.dtype)


def parse_privacy(value: object) -> NoiseDefence | None:
    """The `privacy` client option as a defence: "off" / None / 0 -> none; "noise" -> the default noise;
    a number m > 0 -> noise with multiplier m; a NoiseDefence as is. Anything else raises PrivacyConfigError."""
    if value is None or value == PRIVACY_OFF:
        return None
    if isinstance(value, NoiseDefence):
        return value
    if value == PRIVACY_NOISE:
        return NoiseDefence()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyConfigError(
            f"privacy must be {PRIVACY_OFF!r}, {PRIVACY_NOISE!r}, a noise multiplier > 0 or a NoiseDefence, "
            f"got {value!r}"
        )
    if value == 0 and math.isfinite(value):
        return None
    return NoiseDefence(float(value))


class ResidualNoise:
    """The client's side of a NoiseDefence: masks what is sent to the swarm and unmasks what comes back."""

    def __init__(self, defence: NoiseDefence):
        self.defence = defence
        self.generator = defence.new_generator()

    def send(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what to send, the noise to subtract from the answer)."""
        noise = self.defence.noise(hidden, self.generator)
        return hidden + noise, noise

    @staticmethod
    def receive(output: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return output - noise.to(output.dtype)
