"""Training through the swarm: gradients of prompts, deep prompts and LoRA equal those of local transformers (and
PEFT), optimizer steps agree, backward survives a dead peer, DP-SGD per-example gradients are exact, and local
blocks show no peer their activations."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from privacy import DPSGD, DPConfig, ExposureLedger
from swarm import AutoDistributedModelForCausalLM
from swarm.transport import call_info
from swarm.tuning import local_deep_prompts

ATOL = 2e-5
VOCAB = 512


@pytest.fixture(scope="module")
def client(llama_ckpt, llama_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=llama_swarm.initial_peers)
    yield model
    model.shutdown()


def fresh_tuning(model) -> None:
    """An empty ClientTuning on `model` (tests share one client)."""
    from swarm.tuning import ClientTuning

    model.model.tuning = ClientTuning(model.config)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss, per example summed over tokens for reduction='none'."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return losses.mean() if reduction == "mean" else losses.sum(dim=1)


def local_forward(local, ids: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: transformers' model (or PEFT's around it) with the same prompts; deep prompts added before
    each layer by swarm.tuning.local_deep_prompts; shallow prompts prepended and their outputs dropped."""
    deep = tensors.get("deep_prompts")
    with local_deep_prompts(local, deep) if deep is not None else contextlib.nullcontext():
        embeds = local.get_input_embeddings()(ids)
        prompts = tensors.get("prompts")
        if prompts is not None:
            embeds = torch.cat([prompts.expand(ids.shape[0], -1, -1), embeds], dim=1)
        logits = local(inputs_embeds=embeds).logits
        return logits if prompts is None else logits[:, prompts.shape[0] :]


def peer_stats(model, key: str) -> int:
    """A counter summed over the peers serving the model (info calls)."""
    sequence = model.model.sequence
    route = sequence.make_route(start=0, end=sequence.num_blocks, policy="hops")
    return sum(sequence.loop.run(call_info(sequence.p2p, s.peer_id, 5.0)).stats[key] for s in route)


def randomize(tuning, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuning.named_trainables().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_prompt_and_deep_prompt_gradients_and_step_match_local(client, llama_ckpt, local_model):
    fresh_tuning(client)
    client.tuning.add_prompts(3)
    client.tuning.add_deep_prompts(3)
    randomize(client.tuning, 1)
    params = client.tuning.named_trainables()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))

    held_before = peer_stats(client, "held_backward_calls")
    out = client(ids, labels=ids)
    assert torch.allclose(out.loss, lm_loss(out.logits, ids), atol=1e-6)
    out.loss.backward()
    remote_grads = {n: p.grad.clone() for n, p in params.items()}
    assert peer_stats(client, "held_backward_calls") == held_before + 2  # both peers answered from held graphs

    local_params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    local_logits = local_forward(local_model(llama_ckpt), ids, local_params)
    assert torch.allclose(out.logits, local_logits, atol=ATOL, rtol=0)
    lm_loss(local_logits, ids).backward()
    for name, p in local_params.items():
        assert remote_grads[name].abs().sum() > 0
        assert torch.allclose(remote_grads[name], p.grad, atol=ATOL, rtol=1e-4), name

    # one optimizer step on each side gives the same parameters
    remote_opt, local_opt = torch.optim.Adam(params.values(), lr=1e-2), torch.optim.Adam(local_params.values(), lr=1e-2)
    remote_opt.step(), local_opt.step()
    for name in params:
        assert torch.allclose(params[name], local_params[name], atol=1e-6, rtol=0), name

    # chunked requests (one example per chunk) through the stateless backward call give the same gradients
    client.zero_grad()
    config = client.model.sequence.config
    config.max_train_tokens, config.hold_activations = 9, False
    try:
        backward_before = peer_stats(client, "backward_calls")
        lm_loss(client(ids).logits, ids).backward()
        assert peer_stats(client, "backward_calls") == backward_before + 2 * ids.shape[0]  # a call per example
    finally:
        config.max_train_tokens, config.hold_activations = 8192, True
    local_opt.zero_grad()
    lm_loss(local_forward(local_model(llama_ckpt), ids, local_params), ids).backward()
    for name, p in local_params.items():
        assert torch.allclose(params[name].grad, p.grad, atol=ATOL, rtol=1e-4), name


