"""Benchmark: one training step (forward + backward of deep prompts) through a 2-peer swarm vs local transformers.

Makes the random-weight ~110M Llama (or uses --model), starts 2 peers (half the blocks each) on 127.0.0.1, and in
the same run alternates timed steps — batch 8 x 128 tokens, deep prompts of every block trained, next-token loss —
through the swarm and through local transformers with the same deep prompts (swarm.tuning.local_deep_prompts).
Prints one JSON line: medians of swarm_step_s and local_step_s, their ratio (local / swarm: 1.0 means no slowdown)
and the largest difference between the two gradients.

By default each peer keeps its span's autograd graph from the forward until the backward arrives on the same call
(ClientConfig.hold_activations), so a swarm step does the same two passes over every block as the local step.
It also times the stateless mode (stateless_step_s, stateless_ratio), where the peer recomputes the forward in the
backward call: three passes over every block instead of two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import PRESETS, make_random_checkpoint  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.tuning import local_deep_prompts  # noqa: E402


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def swarm_step(model, ids: torch.Tensor, hold: bool = True) -> tuple[float, torch.Tensor]:
    model.model.sequence.config.hold_activations = hold
    deep = model.tuning.named_trainables()["deep_prompts"]
    deep.grad = None
    began = time.perf_counter()
    next_token_loss(model(ids).logits, ids).backward()
    return time.perf_counter() - began, deep.grad.clone()


def local_step(model, deep: torch.Tensor, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    deep.grad = None
    began = time.perf_counter()
    with local_deep_prompts(model, deep):
        next_token_loss(model(ids).logits, ids).backward()
    return time.perf_counter() - began, deep.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: a fresh random bench-110m)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads-per-peer", type=int, default=2, help="peers compute one after the other")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockswarm-bench-") as tmp:
        path = (
            Path(args.model)
            if args.model
            else make_random_checkpoint(Path(tmp) / "bench-110m", **PRESETS["bench-110m"])
        )
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
        n_params = sum(p.numel() for p in local.parameters())
        ids = torch.randint(
            0, local.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
        )
        with LocalSwarm(
            path, peers=2, threads_per_peer=args.threads_per_peer, extra_args=["--log-level", "WARNING"]
        ) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            try:
                model.tuning.add_deep_prompts(args.prompt_len)
                with torch.no_grad():
                    model.tuning.named_trainables()["deep_prompts"].normal_(
                        0, 0.02, generator=torch.Generator().manual_seed(1)
                    )
                deep = model.tuning.named_trainables()["deep_prompts"].detach().clone().requires_grad_(True)
                swarm_step(model, ids), local_step(local, deep, ids)  # warm-up: connections, allocator
                swarm_times, stateless_times, local_times, max_diff = [], [], [], 0.0
                for _ in range(args.repeats):
                    t_swarm, g_swarm = swarm_step(model, ids)
                    t_stateless, g_stateless = swarm_step(model, ids, hold=False)
                    t_local, g_local = local_step(local, deep, ids)
                    swarm_times.append(t_swarm)
                    stateless_times.append(t_stateless)
                    local_times.append(t_local)
                    for g in (g_swarm, g_stateless):
                        max_diff = max(max_diff, float((g - g_local).abs().max()))
                grad_norm = float(g_local.norm())
            finally:
                model.shutdown()
    swarm_s, local_s = statistics.median(swarm_times), statistics.median(local_times)
    stateless_s = statistics.median(stateless_times)
    result = {
        "model": "bench-110m" if not args.model else str(args.model),
        "params_m": round(n_params / 1e6, 1),
        "peers": 2,
        "batch": args.batch,
        "tokens": args.tokens,
        "deep_prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "swarm_step_s": round(swarm_s, 3),
        "local_step_s": round(local_s, 3),
        "ratio": round(local_s / swarm_s, 3),
        "stateless_step_s": round(stateless_s, 3),
        "stateless_ratio": round(local_s / stateless_s, 3),
        "grad_norm": round(grad_norm, 4),
        "max_grad_abs_diff": max_diff,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
