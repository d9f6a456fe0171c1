"""swarm-api: request validation, stop sequences and rendering without a network; then a real `swarm-api` process in
front of a 2-peer local swarm, used through the `openai` package and raw HTTP, checked against local transformers."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from api_process import ApiProcess
from conftest import REPO, start_swarm, wait_until
from hivemind.p2p import PeerID
from model_tools import make_random_checkpoint, save_tiny_tokenizer
from prometheus_client.parser import text_string_to_metric_families

from peers.settings import ConfigError
from swarm.api.app import (
    ApiError,
    GenerationRequest,
    Limits,
    StreamText,
    check_bearer,
    check_prompt_length,
    chunk_body,
    first_stop,
    parse_json_body,
    parse_request,
    partial_stop_length,
    response_body,
    sse,
)
from swarm.api.config import is_loopback, load_api_config, read_api_keys
from swarm.api.engine import SeededSampler

LIMITS = Limits(model_name="tiny", max_tokens_limit=100, default_max_tokens=16)
KEY = "sk-test-0123456789abcdef"

# ---- request validation (no network) ----


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


def refused(body: dict[str, Any], kind: str = "chat") -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_request(body, kind, LIMITS)  # type: ignore[arg-type]
    return info.value


def test_valid_requests_are_read_with_openai_defaults():
    r = parse_request(chat(), "chat", LIMITS)
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.stream) == (16, 1.0, 1.0, None, (), False)
    assert r.messages == [{"role": "user", "content": "hi"}]
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        ],
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        seed=-3,
        stop="\n",
        n=1,
        stream=True,
        stream_options={"include_usage": True},
        presence_penalty=0,
        logprobs=False,
        user="u",
    )
    r = parse_request(body, "chat", LIMITS)
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert (r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.include_usage) == (7, 0.0, 0.5, -3, ("\n",), True)
    assert r.greedy
    r = parse_request(
        {"model": "tiny", "prompt": ["once"], "max_tokens": 100, "stop": ["a", "b"]}, "completion", LIMITS
    )
    assert (r.prompt, r.max_tokens, r.stop) == ("once", 100, ("a", "b"))


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        (chat(model="other"), "model", 404),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", 400),
        (chat(max_tokens=101), "max_tokens", 400),
        (chat(max_tokens=0), "max_tokens", 400),
        (chat(max_tokens=2.5), "max_tokens", 400),
        (chat(max_tokens=5, max_completion_tokens=5), "max_completion_tokens", 400),
        (chat(temperature=2.5), "temperature", 400),
        (chat(temperature=True), "temperature", 400),
        (chat(temperature=float("nan")), "temperature", 400),
        (chat(top_p=0), "top_p", 400),
        (chat(top_p=1.5), "top_p", 400),
        (chat(seed=2**63), "seed", 400),
        (chat(seed="1"), "seed", 400),
        (chat(n=2), "n", 400),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop", 400),
        (chat(stop=[""]), "stop", 400),
        (chat(stop=[1]), "stop", 400),
        (chat(stream="yes"), "stream", 400),
        (chat(stream_options={"include_usage": True}), "stream_options", 400),
        (chat(stream=True, stream_options={"other": 1}), "stream_options", 400),
        (chat(logprobs=True), "logprobs", 400),
        (chat(tools=[{"type": "function"}]), "tools", 400),
        (chat(frequency_penalty=0.5), "frequency_penalty", 400),
        (chat(functions=[]), "functions", 400),
        (chat(messages=[]), "messages", 400),
        (chat(messages="hi"), "messages", 400),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", 400),
        (chat(messages=[{"role": "user", "content": 3}]), "messages[0].content", 400),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content",
            400,
        ),
        (chat(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages[0].tool_calls", 400),
        (chat(prompt="x"), "prompt", 400),  # a completions field on the chat endpoint
    ],
)
def test_bad_fields_are_refused_naming_the_field(body, param, status):
    error = refused(body)
    assert (error.status, error.param) == (status, param), error.message
    assert error.body()["error"]["param"] == param and error.body()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": 5}, "prompt"),
        ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "tiny", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "echo": True}, "echo"),
        ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "tiny", "prompt": "x", "messages": []}, "messages"),
    ],
)
def test_bad_completion_fields_are_refused(body, param):
    assert refused(body, "completion").param == param


def test_bodies_that_are_not_json_objects_are_refused():
    for raw in (b"{bad", b"[1]", b"\xff\xfe", b"[" * 100000):
        with pytest.raises(ApiError) as info:
            parse_json_body(raw)
        assert info.value.status == 400 and info.value.code == "invalid_json"
    assert parse_json_body(b'{"a": 1}') == {"a": 1}


def test_prompt_length_limits():
    request = parse_request(chat(max_tokens=10), "chat", LIMITS)
    check_prompt_length(request, 20, max_prompt_tokens=20, context=30)  # exactly at both limits
    for n_tokens, max_prompt, context, code in (
        (0, 20, 100, "invalid_value"),  # empty
        (21, 20, 100, "context_length_exceeded"),  # over --max-prompt-tokens
        (21, 50, 30, "context_length_exceeded"),  # prompt + max_tokens over the model's context
    ):
        with pytest.raises(ApiError) as info:
            check_prompt_length(request, n_tokens, max_prompt_tokens=max_prompt, context=context)
        assert (info.value.status, info.value.code) == (400, code)


def test_bearer_keys():
    keys = frozenset({KEY, "sk-other-key-0123456789"})
    check_bearer(None, None)  # no keys configured: anyone
    check_bearer(f"Bearer {KEY}", keys)
    check_bearer(f"bearer {KEY}", keys)
    for header in (None, "", KEY, f"Bearer {KEY}x", f"Basic {KEY}", "Bearer ", f"Bearer {KEY[:-1]}"):
        with pytest.raises(ApiError) as info:
            check_bearer(header, keys)
        assert info.value.status == 401


# ---- stop sequences and streamed text (no network) ----


def test_first_stop_and_partial_stop_length():
    assert first_stop("hello world", ("wor", "lo")) == 3
    assert first_stop("hello", ("x",)) is None
    assert partial_stop_length("hello wo", ("world",)) == 2
    assert partial_stop_length("hello w", ("xyz", "w!", "world")) == 1
    assert partial_stop_length("abcab", ("abcabd",)) == 5
    assert partial_stop_length("hello", ("world",)) == 0
    assert partial_stop_length("hello", ()) == 0


def stream_all(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], StreamText]:
    """Feed one token per piece (decode = join the pieces); returns the deltas, with finish()'s last."""
    text = StreamText(lambda ids: "".join(pieces[i] for i in ids), stops)
    deltas = []
    for i in range(len(pieces)):
        deltas.append(text.add(i))
        if text.stopped:
            break
    deltas.append(text.finish())
    return deltas, text


