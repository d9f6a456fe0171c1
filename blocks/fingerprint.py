"""Fingerprints of decoder blocks' weights, to tell whether two checkpoints' blocks are the same.

A peer announces the fingerprint of the span it serves (``ServerRecord.weights``); a client computes the one it
expects for that span from its own checkpoint and uses the peer only if both are equal. So a text-only client and a
multimodal client (LLaVA) of the same language model share peers exactly when the blocks' weights are the same,
wherever and under whichever names their checkpoints store them, and peers of another fine-tune, seed or dtype
that announce under the same DHT prefix are not used.

A block's fingerprint covers each of its tensors: its name relative to the layer, dtype, shape, and the bytes of a
sample (the whole tensor up to SAMPLE_BYTES, else SAMPLE_ROWS rows spread over its first dimension), read with
safetensors slices, so that a client computes the fingerprints of all blocks without reading the language model.
It tells honest checkpoints apart (a fine-tune or another seed changes every row); it proves nothing against a
peer that lies: that peer can copy an honest record's fingerprint, and what catches it is the spot checks
(swarm.spot_checks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from blocks import checkpoint
from blocks.checkpoint import Checkpoint, block_prefix, block_tensor_names

FINGERPRINT_HEX = 32  # hex digits of a fingerprint (128 bits of SHA-256)
SAMPLE_ROWS = 3  # rows hashed of a tensor of more than SAMPLE_ELEMENTS elements, spread from the first to the last
SAMPLE_ELEMENTS = 1 << 14  # a tensor up to this many elements is hashed whole
_VERSION = b"blockswarm-block-weights-v1"  # changes whenever what is hashed does


def sample_rows(shape: list[int]) -> list[int] | None:
    """Rows of the first dimension to hash, or None for the whole tensor."""
    numel = 1
    for size in shape:
        numel *= size
    if len(shape) < 2 or numel <= SAMPLE_ELEMENTS:
        return None
    last = shape[0] - 1
    return sorted({i * last // (SAMPLE_ROWS - 1) for i in range(SAMPLE_ROWS)})


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def block_fingerprint(ckpt: Checkpoint, block: int) -> str:
    """The fingerprint of one block's weights as the checkpoint stores them (dtype included)."""
    prefix = block_prefix(ckpt, block)
    names = sorted(block_tensor_names(ckpt, block), key=lambda n: n[len(prefix) :])
    digest = hashlib.sha256(_VERSION)
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(ckpt.weight_map[name], []).append(name)
    parts: dict[str, bytes] = {}
    for file_name, file_names in by_file.items():
        # Through the module's safe_open, so that tests that spy on what a peer reads see these reads too.
        with checkpoint.safe_open(ckpt.path / file_name, framework="pt") as f:
            for name in file_names:
                sliced = f.get_slice(name)
                shape, dtype = list(sliced.get_shape()), sliced.get_dtype()
                rows = sample_rows(shape)
                if rows is None:
                    data = _tensor_bytes(f.get_tensor(name))
                else:
                    data = b"".join(_tensor_bytes(sliced[r : r + 1]) for r in rows)
                header = f"{name[len(prefix) :]}|{dtype}|{shape}|{rows}|{len(data)}|".encode()
                parts[name] = header + data
    for name in names:
        digest.update(parts[name])
    return digest.hexdigest()[:FINGERPRINT_HEX]


def combine(block_fingerprints: list[str]) -> str:
    """The fingerprint of a span: of its blocks' fingerprints, in order."""
    digest = hashlib.sha256(_VERSION + b"|span|" + "|".join(block_fingerprints).encode())
    return digest.hexdigest()[:FINGERPRINT_HEX]


def span_fingerprint(ckpt: Checkpoint, start: int, end: int) -> str:
    """What a peer serving blocks [start, end) of `ckpt` announces."""
    return combine([block_fingerprint(ckpt, b) for b in range(start, end)])


@dataclass(frozen=True)
class ModelWeights:
    """The fingerprints of every block of a model, computed by a client: what it expects a span's peers to announce."""

    blocks: tuple[str, ...]

    def span(self, start: int, end: int) -> str | None:
        """The fingerprint of [start, end); None for a span outside the model (no peer's record can match it)."""
        if not 0 <= start < end <= len(self.blocks):
            return None
        return combine(list(self.blocks[start:end]))


def model_weights(ckpt: Checkpoint) -> ModelWeights | None:
    """Every block's fingerprint, or None where the checkpoint's block files are not all here (a client that fetched
    only its own part from the hub): such a client cannot tell peers' weights apart."""
    files = {ckpt.weight_map[n] for b in range(ckpt.num_blocks) for n in block_tensor_names(ckpt, b)}
    if not all((ckpt.path / f).is_file() for f in files):
        return None
    return ModelWeights(tuple(block_fingerprint(ckpt, b) for b in range(ckpt.num_blocks)))
