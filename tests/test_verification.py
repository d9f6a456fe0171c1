"""Spot checks of peers' outputs: the pure rules (tolerance, comparison, judgement, sampling, records, routing
preference), honest spans that always agree, and a swarm with a lying peer that is caught and banned."""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch
from conftest import REPO, start_swarm, wait_until
from helpers_unit import make_random_checkpoint

from swarm.verification import (
    CheckRecords,
    CheckSampler,
    Evidence,
    PeerRecord,
    Verdict,
    compare,
    compare_all,
    judge,
    route_penalties,
    tolerance_for,
)

# ---- pure rules ----


def test_tolerance_per_dtype_and_quant():
    assert tolerance_for("float32", "none") == tolerance_for("float32", "nf4") == 1e-5
    assert tolerance_for("bfloat16", "int8") > 1e-3  # 16-bit compute: only gross lies are detectable
    assert tolerance_for("float32", "none", override=0.5) == 0.5
    with pytest.raises(ValueError, match="no spot-check tolerance"):
        tolerance_for("float64", "none")


def test_compare_agrees_within_tolerance_and_locates_the_worst_difference():
    a = torch.linspace(-4, 4, 24).reshape(2, 3, 4)
    assert compare(a, a.clone(), 1e-5).agree
    b = a.clone()
    b[1, 2, 0] += 4 * 1e-6  # 1e-6 of the largest magnitude (4)
    v = compare(a, b, 1e-5)
    assert v.agree and v.where == (1, 2, 0) and v.scale == 4.0 and math.isclose(v.relative_diff, 1e-6, rel_tol=0.05)
    b[0, 1, 1] += 4 * 1e-3
    v = compare(a, b, 1e-5)
    assert not v.agree and v.where == (0, 1, 1) and "tolerance 1e-05" in v.describe()
    assert compare(b, a, 1e-5) == v  # symmetric: neither peer is the reference


def test_compare_rejects_shape_mismatch_and_non_finite_values():
    a = torch.ones(2, 3)
    assert not compare(a, torch.ones(3, 2), 0.5).agree
    bad = a.clone()
    bad[0, 0] = float("nan")
    assert not compare(a, bad, 0.5).agree
    assert compare(torch.zeros(0, 3), torch.zeros(0, 3), 0.0).agree
    assert compare(torch.zeros(3), torch.zeros(3), 0.0).agree  # all-zero outputs: exact equality required


def test_compare_all_reports_the_worst_failing_output():
    a, b = torch.ones(4), torch.ones(4)
    worse = b.clone()
    worse[2] = 3.0
    v = compare_all([(a, b), (a, worse), (a, b * 1.5)], 1e-5)
    assert not v.agree and v.where == (2,)
    assert compare_all([(a, b)], 1e-5).agree


def _verdict(agree: bool) -> Verdict:
    return Verdict(agree, 0.0 if agree else 1.0, 1.0, 1e-5)


def test_judge_attributes_a_lie_only_with_a_deciding_arbiter():
    ok, bad = _verdict(True), _verdict(False)
    assert judge(ok).outcome == "passed"
    assert judge(bad).outcome == "unresolved"  # two peers disagree, nobody to tell who lied
    assert judge(bad, ok, bad).outcome == "checker_lied"
    assert judge(bad, bad, ok).outcome == "primary_lied"
    assert judge(bad, bad, bad).outcome == "unresolved"
    assert judge(bad, ok, ok).outcome == "unresolved"


def test_sampler_rate_is_respected_and_seedable():
    sampler = CheckSampler(0.05, seed=1)
    hits = sum(sampler.should_check() for _ in range(20000))
    assert 800 < hits < 1200
    first = [CheckSampler(0.3, seed=7).should_check() for _ in range(1)]
    again = CheckSampler(0.3, seed=7)
    assert [again.should_check() for _ in range(1)] == first
    assert not any(CheckSampler(0.0).should_check() for _ in range(100))
    assert all(CheckSampler(1.0).should_check() for _ in range(100))
    with pytest.raises(ValueError, match="check rate"):
        CheckSampler(1.5)


def _evidence(outcome: str, arbiter: str | None = "C") -> Evidence:
    return Evidence("step", "2:4", "position 3", "A", "B", arbiter, outcome, _verdict(outcome == "passed"))


