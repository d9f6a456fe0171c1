"""Multimodal (LLaVA) models: the client encodes images, the swarm serves the language model's blocks.

A tiny random LlavaForConditionalGeneration (CLIP vision tower + Llama) is served by two `swarm-peer` processes
straight from its own checkpoint; the client must compute what local transformers computes. Peers of other weights
under the same DHT prefix must not be used, while a text-only client of the very same language model shares them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_swarm, wait_until
from helpers_unit import SafeOpenSpy, make_random_checkpoint, one_torch_thread
from model_tools import make_random_llava_checkpoint, save_tiny_llava_processor
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

import blocks.checkpoint
import blocks.fingerprint
from blocks.checkpoint import LLAVA_SAVED_LAYOUT, open_checkpoint, read_client_state
from blocks.fingerprint import model_weights, sample_rows, span_fingerprint
from blocks.span import load_span
from dht.announce import fetch_block_servers
from dht.records import BlockServer, ServerRecord, with_weights

ATOL = 1e-4
IMAGE_TOKENS = 16  # the tiny vision tower: 16x16 images in 4x4 patches
PREFIX = "tiny-llava"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def llava_ckpt(tmp_path_factory) -> Path:
    """The checkpoint with its processor, as a real one is published: peers serve it, AutoProcessor loads it."""
    path = make_random_llava_checkpoint(tmp_path_factory.mktemp("llava") / PREFIX, "llama", seed=5)
    save_tiny_llava_processor(path)
    return path


@pytest.fixture(scope="module")
def local_llava(llava_ckpt) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(llava_ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_twin(tmp_path_factory, local_llava) -> Path:
    """A text-only Llama checkpoint holding exactly the LLaVA model's language model (same tensors, same dtype)."""
    config = local_llava.config.text_config
    with torch.device("meta"):
        text = LlamaForCausalLM(config)
    state = {
        name.replace("model.language_model.", "model.", 1): t
        for name, t in local_llava.state_dict().items()
        if name.startswith(("model.language_model.", "lm_head."))
    }
    text.load_state_dict(state, strict=True, assign=True)
    path = tmp_path_factory.mktemp("twin") / "tiny-llama-twin"
    text.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_text(tmp_path_factory) -> Path:
    """Same architecture as the LLaVA model's language model, other random weights."""
    return make_random_checkpoint(tmp_path_factory.mktemp("other") / "tiny-llama-other", "llama", seed=6)


