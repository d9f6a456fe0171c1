"""privacy/: exact per-example gradients, DP-SGD clipping/noise against Opacus, accounting, exposure ledger."""

from __future__ import annotations

import copy
import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from model_tools import TINY  # tests/conftest.py puts scripts/ on sys.path
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from privacy import (
    DPSGD,
    DPConfig,
    ExposureLedger,
    ExposureRow,
    PerExampleGradError,
    PrivacyAccountant,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    clip_per_example,
    noise_for_target_epsilon,
    per_example_norms,
    per_example_parameters,
    poisson_sample,
    privatize,
    split_local_blocks,
)

DTYPE = torch.float64  # exactness checks compare batched and one-at-a-time results to ~1e-10


# ---------------------------------------------------------------- per-example gradients


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 2})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DTYPE).eval()
    model.requires_grad_(False)  # frozen like the swarm's blocks: only the client's own parameters train
    return model


def llama_loss(model: LlamaForCausalLM, params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Per-example losses [B]: a soft prompt [B, P, H] before the tokens and a LoRA (A [B, r, H], B [B, V, r])
    on the LM head, each example using its own row."""
    prompt = params["prompt"]
    embeds = torch.cat([prompt, model.model.embed_tokens(ids)], dim=1)
    hidden = model.model(inputs_embeds=embeds).last_hidden_state[:, prompt.shape[1] :]
    lora = torch.einsum("btd,brd->btr", hidden, params["lora_a"])
    logits = model.lm_head(hidden) + torch.einsum("btr,bvr->btv", lora, params["lora_b"])
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return token_losses.sum(dim=1)


def test_per_example_grads_equal_one_at_a_time_on_tiny_llama() -> None:
    model = tiny_llama()
    hidden, vocab, batch = model.config.hidden_size, model.config.vocab_size, 4
    gen = torch.Generator().manual_seed(1)
    params = {
        "prompt": torch.randn(3, hidden, generator=gen, dtype=DTYPE),
        "lora_a": torch.randn(2, hidden, generator=gen, dtype=DTYPE) * 0.1,
        "lora_b": torch.randn(vocab, 2, generator=gen, dtype=DTYPE) * 0.1,
    }
    ids = torch.randint(0, vocab, (batch, 7), generator=gen)

    replicas = per_example_parameters(params, batch)
    llama_loss(model, replicas.tensors, ids).sum().backward()
    batched = replicas.grads()

    for i in range(batch):
        single = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        loss = llama_loss(model, {name: p.unsqueeze(0) for name, p in single.items()}, ids[i : i + 1]).sum()
        expected = torch.autograd.grad(loss, list(single.values()))
        for (name, got), want in zip(batched.items(), expected, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-11, msg=f"example {i}, {name}")
    # The examples really differ, so a broadcast of one example's gradient would have failed above.
    assert not torch.allclose(batched["prompt"][0], batched["prompt"][1])


def test_per_example_parameters_are_fresh_leaves_and_unused_ones_get_zero_grads() -> None:
    weight = nn.Parameter(torch.randn(3, 2))
    replicas = per_example_parameters({"w": weight, "unused": nn.Parameter(torch.ones(4))}, 5)
    assert replicas.tensors["w"].shape == (5, 3, 2) and replicas.tensors["w"].is_leaf
    assert torch.equal(replicas.row(4)["w"], weight.detach())
    (replicas.tensors["w"][2] * 2).sum().backward()
    grads = replicas.grads()
    assert weight.grad is None  # the real parameter is untouched
    assert torch.equal(grads["w"][2], torch.full((3, 2), 2.0)) and grads["w"][[0, 1, 3, 4]].abs().sum() == 0
    assert torch.equal(grads["unused"], torch.zeros(5, 4))
    with pytest.raises(IndexError):
        replicas.row(5)
    assert per_example_parameters({"w": weight}, 0).tensors["w"].shape == (0, 3, 2)


# ---------------------------------------------------------------- clipping and noise


def test_clipping_bounds_every_example_jointly_and_keeps_small_ones() -> None:
    gen = torch.Generator().manual_seed(2)
    scales = torch.tensor([0.01, 0.3, 1.0, 10.0, 1000.0]).view(-1, 1, 1)
    grads = {"a": torch.randn(5, 4, 3, generator=gen) * scales, "b": torch.randn(5, 7, generator=gen) * scales[:, 0]}
    norm_before = per_example_norms(grads)
    joint = torch.cat([grads["a"].reshape(5, -1), grads["b"]], dim=1).norm(dim=1)
    torch.testing.assert_close(norm_before, joint)

    clip = 0.5
    clipped = clip_per_example(grads, clip)
    norm_after = per_example_norms(clipped)
    assert (norm_after <= clip * (1 + 1e-6)).all(), norm_after
    small = norm_before < clip
    assert small.any() and (~small).any()
    for name in grads:
        assert torch.equal(clipped[name][small], grads[name][small])  # factor exactly 1 below the bound
    torch.testing.assert_close(norm_after[~small], torch.full(((~small).sum(),), clip), rtol=1e-5, atol=0)


@pytest.mark.parametrize("noise_multiplier", [0.0, 0.8])
def test_privatize_matches_opacus_dpoptimizer(noise_multiplier: float) -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    batch, clip = 8, 0.7
    gen = torch.Generator().manual_seed(3)
    grads = {name: torch.randn(batch, *p.shape, generator=gen) * 2 for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad_sample = grads[name].clone()
    opacus = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(4),
    )
    opacus.pre_step()
    ours = privatize(
        grads,
        max_grad_norm=clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(4),
    )
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_noise_has_std_sigma_c_over_expected_batch_and_is_reproducible() -> None:
    sigma, clip, expected = 1.3, 0.5, 32.0
    grads = {"w": torch.zeros(0, 400, 500)}  # an empty Poisson batch: the update is pure noise

    def noise(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return privatize(
            grads, max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, generator=gen
        )["w"]

    sample = noise(5)
    assert sample.shape == (400, 500)
    target = sigma * clip / expected
    # 200k draws: the sample std's relative standard error is ~0.16%, the mean's is ~0.2% of the std.
    assert abs(sample.std().item() / target - 1) < 0.01
    assert abs(sample.mean().item()) < 0.01 * target
    assert torch.equal(noise(5), sample) and not torch.equal(noise(6), sample)


def test_noise_scale_does_not_depend_on_the_actual_batch() -> None:
    sigma, clip, expected = 2.0, 1.0, 10.0
    gen = torch.Generator().manual_seed(7)
    grads = {"w": torch.randn(40, 100_000, generator=gen) * 5}  # 4x the expected batch, all above the bound
    signal = clip_per_example(grads, clip)["w"].sum(dim=0) / expected
    noisy = privatize(grads, max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, generator=gen)
    assert abs((noisy["w"] - signal).std().item() / (sigma * clip / expected) - 1) < 0.02


# ---------------------------------------------------------------- DP-SGD end to end


def mlp_losses(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example squared errors [B] of a LoRA-adapted linear layer with per-example weights [B, ...]."""
    weight = params["w"] + torch.einsum("bor,bri->boi", params["lora_b"], params["lora_a"])
    pred = torch.einsum("boi,bi->bo", weight, x) + params["bias"]
    return ((pred - y) ** 2).sum(dim=1)


def make_mlp_params(seed: int) -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (3, 5), "lora_a": (2, 5), "lora_b": (3, 2), "bias": (3,)}
    return {name: nn.Parameter(torch.randn(*shape, generator=gen, dtype=DTYPE)) for name, shape in shapes.items()}