def test_stream_text_holds_back_possible_stops_and_cuts_at_the_stop():
    deltas, text = stream_all(["Hel", "lo ", "wo", "rld", "!", " more"], ("world",))
    assert deltas == ["Hel", "lo ", "", "", ""] and text.stopped and text.text == "Hello "
    deltas, text = stream_all(["Hel", "lo ", "wo", "nder"], ("world",))
    assert deltas == ["Hel", "lo ", "", "wonder", ""] and not text.stopped
    deltas, text = stream_all(["a", "b"], ("bc",))  # a held-back start that nothing completes comes out at the end
    assert "".join(deltas) == "ab" and deltas[-1] == "b"
    deltas, text = stream_all(["x", "yes!", "no"], ("es", "y"))  # the earliest stop wins
    assert "".join(deltas) == "x" and text.stopped


def test_stream_text_holds_back_split_characters():
    """Byte-level tokens may split a character: its first byte alone decodes to U+FFFD, which is not sent."""
    data = "é!".encode()
    text = StreamText(lambda ids: data[: len(ids)].decode(errors="replace"))
    assert [text.add(0), text.add(1), text.add(2), text.finish()] == ["", "é", "!", ""]
    text = StreamText(lambda ids: data[:1].decode(errors="replace"))  # the generation ends mid-character
    assert [text.add(0), text.finish()] == ["", "\ufffd"]


