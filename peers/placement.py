"""Choosing which blocks a new peer serves (pure functions over the swarm's coverage)."""

from __future__ import annotations

from collections.abc import Sequence


def coverage(num_blocks: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """How many servers cover each block, given their spans [start, end)."""
    counts = [0] * num_blocks
    for start, end in spans:
        for block in range(max(0, start), min(end, num_blocks)):
            counts[block] += 1
    return counts


def choose_span(num_blocks: int, span_length: int, counts: Sequence[int]) -> tuple[int, int]:
    """The window of `span_length` blocks covering the most blocks with the lowest coverage, earliest first.

    Windows are compared by their sorted coverage counts, so a window containing an uncovered block beats any
    window without one, and among those the one with more uncovered blocks wins.
    """
    if not 1 <= span_length:
        raise ValueError(f"span length must be >= 1, got {span_length}")
    span_length = min(span_length, num_blocks)
    best_start = min(
        range(num_blocks - span_length + 1),
        key=lambda s: (sorted(counts[s : s + span_length]), s),
    )
    return best_start, best_start + span_length