def test_lora_gradients_match_peft_and_save_load(client, llama_ckpt, local_model, tmp_path):
    fresh_tuning(client)
    client.tuning.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), blocks=[0, 1, 3])
    randomize(client.tuning, 3)
    params = client.tuning.named_trainables()
    client.tuning.save_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(local_model(llama_ckpt)), tmp_path / "adapter", is_trainable=True
    )
    peft_params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(peft_params) == len(params) == 18

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    logits = client(ids).logits
    local_logits = peft_model(ids).logits
    assert torch.allclose(logits, local_logits, atol=ATOL, rtol=0)
    assert not torch.allclose(logits, local_model(llama_ckpt)(ids).logits, atol=1e-3)  # the adapters matter
    lm_loss(logits, ids).backward()
    lm_loss(local_logits, ids).backward()
    for name, p in params.items():
        block, module, part = name.split(".")[1:]
        [peft_p] = [q for n, q in peft_params.items() if f"layers.{block}." in n and f"{module}.lora_{part}" in n]
        assert p.grad.abs().sum() > 0
        assert torch.allclose(p.grad, peft_p.grad, atol=ATOL, rtol=1e-4), name
    torch.optim.SGD(params.values(), lr=0.1).step()
    torch.optim.SGD(peft_params.values(), lr=0.1).step()
    with torch.no_grad():
        assert torch.allclose(client(ids).logits, peft_model(ids).logits, atol=ATOL, rtol=0)

    # what was saved loads back into a fresh tuning
    fresh_tuning(client)
    client.tuning.load_pretrained(tmp_path / "adapter")
    assert client.tuning.lora_scale == 2.0 and set(client.tuning.named_trainables()) == set(params)


def test_generation_uses_lora_and_deep_prompts(client, llama_ckpt, local_model, tmp_path):
    fresh_tuning(client)
    client.tuning.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj"), blocks=[0, 2, 3])
    randomize(client.tuning, 6)
    client.tuning.save_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(local_model(llama_ckpt)), tmp_path / "adapter")
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        assert not torch.allclose(client(ids).logits, local_model(llama_ckpt)(ids).logits, atol=1e-3)
        # the peers apply the client's LoRA in its inference sessions (cached generation) exactly as PEFT does
        assert torch.equal(client.generate(ids, **kwargs), peft_model.generate(input_ids=ids, **kwargs))

        # deep prompts too: cached generation equals greedy decoding by whole-sequence forwards (tested vs local)
        client.tuning.add_deep_prompts(3)
        randomize(client.tuning, 8)
        tokens = ids
        for _ in range(10):
            tokens = torch.cat([tokens, client(tokens).logits[:, -1:].argmax(-1)], dim=1)
        with client.inference_session(max_length=32):
            assert torch.equal(client.generate(ids, **kwargs), tokens)
        with client.inference_session(max_length=32), pytest.raises(ValueError, match="must cover positions 0..2"):
            client.generate(ids[:, :2], max_new_tokens=1)  # too short to hold the deep prompts' positions
    fresh_tuning(client)


def test_dp_sgd_per_example_gradients_through_swarm_are_exact(client, llama_ckpt, local_model, tmp_path):
    fresh_tuning(client)
    client.tuning.add_deep_prompts(2)
    client.tuning.add_lora(rank=2, alpha=2, blocks=[1, 2])
    randomize(client.tuning, 5)
    params = client.tuning.named_trainables()
    config = DPConfig(dataset_size=100, sample_rate=0.04, max_grad_norm=0.05, delta=1e-3, noise_multiplier=1.0, seed=7)
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(6))

    dpsgd = DPSGD(params, config)
    replicas = dpsgd.per_example(ids.shape[0])
    swarm_grads, _ = client.tuning.per_example_gradients(
        replicas, lambda: lm_loss(client(ids).logits, ids, reduction="none")
    )

    client.tuning.save_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(local_model(llama_ckpt)), tmp_path / "adapter", is_trainable=True
    )
    peft_params = dict(peft_model.named_parameters())
    deep = params["deep_prompts"].detach().clone().requires_grad_(True)
    for i in range(ids.shape[0]):  # the reference: one example at a time, locally
        peft_model.zero_grad()
        deep.grad = None
        example = ids[i : i + 1]
        lm_loss(local_forward(peft_model, example, {"deep_prompts": deep}), example, reduction="none").sum().backward()
        assert torch.allclose(swarm_grads["deep_prompts"][i], deep.grad, atol=ATOL, rtol=1e-4)
        for name in params:
            if name.startswith("lora."):
                block, module, part = name.split(".")[1:]
                [key] = [n for n in peft_params if f"layers.{block}." in n and f"{module}.lora_{part}" in n]
                assert torch.allclose(swarm_grads[name][i], peft_params[key].grad, atol=ATOL, rtol=1e-4), name

    report = dpsgd.step(swarm_grads)
    assert report.batch_size == 4 and report.epsilon > 0
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in swarm_grads.values()], 1).norm(dim=1)
    assert (norms > config.max_grad_norm).any()  # clipping had something to do


