"""Block placement with real peers: automatic spans spread over the model, and a peer moves to fill a gap."""

from __future__ import annotations

import time

import torch
from conftest import PEER_ARGS, wait_until
from local_swarm import LocalSwarm

from swarm import AutoDistributedModelForCausalLM


def test_peers_spread_over_the_model_and_one_moves_to_fill_a_gap(llama_ckpt, local_model, tmp_path):
    swarm = LocalSwarm(llama_ckpt, threads_per_peer=1, extra_args=PEER_ARGS, workdir=tmp_path)
    model = None
    try:
        # One after another, each with --num-blocks 1 and no moving: they must spread over all 4 blocks.
        fixed = [swarm.start_peer(None, extra_args=["--num-blocks", "1", "--rebalance-period", "0"]) for _ in range(4)]
        assert sorted(p.info["blocks"][0] for p in fixed) == [0, 1, 2, 3]
        # A fifth peer doubles some block (the swarm is evenly covered) and may move every ~second.
        moving = ["--num-blocks", "1", "--rebalance-period", "1", "--log-level", "INFO"]
        mover = swarm.start_peer(None, extra_args=moving, name="mover")
        doubled = mover.info["blocks"][0]
        # Two rebalance checks (about a second apart) find nothing worth moving for.
        wait_until(lambda: mover.log_file.read_text().count("rebalance check: staying") >= 2, "two rebalance checks")
        assert mover.ready_file.exists() and swarm.wait_ready(mover)["blocks"][0] == doubled, "moved for no gain"

        # The only server of another block leaves: the mover may leave its doubled block, and fills the gap.
        [leaving] = [p for p in fixed if p.info["blocks"][0] == (doubled + 2) % 4]
        assert swarm.stop_peer(leaving) == 0
        gap = leaving.info["blocks"][0]
        deadline = time.monotonic() + 30
        blocks = None
        while time.monotonic() < deadline:
            if mover.ready_file.exists():
                blocks = swarm.wait_ready(mover)["blocks"]
                if blocks == [gap, gap + 1]:
                    break
            time.sleep(0.2)
        assert blocks == [gap, gap + 1], f"the mover did not fill block {gap} (serves {blocks})"

        # The swarm is whole again: a client gets exact logits through the peers that remain.
        model = AutoDistributedModelForCausalLM.from_pretrained(
            llama_ckpt, initial_peers=[m for p in fixed if p is not leaving for m in p.info["maddrs"]]
        )
        ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(40))
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, local_model(llama_ckpt)(ids).logits, atol=1e-4, rtol=0)
    finally:
        if model is not None:
            model.shutdown()
        swarm.stop()


def test_throughput_cache_measures_once_per_setup(tmp_path):
    from peers.throughput import cached_throughput

    path = str(tmp_path / "sub" / "throughput.json")
    calls = []

    def measure(value: float):
        return lambda: calls.append(value) or value

    assert cached_throughput(path, "setup-a", measure(10.0)) == 10.0
    assert cached_throughput(path, "setup-a", measure(99.0)) == 10.0  # cached: not measured again
    assert cached_throughput(path, "setup-b", measure(20.0)) == 20.0  # another setup is measured
    assert calls == [10.0, 20.0]
    (tmp_path / "sub" / "throughput.json").write_text("{not json")
    assert cached_throughput(path, "setup-a", measure(30.0)) == 30.0  # a broken cache is measured over
    assert cached_throughput(path, "setup-a", measure(40.0)) == 30.0
    assert cached_throughput("", "setup-a", measure(50.0)) == 50.0  # caching off
    assert calls == [10.0, 20.0, 30.0, 50.0]
