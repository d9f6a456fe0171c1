"""Exact per-example gradients by replicating parameters once per example.

Each trainable parameter p becomes a leaf tensor of shape [B, *p.shape] whose row i only example i uses. With the
loss taken as the SUM of per-example losses, one batched backward leaves in `copy.grad[i]` exactly the gradient
of example i's loss with respect to p: examples never mix inside a transformer (no cross-row operations), so
row i's gradient cannot receive contributions from any other example. A MEAN loss would scale every row by 1/B.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from privacy.errors import check_int


@dataclass(frozen=True)
class PerExampleParameters:
    """Replicated leaves `tensors[name]` of shape [batch_size, *shape], one row per example."""

    tensors: dict[str, torch.Tensor]
    batch_size: int

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Example `index`'s own copy of every parameter (still connected to the replicated leaves)."""
        if not 0 <= index < self.batch_size:
            raise IndexError(f"example {index} is outside a batch of {self.batch_size}")
        return {name: t[index] for name, t in self.tensors.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        """Per-example gradients [batch_size, *shape] after backward; a copy that no loss used has zero gradient."""
        return {
            name: torch.zeros_like(t) if t.grad is None else t.grad.detach().clone() for name, t in self.tensors.items()
        }


def per_example_parameters(params: Mapping[str, torch.Tensor], batch_size: int) -> PerExampleParameters:
    """Replicate each parameter `batch_size` times as a fresh leaf requiring grad (the originals are untouched).

    Use `result.tensors[name][i]` (or `result.row(i)`) for example i, backward the SUM of per-example losses,
    then read `result.grads()`. A batch of 0 gives [0, *shape] tensors, which is what an empty Poisson batch needs.
    """
    batch_size = check_int("batch_size", batch_size, 0)
    tensors = {
        name: p.detach().unsqueeze(0).repeat(batch_size, *([1] * p.dim())).requires_grad_(True)
        for name, p in params.items()
    }
    return PerExampleParameters(tensors=tensors, batch_size=batch_size)


def flat_per_example(grad: torch.Tensor) -> torch.Tensor:
    """[B, *shape] → [B, prod(shape)]; unlike flatten(1) it also works for B = 0 and for scalar parameters."""
    return grad.reshape(grad.shape[0], math.prod(grad.shape[1:]))