def test_rendered_bodies_have_openai_shapes():
    request = GenerationRequest(kind="chat", model="tiny", max_tokens=5, include_usage=True)
    body = response_body(request, "chatcmpl-1", 7, "hi", "stop", 3, 2)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "hi",
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    first = chunk_body(request, "chatcmpl-1", 7, "", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    last = chunk_body(request, "chatcmpl-1", 7, None, "length")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert chunk_body(request, "chatcmpl-1", 7, None, usage_only={"a": 1}) | {} == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "tiny",
        "choices": [],
        "usage": {"a": 1},
    }
    completion = GenerationRequest(kind="completion", model="tiny", max_tokens=5)
    assert chunk_body(completion, "c", 7, "x")["choices"][0]["text"] == "x"
    assert response_body(completion, "c", 7, "x", "stop", 1, 1)["object"] == "text_completion"
    assert sse("[DONE]") == b"data: [DONE]\n\n" and sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()


def test_seeded_sampler_draws_from_its_own_generator():
    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    draws = [int(SeededSampler(1.0, 1.0, 42)(None, scores).argmax()) for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same token, whatever the global RNG does
    many = {int(SeededSampler(1.0, 1.0, seed)(None, scores).argmax()) for seed in range(40)}
    assert len(many) > 3  # it samples
    narrow = {int(SeededSampler(1.0, 1e-6, seed)(None, scores).argmax()) for seed in range(20)}
    assert narrow == {int(scores.argmax())}  # top_p that small keeps the most likely token only
    out = SeededSampler(0.7, 0.9, 1)(None, scores)
    assert torch.isfinite(out).sum() == 1


# ---- config (no network) ----

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmSeLjcx1MJbAZMupynu1hbbRn8aNV7p4UcgsgpSpUKJ3a"


def test_config_from_flags_env_and_file(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n{KEY}\n\n")
    assert read_api_keys(str(keys)) == frozenset({KEY})
    config_file = tmp_path / "api.toml"
    config_file.write_text('max-tokens-limit = 64\ndefault-max-tokens = 32\nhost = "0.0.0.0"\n')
    monkeypatch.setenv("SWARM_API_MAX_CONCURRENT_REQUESTS", "3")
    config = load_api_config(
        ["/models/x/", "--initial-peers", PEER, "--config", str(config_file), "--api-keys", str(keys)]
    )
    assert (config.max_tokens_limit, config.max_concurrent_requests, config.host) == (64, 3, "0.0.0.0")
    assert config.model_name == "x"
    assert load_api_config(["m", "--initial-peers", PEER, "--served-model-name", "y"]).model_name == "y"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--initial-peers", PEER], "MODEL"),
        (["m"], "--initial-peers"),
        (["m", "--initial-peers", "nonsense"], "--initial-peers"),
        (["m", "--initial-peers", PEER, "--host", "0.0.0.0"], "--api-keys"),
        (["m", "--initial-peers", PEER, "--host", "example.org"], "--insecure-public"),
        (["m", "--initial-peers", PEER, "--max-tokens-limit", "0"], "--max-tokens-limit"),
        (["m", "--initial-peers", PEER, "--default-max-tokens", "600"], "--default-max-tokens"),
        (["m", "--initial-peers", PEER, "--port", "70000"], "--port"),
        (["m", "--initial-peers", PEER, "--api-keys", "/nonexistent/keys"], "--api-keys"),
        (["m", "--initial-peers", PEER, "--chat-template", "/nonexistent/t.jinja"], "--chat-template"),
    ],
)
def test_bad_config_is_refused(argv, words):
    with pytest.raises(ConfigError, match=words.replace("-", r"\-")):
        load_api_config(argv)