def test_records_count_passes_catch_liars_and_suspect_both_sides_when_unresolved():
    records = CheckRecords()
    records.add(_evidence("passed", None))
    assert records.peers["A"].passed == 1 and records.peers["B"].passed == 1 and records.evidence == []
    records.add(_evidence("primary_lied"))
    assert records.caught() == {"A"} and records.peers["B"].passed == 2 and records.peers["C"].passed == 1
    records.add(_evidence("unresolved", None))
    assert records.peers["B"].failed == 1 and records.caught() == {"A"}
    assert len(records.evidence) == 2 and records.checks == 3
    assert _evidence("checker_lied").liar == "B" and _evidence("unresolved").liar is None


def test_route_penalties_prefer_checked_peers():
    records = {"ok": PeerRecord(passed=3), "sus": PeerRecord(passed=5, failed=1)}
    assert route_penalties(records, ["ok", "sus", "new"], unchecked=0.002, suspect=1.0) == {
        "ok": 0.0,
        "sus": 1.0,
        "new": 0.002,
    }


def test_latency_route_takes_the_penalty_into_account():
    from test_routing import A, B, snapshot

    from swarm.routing import min_latency_route

    snap = snapshot(4, (A, 0, 4, 10.0), (B, 0, 4, 10.0))
    rtt = {A: 0.010, B: 0.011}
    assert min_latency_route(snap, 0, 4, rtt=rtt, default_rtt=0.005)[0].peer_id == A
    assert min_latency_route(snap, 0, 4, rtt=rtt, default_rtt=0.005, penalty={A: 0.002})[0].peer_id == B


def test_permanent_ban_outlasts_backoff():
    from hivemind.p2p import PeerID

    from swarm.config import ClientConfig
    from swarm.health import PeerHealth

    health = PeerHealth(ClientConfig(ban_seconds=0.001, max_ban_seconds=0.001))
    liar = PeerID(b"\x01" * 34)
    health.ban_forever(liar, "test")
    health.succeeded(liar)
    assert liar in health.banned() and health.banned_forever() == {liar: "test"}


def test_client_config_checks_the_check_settings():
    from swarm.config import ClientConfig

    for bad in ({"check_rate": -0.1}, {"check_rate": 1.1}, {"check_tolerance": 1.0}, {"verification_retries": -1}):
        with pytest.raises(ValueError):
            ClientConfig(**bad)


# ---- honest spans agree, liars do not (in process, real blocks) ----


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_honest_spans_agree_across_cache_steps_and_batching_and_a_small_lie_is_caught(tmp_path, quant):
    from blocks.adapters import run_span
    from blocks.batching import Segment, run_segments
    from blocks.checkpoint import open_checkpoint
    from blocks.span import load_span

    ckpt = open_checkpoint(str(make_random_checkpoint(tmp_path / "m", "llama", seed=3)))
    n = ckpt.num_blocks
    a, b = (load_span(ckpt, 0, n, quant=quant, progress=False) for _ in range(2))  # two peers, same weights
    tolerance = tolerance_for("float32", quant)
    gen = torch.Generator().manual_seed(0)
    for length in (1, 5, 17):
        x = torch.randn(2, length, ckpt.config.hidden_size, generator=gen)
        with torch.inference_mode():
            whole = run_span(a, x, 0, n)  # the checker's whole-sequence forward
            cache, steps = b.new_cache(), []
            for t in range(length):  # the primary's decode steps against its KV cache
                steps.append(run_span(b, x[:, t : t + 1], 0, n, None, cache, t))
            other = torch.randn(1, 3, ckpt.config.hidden_size, generator=gen)
            batched = run_segments(b, [x, other], [Segment(b.new_cache(), 2, length, 0)] + [
                Segment(b.new_cache(), 1, 3, 0)], 0, n)[0]  # fmt: skip
        stepped = torch.cat(steps, dim=1)
        assert compare(stepped, whole, tolerance).agree, compare(stepped, whole, tolerance).describe()
        assert compare(batched, whole, tolerance).agree
        noise = torch.randn(whole.shape, generator=gen) * 1e-3 * whole.pow(2).mean().sqrt()
        assert not compare(stepped + noise, whole, tolerance).agree


# ---- a swarm with a lying peer ----


