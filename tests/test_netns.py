"""Latency routing across real hosts: peers and the client in their own network namespaces, joined by veth pairs
on a bridge, one peer's link slowed down. The client must route through the peer with the lower measured latency.

The slow link is tc netem where the kernel has it, else a delaying TCP relay (scripts/delay_proxy.py) in the slow
peer's namespace in front of its listening port. The test creates and removes everything itself, and skips only
where namespaces cannot be created (not root, no iproute2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import PEER_ARGS, REPO
from local_swarm import LocalSwarm

DELAY_MS = 40  # each way
SUBNET = "10.231.7"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class Hosts:
    """Namespaces `<tag>-c` (client, holds the bridge), `<tag>-a` and `<tag>-b`, at SUBNET.1, .2 and .3."""

    def __init__(self) -> None:
        self.tag = "bs" + uuid.uuid4().hex[:6]
        self.names: list[str] = []
        self.address: dict[str, str] = {}

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def create(self) -> None:
        for i, host in enumerate(("c", "a", "b"), start=1):
            _ip("netns", "add", self.ns(host))
            self.names.append(self.ns(host))
            _ip("-n", self.ns(host), "link", "set", "lo", "up")
            self.address[host] = f"{SUBNET}.{i}"
        c = self.ns("c")
        _ip("-n", c, "link", "add", "br0", "type", "bridge")
        _ip("-n", c, "addr", "add", f"{self.address['c']}/24", "dev", "br0")
        _ip("-n", c, "link", "set", "br0", "up")
        for host in ("a", "b"):
            _ip("link", "add", f"{self.tag}{host}0", "netns", c, "type", "veth", "peer", "name", "eth0",
                "netns", self.ns(host))  # fmt: skip
            _ip("-n", c, "link", "set", f"{self.tag}{host}0", "master", "br0")
            _ip("-n", c, "link", "set", f"{self.tag}{host}0", "up")
            _ip("-n", self.ns(host), "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
            _ip("-n", self.ns(host), "link", "set", "eth0", "up")

    def try_netem(self, host: str, delay_ms: int) -> bool:
        result = subprocess.run(
            [*self.exec(host), "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{delay_ms}ms"],
            capture_output=True,
            text=True,
        )
        return result.returncode == 0

    def remove(self) -> None:
        for name in self.names:
            _ip("netns", "del", name, check=False)


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    probe = Hosts()
    try:
        probe.create()
    except (subprocess.CalledProcessError, OSError) as e:
        probe.remove()
        pytest.skip(f"cannot create network namespaces here: {getattr(e, 'stderr', e)}")
    yield probe
    probe.remove()


CLIENT = """
import json, sys, time
import torch
from hivemind.p2p import PeerID
from swarm import AutoDistributedModelForCausalLM

ckpt, peers, fast, slow = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
model = AutoDistributedModelForCausalLM.from_pretrained(
    ckpt, initial_peers=peers, refresh_period=0.3, host_maddrs=["/ip4/0.0.0.0/tcp/0"]
)
seq = model.model.sequence
deadline = time.monotonic() + 60
while time.monotonic() < deadline and len(seq.health.rtt()) < 2:
    time.sleep(0.2)
ids = torch.arange(3, 11).unsqueeze(0)
tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
with model.inference_session(max_length=32) as session:
    model.generate(ids, max_new_tokens=2, do_sample=False)
    route = [s.peer_id.to_base58() for s in session.route]
rtt = {p.to_base58(): r for p, r in seq.health.rtt().items()}
print(json.dumps({"route": route, "rtt": rtt, "tokens": tokens.tolist()}))
model.shutdown()
"""


def test_route_prefers_the_host_with_lower_latency(hosts, llama_ckpt, local_model, tmp_path):
    swarm = LocalSwarm(llama_ckpt, threads_per_peer=1, extra_args=PEER_ARGS, workdir=tmp_path)
    relay = None
    try:
        fast_addr, slow_addr = hosts.address["b"], hosts.address["a"]
        fast = swarm.start_peer(
            (0, 4), extra_args=["--host-maddrs", f"/ip4/{fast_addr}/tcp/40000"], launcher=hosts.exec("b"), name="fast"
        )
        if hosts.try_netem("a", DELAY_MS):
            slow_args = ["--host-maddrs", f"/ip4/{slow_addr}/tcp/40000"]
        else:  # this kernel has no netem: a delaying relay in front of the slow peer stands in for it
            relay = subprocess.Popen(
                [*hosts.exec("a"), sys.executable, str(REPO / "scripts" / "delay_proxy.py"),
                 "--listen", f"{slow_addr}:40000", "--target", "127.0.0.1:40001", "--delay-ms", str(DELAY_MS)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            slow_args = ["--host-maddrs", "/ip4/127.0.0.1/tcp/40001"]
            slow_args += ["--announce-maddrs", f"/ip4/{slow_addr}/tcp/40000"]
        slow = swarm.start_peer((0, 4), extra_args=slow_args, launcher=hosts.exec("a"), name="slow")
        fast_id, slow_id = fast.info["peer_id"], slow.info["peer_id"]

        result = subprocess.run(
            [*hosts.exec("c"), sys.executable, "-c", CLIENT, str(llama_ckpt), ",".join(fast.info["maddrs"]),
             fast_id, slow_id],
            capture_output=True, text=True, timeout=240, cwd=Path(REPO),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert set(report["rtt"]) == {fast_id, slow_id}, report
        assert report["rtt"][slow_id] > report["rtt"][fast_id] + DELAY_MS / 1000, report["rtt"]
        assert report["route"] == [fast_id], report
        ids = torch.arange(3, 11).unsqueeze(0)
        expected = local_model(llama_ckpt).generate(ids, max_new_tokens=8, do_sample=False)
        assert report["tokens"] == expected.tolist()
    finally:
        swarm.stop()
        if relay is not None:
            relay.kill()
            relay.wait(10)
