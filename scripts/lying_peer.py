"""TEST ONLY: a `swarm-peer` that lies. It runs the ordinary peer with its computations wrapped so that outputs (of
inference steps, pushed ones included, whole-sequence forwards and backward gradients) are perturbed by Gaussian
noise of `--rel` times the output's RMS, on a fraction `--prob` of the requests. Used by tests/test_verification.py
and scripts/bench_verification.py to measure the client's spot checks; nothing in the peer package knows of it.

    python scripts/lying_peer.py --rel 0.1 --prob 1.0 -- python -m peers MODEL --blocks 0:2 ...

It is a launcher for scripts/local_swarm.py (`LocalSwarm.start_peer(launcher=[...])`): the part after `--` is the
peer's own command line, of which it keeps the arguments after `-m peers`.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def perturb(tensor: torch.Tensor, rel: float, rng: random.Random) -> torch.Tensor:
    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    scale = tensor.float().pow(2).mean().sqrt()
    return (tensor.float() + rel * scale * noise).to(tensor.dtype)


def install(rel: float, prob: float, seed: int) -> None:
    import peers.handlers as handlers

    rng = random.Random(seed)

    def lie() -> bool:
        return rng.random() < prob

    def async_output(method):
        @functools.wraps(method)
        async def wrapper(*args, **kwargs):
            out = await method(*args, **kwargs)
            return perturb(out, rel, rng) if lie() else out

        return wrapper

    def gradient_output(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            grad_input, *grads = fn(*args, **kwargs)
            return (perturb(grad_input, rel, rng), *grads) if lie() else (grad_input, *grads)

        return wrapper

    handlers.BlockService._step = async_output(handlers.BlockService._step)
    handlers.BlockService._forward = async_output(handlers.BlockService._forward)
    handlers.recompute_gradients = gradient_output(handlers.recompute_gradients)
    handlers.gradients = gradient_output(handlers.gradients)


def main() -> None:
    if "--" not in sys.argv:
        sys.exit("usage: lying_peer.py --rel R --prob P [--seed S] -- PYTHON -m peers ARGS...")
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rel", type=float, required=True, help="noise RMS relative to the output's RMS")
    parser.add_argument("--prob", type=float, default=1.0, help="fraction of requests answered falsely")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:split])
    command = sys.argv[split + 1 :]
    if "peers" not in command or command[command.index("peers") - 1] != "-m":
        sys.exit("the command after -- must run `-m peers`")
    install(args.rel, args.prob, args.seed)
    from peers.cli import peer_main

    peer_main(command[command.index("peers") + 1 :])


if __name__ == "__main__":
    main()