def _liar_launcher(rel: float, prob: float) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "lying_peer.py"), "--rel", str(rel), "--prob", str(prob), "--"]


@pytest.fixture(scope="module")
def lying_swarm(tmp_path_factory):
    """Blocks 0-1 on one honest peer; blocks 2-3 on two honest peers and one that perturbs every output by 10%."""
    ckpt = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", seed=1)
    swarm = start_swarm(ckpt, peers=3, spans=[(0, 2), (2, 4), (2, 4)])
    try:
        liar = swarm.start_peer((2, 4), launcher=_liar_launcher(0.1, 1.0), name="liar")
    except BaseException:
        swarm.stop()
        raise
    yield ckpt, swarm, liar.info["peer_id"]
    swarm.stop()


def _client(ckpt, swarm, **kwargs):
    from swarm import AutoDistributedModelForCausalLM

    return AutoDistributedModelForCausalLM.from_pretrained(
        ckpt, initial_peers=swarm.initial_peers, check_rate=1.0, check_seed=0, **kwargs
    )


def _honest_ids(swarm, liar: str) -> set[str]:
    return {p.info["peer_id"] for p in swarm.peers} - {liar}


def test_a_lying_peer_is_caught_in_forwards_and_generation_then_matches_transformers(lying_swarm, local_model, caplog):
    ckpt, swarm, liar = lying_swarm
    ref = local_model(ckpt)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        expected_logits = ref(ids).logits
    model = _client(ckpt, swarm)
    try:
        checker = model.model.sequence.checker
        with caplog.at_level(logging.WARNING, logger="swarm"):
            # Each forward picks its replica of blocks 2-3 at random and is checked on another one: every answer
            # returned is right (a primary caught lying has its span re-run elsewhere), until the liar is caught.
            def caught() -> bool:
                with torch.no_grad():
                    logits = model(ids).logits
                torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-4)
                return liar in checker.records.caught()

            wait_until(caught, "the lying peer caught by a spot check", timeout=120, interval=0)
        assert liar in {p.to_base58() for p in model.model.sequence.health.banned_forever()}
        assert any(liar in r.getMessage() and "lied" in r.getMessage() for r in caplog.records)
        evidence = [e for e in checker.records.evidence if e.liar == liar][0]
        assert evidence.verdict.relative_diff > 1e-2 and evidence.arbiter is not None
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, ref.generate(ids, max_new_tokens=8, do_sample=False))
        honest = _honest_ids(swarm, liar)
        assert not honest & checker.records.caught()
        assert all(checker.records.peers[p].failed == 0 for p in honest if p in checker.records.peers)
        assert checker.records.peers[liar].caught
    finally:
        model.shutdown()


def test_inference_steps_are_checked_and_a_liar_in_the_session_is_caught(lying_swarm, local_model):
    ckpt, swarm, liar = lying_swarm
    ref = local_model(ckpt)
    ids = torch.tensor([[4, 8, 15, 16]])
    expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    model = _client(ckpt, swarm)
    try:
        checker = model.model.sequence.checker

        def caught() -> bool:
            # A session through the liar raises VerificationError inside and is redone without it
            # (verification_retries); a session where it only checked goes on: either way the tokens are right.
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)
            return liar in checker.records.caught()

        wait_until(caught, "the lying peer caught in an inference session", timeout=120, interval=0)
        assert any(e.kind == "step" and e.liar == liar for e in checker.records.evidence)
        assert not _honest_ids(swarm, liar) & checker.records.caught()
    finally:
        model.shutdown()


def test_two_replicas_that_disagree_fail_the_work_without_banning_anyone(lying_swarm):
    from swarm import VerificationError

    ckpt, swarm, liar = lying_swarm
    honest_2_4 = [p.info["peer_id"] for p in swarm.peers if p.info["blocks"] == [2, 4] and p.info["peer_id"] != liar]
    model = _client(ckpt, swarm, blocked_peers=honest_2_4[:1])  # one honest replica of blocks 2-3 and the liar
    try:
        with pytest.raises(VerificationError, match="unresolved"):
            model.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=4, do_sample=False)
        assert model.model.sequence.health.banned_forever() == {}
        records = model.model.sequence.checker.records
        assert records.peers[liar].failed >= 1 and records.peers[honest_2_4[1]].failed >= 1
    finally:
        model.shutdown()