def test_public_bind_needs_keys_or_insecure_public(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("my-host")
    assert load_api_config(["m", "--initial-peers", PEER, "--host", "0.0.0.0", "--insecure-public"])
    weak = tmp_path / "weak"
    weak.write_text("short\n")
    with pytest.raises(ConfigError, match="16 characters"):
        load_api_config(["m", "--initial-peers", PEER, "--api-keys", str(weak)])
    # the command refuses before importing torch: a one-line error and a non-zero exit, in about a second
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "swarm.api", "m", "--initial-peers", PEER, "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode != 0 and result.stderr.startswith("swarm-api: error: --host 0.0.0.0"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 5.0


# ---- a real endpoint in front of a 2-peer swarm ----

MAX_TOKENS_LIMIT = 256
MAX_PROMPT_TOKENS = 300
MAX_BODY_BYTES = 32 * 1024
CONCURRENCY = 8


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory) -> Path:
    path = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-chat", "llama", seed=3)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def endpoint(chat_ckpt, tmp_path_factory):
    """(base URL, swarm, python client of the same swarm): `swarm-api` with an API key, in front of 2 peers."""
    from swarm import AutoDistributedModelForCausalLM

    swarm = start_swarm(chat_ckpt)
    workdir = tmp_path_factory.mktemp("api")
    (workdir / "keys").write_text(f"{KEY}\n")
    args = ["--api-keys", str(workdir / "keys"), "--log-level", "INFO"]
    args += ["--max-concurrent-requests", str(CONCURRENCY), "--max-tokens-limit", str(MAX_TOKENS_LIMIT)]
    args += ["--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-body-bytes", str(MAX_BODY_BYTES)]
    api = ApiProcess(chat_ckpt, swarm.initial_peers, workdir, args)
    client = None
    try:
        url = api.start().wait_ready()
        client = AutoDistributedModelForCausalLM.from_pretrained(chat_ckpt, initial_peers=swarm.initial_peers)
        yield url, swarm, client
    finally:
        if client is not None:
            client.shutdown()
        returncode = api.stop()
        # as stop_checked, with more time: on a loaded machine a peer's exit after "stopped" can take 20 s
        for peer in swarm.peers:
            peer.process.send_signal(signal.SIGTERM)
        codes = [swarm.stop_peer(peer, timeout=90, signalled=True) for peer in swarm.peers]
    assert "Traceback" not in api.log(), api.log()
    assert returncode == 0 and "stopped" in api.log(), api.log()
    assert codes == [0, 0], [peer.log_tail() for peer in swarm.peers]


@pytest.fixture(scope="module")
def reference(chat_ckpt, local_model):
    """Local transformers' greedy text for token ids: (text, finish_reason, completion tokens) as the API counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_ckpt)
    model = local_model(chat_ckpt)

    def chat_ids(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def expected(ids: list[int], max_tokens: int, stop: tuple[str, ...] = (), **kwargs: Any) -> tuple[str, str, int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, **kwargs)
        new = out[0, len(ids) :].tolist()
        for k in range(1, len(new) + 1):
            text = tokenizer.decode(new[:k], skip_special_tokens=True)
            cut = first_stop(text, stop)
            if cut is not None:
                return text[:cut], "stop", k
        reason = "stop" if new[-1] == model.generation_config.eos_token_id else "length"
        return tokenizer.decode(new, skip_special_tokens=True), reason, len(new)

    return tokenizer, chat_ids, expected


def api_client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def raw(url: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY, **headers: str):
    """(status, parsed JSON body) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        data = response.read()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(data) if is_json else data
    finally:
        conn.close()


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    _, text = raw(url, "GET", "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a list method."}]


def test_models_health_and_key(endpoint):
    url, _, _ = endpoint
    assert [m.id for m in api_client(url).models.list().data] == ["tiny-chat"]
    assert raw(url, "GET", "/health", key=None)[0] == 200  # no key needed
    for key in (None, "sk-wrong-0123456789abcdef"):
        status, body = raw(url, "GET", "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert raw(url, "POST", "/v1/completions", b'{"model": "tiny-chat", "prompt": "x"}', key=key)[0] == 401
        assert raw(url, "GET", "/metrics", key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        api_client(url, "sk-wrong-0123456789abcdef").chat.completions.create(model="tiny-chat", messages=MESSAGES)


def test_greedy_chat_is_local_transformers_text(endpoint, reference):
    url, _, _ = endpoint
    _, chat_ids, expected = reference
    ids = chat_ids(MESSAGES)
    text, reason, n = expected(ids, 40)
    client = api_client(url)
    answer = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=40, temperature=0)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == reason
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        len(ids),
        n,
        len(ids) + n,
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=MESSAGES,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), n)