def test_dpsgd_without_noise_or_clipping_equals_plain_sgd_on_the_mean_gradient() -> None:
    # sample_rate=1 makes every Poisson batch the whole dataset, whose size is then also the expected batch size.
    num, lr = 6, 0.05
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(num, 5, generator=gen, dtype=DTYPE), torch.randn(num, 3, generator=gen, dtype=DTYPE)
    dp_params, plain_params = make_mlp_params(9), make_mlp_params(9)
    config = DPConfig(
        dataset_size=num, sample_rate=1.0, max_grad_norm=1e9, noise_multiplier=0.0, delta=1e-5 / num, seed=0
    )
    dpsgd = DPSGD(dp_params, config)
    dp_opt = torch.optim.SGD(dp_params.values(), lr=lr)
    plain_opt = torch.optim.SGD(plain_params.values(), lr=lr)
    for step in range(1, 4):
        batch = dpsgd.sample_batch()
        assert batch == list(range(num))
        replicas = dpsgd.per_example(len(batch))
        mlp_losses(replicas.tensors, x[batch], y[batch]).sum().backward()
        report = dpsgd.step(replicas.grads())
        dp_opt.step()

        plain_opt.zero_grad()
        expanded = {name: p.expand(num, *p.shape) for name, p in plain_params.items()}
        mlp_losses(expanded, x, y).mean().backward()
        plain_opt.step()
        for name in plain_params:
            torch.testing.assert_close(dp_params[name], plain_params[name], rtol=1e-12, atol=1e-12)
        assert (report.step, report.batch_size, report.epsilon) == (step, num, math.inf)
    assert not torch.equal(dp_params["w"], make_mlp_params(9)["w"])  # the parameters did move