@pytest.mark.parametrize("hold", [False, True], ids=["stateless", "held"])
def test_backward_fails_over_to_a_replica(replicated, llama_ckpt, local_model, hold):
    """The peer of the forward of blocks 2-3 dies before the backward: with the stateless backward call, the first
    try goes to it (forced here) and fails; with the held graph, its train call fails. Either way the backward
    re-runs on a replica and the gradients are exact."""
    swarm, model = replicated
    fresh_tuning(model)
    model.tuning.add_deep_prompts(2)
    randomize(model.tuning, 8)
    sequence = model.model.sequence
    sequence.config.hold_activations = hold
    sequence.ledger = ExposureLedger()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    loss = lm_loss(model(ids).logits, ids)
    [forward_peer] = [r.peer_id for r in sequence.ledger.summary() if r.start_block == 2]
    [victim] = [p for p in swarm.peers if p.info["peer_id"] == forward_peer]
    victim.process.kill()
    victim.process.wait(10)

    class PreferVictim(random.Random):
        def choices(self, population, weights=None, **kwargs):
            picked = [p for p in population if p.peer_id.to_base58() == forward_peer][:1]
            return picked or super().choices(population, weights, **kwargs)

    sequence.planner.rng = PreferVictim(0)
    loss.backward()
    deep = model.tuning.named_trainables()["deep_prompts"]
    local_deep = deep.detach().clone().requires_grad_(True)
    lm_loss(local_forward(local_model(llama_ckpt), ids, {"deep_prompts": local_deep}), ids).backward()
    assert torch.allclose(deep.grad, local_deep.grad, atol=ATOL, rtol=1e-4)
    backward_rows = [r for r in sequence.ledger.summary() if r.backward_tokens and r.start_block == 2]
    assert [r.peer_id for r in backward_rows] != [forward_peer] and len(backward_rows) == 1
    assert forward_peer in {str(p) for p in sequence.health.banned()}


def test_local_blocks_show_no_peer_their_activations(llama_ckpt, llama_swarm, local_model):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=llama_swarm.initial_peers, local_blocks=1
    )
    try:
        sequence = model.model.sequence

        def block_tokens() -> dict[str, int]:
            counts: dict[str, int] = {}
            for span in sequence.make_route(start=0, end=4, policy="hops"):
                info = sequence.loop.run(call_info(sequence.p2p, span.peer_id, 5.0))
                for block, n in info.block_tokens.items():
                    counts[block] = counts.get(block, 0) + n
            return counts

        before = block_tokens()
        model.tuning.add_deep_prompts(2)
        model.tuning.add_lora(rank=2, alpha=4)
        randomize(model.tuning, 10)
        params = model.tuning.named_trainables()
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(11))
        logits = model(ids).logits
        lm_loss(logits, ids).backward()
        with torch.no_grad():
            fresh_tuning(model)
            generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        after = block_tokens()

        ledger = model.exposure_ledger
        seen = {b for peer in ledger.peers() for b in ledger.blocks_seen_by(peer)}
        assert seen == {1, 2}
        assert {(r.forward_tokens, r.backward_tokens) for r in ledger.summary()} - {(0, 0)} == {(16, 16)}
        assert "total" in ledger.format_table()
        # the peers' own counters agree: blocks 0 and 3 computed nothing for this client
        assert after.get("0", 0) == before.get("0", 0) and after.get("3", 0) == before.get("3", 0)
        assert after["1"] > before.get("1", 0) and after["2"] > before.get("2", 0)

        local = copy.deepcopy(local_model(llama_ckpt))
        assert torch.equal(generated, local.generate(ids[:1], max_new_tokens=4, do_sample=False))
        _compare_with_peft(local, params, ids, logits)
    finally:
        model.shutdown()


