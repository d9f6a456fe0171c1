"""Errors at the door: a bad multiaddr, MODEL or --blocks is one line on stderr naming the value and the reason,
with no traceback, before any DHT or libp2p daemon starts; the pure parsers of dht.maddrs; ClientConfig's errors.

Nothing is downloaded: hub look-ups run with HF_HUB_OFFLINE=1 and an empty hub cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_unit import REPO

from dht.maddrs import (
    MaddrError,
    parse_announce_maddr,
    parse_announce_maddrs,
    parse_host_maddr,
    parse_host_maddrs,
    parse_initial_peer,
    parse_initial_peers,
)
from peers.cli import peek_model_size
from peers.config import DhtConfig, PeerConfig, check_span_fits
from peers.settings import ConfigError, load_config

PEER_ID = "12D3KooWJsXqdaKe8721FnxYsthbYcEH5Qgn22DSApGnRc8du4hA"
PEER = f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}"
# The same peer ID written as a CIDv1 (base32): py-multiaddr reads it, the parsers hand hivemind the base58 form.
PEER_ID_CIDV1 = "bafzaajaiaejcbbui3p2ccpe3gtxurwoq4dp5t3vasgeank64uc3ybdvnolic3taf"
BOGUS_HUB_ID = "blockswarm-no-such-org/no-such-model"
FAST = 5.0  # seconds: errors found before torch, transformers or hivemind are imported
CLIS = {
    "swarm-peer": ["-m", "peers"],
    "swarm-dht": ["-c", "from peers.cli import dht_main; dht_main()"],
    "swarm-monitor": ["-m", "swarm.monitor"],
}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWARM_PEER_", "SWARM_DHT_", "SWARM_MONITOR_"))}
    # never download: offline, and a hub cache of our own that holds nothing
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), **extra)
    return env


def run_cli(cli: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run the installed command (or its module where it is not installed); return the result and wall seconds."""
    script = Path(sys.executable).parent / cli
    command = [str(script)] if script.exists() else [sys.executable, *CLIS[cli]]
    started = time.monotonic()
    result = subprocess.run(
        [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    return result, time.monotonic() - started


def assert_door_error(result: subprocess.CompletedProcess, cli: str, needles: list[str], one_line: bool) -> str:
    """Non-zero exit, no traceback, and stderr's last line is `cli: error: ...` holding every needle."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    if one_line:  # nothing heavy was imported, so nothing else can have printed
        assert len(lines) == 1, result.stderr
    last = lines[-1]
    assert last.startswith(f"{cli}: error: "), last
    for needle in needles:
        assert needle in last, (needle, last)
    return last


# ---- the real commands ----


@pytest.mark.parametrize(
    "cli, args, needles",
    [
        (
            "swarm-peer",
            ["MODEL", "--initial-peers", "/ip4/127.0.0.1/tcp/x"],
            ["--initial-peers: '/ip4/127.0.0.1/tcp/x' is not a valid multiaddr: "],
        ),
        (
            "swarm-peer",
            ["MODEL", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"],
            ["--initial-peers: '/ip4/127.0.0.1/tcp/31337' cannot be an initial peer", "/p2p/<peer id>"],
        ),
        (
            "swarm-peer",
            ["MODEL", "--new-swarm", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic"],
            ["--host-maddrs: '/ip4/127.0.0.1/udp/0/quic' cannot be listened on", "/quic-v1"],
        ),
        (
            "swarm-peer",
            ["MODEL", "--new-swarm", "--announce-maddrs", "/ip4/203.0.113.5/tcp/0"],
            ["--announce-maddrs: '/ip4/203.0.113.5/tcp/0' cannot be announced", "port 0"],
        ),
        (
            "swarm-dht",
            ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmPeer"],
            ["--initial-peers: '/ip4/127.0.0.1/tcp/1/p2p/QmPeer' is not a valid multiaddr: ", "QmPeer"],
        ),
        (
            "swarm-dht",
            ["--host-maddrs", "/dns/localhost/tcp/0"],
            ["--host-maddrs: '/dns/localhost/tcp/0' cannot be listened on", "/dns4"],
        ),
    ],
)
def test_bad_multiaddr_is_one_line_before_any_import(tmp_path, cli, args, needles):
    identity = tmp_path / "identity.key"
    result, elapsed = run_cli(cli, [*args, "--identity-path", str(identity)], _env(tmp_path))
    assert_door_error(result, cli, needles, one_line=True)
    assert elapsed < FAST, elapsed
    assert not identity.exists()  # made just before the DHT starts: it never did


def test_bad_multiaddr_from_the_environment(tmp_path):
    env = _env(tmp_path, SWARM_PEER_INITIAL_PEERS=f"{PEER} /ip4/127.0.0.1/tcp/31337/p2p")
    result, elapsed = run_cli("swarm-peer", ["MODEL"], env)
    assert_door_error(result, "swarm-peer", ["--initial-peers: '/ip4/127.0.0.1/tcp/31337/p2p'"], one_line=True)
    assert elapsed < FAST, elapsed


def test_monitor_bad_multiaddr(tmp_path):
    db, identity = tmp_path / "monitor.sqlite3", tmp_path / "identity.key"
    args = ["--initial-peers", "/ip4/127.0.0.1/tcp/31337", "--db-path", str(db), "--identity-path", str(identity)]
    result, elapsed = run_cli("swarm-monitor", args, _env(tmp_path))
    assert_door_error(result, "swarm-monitor", ["--initial-peers: '/ip4/127.0.0.1/tcp/31337'", "/p2p/"], True)
    assert elapsed < FAST, elapsed  # `import swarm` is lazy: the monitor's config loads without torch
    assert not db.exists() and not identity.exists()  # the monitor never started


def test_missing_local_model(tmp_path):
    identity = tmp_path / "identity.key"
    missing = tmp_path / "no-such-model"
    result, elapsed = run_cli(
        "swarm-peer", [str(missing), "--new-swarm", "--identity-path", str(identity)], _env(tmp_path)
    )
    assert_door_error(result, "swarm-peer", [str(missing), "does not exist"], one_line=True)
    assert elapsed < FAST, elapsed
    assert not identity.exists()


def test_directory_without_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result, elapsed = run_cli("swarm-peer", [str(empty), "--new-swarm"], _env(tmp_path))
    assert_door_error(result, "swarm-peer", [str(empty), "no config.json"], one_line=True)
    assert elapsed < FAST, elapsed


@pytest.mark.parametrize("model", [BOGUS_HUB_ID, "not a hub id!"])
def test_bogus_hub_model(tmp_path, model):
    identity = tmp_path / "identity.key"
    result, elapsed = run_cli("swarm-peer", [model, "--new-swarm", "--identity-path", str(identity)], _env(tmp_path))
    assert_door_error(result, "swarm-peer", [repr(model), "neither a local checkpoint directory nor"], one_line=True)
    assert elapsed < FAST, elapsed
    assert not identity.exists()


def test_blocks_beyond_the_model(tmp_path, llama_ckpt):
    identity = tmp_path / "identity.key"
    args = [str(llama_ckpt), "--new-swarm", "--blocks", "3:99", "--identity-path", str(identity)]
    result, elapsed = run_cli("swarm-peer", args, _env(tmp_path))
    assert_door_error(result, "swarm-peer", ["--blocks 3:99", "only 4 blocks"], one_line=True)
    assert elapsed < FAST, elapsed
    assert not identity.exists()


# ---- dht.maddrs: the pure parsers ----


@pytest.mark.parametrize(
    "value, expected",
    [
        (PEER, PEER),
        (f"/ip6/::1/tcp/31337/p2p/{PEER_ID}", None),
        (f"/dns4/peer.example.org/tcp/31337/ws/p2p/{PEER_ID}", None),
        (f"/dns/peer.example.org/tcp/443/wss/p2p/{PEER_ID}", None),
        (f"/ip4/203.0.113.5/udp/31337/quic-v1/p2p/{PEER_ID}", None),
        (f"/dnsaddr/swarm.example.org/p2p/{PEER_ID}", None),
        (f"/ip4/203.0.113.5/tcp/4001/p2p/{PEER_ID}/p2p-circuit/p2p/{PEER_ID}", None),  # relayed, as peers list it
        (f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID_CIDV1}", PEER),  # hivemind reads base58 only
        ("/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", None),
    ],
)
def test_good_initial_peer(value, expected):
    assert parse_initial_peer(value, "--initial-peers") == (expected or value)


@pytest.mark.parametrize(
    "value, reason",
    [
        ("/ip4/127.0.0.1/tcp/x", "is not a valid multiaddr: "),
        ("/ip4/300.1.2.3/tcp/1/p2p/" + PEER_ID, "is not a valid multiaddr: "),
        ("/ip4/127.0.0.1/tcp/70000/p2p/" + PEER_ID, "is not a valid multiaddr: "),
        ("/ip4/127.0.0.1/tcp/1/p2p/QmPeer", "is not a valid multiaddr: "),
        ("/nosuch/1/tcp/1", "is not a valid multiaddr: "),
        ("ip4/127.0.0.1/tcp/1/p2p/" + PEER_ID, "must start with '/'"),
        ("", "it is empty"),
        ("/ip4/127.0.0.1/tcp/31337", "lacks the /p2p/<peer id> part"),
        (f"/p2p/{PEER_ID}", "must start with the host"),
        (f"/ip4/127.0.0.1/p2p/{PEER_ID}", "/tcp/PORT or /udp/PORT/quic-v1"),
        (f"/ip4/127.0.0.1/udp/1/p2p/{PEER_ID}", "/udp/PORT/quic-v1"),
        (f"/ip4/127.0.0.1/udp/1/quic/p2p/{PEER_ID}", "/udp/PORT/quic-v1"),
        (f"/ip4/0.0.0.0/tcp/1/p2p/{PEER_ID}", "0.0.0.0"),
        (f"/ip6/::/tcp/1/p2p/{PEER_ID}", "::"),
        (f"/ip4/127.0.0.1/tcp/0/p2p/{PEER_ID}", "port 0"),
        (f"/ip4/127.0.0.1/tcp/1/http/p2p/{PEER_ID}", "may follow the transport, not /http/p2p/"),
        (f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}/p2p-circuit", "may follow the transport"),  # relay, but to whom?
        ("/dnsaddr/swarm.example.org", "/dnsaddr/NAME/p2p/<peer id>"),
        (f"/unix/tmp/p2pd.sock/p2p/{PEER_ID}", "must start with the host"),
        (31337, "is not a multiaddr string"),
    ],
)
def test_bad_initial_peer(value, reason):
    with pytest.raises(MaddrError) as info:
        parse_initial_peer(value, "--initial-peers")
    message = str(info.value)
    assert message.startswith(f"--initial-peers: {value!r} ") and reason in message, message
    assert "\n" not in message
    assert info.value.field == "--initial-peers" and info.value.value == value
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "value",
    [
        "/ip4/0.0.0.0/tcp/0",
        "/ip4/127.0.0.1/tcp/31337",
        "/ip6/::/tcp/0",
        "/ip4/0.0.0.0/tcp/0/ws",
        "/ip4/0.0.0.0/udp/0/quic-v1",
        "/dns4/localhost/tcp/0",
        "/dns6/localhost/udp/0/quic-v1",
    ],
)
def test_good_host_maddr(value):
    assert parse_host_maddr(value, "--host-maddrs") == value


@pytest.mark.parametrize(
    "value, reason",
    [
        ("/ip4/0.0.0.0/tcp/x", "is not a valid multiaddr: "),
        ("/dns/localhost/tcp/0", "must start with the host (/ip4, /ip6, /dns4, /dns6)"),
        ("/dnsaddr/example.org", "must start with the host"),
        ("/unix/tmp/p2pd.sock", "must start with the host"),
        ("/ip4/0.0.0.0", "/tcp/PORT or /udp/PORT/quic-v1"),
        ("/ip4/0.0.0.0/udp/0", "/udp/PORT/quic-v1"),
        ("/ip4/0.0.0.0/udp/0/quic", "/udp/PORT/quic-v1"),
        ("/ip4/0.0.0.0/tcp/0/wss", "nothing may follow the transport"),
        (f"/ip4/0.0.0.0/tcp/0/p2p/{PEER_ID}", "nothing may follow the transport"),
    ],
)
def test_bad_host_maddr(value, reason):
    with pytest.raises(MaddrError) as info:
        parse_host_maddr(value, "--host-maddrs")
    assert str(info.value).startswith(f"--host-maddrs: {value!r} ") and reason in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "value", ["/ip4/203.0.113.5/tcp/31337", "/dns/peer.example.org/tcp/443/wss", "/ip6/2001:db8::1/udp/4001/quic-v1"]
)
def test_good_announce_maddr(value):
    assert parse_announce_maddr(value, "--announce-maddrs") == value


@pytest.mark.parametrize(
    "value, reason",
    [
        ("/ip4/203.0.113.5/tcp/0", "port 0"),
        ("/ip4/0.0.0.0/tcp/31337", "0.0.0.0"),
        (f"/ip4/203.0.113.5/tcp/31337/p2p/{PEER_ID}", "hivemind adds /p2p/ itself"),
        ("/ip4/203.0.113.5/udp/31337", "/udp/PORT/quic-v1"),
        ("/ip4/203.0.113.5/tcp/x", "is not a valid multiaddr: "),
    ],
)
def test_bad_announce_maddr(value, reason):
    with pytest.raises(MaddrError) as info:
        parse_announce_maddr(value, "--announce-maddrs")
    assert str(info.value).startswith(f"--announce-maddrs: {value!r} ") and reason in str(info.value), str(info.value)


def test_lists():
    assert parse_initial_peers([], "initial_peers") == []
    assert parse_announce_maddrs((), "announce_maddrs") == []
    assert parse_initial_peers([PEER, PEER], "initial_peers") == [PEER, PEER]
    with pytest.raises(MaddrError, match="host_maddrs: \\[\\] is empty"):
        parse_host_maddrs([], "host_maddrs")
    with pytest.raises(MaddrError, match="is one string: give a list"):
        parse_initial_peers(PEER, "initial_peers")
    with pytest.raises(MaddrError, match="initial_peers: '/ip4/127.0.0.1/tcp/x'"):  # the first bad one is named
        parse_initial_peers([PEER, "/ip4/127.0.0.1/tcp/x", "also bad"], "initial_peers")


def test_multiaddr_objects_are_read_as_text():
    from hivemind.utils.multiaddr import Multiaddr as HivemindMultiaddr
    from multiaddr import Multiaddr

    assert parse_initial_peers([Multiaddr(PEER), HivemindMultiaddr(PEER)], "initial_peers") == [PEER, PEER]


# ---- the configs ----


def _load(cls: type, argv: list[str]):
    return load_config(cls, argv, "BLOCKSWARM_TEST_UNSET_", "test", "test")


def test_peer_config_checks_and_canonicalizes():
    config = _load(PeerConfig, ["M", "--initial-peers", f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID_CIDV1}"])
    assert config.initial_peers == [PEER]
    config = _load(
        PeerConfig,
        ["M", "--new-swarm", "--host-maddrs", "/ip4/0.0.0.0/tcp/0", "--announce-maddrs", "/ip4/1.2.3.4/tcp/5"],
    )
    assert config.host_maddrs == ["/ip4/0.0.0.0/tcp/0"] and config.announce_maddrs == ["/ip4/1.2.3.4/tcp/5"]
    for argv, message in [
        (["M", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"], "--initial-peers: '/ip4/127.0.0.1/tcp/31337' "),
        (["M", "--new-swarm", "--host-maddrs", "/ip4/1.2.3.4"], "--host-maddrs: '/ip4/1.2.3.4' "),
        (["M", "--new-swarm", "--announce-maddrs", "/ip4/1.2.3.4/tcp/0"], "--announce-maddrs: '/ip4/1.2.3.4/tcp/0' "),
    ]:
        with pytest.raises(ConfigError) as info:
            _load(PeerConfig, argv)
        assert str(info.value).startswith(message), str(info.value)


def test_dht_config_checks():
    assert _load(DhtConfig, ["--initial-peers", PEER]).initial_peers == [PEER]
    with pytest.raises(ConfigError, match="--initial-peers: 'nonsense' is not a valid multiaddr"):
        _load(DhtConfig, ["--initial-peers", "nonsense"])


def test_monitor_config_checks():
    from swarm.monitor.config import load_monitor_config

    assert load_monitor_config(["--initial-peers", PEER]).initial_peers == [PEER]
    with pytest.raises(ConfigError, match="--host-maddrs: '/ip4/127.0.0.1/udp/0' cannot be listened on"):
        load_monitor_config(["--initial-peers", PEER, "--host-maddrs", "/ip4/127.0.0.1/udp/0"])


def test_span_fits():
    assert check_span_fits("0:4", 4) == (0, 4)
    with pytest.raises(ConfigError, match="--blocks 3:5: the model has only 4 blocks"):
        check_span_fits("3:5", 4)
    with pytest.raises(ConfigError, match="--blocks"):
        check_span_fits("4:3", 8)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The hub client in this process never goes online, and its cache is empty."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # imported already (transformers imports it), the hub client read HF_HUB_OFFLINE then: set its constants too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_peek_model_size(tmp_path, llama_ckpt, offline_hub):
    assert peek_model_size(str(llama_ckpt)) == 4
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"text_config": {}}')
    assert peek_model_size(str(tmp_path / "odd")) is None  # it does not say: open_checkpoint decides
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    (tmp_path / "file").write_text("")
    for path, reason in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "file", "is a file"),
        (tmp_path, "no config.json"),
        (tmp_path / "bad", "cannot read its config.json"),
        (BOGUS_HUB_ID, "neither a local checkpoint directory nor a model the hub could provide"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            peek_model_size(str(path))


# ---- the client ----


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_peers": ["/ip4/127.0.0.1/tcp/x"]}, "initial_peers: '/ip4/127.0.0.1/tcp/x' is not a valid multiaddr"),
        ({"initial_peers": ["/ip4/127.0.0.1/tcp/31337"]}, "initial_peers: '/ip4/127.0.0.1/tcp/31337' cannot be"),
        ({"initial_peers": PEER}, f"initial_peers: {PEER!r} is one string"),
        ({"host_maddrs": ["/ip4/127.0.0.1/udp/0/quic"]}, "host_maddrs: '/ip4/127.0.0.1/udp/0/quic' cannot be listened"),
        ({"host_maddrs": []}, "host_maddrs: [] is empty"),
    ],
)
def test_client_config_errors(kwargs, message):
    from swarm import ClientConfig

    with pytest.raises(ValueError) as info:
        ClientConfig(**kwargs)
    assert isinstance(info.value, MaddrError)
    assert str(info.value).startswith(message), str(info.value)


def test_client_config_canonicalizes():
    from swarm import ClientConfig

    config = ClientConfig(initial_peers=[f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID_CIDV1}"])
    assert config.initial_peers == [PEER] and config.host_maddrs == ["/ip4/127.0.0.1/tcp/0"]


def test_from_pretrained_bad_multiaddr_before_the_dht(llama_ckpt):
    from swarm import AutoDistributedModelForCausalLM

    started = time.monotonic()
    with pytest.raises(MaddrError, match="initial_peers: '/ip4/127.0.0.1/tcp/x' is not a valid multiaddr"):
        AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=["/ip4/127.0.0.1/tcp/x"])
    assert time.monotonic() - started < FAST


@pytest.mark.parametrize("model, reason", [("/nonexistent/blockswarm-model", "does not exist"), (BOGUS_HUB_ID, "hub")])
def test_from_pretrained_bad_model(offline_hub, model, reason):
    from blocks.checkpoint import CheckpointError
    from swarm import AutoDistributedModelForCausalLM

    started = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[PEER])
    assert time.monotonic() - started < FAST
    message = str(info.value)
    assert model in message and reason in message and "\n" not in message, message
