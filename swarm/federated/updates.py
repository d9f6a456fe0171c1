"""The pure steps of a federated round on adapter vectors: flatten, clip, noise, check, agree, average, digest.

Robust aggregation is a norm-bounded mean: every accepted update has norm ≤ C + the noise's bound (`norm_bound`),
so one client moves the average by at most that / k; NaN, infinities and wrong shapes are refused outright
(`check_update`). It costs one norm per received update. It does not stop a malicious client's update inside the
bound, nor lying confirmations (not Byzantine agreement); a coordinate-wise median would resist more but breaks the
Gaussian mechanism's sensitivity analysis and the exact mean.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from peers.wire.codec import all_finite
from swarm.federated.errors import RejectedUpdate

CLIP_ROUNDING = 1e-5  # float32 norms of clipped updates exceed C by < 1e-6 relative; 10x margin


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All tensors as one float32 vector, in name order (the order every client uses)."""
    return torch.cat([tensors[name].detach().reshape(-1).to(torch.float32) for name in sorted(tensors)])


def unflatten_into(vector: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
    """Copy `vector` (as laid out by `flatten`) into the parameters, in place."""
    offset = 0
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            p.copy_(vector[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
    if offset != vector.numel():
        raise ValueError(f"vector of {vector.numel()} values for parameters of {offset}")


def clip_update(update: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    """The update scaled by min(1, C / (norm + 1e-6)) (as DP-SGD clips an example); unchanged if C is None."""
    if clip_norm is None:
        return update.clone()
    return update * min(1.0, clip_norm / (float(update.norm()) + 1e-6))


def noise_share(numel: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """This client's share of the round's noise: N(0, std²) per coordinate (zeros when std is 0)."""
    if std == 0.0:
        return torch.zeros(numel)
    return torch.normal(0.0, std, size=(numel,), generator=generator)


def norm_bound(clip_norm: float, noise_std: float, numel: int, failure_probability: float) -> float:
    """Largest norm an honest client's noisy update has, except with `failure_probability`: C + std·(sqrt(d) +
    sqrt(2 ln(1/p))), by Gaussian concentration of the norm (a 1-Lipschitz function) around at most sqrt(d)·std.
    C gets a relative slack of `CLIP_ROUNDING`: a clipped float32 update's computed norm can exceed C by rounding
    (about one in four at d = 3584), which without noise would refuse honest updates."""
    return clip_norm * (1.0 + CLIP_ROUNDING) + noise_std * (
        math.sqrt(numel) + math.sqrt(2.0 * math.log(1.0 / failure_probability))
    )


def check_update(update: torch.Tensor, numel: int, bound: float | None) -> torch.Tensor:
    """The update if it is a float32 vector of `numel` finite values with norm ≤ `bound` (None: no bound)."""
    if update.dtype != torch.float32 or update.dim() != 1 or update.numel() != numel:
        raise RejectedUpdate(f"shape {list(update.shape)} {update.dtype}, expected [{numel}] float32")
    if not all_finite(update):
        raise RejectedUpdate("it holds NaN or infinite values")
    if bound is not None:
        norm = float(update.norm())
        if norm > bound:
            raise RejectedUpdate(f"norm {norm:.6g} above the bound {bound:.6g}")
    return update


def agreed_set(accepted: frozenset[str], confirmations: Mapping[str, frozenset[str]]) -> frozenset[str]:
    """The round's participants: of the clients whose updates we accepted and who confirmed, those accepted by
    every one of them. Confirmations of clients we refused are ignored; ours must be among them."""
    confirming = {q for q in confirmations if q in accepted}
    return frozenset(p for p in confirming if all(p in confirmations[q] for q in confirming))


def aggregate(updates: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the updates, summed in key order in float64: identical bits on every client with the same set."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = torch.zeros(next(iter(updates.values())).numel(), dtype=torch.float64)
    for name in sorted(updates):
        total += updates[name].to(torch.float64)
    return (total / len(updates)).to(torch.float32)


def digest(vector: torch.Tensor) -> str:
    """Short hash of an adapter vector's bytes (to compare clients' adapters in logs and tests)."""
    return hashlib.sha256(vector.contiguous().numpy().tobytes()).hexdigest()[:16]
