"""Client-owned tensors applied to frozen blocks: an :class:`Adapters` value of deep prompts and LoRA pairs. Peers
and the client's local blocks run the same code, so a span computes the same function wherever it runs.

Tensors are named; a name and its shape fully describe what it does (the names are also their wire encoding):

- ``deep_prompts`` — for blocks ``first_block, first_block + 1, ...``: [n_blocks, P, H] (shared) or
  [B, n_blocks, P, H] (one copy per example). Before block j runs, its prompt is ADDED to the hidden states at
  positions 0..P-1 of every sequence (P must not exceed the number of tokens). This is Petals' deep prompt tuning.
- ``lora.{block}.{module}.A`` / ``.B`` — LoRA of linear module `module` (e.g. ``q_proj``) of global block `block`:
  A [r, in_features], B [out_features, r] (shared) or with a leading batch dim (per example). The module's output
  becomes ``base(x) + scale * (x @ A^T) @ B^T``, exactly PEFT's LoRA with scale = lora_alpha / r and no dropout.
  It is applied with a temporary forward hook, so it works on bitsandbytes-quantized layers as well, and
  attention is transformers' own.

Per-example tensors make ``privacy.per_example_parameters`` work through the swarm: row i only touches example i.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from blocks.span import BlockSpan

# Linear modules of a decoder layer that LoRA may target: the allow-list checked against names from the network.
LORA_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
DEEP_PROMPTS = "deep_prompts"
# [0-9], not \d: \d matches every script's digits, so two names could spell one block
_LORA_NAME = re.compile(r"lora\.([0-9]{1,6})\.([a-z_]{1,16})\.([AB])")


def lora_name(block: int, module: str, part: str) -> str:
    return f"lora.{block}.{module}.{part}"


def parse_lora_name(name: str) -> tuple[int, str, str] | None:
    """'lora.3.q_proj.A' -> (3, 'q_proj', 'A'); None if the name is not a LoRA name or targets a module not allowed."""
    match = _LORA_NAME.fullmatch(name)
    if match is None or match.group(2) not in LORA_MODULES:
        return None
    return int(match.group(1)), match.group(2), match.group(3)


def linear_module(layer: nn.Module, module: str) -> nn.Linear:
    return getattr(getattr(layer, LORA_MODULES[module]), module)


def is_per_example(name: str, tensor: torch.Tensor) -> bool:
    """Whether `tensor` has a leading batch dim (one copy per example) on top of its shared shape."""
    return tensor.dim() == (3 if name == DEEP_PROMPTS else 2) + 1


@dataclass(frozen=True)
class Adapters:
    """What a client attaches to blocks: named deep prompts and LoRA tensors (see the module docstring), the LoRA
    scale, and the global index of the block that ``deep_prompts`` starts at. Immutable: every operation returns a
    new value sharing the tensors."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    lora_scale: float = 1.0
    first_block: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __bool__(self) -> bool:
        return bool(self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    @property
    def values(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    @property
    def deep_prompts(self) -> torch.Tensor | None:
        return self.tensors.get(DEEP_PROMPTS)

    @property
    def prompt_length(self) -> int:
        prompts = self.deep_prompts
        return 0 if prompts is None else int(prompts.shape[-2])

    def lora_pairs(self) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        """(block, module) -> {"A": ..., "B": ...} of the LoRA tensors."""
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for name, tensor in self.tensors.items():
            parsed = parse_lora_name(name)
            if parsed is not None:
                pairs.setdefault(parsed[:2], {})[parsed[2]] = tensor
        return pairs

    def replace(self, tensors: Mapping[str, torch.Tensor]) -> Adapters:
        """The same adapters with other tensors under the same names (e.g. autograd's inputs, or gradients)."""
        if set(tensors) != set(self.tensors):
            raise ValueError(f"tensors {sorted(tensors)} do not match the adapters' {sorted(self.tensors)}")
        return Adapters({name: tensors[name] for name in self.tensors}, self.lora_scale, self.first_block)

    def select(self, start: int, end: int) -> Adapters:
        """The adapters of blocks [start, end): deep prompts sliced to them (now starting at `start`), their LoRA."""
        selected: dict[str, torch.Tensor] = {}
        prompts = self.deep_prompts
        if prompts is not None:
            a, b = start - self.first_block, end - self.first_block
            selected[DEEP_PROMPTS] = prompts[:, a:b] if prompts.dim() == 4 else prompts[a:b]
        for name, tensor in self.tensors.items():
            parsed = parse_lora_name(name)
            if parsed is not None and start <= parsed[0] < end:
                selected[name] = tensor
        return Adapters(selected, self.lora_scale, start)

    def rows(self, rows: slice) -> Adapters:
        """Examples `rows` of the per-example tensors; shared tensors as they are."""
        return self.replace({n: t[rows] if is_per_example(n, t) else t for n, t in self.tensors.items()})

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Adapters:
        return self.replace({n: t.to(device=device, dtype=dtype) for n, t in self.tensors.items()})

    def detach(self) -> Adapters:
        return self.replace({n: t.detach() for n, t in self.tensors.items()})


def _lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    a, b = a.to(x.dtype), b.to(x.dtype)
    if a.dim() == 2:  # shared by the whole batch
        return scale * ((x @ a.T) @ b.T)
    # per example: x [B, T, in], a [B, r, in], b [B, out, r]
    return scale * torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, a), b)