def test_dpsgd_empty_batch_gives_pure_noise_and_counts_the_step() -> None:
    params = {"w": nn.Parameter(torch.zeros(300, 300))}
    config = DPConfig(dataset_size=1000, sample_rate=0.01, max_grad_norm=2.0, noise_multiplier=1.5, delta=1e-5, seed=1)
    dpsgd = DPSGD(params, config)
    report = dpsgd.step(None)
    assert report.batch_size == 0 and report.step == 1 and 0 < report.epsilon < math.inf
    assert abs(params["w"].grad.std().item() / (1.5 * 2.0 / 10.0) - 1) < 0.02
    empty = dpsgd.per_example(0).grads()  # the same through the replicas of a zero-size batch
    assert dpsgd.step(empty).batch_size == 0 and dpsgd.steps == 2


def test_dpsgd_rejects_mismatched_per_example_grads() -> None:
    params = make_mlp_params(0)
    dpsgd = DPSGD(params, DPConfig(dataset_size=10, sample_rate=0.5, max_grad_norm=1.0, noise_multiplier=1, delta=1e-3))
    good = per_example_parameters(params, 2).grads()
    with pytest.raises(PerExampleGradError):
        dpsgd.step({name: g for name, g in good.items() if name != "bias"})
    with pytest.raises(PerExampleGradError):
        dpsgd.step({**good, "bias": torch.zeros(3, 3, dtype=DTYPE)})  # batch of 3 among batches of 2
    with pytest.raises(PerExampleGradError):
        dpsgd.step({**good, "w": torch.zeros(2, 5, 3, dtype=DTYPE)})
    assert dpsgd.steps == 0  # nothing was accounted for the refused steps
    with pytest.raises(PrivacyConfigError):
        DPSGD({"frozen": torch.zeros(2)}, dpsgd.config)


def test_poisson_sampling_matches_opacus_sampler() -> None:
    num, rate = 500, 0.1
    opacus = UniformWithReplacementSampler(
        num_samples=num, sample_rate=rate, generator=torch.Generator().manual_seed(11), steps=30
    )
    gen = torch.Generator().manual_seed(11)
    ours = [poisson_sample(num, rate, gen) for _ in range(30)]
    assert ours == list(opacus)
    sizes = [len(b) for b in ours]
    assert abs(sum(sizes) / len(sizes) - num * rate) < 5  # mean of 30 batches: SE ≈ 1.2
    assert len(set(sizes)) > 1  # batch sizes vary, unlike fixed-size batches


