"""Drift in a dependency raises GenerationDriftError / CacheLengthError instead of producing different text."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationMixin

from blocks.checkpoint import open_checkpoint
from blocks.span import CacheLengthError, load_span
from peers.wire import ProtocolError, Step, StepReply
from swarm import AutoDistributedModelForCausalLM
from swarm.remote_cache import GenerationDriftError, library_versions


def prompt(length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def client(llama_ckpt, llama_swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=llama_swarm.initial_peers)
    yield model
    model.shutdown()


def test_whole_sequence_fed_again_raises(client, llama_ckpt, local_model, monkeypatch):
    """A generate that stops slicing the inputs to the new tokens hands the peers the whole sequence again."""

    def unsliced(self, input_ids, next_sequence_length=None, **kwargs):
        return GenerationMixin.prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(client), "prepare_inputs_for_generation", unsliced)
        with pytest.raises(GenerationDriftError, match="positions of the tokens") as caught:
            client.generate(prompt(), max_new_tokens=8, do_sample=False)
    message = str(caught.value)
    assert "expected 10..20" in message and "0..10 (11 positions)" in message
    assert f"transformers {__import__('transformers').__version__}" in message
    # Nothing stayed broken: the next generation (a fresh session) matches local transformers again.
    expected = local_model(llama_ckpt).generate(prompt(), max_new_tokens=8, do_sample=False)
    assert torch.equal(client.generate(prompt(), max_new_tokens=8, do_sample=False), expected)


def test_cache_lost_between_steps_raises(client, monkeypatch):
    """The 5.24 failure: the cache did not come back from the model, so later steps ran without the session."""

    def forget_cache(self, outputs, model_kwargs, *args, **kwargs):
        kwargs_out = GenerationMixin._update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs)
        kwargs_out.pop("cache", None)
        return kwargs_out

    monkeypatch.setattr(type(client), "_update_model_kwargs_for_generation", forget_cache)
    with pytest.raises(GenerationDriftError, match="tokens held by the peers after a forward step"):
        client.generate(prompt(), max_new_tokens=8, do_sample=False)


def test_wrong_tokens_sent_raise(client, monkeypatch):
    """Generate hands a step the right number of tokens at the right positions, but not the sequence's tokens."""

    def shifted(self, input_ids, next_sequence_length=None, **kwargs):
        inputs = GenerationMixin.prepare_inputs_for_generation(
            self, input_ids, next_sequence_length=next_sequence_length, **kwargs
        )
        if next_sequence_length == 1:
            inputs["input_ids"] = input_ids[:, -2:-1].clone()
        return inputs

    monkeypatch.setattr(type(client), "prepare_inputs_for_generation", shifted)
    with pytest.raises(GenerationDriftError, match="tokens sent to the peers at positions 10..10"):
        client.generate(prompt(), max_new_tokens=8, do_sample=False)


def test_rewound_session_matches_local(client, llama_ckpt, local_model):
    """RemoteCache.crop (transformers' way to undo steps) rewinds the session; generation continues exactly."""
    ids, more = prompt(12, seed=1), prompt(3, seed=2)
    with client.inference_session(max_length=40) as session:
        client.generate(ids, max_new_tokens=6, do_sample=False)
        session.rewind(12)
        out = client.generate(more, max_new_tokens=5, do_sample=False)
    expected = local_model(llama_ckpt).generate(torch.cat([ids, more], 1), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, expected)


def test_span_refuses_a_cache_of_the_wrong_length(llama_ckpt):
    span = load_span(open_checkpoint(llama_ckpt), 0, 2, progress=False)
    cache = span.new_cache()
    hidden = torch.randn(1, 3, span.hidden_size)
    span(hidden, cache, 0)
    with pytest.raises(CacheLengthError, match="cache layer 0 holds 3 tokens where 4 were expected"):
        span(hidden[:, :1], cache, 4)


def test_peer_reporting_another_session_length_is_refused():
    sent = Step(torch.zeros(1, 2, 4), position=5)
    assert StepReply.decode(StepReply(torch.ones(1, 2, 4), 7, 0.001).encode(), sent).position == 7
    for held in (6, 8, None, "7"):
        with pytest.raises(ProtocolError, match="cache holds"):
            StepReply.decode(StepReply(torch.ones(1, 2, 4), held, 0.001).encode(), sent)


def test_library_versions_names_the_libraries():
    text = library_versions()
    for name in ("transformers", "torch", "hivemind"):
        assert name in text
