"""Spot checks of peers' work, the pure part: the tolerance an honest replica stays within, the comparison of two
peers' outputs, the judgement of who lied, which work to check, and each peer's record of checks. No network here
(swarm.spot_checks sends the checks).

A check sends the same work (a span's input, the client's adapters) to a second peer serving the same blocks with
the same dtype and quantization and compares the outputs. Honest replicas load identical weights (quantization is
deterministic), so they differ only by the order of floating-point operations: a step computed against a KV cache
vs the same positions in a whole-sequence forward, or a batch shared with other sessions vs alone. Measured on CPU
peers of the test models (scripts/bench_verification.py, 10,000 checks each), the largest honest difference is
2.2e-7 of the output's largest magnitude in float32 and nf4, and 5.9e-5 in int8 (bitsandbytes quantizes each
activation row to 8 bits, so a rounding difference upstream can flip one quantization step); the default tolerances
leave a margin of ~45x (float32, nf4) and ~8x (int8).
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

CheckKind = Literal["step", "forward", "backward"]

# Largest honest |a - b| relative to max(|a|, |b|), per (dtype, quant) of the peers compared. float32 (plain or with
# int8/nf4 weights and float32 compute) is exact up to operation order; 16-bit compute rounds every op to 8 or 11
# bits, so two batchings of the same work differ by about a rounding step and only gross lies are detectable.
DEFAULT_TOLERANCES: dict[tuple[str, str], float] = {
    ("float32", "none"): 1e-5,
    ("float32", "int8"): 5e-4,
    ("float32", "nf4"): 1e-5,
    ("bfloat16", "none"): 5e-2,
    ("bfloat16", "int8"): 5e-2,
    ("bfloat16", "nf4"): 5e-2,
    ("float16", "none"): 1e-2,
    ("float16", "int8"): 1e-2,
    ("float16", "nf4"): 1e-2,
}


def tolerance_for(dtype: str, quant: str, override: float | None = None) -> float:
    """The relative tolerance for comparing two peers computing in `dtype` with `quant` weights."""
    if override is not None:
        return override
    try:
        return DEFAULT_TOLERANCES[(dtype, quant)]
    except KeyError:
        raise ValueError(f"no spot-check tolerance for dtype {dtype!r} with quant {quant!r}") from None


@dataclass(frozen=True)
class Verdict:
    """The comparison of two outputs: `agree` when max |a - b| <= tolerance * max(|a|, |b|) (and both finite)."""

    agree: bool
    max_abs_diff: float
    scale: float  # max(|a|, |b|) over all elements
    tolerance: float
    where: tuple[int, ...] = ()  # index of the largest difference

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.scale if self.scale > 0 else (0.0 if self.max_abs_diff == 0 else math.inf)

    def describe(self) -> str:
        return (
            f"max |diff| {self.max_abs_diff:.3g} at {list(self.where)} = {self.relative_diff:.3g} of the largest "
            f"magnitude {self.scale:.3g} (tolerance {self.tolerance:.3g})"
        )


def compare(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> Verdict:
    """Compare two peers' outputs for the same work. Symmetric: neither side is trusted more. A shape mismatch or
    a non-finite value disagrees."""
    if a.shape != b.shape:
        return Verdict(False, math.inf, 0.0, tolerance)
    a, b = a.detach().float(), b.detach().float()
    if a.numel() == 0:
        return Verdict(True, 0.0, 0.0, tolerance)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return Verdict(False, math.inf, math.inf, tolerance)
    diff = (a - b).abs()
    flat = int(diff.argmax())
    max_diff = float(diff.reshape(-1)[flat])
    scale = max(float(a.abs().max()), float(b.abs().max()))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return Verdict(max_diff <= tolerance * scale, max_diff, scale, tolerance, where)


def compare_all(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], tolerance: float) -> Verdict:
    """The worst verdict over several outputs of one piece of work (e.g. a backward's input and adapter grads)."""
    verdicts = [compare(a, b, tolerance) for a, b in pairs]
    failed = [v for v in verdicts if not v.agree]
    if failed:
        return max(failed, key=lambda v: v.relative_diff)
    return max(verdicts, key=lambda v: v.relative_diff, default=Verdict(True, 0.0, 0.0, tolerance))


Outcome = Literal["passed", "checker_lied", "primary_lied", "unresolved"]


@dataclass(frozen=True)
class Judgement:
    outcome: Outcome
    verdict: Verdict  # primary vs checker
    arbiter_verdicts: tuple[Verdict, Verdict] | None = None  # arbiter vs primary, arbiter vs checker


def judge(
    primary: Verdict, arbiter_vs_primary: Verdict | None = None, arbiter_vs_checker: Verdict | None = None
) -> Judgement:
    """Who lied, from the comparison of the primary's output with a checker's and, when they disagree, with a third
    replica's (the arbiter). The side the arbiter agrees with (and the other does not) is honest; an arbiter that
    agrees with both or neither, or no arbiter at all, leaves the lie unattributed ("unresolved")."""
    if primary.agree:
        return Judgement("passed", primary)
    if arbiter_vs_primary is None or arbiter_vs_checker is None:
        return Judgement("unresolved", primary)
    verdicts = (arbiter_vs_primary, arbiter_vs_checker)
    if arbiter_vs_primary.agree and not arbiter_vs_checker.agree:
        return Judgement("checker_lied", primary, verdicts)
    if arbiter_vs_checker.agree and not arbiter_vs_primary.agree:
        return Judgement("primary_lied", primary, verdicts)
    return Judgement("unresolved", primary, verdicts)


class CheckSampler:
    """Decides which work is checked: each piece independently with probability `rate`. Unseeded (the default),
    the choice is unpredictable to the peers; a seed makes tests and benchmarks reproducible."""

    def __init__(self, rate: float, seed: int | None = None):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"check rate must be in [0, 1], got {rate}")
        self.rate = rate
        self.rng = random.Random(secrets.randbits(64) if seed is None else seed)

    def should_check(self) -> bool:
        return self.rate > 0 and (self.rate >= 1 or self.rng.random() < self.rate)

    def choose(self, candidates: list):
        return self.rng.choice(candidates)


