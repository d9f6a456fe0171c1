"""DP-SGD for the client's trainable parameters: Poisson sampling, per-example clipping, Gaussian noise.

Clipping and noise follow Opacus' DPOptimizer exactly: the per-example norm is the L2 norm over all parameters
together, each example is scaled by min(1, C / (norm + 1e-6)), the clipped gradients are summed, N(0, (σC)²)
noise is added to every coordinate, and the result is divided by the expected batch size q·N. Dividing by the
expected rather than the actual size keeps the sensitivity of the sum at C whatever the batch turned out to be.
(Opacus rounds q·N down to an integer; this module keeps it exact, so the two agree whenever q·N is integral.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from privacy.accounting import Mechanism, PrivacyAccountant, noise_for_target_epsilon
from privacy.errors import (
    PerExampleGradError,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    check_delta,
    check_float,
    check_int,
    check_mechanism,
    check_noise_multiplier,
    check_sample_rate,
)
from privacy.per_example import PerExampleParameters, flat_per_example, per_example_parameters


@dataclass(frozen=True)
class DPConfig:
    """Settings of one DP-SGD run.

    Exactly one of `noise_multiplier` (σ) and `target_epsilon` is given; with `target_epsilon`, `total_steps`
    is required, σ is chosen so that `total_steps` steps spend at most that ε, and stepping past `total_steps`
    is refused. `seed` makes sampling and noise reproducible (tests, debugging); leave it None in real use, since
    anyone who knows the seed can subtract the noise.
    """

    dataset_size: int
    sample_rate: float
    max_grad_norm: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    total_steps: int | None = None
    accountant: Mechanism = "rdp"
    seed: int | None = None

    def __post_init__(self) -> None:
        check_int("dataset_size", self.dataset_size, 1)
        check_sample_rate(self.sample_rate)
        check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, high_open=True)
        check_delta(self.delta)
        check_mechanism(self.accountant)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyConfigError("give exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None:
            check_noise_multiplier(self.noise_multiplier)
        if self.target_epsilon is not None and self.total_steps is None:
            raise PrivacyConfigError("target_epsilon needs total_steps: σ is calibrated for a number of steps")
        if self.total_steps is not None:
            check_int("total_steps", self.total_steps, 1)
        if self.seed is not None:
            check_int("seed", self.seed, 0)
        if self.delta >= 1.0 / self.dataset_size:
            # Not an error (the math holds), but δ ≥ 1/N allows mechanisms that publish an example outright.
            warnings.warn(f"delta={self.delta} is not below 1/dataset_size={1 / self.dataset_size}", stacklevel=3)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.dataset_size


@dataclass(frozen=True)
class PrivacyReport:
    """State after a DP-SGD step: the guarantee spent so far is (epsilon, delta)-DP."""

    step: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    batch_size: int


def poisson_sample(dataset_size: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """Indices of a Poisson batch: each example is in independently with probability `sample_rate` (may be empty).

    Same draw as Opacus' UniformWithReplacementSampler, so a shared seed gives the same batches.
    """
    mask = torch.rand(check_int("dataset_size", dataset_size, 1), generator=generator) < check_sample_rate(sample_rate)
    return mask.nonzero(as_tuple=False).reshape(-1).tolist()


def _batch_size_of(grads: Mapping[str, torch.Tensor]) -> int:
    sizes = {g.shape[0] if g.dim() > 0 else None for g in grads.values()}
    if len(sizes) != 1 or None in sizes:
        raise PerExampleGradError(f"per-example gradients need one leading batch dimension, got sizes {sizes}")
    return int(sizes.pop())


def per_example_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B] L2 norm of each example's gradient over all parameters together (per-parameter norms, then their norm,
    as Opacus computes it)."""
    if not grads:
        raise PerExampleGradError("no per-example gradients given")
    _batch_size_of(grads)
    per_param = [flat_per_example(g).norm(2, dim=-1) for g in grads.values()]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


def clip_per_example(grads: Mapping[str, torch.Tensor], max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Scale each example's gradients by min(1, C / (norm + 1e-6)) so that its joint norm is at most C."""
    max_grad_norm = check_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True, high_open=True)
    factors = (max_grad_norm / (per_example_norms(grads) + 1e-6)).clamp(max=1.0)
    return {name: torch.einsum("i,i...->i...", factors.to(g.dtype), g) for name, g in grads.items()}


