"""Example: three clients train one shared LoRA adapter with federated rounds and user-level DP, through a local
2-peer swarm; everything on 127.0.0.1.

The task (as in scripts/dp_utility.py): a sequence of random filler tokens ends with a key token; each of the K
classes owns --keys key tokens, and the model must predict the class's label token next (accuracy: argmax over the
K label tokens, on held-out sequences with keys of every class and slice). The clients hold different slices: client
c only has sequences whose key index j (within its class) has j % clients == c, so no client ever sees the other
keys and one client alone cannot beat `single_client_ceiling` (its own keys right, chance on the others'). LoRA
(rank 4, q_proj and v_proj of every remote block) is trained with Adam for --local-steps steps per round per client.

The same client processes (--clients, 3 by default) run the same number of rounds once without noise (σ = 0,
clipping only) and once per --noise σ, each run from the same initial adapter, and print the accuracy per round,
the ε reached and a JSON summary at the end.

What DP costs here, honestly: the guarantee is user-level (each client's whole data set), and each round adds noise
of std σC per coordinate to the sum of the clipped updates (each of the m = 3 clients adds σC/sqrt(3)); the released
average divides signal and noise alike by 3. With d ≈ 3.6k adapter values the noise in a round's average has norm ≈
σC·sqrt(d)/3 ≈ 20·σC against a signal of at most C, so only σ well below 1 keeps the adapter learning, and over 10
rounds at participation rate 1 that means ε in the hundreds or more (δ = 1e-5): a formal guarantee of no practical
value. Two runs (10 rounds, C = 5, δ = 1e-5) measured: σ = 0 → accuracy 0.998 (ε = ∞); σ = 0.03 → 0.996-1.0 at ε ≈
6200; σ = 0.1 → 0.88-0.90 at ε ≈ 650; σ = 0.3 → 0.24-0.32, near chance, at ε ≈ 104 (σ = 1, ε ≈ 19, stays at chance
in a local simulation of the same rounds). Against the other participants (`exchange_epsilon`: they see each update
with only its own noise share) ε is about 2.5× larger still. A small ε with useful accuracy needs many clients per
round (DP-FedAvg is meant for hundreds to thousands: the signal grows with their number, the noise std stays σC),
fewer trained values, or secure aggregation plus central noise; `--clients N` runs N processes (each needs a model
and a share of the CPU).

    python scripts/federated_example.py                    # σ = 0, 0.03, 0.1, 0.3; 10 rounds
    python scripts/federated_example.py --noise 1 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import make_random_checkpoint  # noqa: E402

CLASSES = 4
LENGTH = 6
TEST_SEED = 999  # the held-out set, the same in every process


def make_data(
    vocab_size: int, keys: int, count: int, seed: int, client: int | None = None, clients: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """[count, LENGTH] sequences and their [count] classes: filler, then a key of the class. Tokens 0..K-1 are
    the label tokens, class c owns keys K + c·keys + j; with `client`, only key indices j ≡ client (mod clients)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=g)
    allowed = torch.arange(keys) if client is None else torch.arange(client % keys, keys, clients)
    index = allowed[torch.randint(0, len(allowed), (count,), generator=g)]
    key = CLASSES + labels * keys + index
    filler = torch.randint(CLASSES * (keys + 1), vocab_size, (count, LENGTH - 1), generator=g)
    return torch.cat([filler, key[:, None]], dim=1), labels


def class_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """[B, K]: the next-token logits of the label tokens after the last position."""
    return model(ids).logits[:, -1, :CLASSES]


@torch.no_grad()
def accuracy(model: Any, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    ids, labels = test
    return float((class_logits(model, ids).argmax(dim=-1) == labels).float().mean())


def single_client_ceiling(keys: int, clients: int) -> float:
    """Expected accuracy of a client trained on its own slice only: right on its keys, chance on the others'."""
    own = len(range(0, keys, clients)) / keys
    return own + (1 - own) / CLASSES


def client_main(index: int, ckpt: str, peers: list[str], settings: dict, results: Any) -> None:
    torch.set_num_threads(1)
    from swarm import AutoDistributedModelForCausalLM
    from swarm.federated import FederatedClient, FederatedConfig, flatten, unflatten_into

    model = AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=peers, check_rate=0.0)
    try:
        model.tuning.add_lora(rank=4, alpha=8, generator=torch.Generator().manual_seed(1))
        params = model.tuning.named_trainables()
        initial = flatten(params)
        vocab, keys, clients = model.config.vocab_size, settings["keys"], settings["clients"]
        ids, labels = make_data(vocab, keys, settings["examples"], seed=100 + index, client=index, clients=clients)
        test = make_data(vocab, keys, settings["test"], seed=TEST_SEED)
        batches = torch.Generator().manual_seed(200 + index)
        for run in settings["runs"]:
            unflatten_into(initial, params)  # every run starts from the same adapter
            config = FederatedConfig(**run["config"])
            began = time.perf_counter()
            with FederatedClient.for_model(model, config) as client:
                for _ in range(settings["rounds"]):

                    def train() -> None:
                        optimizer = torch.optim.Adam(params.values(), lr=settings["lr"])
                        for _ in range(settings["local_steps"]):
                            batch = torch.randint(0, len(ids), (settings["batch"],), generator=batches)
                            F.cross_entropy(class_logits(model, ids[batch]), labels[batch]).backward()
                            optimizer.step()
                            optimizer.zero_grad()

                    result = client.run_round(train)
                    report = {"run": run["name"], "client": index, "round": result.round}
                    report |= {"completed": result.completed, "participants": len(result.participants)}
                    report |= {"digest": result.adapter_digest, "seconds": time.perf_counter() - began}
                    report["update_norm"] = (
                        float(result.local_update.norm()) if result.local_update is not None else None
                    )
                    if result.privacy is not None:
                        report["epsilon"] = result.privacy.epsilon
                        report["exchange_epsilon"] = result.privacy.exchange_epsilon
                    if index == 0:
                        report["accuracy"] = accuracy(model, test)
                    results.put(report)
    finally:
        model.shutdown()
        results.put({"client": index, "done": True})


