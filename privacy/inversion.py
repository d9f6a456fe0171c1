"""Inversion attacks of a curious peer with the model's public weights, and their metrics (privacy.audit runs them).

Forward path: the first remote peer receives the hidden states at the input of its first block. For each position t
in order, it tries every token v after the prefix it has recovered so far, runs prefix + v through the public blocks
before its span (the identity without local blocks: then it compares embeddings) and keeps the v whose state at t
is nearest to what it received: "nearest" is Euclidean distance; "ml" is the maximum-likelihood choice of an
attacker who knows privacy.defence's noise distribution (std = multiplier * RMS of the clean state), but not the
noise drawn; with several noisy copies of the same tokens it averages them first.

Backward path (fine-tuning): the peer serving the last remote block receives the gradient of the mean next-token
loss with respect to its output. That gradient is linear in the residuals softmax(logits_s) - onehot(label_s) of
the positions s >= t that position t feeds, through the public rest of the model (local last blocks, final norm,
LM head). From the last labelled position backwards, the peer predicts the gradient for every candidate label with
the labels it has already recovered, and keeps the nearest: the labels are the prompt's tokens shifted by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from privacy.errors import PrivacyConfigError, check_float, check_int

# (prefix ids [t], candidate ids [C]) -> the public hidden states [C, H] at position t of the first remote block's
# input, for the sequences prefix + candidate
StatesFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# hidden states [B, T, H] at the last remote block's output -> the public blocks after it [B, T, H]
TailFn = Callable[[torch.Tensor], torch.Tensor]
# states [..., H] after the last block -> logits [..., V] (final norm and LM head: position-wise)
HeadFn = Callable[[torch.Tensor], torch.Tensor]
Scoring = Literal["nearest", "ml"]
SCORINGS: tuple[Scoring, ...] = ("nearest", "ml")


@dataclass(frozen=True)
class Recovery:
    """How much of a set of token sequences an attack got back."""

    tokens: int
    recovered_tokens: int
    sequences: int
    recovered_sequences: int  # sequences recovered exactly, every token

    @property
    def token_rate(self) -> float:
        return self.recovered_tokens / self.tokens if self.tokens else 0.0

    @property
    def sequence_rate(self) -> float:
        return self.recovered_sequences / self.sequences if self.sequences else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "token_recovery": round(self.token_rate, 4),
            "prompts_fully_recovered": self.recovered_sequences,
            "prompts": self.sequences,
            "tokens": self.tokens,
        }


def score_recovery(truth: list[torch.Tensor], guesses: list[torch.Tensor]) -> Recovery:
    """Token-by-token comparison of recovered sequences with the true ones (same lengths)."""
    if len(truth) != len(guesses):
        raise PrivacyConfigError(f"{len(guesses)} recovered sequences for {len(truth)} true ones")
    hits = [(t.reshape(-1) == g.reshape(-1)) for t, g in zip(truth, guesses, strict=True)]
    return Recovery(
        tokens=sum(h.numel() for h in hits),
        recovered_tokens=sum(int(h.sum()) for h in hits),
        sequences=len(hits),
        recovered_sequences=sum(bool(h.all()) for h in hits),
    )


def _scores(
    observed: torch.Tensor, candidates: torch.Tensor, scoring: Scoring, noise_multiplier: float, copies: int
) -> torch.Tensor:
    """Lower is more likely: observed [H] (the mean of `copies` noisy copies) against candidates [V, H]."""
    sq_dist = (candidates - observed).pow(2).sum(dim=-1)
    if scoring == "nearest" or noise_multiplier == 0:
        return sq_dist
    # Gaussian with per-candidate std sigma_v = m * RMS(c_v) / sqrt(copies): minus the log-likelihood, up to a constant
    sigma = noise_multiplier * candidates.pow(2).mean(dim=-1).sqrt().clamp_min(1e-12) / math.sqrt(copies)
    return sq_dist / (2 * sigma.pow(2)) + candidates.shape[-1] * sigma.log()


@torch.no_grad()
def invert_hidden_states(
    received: torch.Tensor,
    public_states: StatesFn,
    vocab_size: int,
    *,
    scoring: Scoring = "nearest",
    noise_multiplier: float = 0.0,
    chunk: int = 2048,
) -> torch.Tensor:
    """Greedy inversion of one sequence's hidden states received [T, H] (or [copies, T, H] of the same tokens with
    independent noise: averaged, and scored as one observation with noise std / sqrt(copies)) -> ids [T]."""
    if scoring not in SCORINGS:
        raise PrivacyConfigError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    check_float("noise_multiplier", noise_multiplier, low=0.0, low_open=False, high_open=True)
    check_int("chunk", chunk, 1)
    copies = received.shape[0] if received.dim() == 3 else 1
    observed_all = received.float().mean(dim=0) if received.dim() == 3 else received.float()
    length = observed_all.shape[0]
    recovered = torch.empty(length, dtype=torch.long)
    vocab = torch.arange(vocab_size)
    for t in range(length):
        best_score, best_token = math.inf, 0
        for part in vocab.split(chunk):
            states = public_states(recovered[:t], part).float()
            scores = _scores(observed_all[t], states, scoring, noise_multiplier, copies)
            score, index = scores.min(dim=0)
            if float(score) < best_score:
                best_score, best_token = float(score), int(part[index])
        recovered[t] = best_token
    return recovered


def invert_labels_from_gradients(
    outputs: torch.Tensor, grads: torch.Tensor, public_tail: TailFn, public_head: HeadFn, num_labels: int
) -> torch.Tensor:
    """Labels of positions 0..T-2 (the inputs' tokens 1..T-1) from one sequence's output states [T, H] of the last
    remote block and the gradient [T, H] of the loss (mean cross-entropy over `num_labels` labels of the batch)
    with respect to them, as that block's peer receives it in a backward pass. `public_tail` is the public blocks
    after the peer's span, `public_head` the final norm and LM head."""
    check_int("num_labels", num_labels, 1)
    length = outputs.shape[0]
    hidden = outputs.detach().float().requires_grad_(True)
    tail = public_tail(hidden[None])[0]
    logits = public_head(tail).float()  # [T, V]
    probs = logits.detach().softmax(dim=-1)
    # d tail_t / d hidden_t of every position, in one vectorized pass (the identity without public tail blocks)
    tail_jacobian = torch.autograd.functional.jacobian(
        lambda h: public_tail(h[None])[0], hidden.detach(), vectorize=True
    )
    labels = torch.zeros(length - 1, dtype=torch.long)
    residuals = torch.zeros_like(probs)  # rows of the labels recovered so far, (p_s - onehot(y_s)) / N
    for t in range(length - 2, -1, -1):
        # The gradient at t if the label at t were none: position t's own term is then p_t / N
        residuals[t] = probs[t] / num_labels
        (base,) = torch.autograd.grad(logits, hidden, residuals, retain_graph=True)
        # Label v takes d logits_t[v] / d hidden_t / N away from it: rows of position t's Jacobian [V, H]
        head_jacobian = torch.func.jacfwd(public_head)(tail[t].detach())
        rows = head_jacobian.float() @ tail_jacobian[t, :, t, :]
        predicted = base[t] - rows / num_labels
        label = int((predicted - grads[t].float()).pow(2).sum(dim=-1).argmin())
        labels[t] = label
        residuals[t, label] -= 1.0 / num_labels
    return labels
