"""Privacy audit: privacy.inversion's attacks against a model and a client configuration, and what they cost.

It runs without a network, on what the client code really sends: the client is the real Distributed*ForCausalLM
class, assembled (``DistributedCausalLMMixin.assemble``) around :class:`CapturingSequence`, a stand-in for
swarm.sequence.RemoteSequence that runs the remote blocks in this process with blocks.adapters.run_span as the peers
do. Everything up to that point (embeddings, local blocks with the client's adapters, the privacy defence in
RemoteDecoderModel._through_swarm) is the client's own code path, so the stand-in receives exactly the tensor the
first remote peer would, and, in a backward pass, the last remote peer's gradient. The attacker knows only public
weights: embeddings and the blocks before its span without the client's adapters, and the rest of the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blocks.adapters import Adapters, run_span
from blocks.checkpoint import open_checkpoint
from blocks.families import family_of
from blocks.span import BlockSpan, load_span
from privacy.defence import NoiseDefence, parse_privacy
from privacy.errors import PrivacyConfigError, check_int
from privacy.exposure import split_local_blocks
from privacy.inversion import invert_hidden_states, invert_labels_from_gradients, score_recovery
from swarm.config import ClientConfig
from swarm.model import DISTRIBUTED_CLASSES, RemoteDecoderModel


class CapturingSequence:
    """Runs the remote blocks [start, end) here, as a route of peers would, and keeps what the first of them
    received (`received`), what the last returned (`returned`) and the gradient sent back to it (`grads`). Not an
    nn.Module, like RemoteSequence: the client's state dict holds no remote weights."""

    def __init__(self, span: BlockSpan | None, start: int, end: int):
        self.span, self.remote_start, self.remote_end = span, start, end
        self.received: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def forward(self, hidden: torch.Tensor, adapters: Adapters | None = None) -> torch.Tensor:
        self.received.append(hidden.detach().clone())
        if self.span is None:  # "skip": what the model does without its remote blocks, for reference
            output = hidden
        else:
            sub = (adapters or Adapters()).select(self.remote_start, self.remote_end)
            output = run_span(self.span, hidden, self.remote_start, self.remote_end, sub)
        self.returned.append(output.detach().clone())
        if output.requires_grad:
            output.register_hook(lambda grad: self.grads.append(grad.detach().clone()))
        return output


@dataclass(frozen=True)
class ClientSetup:
    """A client configuration to audit: ClientConfig's local_blocks and privacy, and a LoRA of rank `lora_rank`
    that the client trains on its first local blocks for `lora_steps` steps before the attack (0: none)."""

    local_blocks: int | tuple[int, int] = 0
    privacy: str | float | NoiseDefence | None = "off"
    lora_steps: int = 0
    lora_rank: int = 8
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the report, e.g. a label

    def __post_init__(self) -> None:
        check_int("lora_steps", self.lora_steps, 0)
        check_int("lora_rank", self.lora_rank, 1)
        parse_privacy(self.privacy)


def _client_config(setup: ClientSetup) -> ClientConfig:
    defence = parse_privacy(setup.privacy)
    if defence is not None and defence.seed is None:  # reproducible audits; the client itself never seeds it
        defence = NoiseDefence(defence.multiplier, setup.seed)
    return ClientConfig(local_blocks=setup.local_blocks, privacy=defence if defence is not None else "off")


def build_client(path: str | Path, setup: ClientSetup, *, skip_remote: bool = False) -> Any:
    """The client model of `setup` around a CapturingSequence (with `skip_remote`, one that skips the blocks)."""
    ckpt = open_checkpoint(path)
    config = _client_config(setup)
    _, remote, _ = split_local_blocks(ckpt.config.num_hidden_layers, *config.local_split)
    span = None if skip_remote else load_span(ckpt, remote.start, remote.stop, progress=False)
    sequence = CapturingSequence(span, remote.start, remote.stop)
    cls = DISTRIBUTED_CLASSES[family_of(ckpt.config).model_type]
    return cls.assemble(ckpt, sequence, config, torch.float32)