def run_all(ckpt: Path, peers: list[str], settings: dict) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    clients = settings["clients"]
    processes = [ctx.Process(target=client_main, args=(i, str(ckpt), peers, settings, results)) for i in range(clients)]
    for process in processes:
        process.start()
    reports, done = [], 0
    while done < clients:
        report = results.get(timeout=settings["round_timeout"])
        if report.get("done"):
            done += 1
            continue
        reports.append(report)
        if report["client"] == 0:
            eps = report.get("epsilon")
            print(
                f"  {report['run']:8s} round {report['round']:3d}  accuracy {report['accuracy']:.3f}  participants "
                f"{report['participants']}  {report['seconds']:.0f}s" + (f"  eps {eps:.3g}" if eps is not None else ""),
                flush=True,
            )
    for process in processes:
        process.join()
    return reports


def summarize(reports: list[dict], run: dict, rounds: int) -> dict:
    mine = [r for r in reports if r["run"] == run["name"]]
    lead = sorted((r for r in mine if r["client"] == 0), key=lambda r: r["round"])
    last = [r for r in mine if r["round"] == rounds - 1]
    norms = sorted(r["update_norm"] for r in mine if r["update_norm"] is not None)
    return {
        "noise_multiplier": run["config"]["noise_multiplier"],
        "accuracy_per_round": [round(r["accuracy"], 3) for r in lead],
        "accuracy": lead[-1]["accuracy"],
        "epsilon": lead[-1].get("epsilon"),
        "exchange_epsilon": lead[-1].get("exchange_epsilon"),
        "median_local_update_norm": round(norms[len(norms) // 2], 3) if norms else None,
        "same_adapter_everywhere": len({r["digest"] for r in last}) == 1,
        "rounds_completed": sum(r["completed"] for r in lead),
        "seconds": round(lead[-1]["seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3, help="client processes (= min_clients of the run)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=5.0, help="C: each client's update norm bound")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="σ of the DP runs")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--keys", type=int, default=3, help="key tokens per class, split among the clients")
    parser.add_argument("--examples", type=int, default=512, help="training sequences per client")
    parser.add_argument("--test", type=int, default=512, help="held-out sequences")
    args = parser.parse_args()
    if args.clients < 1 or args.keys < 1 or args.rounds < 1:
        parser.error("--clients, --keys and --rounds must be >= 1")
    stamp = int(time.time())
    runs = [
        {
            "name": "no_dp" if sigma == 0 else f"sigma={sigma:g}",
            "config": dict(
                run_name=f"example-{i}-{stamp}",
                min_clients=args.clients,
                expected_clients=args.clients,
                clip_norm=args.clip,
                noise_multiplier=sigma,
                delta=args.delta,
                join_timeout=120.0,  # a client may still be evaluating the previous run's last round
            ),
        }
        for i, sigma in enumerate([0.0, *args.noise])
    ]
    settings = {
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch": args.batch,
        "lr": args.lr,
        "keys": args.keys,
        "examples": args.examples,
        "test": args.test,
        "runs": runs,
        "round_timeout": 600.0,
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blockswarm-federated-") as tmp:
        ckpt = make_random_checkpoint(Path(tmp) / "tiny", "llama", seed=3)
        with LocalSwarm(ckpt, peers=2, threads_per_peer=1, extra_args=["--log-level", "WARNING"]) as swarm:
            reports = run_all(ckpt, swarm.initial_peers, settings)
    summary: dict[str, Any] = {
        "task": f"{CLASSES} classes x {args.keys} keys, sequences of {LENGTH}, {args.examples} per client",
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "clip_norm": args.clip,
        "delta": args.delta,
        "chance": 1 / CLASSES,
        "single_client_ceiling": round(single_client_ceiling(args.keys, args.clients), 3),
        "runs": {run["name"]: summarize(reports, run, args.rounds) for run in runs},
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
