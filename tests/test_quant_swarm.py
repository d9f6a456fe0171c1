"""int8 and nf4 peers: logits stay close to float32, and their weight memory shrinks as promised."""

from __future__ import annotations

import pytest
import torch
from conftest import PEER_ARGS
from local_swarm import LocalSwarm

from swarm import AutoDistributedModelForCausalLM
from swarm.transport import call_info

# Measured relative logits error (||remote - local|| / ||local||) on this tiny random model (hidden 64, 4 blocks),
# 3 prompts of 20 tokens: int8 0.012, nf4 0.169 (4-bit weights of a 64-wide model are coarse). Tolerances: ~2x.
TOLERANCE = {"int8": 0.03, "nf4": 0.35}
# Weight bytes vs float16: nf4 0.261 measured without AVX512-BF16, 0.263 computed for bnb's AVX512-BF16 repacking.
# At hidden 64 the ~1.1 KB of code tables bnb keeps per layer would give 0.341; share_quant_tables shares them.
MAX_RATIO_VS_FP16 = {"int8": 0.55, "nf4": 0.30}


@pytest.fixture(scope="module")
def quant_swarm(llama_ckpt):
    swarm = LocalSwarm(llama_ckpt, spans=[], threads_per_peer=1)
    try:
        for mode in ("int8", "nf4"):
            swarm.start_peer((0, 4), extra_args=PEER_ARGS + ["--quant", mode, "--dht-prefix", f"tiny-{mode}"])
        yield swarm
    finally:
        swarm.stop_checked()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_peer_logits_and_memory(mode, quant_swarm, llama_ckpt, local_model):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=quant_swarm.initial_peers, dht_prefix=f"tiny-{mode}"
    )
    try:
        ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            remote, local = model(ids).logits, local_model(llama_ckpt)(ids).logits
        error = float((remote - local).norm() / local.norm())
        assert error < TOLERANCE[mode], f"{mode}: relative logits error {error:.4f}"
        assert error > 1e-5, f"{mode}: logits are exact, so the weights were not quantized"

        seq = model.model.sequence
        peer = next(iter(seq.view.snapshot(refresh=True).peers.values()))
        info = seq.loop.run(call_info(seq.p2p, peer.peer_id, timeout=30))
        assert info.quant == mode and (info.start, info.end) == (0, 4)
        weights = info.weights
        # fp16 baseline: every linear weight of 4 blocks at 2 bytes
        config = local_model(llama_ckpt).config
        h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
        assert weights["fp16_bytes"] == 4 * 2 * (2 * h * h + 2 * h * kv + 3 * h * i)
        assert weights["weight_bytes"] <= MAX_RATIO_VS_FP16[mode] * weights["fp16_bytes"], weights
    finally:
        model.shutdown()
