"""peers.config: flags, environment and config files merged into a validated PeerConfig; the CLI's errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
from helpers_unit import REPO

from peers.config import DEFAULT_HOST_MADDRS, DhtConfig, PeerConfig
from peers.settings import ConfigError, load_config

ENV = "SWARM_PEER_"
PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
TWO_HOSTS = ["/ip4/0.0.0.0/tcp/31337", "/ip6/::/udp/31337/quic-v1"]


def load(argv: list[str]) -> PeerConfig:
    return load_config(PeerConfig, argv, ENV, "swarm-peer", "test")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith((ENV, "SWARM_DHT_")):
            monkeypatch.delenv(name)


def test_flags_map_to_fields():
    config = load(
        [
            "MODEL",
            "--blocks",
            "0:4",
            "--new-swarm",
            "--max-length",
            "100",
            "--quant",
            "nf4",
            "--host-maddrs",
            *TWO_HOSTS,
        ]
    )
    assert isinstance(config, PeerConfig)
    assert config.model == "MODEL"
    assert config.blocks == "0:4"
    assert config.new_swarm is True
    assert config.max_length == 100 and isinstance(config.max_length, int)
    assert config.quant == "nf4"
    assert config.host_maddrs == TWO_HOSTS
    # everything else keeps its default
    defaults = PeerConfig()
    for name in ("dtype", "device", "num_blocks", "cache_tokens", "record_ttl", "announce_period", "initial_peers"):
        assert getattr(config, name) == getattr(defaults, name)


def test_more_flags():
    config = load(
        [
            "--initial-peers",
            PEER,
            "--num-blocks",
            "3",
            "--record-ttl",
            "12.5",
            "--announce-period",
            "5",
            "--dtype",
            "bfloat16",
            "--public-name",
            "alice",
            "MODEL",
        ]
    )
    assert config.initial_peers == [PEER] and config.new_swarm is False
    assert config.num_blocks == 3 and config.blocks is None
    assert config.record_ttl == 12.5 and config.announce_period == 5.0
    assert isinstance(config.announce_period, float)
    assert config.dtype == "bfloat16" and config.public_name == "alice"


def test_defaults_are_not_shared():
    a, b = load(["M", "--new-swarm"]), load(["M", "--new-swarm"])
    assert a.host_maddrs == DEFAULT_HOST_MADDRS
    a.host_maddrs.append("x")
    assert b.host_maddrs == DEFAULT_HOST_MADDRS and PeerConfig().host_maddrs == DEFAULT_HOST_MADDRS


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    path = tmp_path / "peer.toml"
    path.write_text('max-length = 10\ncache_tokens = 500\nquant = "int8"\n')
    base = ["M", "--new-swarm", "--config", str(path)]
    config = load(base)
    assert (config.max_length, config.cache_tokens, config.quant) == (10, 500, "int8")

    monkeypatch.setenv("SWARM_PEER_MAX_LENGTH", "20")
    config = load(base)
    assert (config.max_length, config.cache_tokens) == (20, 500)  # env beats the file, only for its own key

    config = load([*base, "--max-length", "30"])
    assert (config.max_length, config.cache_tokens, config.quant) == (30, 500, "int8")


def test_config_file_from_env(tmp_path, monkeypatch):
    path = tmp_path / "peer.json"
    path.write_text(json.dumps({"max_length": 77, "new_swarm": True, "model": "from-file"}))
    monkeypatch.setenv("SWARM_PEER_CONFIG", str(path))
    config = load([])
    assert (config.model, config.max_length, config.new_swarm) == ("from-file", 77, True)


def test_toml_file(tmp_path):
    path = tmp_path / "peer.toml"
    path.write_text(
        "\n".join(
            [
                'model = "tiny"',
                f'initial-peers = ["{PEER}"]',
                'blocks = "1:3"',
                'dtype = "float16"',
                "record_ttl = 120",  # a TOML integer for a float setting
                "announce-period = 40.5",
                'host_maddrs = ["/ip4/127.0.0.1/tcp/0"]',
            ]
        )
    )
    config = load(["--config", str(path)])
    assert config.model == "tiny" and config.initial_peers == [PEER] and config.blocks == "1:3"
    assert config.dtype == "float16" and config.host_maddrs == ["/ip4/127.0.0.1/tcp/0"]
    assert config.record_ttl == 120.0 and isinstance(config.record_ttl, float)
    assert config.announce_period == 40.5


def test_json_file(tmp_path):
    path = tmp_path / "peer.json"
    path.write_text(json.dumps({"model": "tiny", "new-swarm": True, "num_blocks": 2, "max_batch": 8}))
    config = load(["--config", str(path)])
    assert (config.model, config.new_swarm, config.num_blocks, config.max_batch) == ("tiny", True, 2, 8)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("peer.toml", "max_lenght = 10\n", "max_lenght"),
        ("peer.json", '{"model": "m", "colour": "blue"}', "colour"),
        ("peer.toml", "max_length = \n", "peer.toml"),  # syntax error
        ("peer.json", "{not json", "peer.json"),
        ("peer.json", "[1, 2]", "table"),
        ("peer.toml", 'max_length = "lots"\n', "max_length"),
        ("peer.json", '{"new_swarm": "perhaps"}', "new_swarm"),
    ],
)
def test_bad_config_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load(["M", "--new-swarm", "--config", str(path)])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(["M", "--new-swarm", "--config", str(tmp_path / "nope.toml")])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["M", "--new-swarm", "--blocks", "4:2"], "--blocks"),
        (["M", "--new-swarm", "--blocks", "3:3"], "--blocks"),
        (["M", "--new-swarm", "--blocks", "x"], "--blocks"),
        (["M", "--new-swarm", "--blocks", "1:2:3"], "--blocks"),
        (["M", "--new-swarm", "--blocks=-1:2"], "--blocks"),
        (["M", "--new-swarm", "--blocks", "0:2", "--num-blocks", "2"], "--num-blocks"),
        (["M", "--new-swarm", "--num-blocks", "0"], "--num-blocks"),
        (["M"], "--initial-peers"),
        (["M", "--new-swarm", "--initial-peers", PEER], "--new-swarm"),
        (["M", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"], "--initial-peers: '/ip4/127.0.0.1/tcp/31337'"),
        (["M", "--new-swarm", "--host-maddrs", "x"], "--host-maddrs: 'x' is not a valid multiaddr"),
        (["M", "--new-swarm", "--announce-maddrs", "/ip4/1.2.3.4/tcp/0"], "--announce-maddrs"),
        (["M", "--new-swarm", "--record-ttl", "30", "--announce-period", "30"], "--record-ttl"),
        (["M", "--new-swarm", "--record-ttl", "10"], "--record-ttl"),
        (["M", "--new-swarm", "--announce-period", "0"], "--announce-period"),
        (["M", "--new-swarm", "--session-idle-timeout", "-1"], "--session-idle-timeout"),
        (["M", "--new-swarm", "--max-length", "0"], "--max-length"),
        (["M", "--new-swarm", "--cache-tokens", "0"], "--cache-tokens"),
        (["M", "--new-swarm", "--max-batch", "-3"], "--max-batch"),
        (["--new-swarm"], "MODEL"),
        (["M", "--new-swarm", "--direct-port", "70000"], "--direct-port"),
        (["M", "--new-swarm", "--direct-host", "localhost"], "--direct-host: 'localhost' is not an IP address"),
        (["M", "--new-swarm", "--direct-public-hosts", "1.2.3.4", "x"], "--direct-public-hosts: 'x'"),
        (["M", "--new-swarm", "--direct-handshake-timeout", "0"], "--direct-handshake-timeout"),
        (["M", "--new-swarm", "--direct-max-pending", "0"], "--direct-max-pending"),
    ],
)
def test_bad_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        load(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["M", "--new-swarm", "--max-length", "abc"],
        ["M", "--new-swarm", "--quant", "fp8"],
        ["M", "--new-swarm", "--dtype", "float64"],
        ["M", "--new-swarm", "--no-such-flag"],
        ["M", "--new-swarm", "--host-maddrs"],
    ],
)
def test_argparse_rejects(argv, capsys):
    with pytest.raises(SystemExit) as info:
        load(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["1", "true", "True", "YES", "on", " yes "])
def test_bool_env_true(monkeypatch, text):
    monkeypatch.setenv("SWARM_PEER_NEW_SWARM", text)
    assert load(["M"]).new_swarm is True


@pytest.mark.parametrize("text", ["0", "false", "No", "OFF"])
def test_bool_env_false(monkeypatch, text):
    monkeypatch.setenv("SWARM_PEER_NEW_SWARM", text)
    monkeypatch.setenv("SWARM_PEER_INITIAL_PEERS", PEER)
    config = load(["M"])
    assert config.new_swarm is False and config.initial_peers == [PEER]


@pytest.mark.parametrize("text", ["", "maybe", "2", "y"])
def test_bool_env_invalid(monkeypatch, text):
    monkeypatch.setenv("SWARM_PEER_NEW_SWARM", text)
    with pytest.raises(ConfigError, match="new_swarm"):
        load(["M"])


def test_env_values(monkeypatch):
    monkeypatch.setenv("SWARM_PEER_NEW_SWARM", "1")
    monkeypatch.setenv("SWARM_PEER_HOST_MADDRS", "/ip4/127.0.0.1/tcp/0 /ip4/127.0.0.1/udp/0/quic-v1")
    monkeypatch.setenv("SWARM_PEER_RECORD_TTL", "120.5")
    monkeypatch.setenv("SWARM_PEER_MODEL", "env-model")
    config = load([])
    assert config.model == "env-model"
    assert config.host_maddrs == ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"]
    assert config.record_ttl == 120.5


@pytest.mark.parametrize("name, value", [("MAX_LENGTH", "ten"), ("RECORD_TTL", "soon"), ("MAX_BATCH", "1.5")])
def test_env_bad_number(monkeypatch, name, value):
    monkeypatch.setenv("SWARM_PEER_" + name, value)
    with pytest.raises(ConfigError, match=name.lower()):
        load(["M", "--new-swarm"])


def test_dht_config():
    config = load_config(DhtConfig, ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"], "SWARM_DHT_", "swarm-dht", "test")
    assert isinstance(config, DhtConfig)
    assert config.host_maddrs == ["/ip4/127.0.0.1/tcp/0"] and config.initial_peers == []
    with pytest.raises(SystemExit):
        load_config(DhtConfig, ["--blocks", "0:1"], "SWARM_DHT_", "swarm-dht", "test")  # a peer-only flag


# ---- the real command line ----


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV)}
    return subprocess.run(
        [sys.executable, "-m", "peers", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_help_lists_every_setting():
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    flags = set(result.stdout.replace(",", " ").split())
    for field in dataclasses.fields(PeerConfig):
        if field.name == "model":
            assert "model" in result.stdout
            continue
        assert "--" + field.name.replace("_", "-") in flags, field.name
    assert "--config" in flags


def test_cli_bad_blocks_fails_fast_with_message():
    started = time.monotonic()
    result = _run_cli("MODEL", "--blocks", "3:1", "--new-swarm")
    assert result.returncode != 0
    assert "swarm-peer: error" in result.stderr and "--blocks" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 20  # config errors come before torch, the DHT or the model are touched


def test_cli_missing_config_file_is_a_clean_error(tmp_path):
    result = _run_cli("MODEL", "--new-swarm", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode != 0
    assert "swarm-peer: error" in result.stderr and "missing.toml" in result.stderr
    assert "Traceback" not in result.stderr
