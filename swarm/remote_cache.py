"""The peers' KV caches as transformers' ``generate`` sees them, and the checks that it uses them as we expect.

``generate`` is driven through its public contract only: a ``Cache`` passed as ``cache=`` whose layers report the
session's length (so generate hands the model exactly the tokens the peers do not hold yet), ``position_ids``, and
a logits processor, which generate calls with the whole sequence after every forward. What the client relies on is
checked at each step; when it does not hold (a new transformers release that slices inputs differently, a cache
that went missing, a peer whose cache length drifted), generation stops with :class:`GenerationDriftError` naming
what was expected, what arrived and the installed library versions, instead of producing different text.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from swarm.inference import InferenceSession

_VERSIONED = ("blockswarm", "transformers", "torch", "hivemind")


def library_versions() -> str:
    """'blockswarm 0.1.0, transformers 5.24.0, ...': what a drift report needs to be reproduced."""
    found = []
    for name in _VERSIONED:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed as a package)")
    return ", ".join(found)


class GenerationDriftError(RuntimeError):
    """Something generation relies on did not hold: continuing would produce text that differs from local."""

    def __init__(self, what: str, expected: object, arrived: object):
        self.what, self.expected, self.arrived = what, expected, arrived
        super().__init__(
            f"{what}: expected {expected}, got {arrived}. Generation stopped rather than produce wrong text; "
            f"installed: {library_versions()}"
        )


class RemoteCacheLayer(CacheLayerMixin):
    """One layer's KV cache, held by the peers: it has the session's length and nothing local to update."""

    is_sliding = False  # the peers apply sliding windows themselves; the client builds no attention masks
    is_croppable = True  # the session can rewind (the peers crop their caches at the next step)

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise self._local_use()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise self._local_use()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.session.position + query_length, 0

    def get_seq_length(self) -> int:
        return self.session.position

    def get_max_length(self) -> int:
        return self.session.max_length

    def offload(self) -> None:  # nothing local to move
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        raise NotImplementedError("the KV cache of an inference session cannot be reset: open a new session")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported through the swarm yet")

    def crop(self, tokens_to_remove: int) -> None:
        pass  # RemoteCache.crop rewinds the session once for all layers

    @staticmethod
    def _local_use() -> GenerationDriftError:
        return GenerationDriftError(
            "a local attention layer tried to write the remote KV cache",
            "the cache to reach only the swarm's model class",
            "an update() call",
        )


class RemoteCache(Cache):
    """The cache passed to ``generate`` as ``cache=``: one RemoteCacheLayer per decoder layer of the model, all with
    the session's length. It also remembers the last step that went through the session, for StepCheck.

    `prefix`: positions the peers hold before the first token of the sequence generate sees (a prompt given as
    inputs_embeds, which generate keeps no tokens of)."""

    def __init__(self, session: InferenceSession, num_layers: int, prefix: int = 0):
        super().__init__(layers=[RemoteCacheLayer(session) for _ in range(num_layers)])
        self.session = session
        self.prefix = prefix
        self.last_step: tuple[int, torch.Tensor | None] | None = None  # (position, input ids or None for embeddings)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (transformers' convention: a non-positive count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove:
            self.session.rewind(self.session.position + tokens_to_remove)

    def reset(self) -> None:
        raise NotImplementedError("the KV cache of an inference session cannot be reset: open a new session")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported through the swarm yet")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the batch of an inference session is fixed when it opens")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the batch of an inference session is fixed when it opens")

    def check_step(self, tokens: int, batch: int, position_ids: torch.Tensor | None) -> None:
        """Before a step goes to the peers: a non-empty batch of the session's size, at the session's end."""
        session = self.session
        if tokens < 1:
            raise GenerationDriftError("tokens handed to the remote cache in one step", ">= 1", tokens)
        if batch != session.batch:
            raise GenerationDriftError("batch size of a step", session.batch, batch)
        if position_ids is None:
            return
        expected = torch.arange(session.position, session.position + tokens, device=position_ids.device)
        if position_ids.shape[-1] != tokens or not bool((position_ids == expected).all()):
            raise GenerationDriftError(
                "positions of the tokens handed to the remote cache",
                f"{session.position}..{session.position + tokens - 1}",
                _describe_positions(position_ids),
            )

    def record_step(self, position: int, input_ids: torch.Tensor | None) -> None:
        self.last_step = (position, input_ids)


def _describe_positions(position_ids: torch.Tensor) -> str:
    row = position_ids.reshape(-1, position_ids.shape[-1])[0]
    if row.numel() == 0:
        return "no positions"
    return f"{int(row[0])}..{int(row[-1])} ({row.numel()} positions)"


class StepCheck(LogitsProcessor):
    """Generate calls its logits processors with the whole sequence after every forward: at that point the peers
    must hold exactly that sequence, and the tokens of the last step must be the sequence's tokens at its
    positions. Never changes the scores."""

    def __init__(self, cache: RemoteCache):
        self.cache = cache

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cache, session = self.cache, self.cache.session
        if session.position != cache.prefix + input_ids.shape[1]:
            raise GenerationDriftError(
                "tokens held by the peers after a forward step",
                f"{cache.prefix + input_ids.shape[1]} (the sequence's length, after {cache.prefix} embeddings)",
                session.position,
            )
        if cache.last_step is None:
            raise GenerationDriftError(
                "the forward step before this token", "a step through the inference session", "no step (no cache?)"
            )
        position, ids = cache.last_step
        cache.last_step = None  # each forward is checked once
        position -= cache.prefix  # where in input_ids the step's tokens are
        if ids is not None and not torch.equal(input_ids[:, position : position + ids.shape[1]], ids.to(input_ids)):
            raise GenerationDriftError(
                f"tokens sent to the peers at positions {position}..{position + ids.shape[1] - 1}",
                input_ids[:, position : position + ids.shape[1]].tolist(),
                ids.tolist(),
            )
        return scores