def test_greedy_completion_with_stop_and_max_tokens(endpoint, reference):
    url, _, _ = endpoint
    tokenizer, _, expected = reference
    client = api_client(url)
    prompt = "Return a new list"
    ids = tokenizer(prompt)["input_ids"]
    full, _, _ = expected(ids, 30)
    # max_tokens: exactly that many tokens, finish_reason "length" (the tiny random model rarely ends by itself)
    text, reason, n = expected(ids, 7)
    answer = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=7, temperature=0)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (text, reason)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), n)
    # a stop sequence that spans tokens, taken from the text itself: the text ends before it, never showing it
    visible = [i for i, ch in enumerate(full) if ch != "\ufffd" and not ch.isspace()]
    stop = full[visible[len(visible) // 2] : visible[len(visible) // 2] + 3]
    text, reason, n = expected(ids, 30, (stop, "never-there"))
    assert reason == "stop" and stop not in text and n < 30
    for stream in (False, True):
        answer = client.completions.create(
            model="tiny-chat", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "never-there"], stream=stream
        )
        if stream:
            chunks = list(answer)
            got = "".join(c.choices[0].text for c in chunks)
            assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
        else:
            got = answer.choices[0].text
            assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == n
        assert got == text


def test_seeded_sampling_is_reproducible_and_is_transformers_with_that_sampler(endpoint, reference):
    url, _, _ = endpoint
    _, chat_ids, expected = reference
    ids = chat_ids(MESSAGES)
    want, _, _ = expected(ids, 20, logits_processor=[SeededSampler(0.9, 0.8, 1234)])
    client = api_client(url)
    for _ in range(2):
        answer = client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=20, temperature=0.9, top_p=0.8, seed=1234
        )
        assert answer.choices[0].message.content == want


def test_concurrent_requests_each_get_their_own_text(endpoint, reference):
    url, _, _ = endpoint
    tokenizer, chat_ids, expected = reference
    client = api_client(url)
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    wanted: dict[int, str] = {}
    calls: dict[int, Callable[[], str]] = {}
    for i in range(CONCURRENCY):
        if i % 2:
            messages = [{"role": "user", "content": f"Question {i}: what does pop do?"}]
            wanted[i] = expected(chat_ids(messages), 12 + i)[0]
            calls[i] = lambda m=messages, i=i: (
                client.chat.completions.create(model="tiny-chat", messages=m, max_tokens=12 + i, temperature=0)
                .choices[0]
                .message.content
            )
        else:
            prompt = f"Item {i} of the list"
            wanted[i] = expected(tokenizer(prompt)["input_ids"], 12 + i)[0]
            calls[i] = lambda p=prompt, i=i: "".join(
                c.choices[0].text
                for c in client.completions.create(
                    model="tiny-chat", prompt=p, max_tokens=12 + i, temperature=0, stream=True
                )
            )
    barrier = threading.Barrier(CONCURRENCY)

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = calls[i]()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == wanted


