"""The privacy audit (privacy.audit, privacy.inversion) and the noise defence (privacy.defence, ClientConfig.privacy)
on a tiny random model, without a network: what the client sends, the attacks, and what the defence removes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privacy.audit import ClientSetup, audit_client, build_client
from privacy.defence import DEFAULT_NOISE_MULTIPLIER, NoiseDefence, ResidualNoise, parse_privacy
from privacy.errors import PrivacyConfigError
from swarm.config import ClientConfig

ATOL = 1e-5
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prompts(llama_ckpt) -> torch.Tensor:
    return torch.randint(3, 512, (3, 8), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("local_blocks", [0, 1])
def test_sent_states_are_the_models_hidden_states(llama_ckpt, local_model, prompts, local_blocks):
    """What the stand-in receives is the hidden state at the first remote block's input, as transformers computes
    it, and the client's logits through the stand-in are transformers' own."""
    client = build_client(llama_ckpt, ClientSetup(local_blocks=local_blocks))
    reference = local_model(llama_ckpt)
    with torch.no_grad():
        ref = reference(prompts, output_hidden_states=True)
        logits = client(input_ids=prompts).logits
    torch.testing.assert_close(client.model.sequence.received[-1], ref.hidden_states[local_blocks], rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("local_blocks", [0, 1])
def test_attack_recovers_undefended_prompts(llama_ckpt, prompts, local_blocks):
    report = audit_client(llama_ckpt, ClientSetup(local_blocks=local_blocks), prompts, backward_prompts=1)
    assert report["forward"]["nearest"] == {
        "token_recovery": 1.0,
        "prompts_fully_recovered": 3,
        "prompts": 3,
        "tokens": 24,
    }
    # the labels of a fine-tuning step, from the gradient the last remote peer gets back
    assert report["backward"]["token_recovery"] == 1.0


def test_noise_defence_lowers_recovery_and_averaging_gains_back(llama_ckpt, prompts):
    setup = ClientSetup(local_blocks=1, privacy=8.0, seed=1)
    report = audit_client(llama_ckpt, setup, prompts, scorings=("ml",), copies=16)
    forward = report["forward"]
    assert forward["ml"]["token_recovery"] <= 0.25
    assert forward["ml"]["prompts_fully_recovered"] == 0
    # 16 copies of the same prompt with fresh noise: the mean has a quarter of the noise, and the attack gains
    assert forward["ml_16_copies"]["token_recovery"] > forward["ml"]["token_recovery"]


def test_noise_is_removed_from_what_comes_back(llama_ckpt, prompts):
    """With remote blocks that add nothing, the defended client's output is the undefended one: the noise that
    was sent (and is large) never reaches the client's last blocks or LM head."""
    plain = build_client(llama_ckpt, ClientSetup(local_blocks=1), skip_remote=True)
    noisy = build_client(llama_ckpt, ClientSetup(local_blocks=1, privacy=4.0, seed=2), skip_remote=True)
    with torch.no_grad():
        expected, got = plain(input_ids=prompts).logits, noisy(input_ids=prompts).logits
    sent, clean = noisy.model.sequence.received[-1], plain.model.sequence.received[-1]
    ratio = float((sent - clean).norm(dim=-1).mean() / clean.norm(dim=-1).mean())
    assert 3.0 < ratio < 5.0  # noise norm ~ multiplier x the state's norm
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_noise_is_fresh_per_request_and_calibrated_per_position():
    noise = ResidualNoise(NoiseDefence(2.0, seed=0))
    hidden = torch.randn(1, 4, 256) * torch.tensor([1.0, 10.0, 100.0, 0.1])[None, :, None]
    (sent_a, n_a), (_, n_b) = noise.send(hidden), noise.send(hidden)
    assert not torch.equal(n_a, n_b)
    ratio = n_a.norm(dim=-1) / hidden.norm(dim=-1)
    assert torch.all((ratio > 1.6) & (ratio < 2.4)), ratio
    torch.testing.assert_close(noise.receive(sent_a, n_a), hidden)