def privatize(
    per_example_grads: Mapping[str, torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """(Σ clipped per-example gradients + N(0, (σC)²) per coordinate) / expected_batch_size, for each parameter.

    Noise is drawn from `generator` in the mapping's order, on the generator's device, and then moved to the
    gradient's device. An empty batch ([0, *shape] tensors) yields pure noise, as DP-SGD requires.
    """
    noise_multiplier = check_noise_multiplier(noise_multiplier)
    expected_batch_size = check_float(
        "expected_batch_size", expected_batch_size, low=0.0, low_open=True, high_open=True
    )
    clipped = clip_per_example(per_example_grads, max_grad_norm)
    std = noise_multiplier * max_grad_norm
    result = {}
    for name, g in clipped.items():
        summed = g.sum(dim=0)
        if std > 0:
            noise = torch.normal(
                0.0, std, size=summed.shape, generator=generator, dtype=g.dtype, device=generator.device
            )
            summed = summed + noise.to(summed.device)
        result[name] = summed / expected_batch_size
    return result


class DPSGD:
    """Ties Poisson sampling, per-example clipping, noise and accounting together for named parameters.

    One step::

        batch = dpsgd.sample_batch()                     # indices into the dataset, possibly empty
        replicas = dpsgd.per_example(len(batch))         # run example i with replicas.row(i) ...
        (sum of per-example losses).backward()           # ... skipped for an empty batch
        report = dpsgd.step(replicas.grads())            # writes .grad of the real parameters
        optimizer.step(); optimizer.zero_grad()          # any torch optimizer
    """

    def __init__(
        self, params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], config: DPConfig
    ) -> None:
        self.params: dict[str, torch.Tensor] = dict(params.items() if isinstance(params, Mapping) else params)
        if not self.params:
            raise PrivacyConfigError("DPSGD needs at least one parameter")
        for name, p in self.params.items():
            if not (p.is_leaf and p.requires_grad):
                raise PrivacyConfigError(f"parameter {name!r} must be a leaf tensor that requires grad")
        self.config = config
        self.noise_multiplier: float
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        elif config.target_epsilon is not None and config.total_steps is not None:
            self.noise_multiplier = noise_for_target_epsilon(
                config.target_epsilon, config.delta, config.sample_rate, config.total_steps, config.accountant
            )
        else:
            raise PrivacyConfigError("config gives neither noise_multiplier nor target_epsilon with total_steps")
        self.accountant = PrivacyAccountant(config.accountant)
        self.generator = torch.Generator()
        if config.seed is None:
            self.generator.seed()  # non-deterministic seed from the OS
        else:
            self.generator.manual_seed(config.seed)

    @property
    def steps(self) -> int:
        return len(self.accountant)

    def sample_batch(self) -> list[int]:
        """A Poisson batch of dataset indices for the next step."""
        return poisson_sample(self.config.dataset_size, self.config.sample_rate, self.generator)

    def per_example(self, batch_size: int) -> PerExampleParameters:
        """Per-example replicas of the trainable parameters for a batch of `batch_size` examples."""
        return per_example_parameters(self.params, batch_size)

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.config.delta)

    def step(self, per_example_grads: Mapping[str, torch.Tensor] | None) -> PrivacyReport:
        """Privatize one batch's per-example gradients into each parameter's `.grad` (replacing what was there)
        and account for the step. None stands for an empty batch."""
        total = self.config.total_steps
        if self.config.target_epsilon is not None and total is not None and self.steps >= total:
            raise PrivacyBudgetExhausted(
                f"σ={self.noise_multiplier:.4g} was calibrated to spend ε={self.config.target_epsilon} in {total} steps"
            )
        grads = self._checked(per_example_grads)
        noisy = privatize(
            grads,
            max_grad_norm=self.config.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.config.expected_batch_size,
            generator=self.generator,
        )
        for name, p in self.params.items():
            p.grad = noisy[name].to(p.device)
        self.accountant.step(self.noise_multiplier, self.config.sample_rate)
        return PrivacyReport(
            step=self.steps,
            epsilon=self.epsilon(),
            delta=self.config.delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.config.sample_rate,
            batch_size=_batch_size_of(grads),
        )

    def _checked(self, per_example_grads: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Per-example gradients in parameter order and dtype, after checking names and shapes."""
        if per_example_grads is None:
            return {name: p.detach().new_zeros((0, *p.shape)) for name, p in self.params.items()}
        if set(per_example_grads) != set(self.params):
            raise PerExampleGradError(
                f"per-example gradients are for {sorted(per_example_grads)}, parameters are {sorted(self.params)}"
            )
        batch_size = _batch_size_of(per_example_grads)
        grads = {}
        for name, p in self.params.items():
            g = per_example_grads[name]
            if tuple(g.shape) != (batch_size, *p.shape):
                raise PerExampleGradError(
                    f"{name}: per-example gradient {tuple(g.shape)} for parameter {tuple(p.shape)}"
                )
            grads[name] = g.detach().to(p.dtype)
        return grads
