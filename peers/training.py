"""Training through a peer: the span's forward with autograd, gradients, and the budget of graphs held between a
train call's forward and its backward."""

from __future__ import annotations

import torch

from blocks.adapters import Adapters, run_span
from blocks.span import BlockSpan
from peers.wire.codec import all_finite
from peers.wire.framing import ProtocolError


def forward_graph(
    span: BlockSpan, hidden: torch.Tensor, start: int, end: int, adapters: Adapters
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Blocks [start, end) with autograd: (leaves [input, *adapter tensors], output)."""
    device, dtype = next(span.parameters()).device, span.dtype
    with torch.enable_grad():
        x = hidden.to(device, dtype).requires_grad_(True)
        leaves = [t.to(device, dtype).requires_grad_(True) for t in adapters.values]
        out = run_span(span, x, start, end, adapters.replace(dict(zip(adapters.names, leaves, strict=True))))
    return [x, *leaves], out


def gradients(
    leaves: list[torch.Tensor], out: torch.Tensor, grad_out: torch.Tensor, wire: torch.dtype
) -> list[torch.Tensor]:
    """Gradients w.r.t. each leaf, in the wire dtype on the CPU (zeros for a leaf the output does not depend on)."""
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.device, out.dtype), allow_unused=True)
    result = [(torch.zeros_like(v) if g is None else g).to("cpu", wire) for g, v in zip(grads, leaves, strict=True)]
    if not all(all_finite(g) for g in result):
        # inputs within max_abs_value can still overflow in a low-precision dtype: a clear refusal, not infinities
        raise ProtocolError("the gradients overflowed to NaN or infinity: the request's values are too large")
    return result


def recompute_gradients(
    span: BlockSpan, hidden: torch.Tensor, grad_out: torch.Tensor, start: int, end: int, adapters: Adapters
) -> list[torch.Tensor]:
    """The stateless backward: recompute blocks [start, end) with autograd (nothing was kept from the forward)."""
    leaves, out = forward_graph(span, hidden, start, end, adapters)
    return gradients(leaves, out, grad_out, hidden.dtype)


class HeldGraphs:
    """Tokens of the autograd graphs that open train calls hold, against a limit (event-loop only)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0

    def try_hold(self, tokens: int) -> bool:
        if self.tokens + tokens > self.max_tokens:
            return False
        self.tokens += tokens
        return True

    def release(self, tokens: int) -> None:
        self.tokens -= tokens
