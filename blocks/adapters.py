"""Client-owned trainable tensors applied to frozen blocks: deep prompts and LoRA. Peers and the client's local
blocks run the same code, so a span computes the same function wherever it runs.

Tensors are named; a name and its shape fully describe what it does:

- ``prompts`` — deep prompts for the blocks of a request, [n_blocks, P, H] (shared) or [B, n_blocks, P, H]
  (one copy per example). Before block j of the request runs, ``prompts[j]`` is ADDED to the hidden states at
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
PROMPTS = "prompts"
_LORA_NAME = re.compile(r"lora\.(\d{1,6})\.([a-z_]{1,16})\.([AB])")


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


def _lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    a, b = a.to(x.dtype), b.to(x.dtype)
    if a.dim() == 2:  # shared by the whole batch
        return scale * ((x @ a.T) @ b.T)
    # per example: x [B, T, in], a [B, r, in], b [B, out, r]
    return scale * torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, a), b)


@contextlib.contextmanager
def lora_hooks(span: BlockSpan, tensors: Mapping[str, torch.Tensor], scale: float) -> Iterator[None]:
    """Apply the LoRA tensors among `tensors` to `span`'s layers while the block is open; hooks are removed after."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = parse_lora_name(name)
        if parsed is not None:
            pairs.setdefault(parsed[:2], {})[parsed[2]] = tensor
    handles = []
    try:
        for (block, module), pair in sorted(pairs.items()):
            target = linear_module(span.layers[block - span.start], module)

            def hook(_mod: nn.Module, args: tuple, output: torch.Tensor, a=pair["A"], b=pair["B"]) -> torch.Tensor:
                return output + _lora_delta(args[0], a, b, scale)

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
    tensors: Mapping[str, torch.Tensor] | None = None,
    lora_scale: float = 1.0,
    cache=None,
    position_offset: int = 0,
) -> torch.Tensor:
    """Blocks [start, end) of `span` on `hidden` with the given deep prompts (for exactly these blocks) and LoRA."""
    tensors = tensors or {}
    prompts = tensors.get(PROMPTS)
    if prompts is None:
        with lora_hooks(span, tensors, lora_scale):
            return span(hidden, cache, position_offset, start, end)
    check_prompt_positions(prompts.shape[-2], position_offset, hidden.shape[1])
    with lora_hooks(span, tensors, lora_scale):
        for j, block in enumerate(range(start, end)):
            if position_offset == 0:  # later requests start after the prompts' positions
                hidden = add_prompt(hidden, prompts[j] if prompts.dim() == 3 else prompts[:, j])
            hidden = span(hidden, cache, position_offset, block, block + 1)
    return hidden


def is_per_example(name: str, tensor: torch.Tensor) -> bool:
    """Whether `tensor` has a leading batch dim (one copy per example) on top of its shared shape."""
    return tensor.dim() == (3 if name == PROMPTS else 2) + 1


def select_tensors(
    tensors: Mapping[str, torch.Tensor], start: int, end: int, base: int = 0, prompt_key: str = PROMPTS
) -> dict[str, torch.Tensor]:
    """The tensors for blocks [start, end), named as a request for those blocks names them: deep prompts
    (`tensors[prompt_key]`, whose block dim starts at block `base`) sliced to these blocks, LoRA of these blocks."""
    selected: dict[str, torch.Tensor] = {}
    prompts = tensors.get(prompt_key)
    if prompts is not None:
        per_example = prompts.dim() == 4
        selected[PROMPTS] = prompts[:, start - base : end - base] if per_example else prompts[start - base : end - base]
    for name, tensor in tensors.items():
        parsed = parse_lora_name(name)
        if parsed is not None and start <= parsed[0] < end:
            selected[name] = tensor
    return selected