def test_dp_config_validation() -> None:
    base = dict(dataset_size=100, sample_rate=0.1, max_grad_norm=1.0, delta=1e-3)
    with pytest.raises(PrivacyConfigError, match="exactly one"):
        DPConfig(**base)
    with pytest.raises(PrivacyConfigError, match="exactly one"):
        DPConfig(**base, noise_multiplier=1.0, target_epsilon=2.0, total_steps=10)
    with pytest.raises(PrivacyConfigError, match="total_steps"):
        DPConfig(**base, target_epsilon=2.0)
    for bad in ({"max_grad_norm": 0.0}, {"sample_rate": 0.0}, {"sample_rate": 1.5}, {"delta": 1.0}):
        with pytest.raises(PrivacyConfigError):
            DPConfig(**{**base, **bad}, noise_multiplier=1.0)
    with pytest.raises(PrivacyConfigError):
        DPConfig(**base, noise_multiplier=-0.1)
    with pytest.raises(PrivacyConfigError):
        DPConfig(**base, noise_multiplier=1.0, accountant="gdp")
    with pytest.raises(PrivacyConfigError):
        DPConfig(**{**base, "dataset_size": True}, noise_multiplier=1.0)
    with pytest.warns(UserWarning, match="delta"):
        DPConfig(**{**base, "delta": 0.02}, noise_multiplier=1.0)
    assert DPConfig(**base, noise_multiplier=1.0).expected_batch_size == pytest.approx(10.0)


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("mechanism, opacus_cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_opacus_accountant(mechanism: str, opacus_cls: type) -> None:
    ours, theirs = PrivacyAccountant(mechanism), opacus_cls()
    assert ours.epsilon(1e-5) == 0.0
    schedule = [(1.1, 0.01)] * 30 + [(0.9, 0.02)] * 20
    for i, (sigma, rate) in enumerate(schedule, start=1):
        ours.step(sigma, rate)
        theirs.step(noise_multiplier=sigma, sample_rate=rate)
        if i in (1, 30, 50):
            for delta in (1e-5, 1e-3):
                expected = theirs.get_epsilon(delta=delta)
                assert ours.epsilon(delta) == expected and 0 < expected < math.inf
    assert len(ours) == 50 and ours.history == [(1.1, 0.01, 30), (0.9, 0.02, 20)]
    ours.step(0.0, 0.01)
    assert ours.epsilon(1e-5) == math.inf  # one noiseless step releases an exact gradient


def test_accountant_rejects_bad_inputs() -> None:
    with pytest.raises(PrivacyConfigError):
        PrivacyAccountant("gaussian")  # type: ignore[arg-type]
    accountant = PrivacyAccountant("rdp")
    for sigma, rate in ((-1.0, 0.1), (1.0, 0.0), (1.0, 1.01), (math.nan, 0.1), (1.0, math.inf)):
        with pytest.raises(PrivacyConfigError):
            accountant.step(sigma, rate)
    assert len(accountant) == 0
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError):  # PrivacyConfigError is a ValueError
            accountant.epsilon(delta)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_target_epsilon_picks_sigma_that_lands_just_under_target(mechanism: str) -> None:
    target, delta, rate, steps = 2.0, 1e-5, 0.02, 20
    sigma = noise_for_target_epsilon(target, delta, rate, steps, mechanism)
    config = DPConfig(
        dataset_size=1000,
        sample_rate=rate,
        max_grad_norm=1.0,
        delta=delta,
        target_epsilon=target,
        total_steps=steps,
        accountant=mechanism,
        seed=0,
    )
    dpsgd = DPSGD({"w": nn.Parameter(torch.zeros(4))}, config)
    assert dpsgd.noise_multiplier == sigma
    reports = [dpsgd.step(None) for _ in range(steps)]
    epsilons = [r.epsilon for r in reports]
    assert epsilons == sorted(epsilons)  # spent privacy only grows
    assert target - 0.01 <= epsilons[-1] <= target  # Opacus' default epsilon_tolerance
    # A lower σ would overshoot: the chosen one is not needlessly large.
    lower = PrivacyAccountant(mechanism)
    for _ in range(steps):
        lower.step(sigma * 0.97, rate)
    assert lower.epsilon(delta) > target
    with pytest.raises(PrivacyBudgetExhausted):
        dpsgd.step(None)


def test_target_epsilon_out_of_reach_is_a_config_error() -> None:
    with pytest.raises(PrivacyConfigError, match="no noise multiplier"):
        noise_for_target_epsilon(1e-9, 1e-5, 1.0, 1000)
    with pytest.raises(PrivacyConfigError):
        noise_for_target_epsilon(1.0, 1e-5, 0.01, 0)


