"""Benchmark: how much phantom records (signed announcements of peers that do not run) delay opening a session.

Starts one honest peer serving every block of a small random Llama on 127.0.0.1, then for 0, 6 and 100 phantom
records (scripts/phantoms.py: fresh keys, valid signatures, each claiming all blocks at 1e9 tokens/s) opens an
inference session from `--runs` fresh clients each and reports the median opening time, split into its DHT read
(the records themselves) and the rest (probes of never-reached peers, route, streams). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from local_swarm import LocalSwarm  # noqa: E402
from model_tools import make_random_checkpoint  # noqa: E402
from phantoms import PhantomPublisher  # noqa: E402

from blocks.checkpoint import model_name_of  # noqa: E402
from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.inference import InferenceSession  # noqa: E402


def open_once(ckpt: Path, initial_peers: list[str], honest: str) -> dict[str, float]:
    """A fresh client's first session opening (its first DHT read included), then one more DHT read alone."""
    model = AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=initial_peers)
    try:
        began = time.perf_counter()
        session = InferenceSession(model.model.sequence, max_length=32).open()
        opening = time.perf_counter() - began
        route = [s.peer_id.to_base58() for s in session.route]
        session.close()
        if route != [honest]:
            raise RuntimeError(f"the session was routed through {route}, not the honest peer {honest}")
        began = time.perf_counter()
        model.model.sequence.view.snapshot(refresh=True)
        return {"opening_s": opening, "dht_read_s": time.perf_counter() - began}
    finally:
        model.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phantoms", type=int, nargs="+", default=[0, 6, 100])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args()
    counts = sorted(set(args.phantoms))
    results = {}
    with tempfile.TemporaryDirectory(prefix="blockswarm-phantoms-") as tmp:
        ckpt = make_random_checkpoint(Path(tmp) / "tiny-llama", "llama", seed=0, num_hidden_layers=args.blocks)
        with LocalSwarm(ckpt, peers=1, threads_per_peer=1, extra_args=["--log-level", "WARNING"]) as swarm:
            honest = swarm.peers[0].info["peer_id"]
            # one attacker; each count publishes more of its phantoms (the earlier ones' records are still there)
            publisher = PhantomPublisher(swarm.initial_peers, model_name_of(str(ckpt)), args.blocks, max(counts))
            try:
                for count in counts:
                    if count and not publisher.publish(count):
                        raise RuntimeError("the phantom records could not be stored")
                    runs = [open_once(ckpt, swarm.initial_peers, honest) for _ in range(args.runs)]
                    results[count] = {
                        "opening_s": statistics.median(r["opening_s"] for r in runs),
                        "dht_read_s": statistics.median(r["dht_read_s"] for r in runs),
                    }
            finally:
                publisher.shutdown()
    base = results.get(0, {}).get("opening_s")
    print(
        json.dumps(
            {
                "blocks": args.blocks,
                "runs": args.runs,
                "results": {
                    str(count): {
                        "median_opening_s": round(r["opening_s"], 4),
                        "median_dht_read_s": round(r["dht_read_s"], 4),
                        "added_s": None if base is None else round(r["opening_s"] - base, 4),
                    }
                    for count, r in results.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
