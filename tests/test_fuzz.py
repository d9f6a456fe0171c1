"""A shorter run of scripts/fuzz_peer.py: about 1,000 malformed or abusive messages against a real peer while an
honest client generates through it."""

from __future__ import annotations

import pytest
from fuzz_peer import run_fuzz


@pytest.fixture(scope="module")
def report(llama_ckpt, tmp_path_factory):
    return run_fuzz(llama_ckpt, messages=1000, seed=1, concurrency=8, workdir=tmp_path_factory.mktemp("fuzz"))


def test_the_peer_survives_and_refuses_every_malformed_message_clearly(report):
    assert report["tried"] >= 1000
    assert report["crashes"] == 0 and report["peer_exit_code_on_stop"] == 0, report["peer_log"]
    assert report["internal_errors"] == 0 and report["peer_internal_errors"] == 0, report["examples"]
    assert report["log_tracebacks"] == 0, report["peer_log"]
    assert report["accepted_malformed"] == 0, report["examples"]
    assert report["sessions_ended_by_bad_push"] == 0, report["examples"]
    assert report["harness_errors"] == 0 and report["timeouts"] == 0, report["examples"]
    # most messages get an error frame that names the problem; the rest are hung up on by the sender or abuse
    assert report["clear_errors"] >= 0.7 * report["tried"]
    # bad pushes reached the session and were dropped there (a few may find its inbox full: dropped before)
    assert report["peer_refused_pushes"] >= 0.8 * report["bad_pushes_into_session"] > 0


def test_dht_records_cannot_be_forged_and_floods_stop_at_the_budget(report):
    dht = report["dht"]
    assert dht["forged_or_replayed_accepted"] == 0
    assert dht["records_intact"]
    assert dht["flood_tried"] > dht["per_sender_limit"]
    # 1 MiB values are refused outright; junk subkeys up to the sender's budget (the two identities share none)
    assert 0 < dht["flood_accepted"] <= dht["per_sender_limit"]


def test_the_honest_session_gets_exact_tokens_throughout(report):
    honest = report["honest"]
    assert honest["errors"] == [] and honest["rounds"] >= 1
    assert honest["tokens_identical"] and honest["mismatched_rounds"] == 0