# ---------------------------------------------------------------- exposure


def test_ledger_totals_json_round_trip_and_table(tmp_path) -> None:
    ledger = ExposureLedger(session_id="s1")
    ledger.record("peerA", 0, 4, 100, "forward")
    ledger.record("peerA", 0, 4, 100, "backward")
    ledger.record("peerA", 0, 4, 30, "forward")
    ledger.record("peerA", 6, 8, 5, "inference")
    ledger.record("peerB", 4, 8, 130, "forward")
    rows = ledger.summary()
    assert rows[0] == ExposureRow("peerA", 0, 4, forward_tokens=130, backward_tokens=100, requests=3)
    assert [(r.peer_id, r.start_block, r.end_block) for r in rows] == [
        ("peerA", 0, 4),
        ("peerA", 6, 8),
        ("peerB", 4, 8),
    ]
    assert ledger.blocks_seen_by("peerA") == [0, 1, 2, 3, 6, 7] and ledger.blocks_seen_by("nobody") == []
    assert ledger.peers() == ["peerA", "peerB"]

    data = json.loads(ledger.to_json())
    assert data["session_id"] == "s1" and data["rows"][1]["inference_tokens"] == 5
    path = tmp_path / "exposure.json"
    ledger.save(path)
    loaded = ExposureLedger.load(path)
    assert loaded.summary() == rows and loaded.session_id == "s1"
    loaded.record("peerB", 4, 8, 1, "forward")  # a loaded ledger keeps counting
    assert loaded.summary()[-1].forward_tokens == 131

    table = ledger.format_table().splitlines()
    assert "s1" in table[0] and "forward tokens" in table[1]
    assert table[2].split() == ["peerA", "0-3", "130", "100", "0", "3"]
    assert table[-1].split() == ["total", "260", "100", "5", "5"]


def test_ledger_is_thread_safe() -> None:
    ledger = ExposureLedger()

    def work(kind: str) -> None:
        for _ in range(2000):
            ledger.record("peer", 0, 2, 3, kind)  # type: ignore[arg-type]

    threads = [threading.Thread(target=work, args=(kind,)) for kind in ("forward", "forward", "backward", "inference")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (row,) = ledger.summary()
    assert (row.forward_tokens, row.backward_tokens, row.inference_tokens, row.requests) == (12000, 6000, 6000, 8000)


def test_ledger_rejects_bad_records_and_documents() -> None:
    ledger = ExposureLedger()
    bad_calls = [
        ("", 0, 1, 1, "forward"),
        ("p", 2, 2, 1, "forward"),
        ("p", -1, 1, 1, "forward"),
        ("p", 0, 1, -5, "forward"),
        ("p", 0, 1, True, "forward"),
        ("p", 0, 1, 1, "sideways"),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            ledger.record(*call)  # type: ignore[arg-type]
    assert ledger.summary() == []
    for text in ("[]", '{"rows": [{"peer_id": "p"}]}', '{"rows": [], "session_id": 3}'):
        with pytest.raises(ValueError):
            ExposureLedger.from_json(text)
    row = {"peer_id": "p", "start_block": 0, "end_block": 1}
    with pytest.raises(ValueError, match="duplicate"):
        ExposureLedger.from_json(json.dumps({"rows": [row, copy.copy(row)]}))


def test_split_local_blocks() -> None:
    assert split_local_blocks(10, 2, 1) == (range(0, 2), range(2, 9), range(9, 10))
    assert split_local_blocks(10, 0, 0) == (range(0, 0), range(0, 10), range(10, 10))
    with pytest.raises(ValueError, match="allow_all_local"):
        split_local_blocks(4, 2, 2)
    assert split_local_blocks(4, 2, 2, allow_all_local=True) == (range(0, 2), range(2, 2), range(2, 4))
    for args in ((4, 3, 2), (4, -1, 0), (0, 0, 0), (4, 1.0, 0), (4, False, 0)):
        with pytest.raises(ValueError):
            split_local_blocks(*args)  # type: ignore[arg-type]