@contextlib.contextmanager
def lora_hooks(span: BlockSpan, adapters: Adapters) -> Iterator[None]:
    """Apply the adapters' LoRA to `span`'s layers while the block is open; hooks are removed after."""
    handles = []
    try:
        for (block, module), pair in sorted(adapters.lora_pairs().items()):
            target = linear_module(span.layers[block - span.start], module)

            def hook(_mod: nn.Module, args: tuple, output: torch.Tensor, a=pair["A"], b=pair["B"]) -> torch.Tensor:
                return output + _lora_delta(args[0], a, b, adapters.lora_scale)

            handles.append(target.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] with `prompt` ([P, H] or [B, P, H]) added at positions 0..P-1 (out of place, for autograd)."""
    length = prompt.shape[-2]
    if length > hidden.shape[1]:
        raise ValueError(f"deep prompts of length {length} need at least {length} tokens, got {hidden.shape[1]}")
    head = hidden[:, :length] + prompt.to(hidden.dtype)
    return torch.cat([head, hidden[:, length:]], dim=1)


def check_prompt_positions(prompt_length: int, position: int, tokens: int) -> None:
    """Deep prompts sit at positions 0..P-1: a request starting at `position` with `tokens` tokens must either
    cover all of them (start at 0 with >= P tokens) or start after them."""
    if position < prompt_length and (position > 0 or tokens < prompt_length):
        raise ValueError(
            f"with deep prompts of length {prompt_length}, a request must cover positions 0..{prompt_length - 1} "
            f"or start after them: got {tokens} token(s) at position {position}"
        )


def run_span(
    span: BlockSpan,
    hidden: torch.Tensor,
    start: int,
    end: int,
    adapters: Adapters | None = None,
    cache=None,
    position_offset: int = 0,
) -> torch.Tensor:
    """Blocks [start, end) of `span` on `hidden` with `adapters` selected for exactly these blocks."""
    adapters = adapters or Adapters(first_block=start)
    prompts = adapters.deep_prompts
    if prompts is None:
        with lora_hooks(span, adapters):
            return span(hidden, cache, position_offset, start, end)
    if adapters.first_block != start or prompts.shape[-3] != end - start:
        raise ValueError(
            f"deep prompts for {prompts.shape[-3]} blocks from block {adapters.first_block}, not [{start}, {end})"
        )
    check_prompt_positions(prompts.shape[-2], position_offset, hidden.shape[1])
    with lora_hooks(span, adapters):
        for j, block in enumerate(range(start, end)):
            if position_offset == 0:  # later requests start after the prompts' positions
                hidden = add_prompt(hidden, prompts[j] if prompts.dim() == 3 else prompts[:, j])
            hidden = span(hidden, cache, position_offset, block, block + 1)
    return hidden
