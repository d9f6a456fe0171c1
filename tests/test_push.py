"""Peer-to-peer push: each peer sends its output straight into the next peer's session, and every step is still
computed exactly once per peer whether it arrives pushed, sent by the client, or both."""

from __future__ import annotations

import pytest
import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.transport import call_info


def peer_stats(model) -> dict[str, dict]:
    sequence = model.model.sequence
    stats = {}
    for peer_id in sequence.view.snapshot(refresh=True).peers:
        info = sequence.loop.run(call_info(sequence.p2p, peer_id, 10.0))
        stats[peer_id.to_base58()] = info.stats
    return stats


@pytest.mark.parametrize(
    "settings",
    [dict(push=True), dict(push=True, push_grace=1e-4), dict(push=False)],
    ids=["push", "push-always-late", "client-relayed"],
)
def test_each_step_is_computed_once_per_peer(settings, llama_ckpt, llama_swarm, local_model):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=llama_swarm.initial_peers, **settings
    )
    try:
        ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(50))
        expected = local_model(llama_ckpt).generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        before = peer_stats(model)
        with model.inference_session(max_length=32) as session:
            out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            route = [s.peer_id.to_base58() for s in session.route]
        assert torch.equal(out, expected)
        after = peer_stats(model)
        assert len(route) == 2, route
        assert session.failovers == 0
        first, second = (
            {k: after[p][k] - before[p][k] for k in ("inference_steps", "pushes", "tokens_processed")} for p in route
        )
        # A late push is answered once, however the step arrived: both peers ran the same steps, once each.
        assert first["inference_steps"] == second["inference_steps"] > 0
        assert first["tokens_processed"] == second["tokens_processed"] == 7 + 11
        if settings["push"]:
            assert first["pushes"] == first["inference_steps"]  # the first peer pushed every step to the second
        else:
            assert first["pushes"] == 0
        assert second["pushes"] == 0  # the last peer has no one to push to
    finally:
        model.shutdown()