@dataclass(frozen=True)
class Evidence:
    """What proves (or, unresolved, suggests) that a peer lied: logged and kept in CheckRecords.evidence."""

    kind: CheckKind
    span: str  # "start:end"
    where: str  # e.g. "position 17" or "forward of 32 tokens"
    primary: str  # base58 peer IDs
    checker: str
    arbiter: str | None
    outcome: Outcome
    verdict: Verdict
    arbiter_verdicts: tuple[Verdict, Verdict] | None = None

    @property
    def liar(self) -> str | None:
        return {"primary_lied": self.primary, "checker_lied": self.checker}.get(self.outcome)

    def describe(self) -> str:
        text = (
            f"spot check of a {self.kind} on blocks {self.span} ({self.where}): {self.outcome}; primary "
            f"{self.primary} vs checker {self.checker}: {self.verdict.describe()}"
        )
        if self.arbiter is not None and self.arbiter_verdicts is not None:
            vs_primary, vs_checker = self.arbiter_verdicts
            text += f"; arbiter {self.arbiter} vs primary: {vs_primary.describe()}, vs checker: {vs_checker.describe()}"
        return text


@dataclass
class PeerRecord:
    passed: int = 0  # checks this peer's output passed
    failed: int = 0  # checks it was on the wrong side of (or in an unresolved disagreement)
    caught: bool = False  # proven to have lied: banned for the client's lifetime


@dataclass
class CheckRecords:
    """Per peer (base58 ID): checks passed and failed, and the evidence of every disagreement."""

    peers: dict[str, PeerRecord] = field(default_factory=dict)
    evidence: list[Evidence] = field(default_factory=list)
    checks: int = 0
    inconclusive: int = 0  # checks that got no second opinion (no replica, or it failed)

    def _record(self, peer: str) -> PeerRecord:
        return self.peers.setdefault(peer, PeerRecord())

    def add(self, evidence: Evidence) -> None:
        """Fold one check's result into the records of the peers it involved."""
        self.checks += 1
        involved = [evidence.primary, evidence.checker] + ([evidence.arbiter] if evidence.arbiter else [])
        if evidence.outcome == "passed":
            for peer in (evidence.primary, evidence.checker):
                self._record(peer).passed += 1
            return
        self.evidence.append(evidence)
        liar = evidence.liar
        if liar is None:  # unresolved: everyone involved is suspect
            for peer in involved:
                self._record(peer).failed += 1
            return
        self._record(liar).failed += 1
        self._record(liar).caught = True
        for peer in involved:
            if peer != liar:
                self._record(peer).passed += 1

    def caught(self) -> set[str]:
        return {peer for peer, r in self.peers.items() if r.caught}


def route_penalties(
    records: Mapping[str, PeerRecord], peers: Iterable[str], unchecked: float, suspect: float
) -> dict[str, float]:
    """Routing cost (s) added per peer so that routes prefer peers with a record of passed checks: 0 for a peer that
    passed checks and failed none, `unchecked` for one never checked, `suspect` for one that failed any check."""
    penalties = {}
    for peer in peers:
        record = records.get(peer)
        if record is None or (record.passed == 0 and record.failed == 0):
            penalties[peer] = unchecked
        elif record.failed > 0:
            penalties[peer] = suspect
        else:
            penalties[peer] = 0.0
    return penalties


class VerificationError(RuntimeError):
    """A spot check found that a peer's output for this work was wrong, so the result cannot be trusted. With an
    attributed liar (evidence.liar) that peer is banned by now and redoing the work routes around it; unresolved,
    the two peers disagree and no third replica could tell which one lied."""

    def __init__(self, evidence: Evidence):
        self.evidence = evidence
        super().__init__(evidence.describe())