def _batches(windows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    yield from windows.split(size)


def train_local_lora(model: Any, setup: ClientSetup, train_windows: torch.Tensor, lr: float = 2e-3) -> float:
    """Train a LoRA on the client's first local blocks (all linear modules) on `train_windows`; the last loss."""
    first = model.model.local_first
    if first is None:
        raise PrivacyConfigError("lora_steps needs local blocks: the LoRA is trained on the first local blocks")
    generator = torch.Generator().manual_seed(setup.seed)
    model.tuning.add_lora(
        rank=setup.lora_rank,
        alpha=2.0 * setup.lora_rank,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        blocks=list(range(first.start, first.end)),
        generator=generator,
    )
    optimizer = torch.optim.AdamW(model.tuning.parameters(), lr=lr)
    loss = math.nan
    order = torch.randint(0, len(train_windows), (setup.lora_steps, 8), generator=generator)
    for rows in order:
        batch = train_windows[rows]
        loss_t = model(input_ids=batch, labels=batch).loss
        loss_t.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(loss_t.detach())
    return loss


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token loss) of `model` over windows [N, L], through its (stand-in) remote blocks."""
    losses = [float(model(input_ids=w, labels=w).loss) * len(w) for w in _batches(windows, batch)]
    return math.exp(sum(losses) / len(windows))


def _public_states(public: Any) -> Any:
    """The attacker's map from (prefix, candidate tokens) to the first remote block's input at the candidates'
    position: public embeddings and local blocks, the prefix run once into a KV cache shared by the candidates.
    Memoized per prefix (cleared per prompt by the caller), so that several scorings share the forward passes."""
    decoder: RemoteDecoderModel = public.model
    span = decoder.local_first
    memo: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def states(prefix: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        key = (*prefix.tolist(), -1, int(candidates[0]), len(candidates))
        if key in memo:
            return memo[key]
        embedded = decoder.embed_tokens(candidates[:, None])
        if span is None:
            out = embedded[:, 0]
        else:
            cache, t = span.new_cache(), len(prefix)
            if t:
                RemoteDecoderModel._run_local(span, decoder.embed_tokens(prefix[None]), Adapters(), cache, 0)
                cache.batch_repeat_interleave(len(candidates))
            out = RemoteDecoderModel._run_local(span, embedded, Adapters(), cache, t)[:, 0]
        memo[key] = out
        return out

    states.memo = memo  # type: ignore[attr-defined]
    return states


def _public_tail_and_head(public: Any) -> tuple[Any, Any]:
    """The attacker's map from the last remote block's output to logits: public last local blocks; norm and head."""
    decoder: RemoteDecoderModel = public.model

    def tail(hidden: torch.Tensor) -> torch.Tensor:
        return RemoteDecoderModel._run_local(decoder.local_last, hidden, Adapters())

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return public.lm_head(decoder.norm(hidden))

    return tail, head


def audit_client(
    path: str | Path,
    setup: ClientSetup,
    prompts: torch.Tensor,
    heldout: torch.Tensor | None = None,
    train_windows: torch.Tensor | None = None,
    *,
    scorings: tuple[str, ...] = ("nearest",),
    copies: int = 1,
    backward_prompts: int = 0,
) -> dict[str, Any]:
    """Attack the client of `setup` on prompts [N, T] as the first remote peer would; with `backward_prompts`,
    also the gradients of that many prompts' fine-tuning loss as the last remote peer would. Held-out windows
    [M, L] give the configuration's perplexity. Returns a JSON-able report."""
    check_int("copies", copies, 1)
    check_int("backward_prompts", backward_prompts, 0)
    model = build_client(path, setup)
    report: dict[str, Any] = {
        "local_blocks": setup.local_blocks,
        "privacy": _privacy_label(setup.privacy),
        "lora_steps": setup.lora_steps,
        **setup.extra,
    }
    if setup.lora_steps:
        if train_windows is None:
            raise PrivacyConfigError("lora_steps needs train_windows")
        report["lora_final_loss"] = round(train_local_lora(model, setup, train_windows), 4)
    public = build_client(path, ClientSetup(local_blocks=setup.local_blocks))
    sequence: CapturingSequence = model.model.sequence
    defence = model.model.privacy.defence if model.model.privacy is not None else None
    multiplier = defence.multiplier if defence is not None else 0.0
    vocab = model.config.vocab_size
    states = _public_states(public)

    received = []
    with torch.no_grad():
        for prompt in prompts:
            sequence.received.clear()
            for _ in range(max(copies, 1)):
                model(input_ids=prompt[None])
            received.append(torch.stack([r[0] for r in sequence.received]))
    attacks = [(scoring, 1) for scoring in scorings] + [(scoring, copies) for scoring in scorings if copies > 1]
    guesses: dict[tuple[str, int], list[torch.Tensor]] = {attack: [] for attack in attacks}
    for copies_received in received:
        states.memo.clear()
        for scoring, n in attacks:
            observed = copies_received[:n]
            guess = invert_hidden_states(observed, states, vocab, scoring=scoring, noise_multiplier=multiplier)
            guesses[scoring, n].append(guess)
    truth = list(prompts)
    report["forward"] = {
        scoring if n == 1 else f"{scoring}_{n}_copies": score_recovery(truth, guesses[scoring, n]).as_dict()
        for scoring, n in attacks
    }

    if heldout is not None:
        report["perplexity"] = round(perplexity(model, heldout), 3)
    if backward_prompts:  # last: it may add a (zero) LoRA to the model
        report["backward"] = _backward_attack(model, public, prompts[:backward_prompts])
    return report


def _backward_attack(model: Any, public: Any, prompts: torch.Tensor) -> dict[str, Any]:
    """Fine-tuning step per prompt: the client's loss backward, and the label attack on the last peer's gradient."""
    if not list(model.tuning.parameters()):
        # A fresh LoRA on the remote blocks (B = 0: the forward is unchanged) is what makes the pass a fine-tuning one.
        sequence: CapturingSequence = model.model.sequence
        model.tuning.add_lora(rank=4, blocks=list(range(sequence.remote_start, sequence.remote_end)))
    sequence = model.model.sequence
    tail, head = _public_tail_and_head(public)
    truth, guesses = [], []
    for prompt in prompts:
        sequence.returned.clear()
        sequence.grads.clear()
        loss = model(input_ids=prompt[None], labels=prompt[None]).loss
        loss.backward()
        model.tuning.zero_grad(set_to_none=True)
        output, grad = sequence.returned[-1][0], sequence.grads[-1][0]
        labels = invert_labels_from_gradients(output, grad, tail, head, len(prompt) - 1)
        truth.append(prompt[1:])
        guesses.append(labels)
    return score_recovery(truth, guesses).as_dict()


def _privacy_label(value: object) -> str | float:
    defence = parse_privacy(value)
    return "off" if defence is None else defence.multiplier