def _compare_with_peft(local, params: dict[str, torch.Tensor], ids: torch.Tensor, logits: torch.Tensor) -> None:
    """Logits and gradients of the local-blocks client against PEFT + deep-prompt hooks on the local model."""
    import tempfile

    from swarm.tuning import ClientTuning

    tuning = ClientTuning(local.config)
    tuning.add_deep_prompts(2)
    tuning.add_lora(rank=2, alpha=4)
    with torch.no_grad():
        for name, p in tuning.named_trainables().items():
            p.copy_(params[name])
    with tempfile.TemporaryDirectory() as d:
        tuning.save_pretrained(d)
        peft_model = PeftModel.from_pretrained(local, d, is_trainable=True)
    deep = params["deep_prompts"].detach().clone().requires_grad_(True)
    local_logits = local_forward(peft_model, ids, {"deep_prompts": deep})
    assert torch.allclose(logits, local_logits, atol=ATOL, rtol=0)
    lm_loss(local_logits, ids).backward()
    assert torch.allclose(params["deep_prompts"].grad, deep.grad, atol=ATOL, rtol=1e-4)
    peft_params = dict(peft_model.named_parameters())
    for name, p in params.items():
        if name.startswith("lora."):
            block, module, part = name.split(".")[1:]
            [key] = [n for n in peft_params if f"layers.{block}." in n and f"{module}.lora_{part}" in n]
            assert torch.allclose(p.grad, peft_params[key].grad, atol=ATOL, rtol=1e-4), name


def _bad(name: str, shape: list[int], fill: float = 0.01) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, fill)}


@pytest.mark.parametrize(
    "handler, trainables, message",
    [
        ("forward", _bad("deep_prompts", [2, 9, 64]), "length 9 must be in"),  # longer than the 4 tokens
        ("forward", _bad("deep_prompts", [3, 2, 64]), "deep prompts must be"),  # 3 blocks for a 2-block request
        ("forward", _bad("lora.0.q_proj.A", [2, 64]), "needs both A and B"),
        ("backward", {**_bad("lora.0.q_proj.A", [2, 64]), **_bad("lora.0.q_proj.B", [64, 3])}, "do not fit"),
        (  # above the default --max-lora-rank
            "backward",
            {**_bad("lora.0.q_proj.A", [99, 64]), **_bad("lora.0.q_proj.B", [64, 99])},
            r"rank 99 .* outside \[1, 64\]",
        ),
        ("backward", _bad("lora.0.lm_head.A", [2, 64]), "not allowed"),
        ("backward", _bad("lora.5.q_proj.A", [2, 64]), "not in the requested blocks"),
        ("backward", _bad("deep_prompts", [2, 2, 64], float("nan")), "NaN"),
        ("backward", _bad("deep_prompts", [3, 2, 2, 64]), "deep prompts must be"),  # per-example rows != batch of 2
    ],
)
def test_peer_rejects_malformed_adapters(client, llama_swarm, handler, trainables, message):
    from hivemind.p2p import PeerID

    from blocks.adapters import Adapters
    from peers.wire import Backward, Forward
    from swarm import PeerError
    from swarm.transport import call_backward, call_forward

    seq = client.model.sequence
    peer = PeerID.from_base58(llama_swarm.peers[0].info["peer_id"])
    hidden, adapters = torch.randn(2, 4, 64), Adapters(trainables)
    if handler == "forward":
        call = call_forward(seq.p2p, peer, Forward(0, 2, hidden, adapters), 10**8, 30)
    else:
        call = call_backward(seq.p2p, peer, Backward(0, 2, hidden, torch.randn_like(hidden), adapters), 10**8, 30)
    with pytest.raises(PeerError, match=message):
        seq.loop.run(call)
    # and the peer still serves
    assert seq.loop.run(call_forward(seq.p2p, peer, Forward(0, 2, hidden), 10**8, 30)).shape == hidden.shape