def test_privacy_option_validates():
    assert ClientConfig().defence is None
    assert ClientConfig(privacy="off").defence is None
    assert ClientConfig(privacy=0).defence is None
    assert ClientConfig(privacy="noise").defence == NoiseDefence(DEFAULT_NOISE_MULTIPLIER)
    assert ClientConfig(privacy=2).defence == NoiseDefence(2.0)
    assert parse_privacy(NoiseDefence(3.0, seed=4)) == NoiseDefence(3.0, seed=4)
    for bad in ("on", -1.0, math.nan, math.inf, True, [4.0]):
        with pytest.raises(PrivacyConfigError, match="privacy"):
            ClientConfig(privacy=bad)
    with pytest.raises(PrivacyConfigError, match="seed"):
        NoiseDefence(1.0, seed="x")
    with pytest.raises(PrivacyConfigError, match="lora_steps"):
        ClientSetup(lora_steps=-1)


def test_noise_defence_through_a_swarm(llama_ckpt, llama_swarm, local_model):
    """The defence on the real client path (whole-sequence forward with backward, and generation in a session):
    the noise is added where hidden states leave the client and removed where they come back. With a small
    multiplier the results are transformers' own within the noise's effect on the remote blocks."""
    from swarm import AutoDistributedModelForCausalLM

    ids = torch.randint(3, 512, (2, 8), generator=torch.Generator().manual_seed(7))
    reference = local_model(llama_ckpt)
    outputs = {}
    for name, privacy in (("plain", "off"), ("noisy", NoiseDefence(1e-4, seed=3))):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            llama_ckpt, initial_peers=llama_swarm.initial_peers, local_blocks=1, privacy=privacy, check_rate=0.0
        )
        try:
            assert (model.model.privacy is None) == (name == "plain")
            model.tuning.add_lora(rank=2, alpha=4)
            logits = model(ids).logits
            logits.float().logsumexp(-1).mean().backward()
            assert all(p.grad is not None for p in model.tuning.parameters())
            with torch.no_grad():
                generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
            outputs[name] = logits.detach(), generated
        finally:
            model.shutdown()
    with torch.no_grad():
        ref_logits = reference(ids).logits
        ref_generated = reference.generate(ids[:1], max_new_tokens=4, do_sample=False)
    plain, noisy = outputs["plain"], outputs["noisy"]
    torch.testing.assert_close(plain[0], ref_logits, rtol=0, atol=ATOL)
    assert not torch.equal(noisy[0], plain[0])  # the noise was sent
    torch.testing.assert_close(noisy[0], ref_logits, rtol=0, atol=1e-3)  # and removed
    assert torch.equal(plain[1], ref_generated) and torch.equal(noisy[1], ref_generated)


def test_audit_script_prints_recovery_and_utility_for_each_configuration(llama_ckpt):
    """scripts/privacy_audit.py end to end on the tiny model: every configuration the issue names (no local blocks,
    a local block, a local block with a trained LoRA, the noise defence), with recovery and perplexity from one run."""
    out = subprocess.run(
        [
            sys.executable, str(REPO / "scripts" / "privacy_audit.py"), "--model", str(llama_ckpt), "--noise", "8",
            "--lora-steps", "2", "--prompts", "3", "--prompt-length", "6", "--copies", "2", "--backward-prompts", "1",
            "--heldout-windows", "2", "--window", "16", "--threads", "1",
        ],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    configs = {(c["local_blocks"], str(c["privacy"]), c["lora_steps"]): c for c in report["configs"]}
    assert set(configs) == {(0, "off", 0), (1, "off", 0), (1, "off", 2), (1, "8.0", 0)}
    for key in [(0, "off", 0), (1, "off", 0)]:  # a local block the peer can recompute protects nothing
        assert configs[key]["forward"]["nearest"]["token_recovery"] == 1.0
        assert configs[key]["backward"]["token_recovery"] == 1.0
        assert configs[key]["perplexity_vs_undefended"] == 1.0
    noisy = configs[(1, "8.0", 0)]
    assert (
        noisy["forward"]["nearest"]["token_recovery"] <= 0.25
        and noisy["forward"]["nearest"]["prompts_fully_recovered"] == 0
    )
    assert math.isfinite(noisy["perplexity"]) and noisy["perplexity"] > 0
    assert report["perplexity_undefended"] == configs[(0, "off", 0)]["perplexity"]
