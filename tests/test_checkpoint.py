"""blocks.checkpoint / blocks.span / blocks.families: block-wise loading and equality with local transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers_unit import INDEX_FILE, SafeOpenSpy, make_random_checkpoint, one_torch_thread, shard_map, tensor_names
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import blocks.checkpoint
from blocks.checkpoint import CheckpointError, open_checkpoint, read_block_state, read_client_state
from blocks.families import UnsupportedModelError
from blocks.span import load_span

SEQ = 9
CHUNKS = (5, 2, 1, 1)
ATOL = 1e-5

# (id, family, config overrides). The sliding-window variants use a window (4) shorter than the sequence (9), so
# a span that ignored the window would disagree with transformers.
FAMILIES = [
    ("llama", "llama", {}),
    ("qwen2", "qwen2", {}),
    ("mistral", "mistral", {}),
    ("mistral-window4", "mistral", {"sliding_window": 4}),
    ("qwen2-window4", "qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def _block_names(names: list[str], start: int, end: int) -> list[str]:
    return [n for n in names if any(n.startswith(f"model.layers.{i}.") for i in range(start, end))]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=1)


@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    path = make_random_checkpoint(tmp_path / "sharded", "llama", seed=2, max_shard_size="100KB")
    assert (path / INDEX_FILE).exists() and len(set(shard_map(path).values())) > 3
    return path


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family_model(request, tmp_path_factory):
    name, family, overrides = request.param
    path = make_random_checkpoint(tmp_path_factory.mktemp(name), family, seed=3, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        ref = model.model(ids, output_hidden_states=True)
    ckpt = open_checkpoint(path)
    return ckpt, model, ids, ref


# ---- which tensors are read ----


def test_single_file_span_reads_only_its_blocks(llama_dir, monkeypatch):
    ckpt = open_checkpoint(llama_dir)
    spy = SafeOpenSpy()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", spy)
    load_span(ckpt, 1, 3, progress=False)

    assert spy.read, "load_span read nothing through safe_open"
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in spy.read), spy.read
    expected = _block_names(tensor_names(llama_dir), 1, 3)
    assert len(expected) >= 18  # 9 tensors per llama block
    assert sorted(spy.read) == sorted(expected)  # every tensor of the blocks, each exactly once
    assert set(spy.opened) == {"model.safetensors"}


def test_sharded_span_reads_only_its_blocks_and_shards(sharded_dir, monkeypatch):
    weight_map = shard_map(sharded_dir)
    expected = _block_names(list(weight_map), 1, 3)
    needed_shards = {weight_map[n] for n in expected}
    ckpt = open_checkpoint(sharded_dir, blocks=range(1, 3))

    spy = SafeOpenSpy()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", spy)
    span = load_span(ckpt, 1, 3, progress=False)
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in spy.read), spy.read
    assert sorted(spy.read) == sorted(expected)
    assert set(spy.opened) == needed_shards

    # Delete every shard without a tensor of blocks 1-2: loading must still work (so they are never opened).
    unneeded = set(weight_map.values()) - needed_shards
    assert unneeded, "the test checkpoint should have shards that blocks 1-2 do not need"
    for shard in unneeded:
        (sharded_dir / shard).unlink()
    monkeypatch.undo()
    span_again = load_span(open_checkpoint(sharded_dir, blocks=range(1, 3)), 1, 3, progress=False)
    hidden = torch.randn(1, 4, span.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(span_again(hidden), span(hidden), rtol=0, atol=0)
    # ...while a block whose shard is gone cannot be read.
    with pytest.raises(FileNotFoundError):
        read_block_state(open_checkpoint(sharded_dir, blocks=range(1, 3)), 0, None)


def test_client_state_has_no_blocks(llama_dir, monkeypatch):
    ckpt = open_checkpoint(llama_dir)
    spy = SafeOpenSpy()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", spy)
    state = read_client_state(ckpt, torch.float32)
    assert set(state) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert not any(n.startswith("model.layers.") for n in spy.read)

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    torch.testing.assert_close(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    torch.testing.assert_close(state["model.norm.weight"], model.model.norm.weight)
    torch.testing.assert_close(state["lm_head.weight"], model.lm_head.weight)


def test_sharded_client_state_opens_only_client_shards(sharded_dir, monkeypatch):
    weight_map = shard_map(sharded_dir)
    client_names = [n for n in weight_map if not n.startswith("model.layers.")]
    ckpt = open_checkpoint(sharded_dir)
    spy = SafeOpenSpy()
    monkeypatch.setattr(blocks.checkpoint, "safe_open", spy)
    state = read_client_state(ckpt, None)
    assert sorted(state) == sorted(client_names)
    assert set(spy.opened) == {weight_map[n] for n in client_names}


def test_block_state_keys_are_relative_and_cast(llama_dir):
    ckpt = open_checkpoint(llama_dir)
    state = read_block_state(ckpt, 2, torch.bfloat16)
    assert "self_attn.q_proj.weight" in state and "input_layernorm.weight" in state
    assert all(not k.startswith("model.") for k in state)
    assert all(t.dtype == torch.bfloat16 for t in state.values())


# ---- equality with transformers ----


def test_two_spans_match_transformers(family_model):
    ckpt, model, ids, ref = family_model
    first, second = load_span(ckpt, 0, 2, progress=False), load_span(ckpt, 2, 4, progress=False)
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        mid = first(hidden)
        out = model.model.norm(second(mid))
    torch.testing.assert_close(mid, ref.hidden_states[2], rtol=0, atol=ATOL)
    torch.testing.assert_close(out, ref.last_hidden_state, rtol=0, atol=ATOL)


def test_incremental_with_cache_matches_full_pass(family_model):
    ckpt, model, ids, ref = family_model
    first, second = load_span(ckpt, 0, 2, progress=False), load_span(ckpt, 2, 4, progress=False)
    cache_a, cache_b = first.new_cache(), second.new_cache()
    outputs, offset = [], 0
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        for n in CHUNKS:
            piece = hidden[:, offset : offset + n]
            outputs.append(second(first(piece, cache_a, offset), cache_b, offset))
            offset += n
        out = model.model.norm(torch.cat(outputs, dim=1))
    assert offset == SEQ
    assert cache_a.get_seq_length() == SEQ and cache_b.get_seq_length() == SEQ
    torch.testing.assert_close(out, ref.last_hidden_state, rtol=0, atol=ATOL)


def test_sub_span_call(family_model):
    ckpt, model, ids, ref = family_model
    span = load_span(ckpt, 0, 4, progress=False)
    with torch.no_grad():
        # blocks 1-2 only: from the output of block 0 to the output of block 2
        out = span(ref.hidden_states[1], None, 0, 1, 3)
        torch.testing.assert_close(out, ref.hidden_states[3], rtol=0, atol=ATOL)
        cache = span.new_cache()
        parts, offset = [], 0
        for n in CHUNKS:
            parts.append(span(ref.hidden_states[1][:, offset : offset + n], cache, offset, 1, 3))
            offset += n
        torch.testing.assert_close(torch.cat(parts, dim=1), ref.hidden_states[3], rtol=0, atol=ATOL)
        with pytest.raises(ValueError):
            span(ref.hidden_states[1], None, 0, 3, 5)
        with pytest.raises(ValueError):
            span(ref.hidden_states[1], None, 0, 2, 2)


def test_span_dtype(llama_dir):
    span = load_span(open_checkpoint(llama_dir), 0, 1, dtype=torch.bfloat16, progress=False)
    assert span.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in span.parameters())
    with torch.no_grad():
        assert span(torch.randn(1, 3, span.hidden_size, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_on_block_callback(llama_dir):
    seen = []
    load_span(open_checkpoint(llama_dir), 1, 4, progress=False, on_block=seen.append)
    assert seen == [1, 2, 3]


# ---- errors ----


def test_unsupported_model_type(tmp_path):
    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    save_file({"transformer.wte.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        open_checkpoint(tmp_path)


def test_not_a_directory(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        open_checkpoint(file)
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "does-not-exist")  # an absolute path: never looked up on the hub


def test_directory_without_weights(llama_dir, tmp_path):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="neither"):
        open_checkpoint(tmp_path)


def test_block_out_of_range(llama_dir):
    ckpt = open_checkpoint(llama_dir)
    assert ckpt.num_blocks == 4
    for block in (-1, 4, 100):
        with pytest.raises(CheckpointError):
            read_block_state(ckpt, block, None)
    for start, end in ((3, 5), (2, 2), (-1, 1), (3, 2)):
        with pytest.raises(ValueError):
            load_span(ckpt, start, end, progress=False)


def test_block_missing_from_index(sharded_dir):
    index_path = sharded_dir / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.2.")}
    index_path.write_text(json.dumps(index))
    ckpt = open_checkpoint(sharded_dir, blocks=[1])
    assert read_block_state(ckpt, 1, None)
    with pytest.raises(CheckpointError, match="no tensors for block 2"):
        read_block_state(ckpt, 2, None)