def _dequantized_copy(span):
    """A float span whose linear weights are exactly what the nf4 span computes with."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    from blocks.span import BlockSpan

    float_span = BlockSpan(span.config, span.start, span.end, [copy.deepcopy(layer) for layer in span.layers])
    for name, module in span.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb_f.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            parent, _, leaf = name.rpartition(".")
            setattr(float_span.get_submodule(parent), leaf, torch.nn.Linear(weight.shape[1], weight.shape[0], False))
            float_span.get_submodule(name).weight.data = weight
    return float_span


@pytest.mark.filterwarnings("ignore:bitsandbytes.{2}gemv_4bit")  # its backward is checked against float below
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_lora_and_deep_prompts_work_on_quantized_blocks(llama_ckpt, quant):
    """Hooks, not re-implemented layers: LoRA adds exactly scale * B(A(x)) to a bitsandbytes layer's output, and
    gradients reach the LoRA tensors and the input through the quantized weights (for nf4: those of the dequantized
    weights; int8 also quantizes activations, so only checked to flow)."""
    from blocks.adapters import Adapters, linear_module, lora_hooks, run_span
    from blocks.checkpoint import open_checkpoint
    from blocks.span import load_span

    span = load_span(open_checkpoint(llama_ckpt), 0, 2, quant=quant, progress=False)
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(2, 5, 64, generator=gen)
    a, b = torch.randn(2, 3, 64, generator=gen) * 0.1, torch.randn(2, 64, 3, generator=gen) * 0.1  # per example
    q_proj = linear_module(span.layers[1], "q_proj")
    x = torch.randn(2, 5, 64, generator=gen)
    with torch.no_grad():
        base = q_proj(x)
        delta = torch.einsum("btr,bor->bto", torch.einsum("bti,bri->btr", x, a), b) * 2.0
        with lora_hooks(span, Adapters({"lora.1.q_proj.A": a, "lora.1.q_proj.B": b}, 2.0)):
            assert torch.allclose(q_proj(x), base + delta, atol=1e-5)

    def grads(s) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (hidden, a, b, torch.randn(2, 2, 2, 64, generator=gen))]
        tensors = {"lora.1.q_proj.A": leaves[1], "lora.1.q_proj.B": leaves[2], "deep_prompts": leaves[3]}
        run_span(s, leaves[0], 0, 2, Adapters(tensors, 2.0)).square().sum().backward()
        return [t.grad for t in leaves]

    quantized = grads(span)
    assert all(g is not None and g.abs().sum() > 0 for g in quantized)
    if quant == "nf4":
        gen.manual_seed(13)
        reference = grads(_dequantized_copy(span))
        gen.manual_seed(13)
        quantized = grads(span)
        for got, want in zip(quantized, reference, strict=True):
            # bitsandbytes' CPU 4-bit kernels round differently from a float matmul (up to ~1% of the largest entry)
            assert (got - want).abs().max() <= 2e-2 * want.abs().max(), (got - want).abs().max()


def test_peer_out_of_hold_room_falls_back_to_stateless_backward(llama_ckpt, local_model):
    """A peer that may hold no graphs (--max-held-tokens 0) answers the train call's forward with held=False; the
    client then gets the gradients from the backward call, which recomputes the forward."""
    from conftest import start_swarm

    swarm = start_swarm(llama_ckpt, peers=1, spans=[(0, 4)], extra_args=["--max-held-tokens", "0"])
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=swarm.initial_peers)
    try:
        model.tuning.add_deep_prompts(2)
        randomize(model.tuning, 14)
        ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(15))
        lm_loss(model(ids).logits, ids).backward()
        deep = model.tuning.named_trainables()["deep_prompts"]
        local_deep = deep.detach().clone().requires_grad_(True)
        lm_loss(local_forward(local_model(llama_ckpt), ids, {"deep_prompts": local_deep}), ids).backward()
        assert torch.allclose(deep.grad, local_deep.grad, atol=ATOL, rtol=1e-4)
        assert (peer_stats(model, "held_backward_calls"), peer_stats(model, "backward_calls")) == (0, 1)
    finally:
        model.shutdown()
        swarm.stop_checked()