def open_stream(url: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a raw socket and read until its first generated text arrived (streams) or the request was
    surely received (plain answers); the caller then drops the connection."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    if body.get("stream"):
        received = b""
        while b"data: " not in received:  # a completion stream's first event carries the first text
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received
    return sock


def peer_sessions(swarm, client) -> list[int]:
    from swarm.transport import call_info

    sequence = client.model.sequence
    return [
        sequence.loop.run(call_info(sequence.p2p, PeerID.from_base58(peer.info["peer_id"]), 10.0)).sessions
        for peer in swarm.peers
    ]


def test_dropped_clients_free_their_sessions_and_the_limits_hold(endpoint, reference):
    url, swarm, client = endpoint
    tokenizer, _, expected = reference
    prompt = "Drop this connection"
    # (the random model does not end this prompt early by itself: every stream is still generating when dropped)
    assert expected(tokenizer(prompt)["input_ids"], MAX_TOKENS_LIMIT)[1] == "length"
    long = {"model": "tiny-chat", "prompt": prompt, "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0}
    closed_before = metric(url, "swarm_api_requests_total", {"status": "499"})
    tokens_before = metric(url, "swarm_api_generated_tokens_total")
    assert peer_sessions(swarm, client) == [0, 0]
    # CONCURRENCY streams generating at once: one more request is refused with 429, not queued
    socks = [open_stream(url, {**long, "stream": True}) for _ in range(CONCURRENCY)]
    try:
        status, body = raw(url, "POST", "/v1/completions", json.dumps({**long, "max_tokens": 1}).encode())
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        assert peer_sessions(swarm, client) == [CONCURRENCY, CONCURRENCY]
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: peer_sessions(swarm, client) == [0, 0], "peers closed the dropped streams' sessions")
    wait_until(
        lambda: metric(url, "swarm_api_requests_total", {"status": "499"}) == closed_before + CONCURRENCY,
        "the dropped streams counted as 499",
    )
    # a plain (not streamed) request whose client leaves is cancelled too
    sock = open_stream(url, long)
    wait_until(lambda: peer_sessions(swarm, client) == [1, 1], "the plain request's session opened")
    sock.close()
    wait_until(lambda: peer_sessions(swarm, client) == [0, 0], "peers closed the dropped request's session")
    wait_until(
        lambda: metric(url, "swarm_api_requests_total", {"status": "499"}) == closed_before + CONCURRENCY + 1,
        "the dropped plain request counted as 499",
    )
    generated = metric(url, "swarm_api_generated_tokens_total") - tokens_before
    assert generated < (CONCURRENCY + 1) * MAX_TOKENS_LIMIT / 2  # stopped early, not run to max_tokens
    # and the server serves again
    answer = api_client(url).completions.create(model="tiny-chat", prompt=prompt, max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens == 3


def test_bad_requests_get_4xx_with_openai_error_objects(endpoint):
    url, _, _ = endpoint
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b'["a list"]', 400, "invalid_json"),
        (json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "model_not_found"),
        (json.dumps({"model": "tiny-chat", "prompt": "x", "temperature": 3}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "tiny-chat", "prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}).encode(), 400, None),
        (json.dumps({"model": "tiny-chat", "prompt": "x", "logprobs": 3}).encode(), 400, "unsupported_value"),
        (json.dumps({"model": "tiny-chat", "prompt": "x", "n": 3}).encode(), 400, "unsupported_value"),
        (json.dumps({"model": "tiny-chat", "prompt": "ab " * 400}).encode(), 400, "context_length_exceeded"),
        (json.dumps({"model": "tiny-chat", "prompt": "x" * MAX_BODY_BYTES}).encode(), 413, "body_too_large"),
    ]
    for body, status, code in cases:
        got, answer = raw(url, "POST", "/v1/completions", body)
        assert got == status, (body[:80], answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
        assert code is None or answer["error"]["code"] == code
    # a body larger than the limit is refused from its Content-Length, before it is read
    assert raw(url, "POST", "/v1/completions", b"{}", **{"Content-Length": str(MAX_BODY_BYTES + 1)})[0] == 413
    # and a chunked body (no Content-Length) once the bytes read pass the limit
    assert raw(url, "POST", "/v1/completions", iter([b" " * (MAX_BODY_BYTES // 2 + 1)] * 2))[0] == 413
    assert raw(url, "GET", "/v1/nothing-here")[0] == 404
    assert raw(url, "GET", "/v1/completions")[0] == 405
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api_client(url).chat.completions.create(model="tiny-chat", messages=MESSAGES, temperature=5)
    with pytest.raises(openai.NotFoundError):
        api_client(url).chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_metrics_count_requests_tokens_and_latency(endpoint):
    url, _, _ = endpoint
    before = metric(url, "swarm_api_time_to_first_token_seconds_count")
    tokens = metric(url, "swarm_api_generated_tokens_total")
    answer = api_client(url).completions.create(model="tiny-chat", prompt="Count", max_tokens=5, temperature=0)
    assert metric(url, "swarm_api_time_to_first_token_seconds_count") == before + 1
    assert metric(url, "swarm_api_generated_tokens_total") == tokens + answer.usage.completion_tokens
    assert metric(url, "swarm_api_time_per_output_token_seconds_count") >= 4
    assert metric(url, "swarm_api_requests_total", {"endpoint": "completions", "status": "200"}) >= 1
    # the slot is given back once the worker has returned (its session closed), just after the answer
    wait_until(lambda: metric(url, "swarm_api_active_requests") == 0, "no request active")
