"""Spot checks: false bans of honest peers, steps until a liar is caught, and the cost in tok/s. Prints one JSON line.

- false bans: two identically loaded spans of a random Llama in this process (as two honest peers would load them),
  float32 / int8 / nf4: one decodes sequences step by step against its KV cache, batched with another session
  (blocks.batching, as a peer's scheduler does), the other runs whole-sequence forwards; every step's output is
  compared with the default tolerance. Span-level comparisons of real computations (no network), which is what the
  client's check compares.
- steps to catch: the same primary span perturbed like scripts/lying_peer.py (noise of `rel` x the output's RMS on
  a fraction of the steps), checked at the default rate with the client's sampler; per (rel, lie fraction) the
  median and 95th percentile of the number of decode steps until the first failed check, over many trials.
- tok/s: 64-token greedy generations through a local swarm of 2 peers each serving every block (so that every step
  has a replica to check on), with checks at the default rate and off, alternated in the same run.

    python scripts/bench_verification.py [--checks 10000] [--trials 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lying_peer import perturb  # noqa: E402
from model_tools import make_random_checkpoint  # noqa: E402

from blocks.adapters import run_span  # noqa: E402
from blocks.batching import Segment, run_segments  # noqa: E402
from blocks.checkpoint import open_checkpoint  # noqa: E402
from blocks.span import load_span  # noqa: E402
from swarm.config import ClientConfig  # noqa: E402
from swarm.verification import CheckSampler, compare, tolerance_for  # noqa: E402


def honest_outputs(span_a, span_b, hidden_size: int, length: int, gen: torch.Generator):
    """(step outputs of span_b decoding with its cache next to another session, whole forward of span_a)."""
    n0, n1 = span_a.start, span_a.end
    x = torch.randn(1, length, hidden_size, generator=gen)
    other_len = int(torch.randint(1, 8, (1,), generator=gen))
    with torch.inference_mode():
        whole = run_span(span_a, x, n0, n1)
        cache, other_cache = span_b.new_cache(), span_b.new_cache()
        steps = []
        for t in range(length):
            other = torch.randn(1, 1 if t else other_len, hidden_size, generator=gen)
            segments = [Segment(cache, 1, 1, t), Segment(other_cache, 1, other.shape[1], other_cache.get_seq_length())]
            steps.append(run_segments(span_b, [x[:, t : t + 1], other], segments, n0, n1)[0])
    return steps, whole


def false_bans(ckpt, quant: str, checks: int) -> dict:
    a = load_span(ckpt, 0, ckpt.num_blocks, quant=quant, progress=False)
    b = load_span(ckpt, 0, ckpt.num_blocks, quant=quant, progress=False)
    tolerance = tolerance_for("float32", quant)
    gen = torch.Generator().manual_seed(0)
    done = failed = 0
    worst = 0.0
    while done < checks:
        length = int(torch.randint(4, 33, (1,), generator=gen))
        steps, whole = honest_outputs(a, b, ckpt.config.hidden_size, length, gen)
        for t, out in enumerate(steps[: checks - done]):
            verdict = compare(out, whole[:, t : t + 1], tolerance)
            worst = max(worst, verdict.relative_diff)
            failed += not verdict.agree
            done += 1
    return {"checks": done, "false_bans": failed, "max_relative_diff": worst, "tolerance": tolerance}


def steps_to_catch(ckpt, quant: str, rel: float, lie_fraction: float, rate: float, trials: int, max_steps: int) -> dict:
    """Decode steps until the first failed check when the primary lies (replicas honest, so the arbiter agrees with
    the checker and the primary is caught), with the tolerance of `quant`."""
    span = load_span(ckpt, 0, ckpt.num_blocks, quant=quant, progress=False)
    tolerance = tolerance_for("float32", quant)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, max_steps, ckpt.config.hidden_size, generator=gen)
    with torch.inference_mode():
        honest = run_span(span, x, 0, ckpt.num_blocks)
    liar_rng = random.Random(2)
    counts, missed = [], 0
    for trial in range(trials):
        sampler = CheckSampler(rate, seed=1000 + trial)
        for step in range(max_steps):
            out = honest[:, step : step + 1]
            if liar_rng.random() < lie_fraction:
                out = perturb(out, rel, liar_rng)
            if sampler.should_check() and not compare(out, honest[:, step : step + 1], tolerance).agree:
                counts.append(step + 1)
                break
        else:
            missed += 1
    counts.sort()
    p95 = counts[min(len(counts) - 1, int(0.95 * len(counts)))] if counts else None
    return {
        "quant": quant,
        "rel": rel,
        "lie_fraction": lie_fraction,
        "median_steps": statistics.median(counts) if counts else None,
        "p95_steps": p95,
        "expected_steps": round(1 / (rate * lie_fraction), 1),
        "not_caught_within": {"steps": max_steps, "trials": missed},
    }


def tok_s(ckpt: Path, rate: float, repeats: int, new_tokens: int) -> dict:
    from local_swarm import LocalSwarm

    from swarm import AutoDistributedModelForCausalLM

    config = json.loads((ckpt / "config.json").read_text())
    n = int(config["num_hidden_layers"])
    swarm = LocalSwarm(ckpt, spans=[(0, n), (0, n)], threads_per_peer=1, extra_args=["--log-level", "WARNING"])
    swarm.start()
    models = {}
    try:
        for name, r in (("checks_on", rate), ("checks_off", 0.0)):
            models[name] = AutoDistributedModelForCausalLM.from_pretrained(
                ckpt, initial_peers=swarm.initial_peers, check_rate=r
            )
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        times: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm up
        outputs = {}
        for _ in range(repeats):
            for name, model in models.items():
                began = time.perf_counter()
                outputs[name] = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                times[name].append(time.perf_counter() - began)
        checks = models["checks_on"].model.sequence.checker.records
        result = {name: round(new_tokens / statistics.median(t), 2) for name, t in times.items()}
        result["cost"] = round(1 - result["checks_on"] / result["checks_off"], 3)
        result["checks_made"] = checks.checks
        result["identical_tokens"] = bool(torch.equal(outputs["checks_on"], outputs["checks_off"]))
        return result
    finally:
        for model in models.values():
            model.shutdown()
        swarm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=10000, help="honest checks per quantization")
    parser.add_argument("--trials", type=int, default=200, help="liars per (rel, lie fraction)")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-swarm", action="store_true")
    parser.add_argument("--only-swarm", action="store_true", help="measure only the tok/s cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rate = ClientConfig.check_rate
    path = make_random_checkpoint(Path(tempfile.mkdtemp(prefix="bench-verify-")) / "tiny-llama", "llama", seed=1)
    ckpt = open_checkpoint(str(path))
    result: dict = {"check_rate": rate, "model_hidden": ckpt.config.hidden_size, "blocks": ckpt.num_blocks}
    if not args.only_swarm:
        result["false_bans"] = {q: false_bans(ckpt, q, args.checks) for q in ("none", "int8", "nf4")}
    result["steps_to_catch"] = (
        []
        if args.only_swarm
        else [
            steps_to_catch(ckpt, quant, rel, frac, rate, args.trials, args.max_steps)
            for quant in ("none", "int8", "nf4")
            for rel in (1e-3, 1e-1)
            for frac in (1.0, 0.1)
        ]
    )
    if not args.skip_swarm:
        result["tok_s"] = tok_s(path, rate, args.repeats, args.new_tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
