"""swarm-monitor: pure functions, the model registry, the history store, config, the HTTP server, and a real local
swarm of peers (two models in one DHT) watched by a real `swarm-monitor` process, read as JSON, as Prometheus
metrics, and in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey
from prometheus_client.parser import text_string_to_metric_families
from test_records import make_record

from dht.identity import peer_id_of
from dht.models import MAX_NUM_BLOCKS, REGISTRY_KEY, ModelEntry, ModelRecord, parse_registry_entries
from dht.records import BlockServer, ServerRecord
from peers.settings import ConfigError
from swarm.monitor.config import load_monitor_config
from swarm.monitor.metrics import MonitorMetrics
from swarm.monitor.server import MonitorHTTPServer, read_package_file
from swarm.monitor.state import (
    History,
    ModelInfo,
    ModelSample,
    ModelView,
    PeerSample,
    PeerView,
    Probe,
    ScrapeInfo,
    Snapshot,
    block_coverage,
    connection_kind,
    coverage_timeline,
    effective_state,
    gaps,
    group_by_peer,
    is_healthy,
    peer_histories,
    reported_count,
    resolve_models,
    state_json,
)
from swarm.monitor.store import HistoryStore

SCHEMA = json.loads(read_package_file("state.schema.json"))
XSS_NAME = "<script>window.__pwned = 1; document.title = 'pwned'</script><img src=x onerror=\"window.__pwned=2\">"


def record(start: int = 0, end: int = 2, **overrides: Any) -> ServerRecord:
    return make_record(start=start, end=end, **overrides)


def model_record(prefix: str = "m", num_blocks: int = 4, **overrides: Any) -> ModelRecord:
    return ModelRecord(**{"prefix": prefix, "num_blocks": num_blocks, "family": "llama", "name": prefix, **overrides})


def entry(prefix: str, num_blocks: int, peer: bytes = b"peer") -> ModelEntry:
    return ModelEntry(PeerID(peer), model_record(prefix, num_blocks), 1e12)


def view(
    peer: str,
    blocks: tuple[int, ...],
    state: str = "online",
    rtt: float | None = 0.01,
    batch: int = 1,
    queue: int = 0,
    probed: bool = True,
    **kw: Any,
) -> PeerView:
    """A listed peer; its probe answered (rtt), failed (rtt None: no batching state either), or was not made."""
    rec = record(min(blocks), max(blocks) + 1, **kw)
    if rtt is not None:
        probe = Probe(rtt, "direct", None, batch_sessions=batch, queue_length=queue)
    else:
        probe = Probe(None, None, "timed out", batch_sessions=None, queue_length=None)
    return PeerView(PeerID(peer.encode()).to_base58(), rec, blocks, 1e9, state, probe if probed else None)


# ---- pure functions ----


def test_resolve_models_majority_size_filters_and_caps():
    entries = [entry("a", 4, b"1"), entry("a", 4, b"2"), entry("a", 6, b"3"), entry("b", 2), entry("c", 5, b"4")]
    entries += [entry("c", 3, b"5"), entry("huge", MAX_NUM_BLOCKS, b"6")]
    known = {"gone": ModelInfo("gone", 8, "llama", "gone"), "a": ModelInfo("a", 99)}
    models = {m.prefix: m for m in resolve_models(entries, [], known, max_models=10, max_blocks=100)}
    assert models["a"].num_blocks == 4 and models["a"].registered_by == 3  # the majority, not the stored size
    assert models["c"].num_blocks == 5  # a tie goes to the larger size: a short claim cannot hide gaps
    assert models["gone"] == ModelInfo("gone", 8, "llama", "gone", 0)  # all its peers left: still watched
    assert "huge" not in models  # above max_blocks
    only = resolve_models(entries, ["b", "unknown"], known, max_models=10, max_blocks=100)
    assert [(m.prefix, m.num_blocks) for m in only] == [("b", 2), ("unknown", None)]
    capped = resolve_models(entries, [], known, max_models=2, max_blocks=100)
    assert [m.prefix for m in capped] == ["a", "c"]  # the most registered ones


def test_group_by_peer_coverage_gaps_and_health():
    a, b = PeerID(b"peer-a"), PeerID(b"peer-b")
    servers = {
        0: [BlockServer(a, 0, record(0, 2), 10.0)],
        1: [BlockServer(a, 1, record(0, 2, cache_tokens_left=5), 20.0), BlockServer(b, 1, record(1, 3), 10.0)],
        2: [],  # b announced 1:3 but its record for block 2 is missing: block 2 is not counted for it
        3: [],
    }
    peers = {p.peer_id: p for p in group_by_peer(servers)}
    assert peers[a.to_base58()].blocks == (0, 1) and peers[a.to_base58()].expires_at == 20.0
    assert peers[a.to_base58()].record.cache_tokens_left == 5  # the freshest record stands for the peer
    assert peers[b.to_base58()].blocks == (1,)
    views = [view("a", (0, 1)), view("b", (1,)), view("c", (3,), state="unreachable", rtt=None)]
    coverage = block_coverage(4, views)
    assert coverage == [1, 2, 0, 0]
    assert gaps(coverage) == [(2, 4)] and gaps([0, 1, 0]) == [(0, 1), (2, 3)] and gaps([1, 1]) == []
    assert not is_healthy(coverage) and is_healthy([1, 3]) and not is_healthy([])


def test_effective_state_and_connection_kind():
    assert effective_state("online", Probe(0.01, "direct", None, batch_sessions=1, queue_length=0)) == "online"
    assert effective_state("online", Probe(None, None, "timed out", batch_sessions=None, queue_length=None)) == (
        "unreachable"
    )
    assert effective_state("online", None) == "online"  # not probed (beyond --max-peers)
    assert effective_state("offline", None) == "offline" and effective_state("joining", None) == "joining"
    with pytest.raises(ValueError):
        effective_state("hacked", None)
    assert connection_kind(["/ip4/127.0.0.1/tcp/5"]) == "direct"
    assert connection_kind(["/ip4/1.2.3.4/tcp/5/p2p/QmRelay/p2p-circuit"]) == "relayed"
    assert connection_kind(["/ip4/1.2.3.4/tcp/5/p2p/QmR/p2p-circuit", "/ip4/5.6.7.8/tcp/1"]) == "direct"
    assert connection_kind([]) is None


def test_reported_counts_are_non_negative_ints_or_none():
    assert [reported_count(v) for v in (0, 7, 2**40)] == [0, 7, 2**40]
    assert [reported_count(v) for v in (-1, True, False, 1.0, "3", None)] == [None] * 6


def test_probe_keeps_the_batching_state_of_the_last_successful_answer(monkeypatch):
    from types import SimpleNamespace

    from peers.wire import PeerInfo
    from swarm.monitor import collector
    from swarm.transport import PeerError

    names = {PeerID(name.encode()): name for name in ("busy", "liar", "flaky")}
    calls: dict[str, int] = {}

    async def fake_call_info(p2p: Any, peer_id: PeerID, timeout: float) -> PeerInfo:
        name = names[peer_id]
        calls[name] = calls.get(name, 0) + 1
        if name == "flaky" and calls[name] == 2:  # answered once, then timed out: the probe failed
            raise PeerError(peer_id, "timed out")
        info = PeerInfo("m", "m", 0, 2, "float32", "none", 64, 4, "0.1.0", None, {})
        if name == "liar":  # not counts: kept out of the state rather than passed on
            return replace(info, batch_sessions=-3, queue_length=True)
        return replace(info, batch_sessions=calls[name], queue_length=10 * calls[name])

    async def list_peers() -> list:
        return [SimpleNamespace(peer_id=peer_id, addrs=["/ip4/127.0.0.1/tcp/1"]) for peer_id in names]

    monitor = object.__new__(collector.Monitor)  # only what _probe_all uses: no DHT, no daemon
    monitor.config = SimpleNamespace(probe_concurrency=2, rtt_timeout=1.0)
    monitor.p2p = SimpleNamespace(list_peers=list_peers)
    monkeypatch.setattr(collector, "call_info", fake_call_info)
    probes = asyncio.run(monitor._probe_all([p.to_base58() for p in names]))
    by_name = {names[PeerID.from_base58(peer_id)]: probe for peer_id, probe in probes.items()}
    busy = by_name["busy"]
    assert (busy.batch_sessions, busy.queue_length, busy.connection, busy.error) == (2, 20, "direct", None)
    assert busy.rtt_s is not None and busy.rtt_s >= 0
    assert (by_name["liar"].batch_sessions, by_name["liar"].queue_length) == (None, None)
    assert by_name["liar"].rtt_s is not None  # it answered: reachable, only its counts are dropped
    flaky = by_name["flaky"]
    assert (flaky.rtt_s, flaky.batch_sessions, flaky.queue_length) == (None, None, None)
    assert flaky.error is not None and "timed out" in flaky.error


def test_uptime_and_timelines_from_history():
    looks = [float(t) for t in range(10)]  # the monitor looked at t = 0..9
    samples = [PeerSample(t, "A", "online", "alice") for t in looks]
    samples += [PeerSample(t, "B", "online" if t < 7 else "unreachable", None) for t in looks[5:]]
    histories = {h.peer_id: h for h in peer_histories(looks, samples, 0.0, 10.0, 5)}
    assert histories["A"].uptime == 1.0 and histories["A"].public_name == "alice"
    assert histories["A"].timeline == [1.0] * 5
    assert histories["B"].uptime == pytest.approx(0.2)  # online at t = 5, 6 of 10 looks
    assert histories["B"].timeline == [0.0, 0.0, 0.5, 0.5, 0.0]
    assert (histories["B"].first_seen, histories["B"].last_seen) == (5.0, 9.0)
    sparse = peer_histories([0.0, 9.0], [PeerSample(0.0, "A", "online", None)], 0.0, 10.0, 5)
    assert sparse[0].timeline == [1.0, None, None, None, 0.0]  # None: the monitor did not look then

    model = [ModelSample(0.0, 4, 4, True), ModelSample(1.0, 2, 4, False), ModelSample(9.9, 4, 4, True)]
    buckets = coverage_timeline(model, 0.0, 10.0, 2)
    assert [(b.t, b.min_covered, b.healthy_fraction) for b in buckets] == [(0.0, 2, 0.5), (5.0, 4, 1.0)]


# ---- registry records ----


def test_registry_entries_are_validated_and_bound_to_the_signer():
    key = RSAPrivateKey()
    subkey = RSASignatureValidator(key).local_public_key
    good = model_record("tiny", 4).dict()
    bad_values = [
        {**good, "prefix": "bad/prefix"},
        {**good, "num_blocks": 4.0},  # strict: no float for an int
        {**good, "num_blocks": MAX_NUM_BLOCKS + 1},
        {**good, "extra": 1},
        {**good, "name": "x" * 129},
        "not a dict",
    ]
    assert parse_registry_entries({subkey: (good, 10.0)}) == [
        ModelEntry(peer_id_of(key.get_public_key()), ModelRecord(**good), 10.0)
    ]
    for value in bad_values:
        assert parse_registry_entries({subkey: (value, 10.0)}) == [], value
    assert parse_registry_entries({b"not an owner key": (good, 10.0)}) == []
    assert REGISTRY_KEY == "blockswarm_models" and not REGISTRY_KEY.rsplit("_", 1)[1].startswith("block")


# ---- the store ----


def test_history_store_survives_reopen_and_prunes(tmp_path):
    path = str(tmp_path / "h.sqlite3")
    store = HistoryStore(path, retention_s=100.0)
    info = ModelInfo("m", 2, "llama", "m", registered_by=1)
    store.record(1000.0, [ModelView(info, [view("a", (0, 1), public_name="alice")], [1, 1])])
    store.record(1010.0, [ModelView(info, [view("a", (0,), state="unreachable", rtt=None)], [0, 0])])
    store.close()

    store = HistoryStore(path, retention_s=100.0)
    assert store.known_models(since=0.0) == {"m": ModelInfo("m", 2, "llama", "m")}
    assert store.model_samples("m", since=0.0) == [ModelSample(1000.0, 2, 2, True), ModelSample(1010.0, 0, 2, False)]
    a = PeerID(b"a").to_base58()
    assert store.peer_samples("m", since=0.0) == [
        PeerSample(1000.0, a, "online", "alice"),
        PeerSample(1010.0, a, "unreachable", None),
    ]
    store.record(1105.0, [ModelView(ModelInfo("m", 2), [], [0, 0])])  # registered_by 0: size not re-stored
    assert [s.t for s in store.model_samples("m", since=0.0)] == [1010.0, 1105.0]  # 1000 is past the retention
    assert store.known_models(since=0.0)["m"].num_blocks == 2
    store.close()


# ---- config ----


def test_config_flags_env_and_file(tmp_path, monkeypatch):
    peers = ["/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]
    (tmp_path / "m.toml").write_text('scrape-period = 5.0\nmodels = ["a", "b"]\nport = 9000\n')
    monkeypatch.setenv("SWARM_MONITOR_PORT", "9100")
    config = load_monitor_config(
        ["--initial-peers", *peers, "--config", str(tmp_path / "m.toml"), "--rtt-timeout", "1"]
    )
    assert (config.scrape_period, config.models, config.port, config.rtt_timeout) == (5.0, ["a", "b"], 9100, 1.0)
    assert config.host == "127.0.0.1" and config.initial_peers == peers
    for argv, message in [
        ([], "--initial-peers"),
        (["--initial-peers", *peers, "--models", "no/slash"], "--models"),
        (["--initial-peers", *peers, "--port", "70000"], "--port"),
        (["--initial-peers", *peers, "--scrape-period", "0"], "--scrape-period"),
        (
            ["--initial-peers", *peers, "--history-window", "100", "--history-retention", "50", "--scrape-period", "1"],
            "--history-retention",
        ),
        (["--initial-peers", *peers, "--max-models", "0"], "--max-models"),
        (["--initial-peers", *peers, "--history-window", "60", "--history-buckets", "10"], "--history-buckets"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_monitor_config(argv)


# ---- JSON, metrics and the server on a synthetic snapshot ----


def synthetic_snapshot() -> Snapshot:
    peers = [
        view("a", (0, 1), batch=3, queue=5, public_name=XSS_NAME, throughput=math.inf),
        view("b", (2,), state="unreachable", rtt=None),
        view("c", (2,), state="joining", probed=False),
    ]
    models = [
        ModelView(ModelInfo("m", 3, "llama", "m", 2), peers, block_coverage(3, peers)),
        ModelView(ModelInfo("wanted", None), [], []),
    ]
    history = History(0.0, 10.0, 5.0, coverage_timeline([ModelSample(1.0, 2, 3, False)], 0.0, 10.0, 2), [])
    return Snapshot(100.0, ScrapeInfo(99.0, 0.5), models, {"m": history})


def test_state_json_matches_schema_and_metrics_agree():
    state = state_json(
        synthetic_snapshot(),
        {
            "scrape_period_s": 1.0,
            "page_refresh_s": 1.0,
            "rtt_timeout_s": 1.0,
            "history_window_s": 10.0,
            "history_buckets": 2,
            "models": [],
        },
    )
    jsonschema.validate(state, SCHEMA)
    json.dumps(state, allow_nan=False)  # an announced +inf throughput must not break the JSON
    m, wanted = state["models"]
    assert m["peers"][0]["throughput"] is None and m["peers"][0]["public_name"] == XSS_NAME
    assert (m["coverage"], m["gaps"], m["healthy"], m["blocks_covered"]) == ([1, 1, 0], [[2, 3]], False, 2)
    assert m["peer_counts"] == {"joining": 1, "online": 1, "offline": 0, "unreachable": 1}
    batching = [(p["state"], p["batch_sessions"], p["queue_length"]) for p in m["peers"]]
    assert batching == [("online", 3, 5), ("unreachable", None, None), ("joining", None, None)]
    assert (wanted["num_blocks"], wanted["healthy"], wanted["history"]) == (None, False, None)

    snapshot = synthetic_snapshot()
    metrics = MonitorMetrics(lambda: snapshot)
    metrics.observe_scrape(99.0, 0.5, ok=True)
    samples = parse_metrics(metrics.render().decode())
    assert samples[("blockswarm_block_redundancy", (("block", "2"), ("model", "m")))] == 0
    assert samples[("blockswarm_model_healthy", (("model", "m"),))] == 0
    assert samples[("blockswarm_peers", (("model", "m"), ("state", "unreachable")))] == 1
    assert samples[("blockswarm_monitor_scrape_duration_seconds_count", ())] == 1
    assert ("blockswarm_model_blocks", (("model", "wanted"),)) not in samples  # size unknown: no sample
    a, b, c = ((("model", "m"), ("peer_id", PeerID(name.encode()).to_base58())) for name in "abc")
    assert samples[("blockswarm_peer_batch_sessions", a)] == 3 and samples[("blockswarm_peer_queue_length", a)] == 5
    for unprobed in (b, c):  # unreachable, not probed: no batching state, no sample
        assert ("blockswarm_peer_batch_sessions", unprobed) not in samples
        assert ("blockswarm_peer_queue_length", unprobed) not in samples
    assert "pwned" not in metrics.render().decode()  # no announced free text in the metrics


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_server_routes_and_security_headers():
    states: list[dict | None] = [None]
    server = MonitorHTTPServer(("127.0.0.1", 0), lambda: states[0], lambda: b"# metrics\n")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page, headers = http_get(server.url)
        assert b'src="/static/monitor.js"' in page and b"<script>" not in page  # no inline script at all
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert http_get(server.url + "static/monitor.js")[1]["Content-Type"].startswith("text/javascript")
        script = read_package_file("static/monitor.js").decode()
        assert not [api for api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write") if api in script]
        assert json.loads(http_get(server.url + "api/v1/schema")[0])["title"].startswith("swarm-monitor")
        for path, status in [("api/v1/state", 503), ("nope", 404), ("static/../state.py", 404)]:
            with pytest.raises(urllib.error.HTTPError) as error:
                http_get(server.url + path)
            assert error.value.code == status
        states[0] = {"schema_version": 1}
        assert json.loads(http_get(server.url + "api/v1/state")[0]) == {"schema_version": 1}
        assert http_get(server.url + "metrics")[0] == b"# metrics\n"
    finally:
        server.shutdown()
        server.server_close()


def http_get(url: str, timeout: float = 10.0) -> tuple[bytes, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read(), response.headers


# ---- a real swarm: two models in one DHT, watched by a real swarm-monitor process ----

PEER_ARGS = ["--log-level", "WARNING"]
TIMERS = ["--announce-period", "1", "--record-ttl", "5"]
SCRAPE_PERIOD = 1.0
RTT_TIMEOUT = 3.0
DEADLINE = 20.0  # seconds any change must take at most to show, well above scrape period + probe timeouts + TTL


class Watched:
    def __init__(self, swarm, monitor, peers: dict):
        self.swarm, self.monitor, self.peers = swarm, monitor, peers

    def state(self) -> dict:
        return json.loads(http_get(self.monitor.url + "api/v1/state")[0])

    def metrics(self) -> str:
        return http_get(self.monitor.url + "metrics")[0].decode()

    def wait_for(self, condition: Callable[[dict], bool], what: str, timeout: float = DEADLINE) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if condition(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout:.0f} s: {what}; last state: {json.dumps(state)[:3000]}")
            time.sleep(0.3)


def model_of(state: dict, prefix: str) -> dict | None:
    return next((m for m in state["models"] if m["prefix"] == prefix), None)


def peer_spans(state: dict, prefix: str, only_online: bool = True) -> set[tuple[str, int, int]]:
    model = model_of(state, prefix) or {"peers": []}
    return {(p["peer_id"], p["start"], p["end"]) for p in model["peers"] if p["state"] == "online" or not only_online}


@pytest.fixture(scope="module")
def watched(llama_ckpt, tmp_path_factory):
    from local_swarm import LocalSwarm
    from monitor_screenshot import MonitorProcess

    workdir = tmp_path_factory.mktemp("monitor")
    swarm = LocalSwarm(llama_ckpt, threads_per_peer=1, extra_args=PEER_ARGS + TIMERS, workdir=workdir)
    monitor = None
    try:
        peers = {"alpha": swarm.start_peer((0, 2), ["--public-name", "alpha"], name="alpha")}
        # Two models in one DHT: the same checkpoint under a second prefix; "doomed" is the one the kill test ends.
        later = {
            "xss": ((2, 4), ["--public-name", XSS_NAME]),
            "doomed_full": ((0, 4), ["--dht-prefix", "doomed"]),
            "doomed_half": ((0, 2), ["--dht-prefix", "doomed"]),
        }
        for name, (span, args) in later.items():
            peers[name] = swarm.start_peer(span, args, wait=False, name=name)
        monitor = MonitorProcess(
            swarm.initial_peers,
            workdir,
            [
                "--scrape-period",
                str(SCRAPE_PERIOD),
                "--rtt-timeout",
                str(RTT_TIMEOUT),
                "--page-refresh",
                "1",
                "--history-window",
                "600",
                "--log-level",
                "WARNING",
            ],
        ).start()
        for name in later:
            swarm.wait_ready(peers[name])
        monitor.wait_ready()
        yield Watched(swarm, monitor, peers)
    finally:
        if monitor is not None:
            monitor.stop()
        swarm.stop()


def test_json_lists_exactly_the_running_peers_and_spans(watched):
    ids = {name: p.info["peer_id"] for name, p in watched.peers.items()}
    expected = {
        "tiny-llama": {(ids["alpha"], 0, 2), (ids["xss"], 2, 4)},
        "doomed": {(ids["doomed_full"], 0, 4), (ids["doomed_half"], 0, 2)},
    }
    # coverage counts a peer once the monitor's probe answered it: wait for a scrape that probed every listed peer
    state = watched.wait_for(
        lambda s: all(
            peer_spans(s, prefix, only_online=False) == spans
            and peer_spans(s, prefix) == spans
            and all(p["rtt_s"] is not None for p in model_of(s, prefix)["peers"])
            for prefix, spans in expected.items()
        ),
        "every started peer listed online with its span and probed",
    )
    jsonschema.validate(state, SCHEMA)
    assert [m["prefix"] for m in state["models"]] == ["doomed", "tiny-llama"]  # nothing else, found via the registry
    llama, doomed = model_of(state, "tiny-llama"), model_of(state, "doomed")
    assert (llama["num_blocks"], llama["family"], llama["name"], llama["registered_by"]) == (
        4,
        "llama",
        "tiny-llama",
        2,
    )
    assert (llama["coverage"], llama["healthy"], llama["gaps"]) == ([1, 1, 1, 1], True, [])
    assert (doomed["coverage"], doomed["healthy"]) == ([2, 2, 1, 1], True), json.dumps(doomed)[:3000]
    for peer in llama["peers"] + doomed["peers"]:
        assert peer["connection"] == "direct" and 0 < peer["rtt_s"] < RTT_TIMEOUT
        assert peer["version"] == "0.1.0" and peer["dtype"] == "float32" and peer["throughput"] > 0
        assert peer["expires_at"] > state["scrape"]["started_at"] - 1
        for field in ("batch_sessions", "queue_length"):  # what the peer told the probe about its batching
            assert type(peer[field]) is int and peer[field] >= 0, (field, peer[field])
    names = {p["peer_id"]: p["public_name"] for p in llama["peers"]}
    assert names == {ids["alpha"]: "alpha", ids["xss"]: XSS_NAME}
    assert state["scrape"]["error"] is None and abs(state["generated_at"] - time.time()) < 60  # UTC epoch seconds


def test_metrics_parse_and_agree_with_the_json(watched):
    for _ in range(20):  # the JSON and the metrics must come from the same look at the swarm
        metrics = parse_metrics(watched.metrics())
        state = watched.state()
        if metrics.get(("blockswarm_monitor_last_scrape_timestamp_seconds", ())) == state["scrape"]["started_at"]:
            break
    else:
        pytest.fail("could not read the JSON and the metrics of the same scrape")
    for model in state["models"]:
        label = (("model", model["prefix"]),)
        assert metrics[("blockswarm_model_blocks", label)] == model["num_blocks"]
        assert metrics[("blockswarm_model_blocks_covered", label)] == model["blocks_covered"]
        assert metrics[("blockswarm_model_healthy", label)] == float(model["healthy"])
        assert metrics[("blockswarm_peers_online", label)] == model["peer_counts"]["online"]
        for block, count in enumerate(model["coverage"]):
            assert metrics[("blockswarm_block_redundancy", (("block", str(block)), *label))] == count
        for peer in model["peers"]:
            peer_label = (*label, ("peer_id", peer["peer_id"]))
            assert metrics[("blockswarm_peer_throughput_tokens_per_second", peer_label)] == peer["throughput"]
            assert metrics[("blockswarm_peer_rtt_seconds", peer_label)] == peer["rtt_s"]
            assert metrics[("blockswarm_peer_cache_tokens_left", peer_label)] == peer["cache_tokens_left"]
            assert metrics[("blockswarm_peer_batch_sessions", peer_label)] == peer["batch_sessions"]
            assert metrics[("blockswarm_peer_queue_length", peer_label)] == peer["queue_length"]
    assert metrics[("blockswarm_monitor_scrape_duration_seconds_count", ())] >= 1
    assert metrics[("blockswarm_monitor_scrapes_total", (("result", "ok"),))] >= 1


def test_page_in_headless_chromium(watched):
    from monitor_screenshot import chromium_available, headless_chromium

    if not chromium_available() and os.geteuid() != 0:
        pytest.skip("chromium and chromedriver are missing and only root can install them (scripts/setup.sh does)")
    watched.wait_for(lambda s: sum(m["peer_counts"]["online"] for m in s["models"]) == 4, "4 peers online")
    zone = "Asia/Kolkata"  # UTC+05:30: its local clock differs from UTC's in the minutes too
    driver = headless_chromium(env={"TZ": zone})
    try:
        driver.get(watched.monitor.url)
        deadline = time.monotonic() + DEADLINE
        page = None
        while time.monotonic() < deadline:
            page = driver.execute_script(PAGE_PROBE)
            rows = [row for m in page["models"] for row in m["rows"]]
            if page["rendered"] and len(page["models"]) == 2 and len(rows) == 4 and all(r[3] == "online" for r in rows):
                break
            time.sleep(0.2)
        assert page is not None and page["rendered"], page
        models = {m["prefix"]: m for m in page["models"]}
        assert set(models) == {"tiny-llama", "doomed"}
        assert models["tiny-llama"]["blocks"] == [[0, 1, False], [1, 1, False], [2, 1, False], [3, 1, False]]
        assert [b[1] for b in models["doomed"]["blocks"]] == [2, 2, 1, 1]
        assert {len(m["rows"]) for m in models.values()} == {2}
        names = {row[1] for row in models["tiny-llama"]["rows"]}
        assert names == {"alpha", XSS_NAME}  # the announced markup is shown as text...
        assert page["injected"] == 0 and page["pwned"] is None and page["title"] == "Swarm health · blockswarm"
        assert all(row[3] == "online" for m in models.values() for row in m["rows"])
        columns = models["tiny-llama"]["columns"]
        batch, queue = columns.index("Batch"), columns.index("Queue")
        assert all(row[batch].isdigit() and row[queue].isdigit() for m in models.values() for row in m["rows"])
        started = datetime.fromtimestamp(float(page["started_at"]), ZoneInfo(zone))
        hour = started.hour % 12 or 12
        assert f"{hour}:{started.minute:02d}:{started.second:02d}" in page["status"]  # the viewer's local time
        assert len(models["tiny-llama"]["history_rows"]) == 2
        # ...and the page refreshes itself: a newer state gets rendered without a reload
        first = page["generated_at"]
        deadline = time.monotonic() + DEADLINE
        while driver.execute_script("return document.body.dataset.generatedAt") == first:
            assert time.monotonic() < deadline, "the page did not refresh"
            time.sleep(0.2)
    finally:
        driver.quit()


PAGE_PROBE = """
const models = [...document.querySelectorAll("section.model")].map((s) => ({
  prefix: s.dataset.prefix,
  blocks: [...s.querySelectorAll(".coverage-map .block")].map(
    (b) => [Number(b.dataset.block), Number(b.dataset.count), b.classList.contains("gap")]),
  columns: [...s.querySelectorAll("table.peers thead th")].map((th) => th.textContent),
  rows: [...s.querySelectorAll("table.peers tbody tr[data-peer-id]")].map(
    (tr) => [...tr.querySelectorAll("td")].map((td) => td.textContent)),
  history_rows: [...s.querySelectorAll("table.uptime tbody tr")].map((tr) => tr.dataset.peerId),
}));
return {
  rendered: Boolean(document.body.dataset.generatedAt),
  generated_at: document.body.dataset.generatedAt,
  started_at: document.getElementById("status").dataset.startedAt,
  status: document.getElementById("status").textContent,
  models: models,
  injected: document.querySelectorAll("main script, main img, main [onerror]").length,
  pwned: window.__pwned === undefined ? null : window.__pwned,
  title: document.title,
};
"""


def test_history_survives_a_monitor_restart(watched):
    before = watched.state()
    llama = model_of(before, "tiny-llama")
    looks_before = sum(1 for b in llama["history"]["coverage"] if b["min_covered"] is not None)
    first_seen = {p["peer_id"]: p["first_seen"] for p in llama["history"]["peers"]}
    assert watched.monitor.stop() == 0
    watched.monitor.start()
    watched.monitor.wait_ready()
    after = model_of(watched.state(), "tiny-llama")["history"]
    assert sum(1 for b in after["coverage"] if b["min_covered"] is not None) >= looks_before
    assert {p["peer_id"]: p["first_seen"] for p in after["peers"]} == first_seen  # nothing lost


def test_stopped_and_killed_peers_go_offline_then_gone_and_the_model_unhealthy(watched):
    half, full = watched.peers["doomed_half"], watched.peers["doomed_full"]
    half_id, full_id = half.info["peer_id"], full.info["peer_id"]

    def peer_state(state: dict, peer_id: str) -> str | None:
        return next((p["state"] for p in model_of(state, "doomed")["peers"] if p["peer_id"] == peer_id), None)

    began = time.monotonic()
    assert watched.swarm.stop_peer(half) == 0  # SIGTERM: the peer announces itself offline
    # the other replica still serves every block
    watched.wait_for(
        lambda s: peer_state(s, half_id) in ("offline", None) and model_of(s, "doomed")["healthy"],
        "the stopped peer offline, the model still healthy",
    )

    watched.swarm.stop_peer(full, sig=signal.SIGKILL)  # no goodbye: its record stays until the TTL
    state = watched.wait_for(
        lambda s: not model_of(s, "doomed")["healthy"] and model_of(s, "tiny-llama")["healthy"],
        "the model unhealthy (and the other one untouched)",
    )
    assert peer_state(state, full_id) in ("unreachable", None)
    assert time.monotonic() - began < 2 * DEADLINE
    doomed = model_of(state, "doomed")
    assert doomed["coverage"] == [0, 0, 0, 0] and doomed["gaps"] == [[0, 4]]

    # a peer stores its registry entry after its block records, with the same TTL: it may outlive them a little
    state = watched.wait_for(
        lambda s: not model_of(s, "doomed")["peers"] and model_of(s, "doomed")["registered_by"] == 0,
        "the dead peers' block records and registry entries expired",
    )
    doomed = model_of(state, "doomed")  # still listed: the monitor remembers the model and its size
    assert (doomed["num_blocks"], doomed["healthy"], doomed["registered_by"]) == (4, False, 0)
    uptimes = {p["peer_id"]: p["uptime"] for p in doomed["history"]["peers"]}
    assert set(uptimes) == {half_id, full_id} and all(0 < u < 1 for u in uptimes.values())
    metrics = parse_metrics(watched.metrics())
    assert metrics[("blockswarm_model_healthy", (("model", "doomed"),))] == 0
    assert metrics[("blockswarm_peers_online", (("model", "doomed"),))] == 0