def prompt_ids(image_token_id: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """[batch, 24]: text, one image's placeholders, text (no placeholder ids among the text tokens)."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(3, image_token_id, (batch, 5), generator=g)
    after = torch.randint(3, image_token_id, (batch, 3), generator=g)
    return torch.cat([before, torch.full((batch, IMAGE_TOKENS), image_token_id), after], dim=1)


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def picture(seed: int, height: int = 20, width: int = 24) -> Image.Image:
    """A random RGB image, not of the vision tower's size (the processor resizes and crops it)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def test_processor_makes_the_models_inputs(llava_ckpt, local_llava):
    processor = AutoProcessor.from_pretrained(llava_ckpt)
    image_token_id = local_llava.config.image_token_id
    assert processor.image_token_id == image_token_id
    inputs = processor(images=picture(0), text="What is in <image> this picture?", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert inputs["pixel_values"].shape == (1, 3, 16, 16)
    ids = inputs["input_ids"]
    # one <image> becomes exactly the placeholders that one image's features fill, and no text token is one
    assert int((ids == image_token_id).sum()) == IMAGE_TOKENS == local_llava.config.image_seq_length
    assert ids.shape[1] > IMAGE_TOKENS and bool(inputs["attention_mask"].all())
    two = processor(images=[picture(1), picture(2)], text="<image> and <image>: same?", return_tensors="pt")
    assert int((two["input_ids"] == image_token_id).sum()) == 2 * IMAGE_TOKENS
    with torch.no_grad():  # the local model accepts both (it checks placeholders against features itself)
        local_llava(**inputs)
        local_llava(**two)


# ---- the checkpoint view and what a peer reads (no network) ----


def test_checkpoint_is_a_view_of_its_language_model(llava_ckpt, local_llava):
    ckpt = open_checkpoint(llava_ckpt)
    assert ckpt.multimodal and ckpt.layout == LLAVA_SAVED_LAYOUT
    assert ckpt.config.model_type == "llama" and ckpt.num_blocks == 4
    state = read_client_state(ckpt, torch.float32)
    local = local_llava.state_dict()
    expected = {n for n in local if ".language_model.layers." not in n}
    assert set(state) == expected  # vision tower, projector, embeddings, norm, head: under the module's names
    for name, tensor in state.items():
        assert torch.equal(tensor, local[name]), name


def test_peer_span_reads_no_vision_tensors(llava_ckpt, local_llava, monkeypatch):
    ckpt = open_checkpoint(llava_ckpt)
    layers = ("language_model.model.layers.1.", "language_model.model.layers.2.")
    block_names = sorted(n for n in ckpt.weight_map if n.startswith(layers))
    assert len(block_names) == 18  # 9 tensors per llama block
    spy = SafeOpenSpy()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", spy)
    span = load_span(ckpt, 1, 3, progress=False)
    assert sorted(spy.read) == block_names and not spy.sliced  # every tensor of the blocks, each exactly once
    # What the peer announces (blocks.fingerprint) is read from its span's tensors too, and from nothing else.
    spy = SafeOpenSpy()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", spy)
    span_fingerprint(ckpt, 1, 3)
    assert sorted(set(spy.read + spy.sliced)) == block_names
    # ...and the span computes what the local model's layers 1-2 compute
    embeds = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = local_llava.model.language_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        torch.testing.assert_close(span(hidden[1]), hidden[3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sample_elements", [blocks.fingerprint.SAMPLE_ELEMENTS, 1024], ids=["whole", "rows"])
def test_fingerprints_match_only_the_same_weights(llava_ckpt, text_twin, other_text, sample_elements, monkeypatch):
    # The tiny tensors are hashed whole; with a lower threshold, rows of the larger ones are (as in a real model's).
    monkeypatch.setattr(blocks.fingerprint, "SAMPLE_ELEMENTS", sample_elements)
    spy = SafeOpenSpy()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", spy)
    llava, twin, other = (model_weights(open_checkpoint(p)) for p in (llava_ckpt, text_twin, other_text))
    assert bool(spy.sliced) and (len(set(spy.read)) < len(set(spy.sliced))) == (sample_elements == 1024)
    assert llava == twin  # the same language model, stored under other names in another file
    assert all(a != b for a, b in zip(llava.blocks, other.blocks, strict=True))
    assert span_fingerprint(open_checkpoint(text_twin), 1, 3) == llava.span(1, 3) != llava.span(1, 4)
    assert llava.span(2, 5) is None  # a span outside the model matches no record


def test_sample_rows():
    assert sample_rows([64]) is None and sample_rows([8, 8]) is None  # small, or a vector: hashed whole
    assert sample_rows([4096, 4096]) == [0, 2047, 4095]


def _record(start: int, end: int, weights: str | None) -> ServerRecord:
    return ServerRecord(
        state="online",
        start=start,
        end=end,
        throughput=1.0,
        dtype="float32",
        quant="none",
        cache_tokens_left=100,
        max_length=64,
        version="0.1.0",
        weights=weights,
    )


def test_records_of_other_weights_are_dropped(llava_ckpt, other_text):
    from hivemind.p2p import PeerID

    ours, theirs = model_weights(open_checkpoint(llava_ckpt)), model_weights(open_checkpoint(other_text))
    good, forged, old = PeerID(b"good"), PeerID(b"forged"), PeerID(b"old")
    servers = {
        b: [
            BlockServer(good, b, _record(0, 4, ours.span(0, 4)), 1.0),
            BlockServer(forged, b, _record(0, 4, theirs.span(0, 4)), 1.0),
            BlockServer(old, b, _record(0, 4, None), 1.0),
        ]
        for b in range(4)
    }
    kept, dropped = with_weights(servers, ours.span)
    assert {s.peer_id for b in kept for s in kept[b]} == {good, old} and dropped == {forged}
    kept, dropped = with_weights(servers, ours.span, require=True)
    assert {s.peer_id for b in kept for s in kept[b]} == {good} and dropped == {forged, old}
    # a fingerprint of another span of the right weights does not match either
    shifted = {0: [BlockServer(forged, 0, _record(0, 1, ours.span(1, 2)), 1.0)]}
    assert with_weights(shifted, ours.span)[0] == {0: []}
    with pytest.raises(ValueError):
        _record(0, 4, "not-hex")


# ---- a swarm serving the LLaVA checkpoint ----


@pytest.fixture(scope="module")
def llava_swarm(llava_ckpt):
    swarm = start_swarm(llava_ckpt)
    yield swarm
    swarm.stop_checked()


@pytest.fixture(scope="module")
def client(llava_ckpt, llava_swarm):
    from swarm import AutoDistributedModelForImageTextToText

    model = AutoDistributedModelForImageTextToText.from_pretrained(llava_ckpt, initial_peers=llava_swarm.initial_peers)
    yield model
    model.shutdown()


def test_logits_with_an_image_match_local(client, local_llava):
    from swarm import DistributedLlavaForConditionalGeneration

    assert isinstance(client, DistributedLlavaForConditionalGeneration)
    assert not any(".layers." in n for n, _ in client.model.language_model.named_parameters())
    ids, pv = prompt_ids(local_llava.config.image_token_id), pixels()
    with torch.no_grad():
        remote = client(input_ids=ids, pixel_values=pv).logits
        local = local_llava(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(remote, local, rtol=0, atol=ATOL)
    # the image matters: other pixels give other logits
    with torch.no_grad():
        other = client(input_ids=ids, pixel_values=pixels(seed=9)).logits
    assert (other - local).abs().max() > 1e-3


def test_greedy_and_sampled_generation_match_local(client, local_llava):
    ids, pv = prompt_ids(local_llava.config.image_token_id, seed=3), pixels(seed=4)
    kwargs = dict(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), max_new_tokens=24)
    greedy = dict(kwargs, min_new_tokens=24, do_sample=False)
    out = client.generate(**greedy)
    assert out.shape == (2, ids.shape[1] + 24)
    assert torch.equal(out, local_llava.generate(**greedy))
    sampled = dict(kwargs, min_new_tokens=24, do_sample=True, temperature=1.3, top_k=50)
    torch.manual_seed(7)
    remote = client.generate(**sampled)
    torch.manual_seed(7)
    assert torch.equal(remote, local_llava.generate(**sampled))


def test_session_continues_after_an_image(client, local_llava):
    ids, pv = prompt_ids(local_llava.config.image_token_id, batch=1, seed=5), pixels(batch=1, seed=6)
    greedy = dict(do_sample=False)
    reference = local_llava.generate(input_ids=ids, pixel_values=pv, max_new_tokens=14, min_new_tokens=14, **greedy)
    with client.inference_session(max_length=64):
        first = client.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, min_new_tokens=6, **greedy)
        second = client.generate(None, max_new_tokens=8, min_new_tokens=8, **greedy)
    assert torch.equal(first, reference[:, : ids.shape[1] + 6])
    assert torch.equal(second, reference)


def test_processor_inputs_generate_as_local(client, local_llava, llava_ckpt):
    """What a user writes: AutoProcessor's output (a PIL image and text) straight into generate."""
    processor = AutoProcessor.from_pretrained(llava_ckpt)
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    inputs = processor(images=picture(3), text="Describe <image> in a few words:", return_tensors="pt")
    out = client.generate(**inputs, **greedy)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 12)
    assert torch.equal(out, local_llava.generate(**inputs, **greedy))
    # A batch of two images under prompts of the same length: no padding, each row as if generated alone.
    batch = processor(
        images=[picture(3), picture(4)], text=["Describe <image> in a few words:"] * 2, return_tensors="pt"
    )
    assert bool(batch["attention_mask"].all())
    out2 = client.generate(**batch, **greedy)
    assert torch.equal(out2, local_llava.generate(**batch, **greedy))
    assert torch.equal(out2[:1], out)


def test_padded_batch_is_refused(client, llava_ckpt):
    """Prompts of different lengths are padded by the processor; the swarm's blocks take no attention mask yet, so
    the client refuses them with a clear error instead of generating from the pad tokens."""
    processor = AutoProcessor.from_pretrained(llava_ckpt)
    batch = processor(
        images=[picture(5), picture(6)],
        text=["<image> short", "a much longer prompt before <image> and after it"],
        padding=True,
        return_tensors="pt",
    )
    assert not bool(batch["attention_mask"].all())  # left padding, as the tokenizer's padding_side
    assert not bool(batch["attention_mask"][:, -1].eq(0).any())
    with pytest.raises(NotImplementedError, match="padding"):
        client.generate(**batch, max_new_tokens=4, do_sample=False)
    with pytest.raises(NotImplementedError, match="padding"), torch.no_grad():
        client(**batch)


def test_inputs_embeds_generation_matches_local(client, local_llava):
    """Any front-end's embeddings: here the image merged by hand into the text's embeddings."""
    ids, pv = prompt_ids(local_llava.config.image_token_id, seed=8), pixels(seed=9)
    with torch.no_grad():
        embeds = local_llava.get_input_embeddings()(ids)
        features = torch.cat(local_llava.get_image_features(pixel_values=pv).pooler_output, dim=0)
        embeds = embeds.masked_scatter((ids == local_llava.config.image_token_id).unsqueeze(-1), features)
    greedy = dict(inputs_embeds=embeds, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    out = client.generate(**greedy)
    assert out.shape == (2, 12)  # as transformers: only the new tokens
    assert torch.equal(out, local_llava.generate(**greedy))
    by_ids = {k: v for k, v in greedy.items() if k != "inputs_embeds"}
    assert torch.equal(out, client.generate(input_ids=ids, pixel_values=pv, **by_ids)[:, -12:])
    with client.inference_session(max_length=64, batch_size=2):
        assert torch.equal(client.generate(**greedy), out)
        with pytest.raises(NotImplementedError, match="inputs_embeds"):
            client.generate(ids[:, :2], max_new_tokens=1)


def test_lora_and_prompt_gradients_match_local(client, local_llava, text_twin, tmp_path):
    """Training through the same autograd path as text: LoRA on the remote blocks and shallow prompts, checked
    against PEFT on the language model fed the prompts and the image-merged embeddings that local LLaVA builds."""
    ids, pv = prompt_ids(local_llava.config.image_token_id, seed=10), pixels(seed=11)
    client.tuning.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj"), blocks=[0, 3])
    prompts = client.tuning.add_prompts(3, std=0.5, generator=torch.Generator().manual_seed(13))
    try:
        with torch.no_grad():
            for name, p in client.tuning.named_trainables().items():
                if name.startswith("lora."):
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(12))
        params = {n: p for n, p in client.tuning.named_trainables().items() if n.startswith("lora.")}
        logits = client(input_ids=ids, pixel_values=pv).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()

        client.tuning.save_pretrained(tmp_path / "adapter")
        peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(text_twin, dtype=torch.float32),
            tmp_path / "adapter",
            is_trainable=True,
        )
        peft_params = {n: p for n, p in peft.named_parameters() if p.requires_grad}
        assert len(peft_params) == len(params) == 8
        with torch.no_grad():
            embeds = local_llava.get_input_embeddings()(ids)
            features = torch.cat(local_llava.get_image_features(pixel_values=pv).pooler_output, dim=0)
            embeds = embeds.masked_scatter((ids == local_llava.config.image_token_id).unsqueeze(-1), features)
        local_prompts = prompts.detach().clone().requires_grad_(True)
        prefixed = torch.cat([local_prompts.expand(ids.shape[0], -1, -1), embeds], dim=1)
        local_logits = peft(inputs_embeds=prefixed).logits[:, 3:]
        torch.testing.assert_close(logits, local_logits, rtol=0, atol=ATOL)
        torch.nn.functional.cross_entropy(local_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        for name, p in params.items():
            block, module, part = name.split(".")[1], name.split(".")[2], name.split(".")[-1]
            [peft_p] = [q for n, q in peft_params.items() if f"layers.{block}." in n and f"{module}.lora_{part}" in n]
            assert p.grad is not None and p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, peft_p.grad, rtol=1e-4, atol=ATOL)
        assert prompts.grad.abs().max() > 0
        torch.testing.assert_close(prompts.grad, local_prompts.grad, rtol=1e-4, atol=ATOL)
    finally:
        from swarm.tuning import ClientTuning

        client.model.language_model.tuning = ClientTuning(client.config.text_config)  # the next tests tune nothing


# ---- sharing peers with text-only clients: only of the same weights ----


def test_only_peers_of_the_same_weights_are_shared(llava_ckpt, llava_swarm, client, text_twin, other_text, local_llava):
    from swarm import AutoDistributedModelForCausalLM

    llava_peers = {p.info["peer_id"] for p in llava_swarm.peers}
    # A text peer of other weights announces itself under the LLaVA model's prefix, serving every block in one hop.
    other = start_swarm(
        other_text, peers=1, spans=[(0, 4)], bootstrap=llava_swarm.initial_peers, extra_args=["--dht-prefix", PREFIX]
    )
    try:
        [intruder] = [p.info["peer_id"] for p in other.peers]
        view = client.decoder.sequence.view

        def announced() -> set[str]:
            servers = fetch_block_servers(view.dht, PREFIX, range(4))
            return {s.peer_id.to_base58() for entries in servers.values() for s in entries}

        wait_until(lambda: intruder in announced(), "the other peer's records in the DHT")
        snapshot = wait_until(
            lambda: intruder in {p.to_base58() for p in view.other_weights} and view.snapshot(True),
            "the other peer left out of the client's view",
        )
        assert {p.to_base58() for p in snapshot.peers} == llava_peers
        ids, pv = prompt_ids(local_llava.config.image_token_id, seed=13), pixels(seed=14)
        greedy = dict(input_ids=ids, pixel_values=pv, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(client.generate(**greedy), local_llava.generate(**greedy))
        assert intruder not in set(client.exposure_ledger.peers())

        # A text-only client of the same language model shares the LLaVA peers (and not the intruder)...
        twin = AutoDistributedModelForCausalLM.from_pretrained(
            text_twin, initial_peers=llava_swarm.initial_peers, dht_prefix=PREFIX
        )
        try:
            text_ids = ids[:, :5]
            local_twin = AutoModelForCausalLM.from_pretrained(text_twin, dtype=torch.float32).eval()
            text_greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
            assert torch.equal(twin.generate(text_ids, **text_greedy), local_twin.generate(text_ids, **text_greedy))
            # a text-only client takes inputs_embeds too (whole-sequence forward and generate)
            with torch.no_grad():
                embeds = local_twin.get_input_embeddings()(text_ids) * 1.5  # not any token's embeddings
                torch.testing.assert_close(
                    twin(inputs_embeds=embeds).logits, local_twin(inputs_embeds=embeds).logits, rtol=0, atol=ATOL
                )
            by_embeds = twin.generate(inputs_embeds=embeds, **text_greedy)
            assert torch.equal(by_embeds, local_twin.generate(inputs_embeds=embeds, **text_greedy))
            assert set(twin.exposure_ledger.peers()) <= llava_peers
        finally:
            twin.shutdown()
        # ...while a client of the other weights sees only the intruder.
        stranger = AutoDistributedModelForCausalLM.from_pretrained(
            other_text, initial_peers=llava_swarm.initial_peers, dht_prefix=PREFIX
        )
        try:
            seen = {p.to_base58() for p in stranger.decoder.sequence.view.snapshot(True).peers}
            assert seen == {intruder}
        finally:
            stranger.shutdown()
    finally:
        other.stop_checked()
