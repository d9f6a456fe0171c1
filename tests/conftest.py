"""Shared fixtures: tiny random-weight checkpoints and real local swarms of `swarm-peer` processes on 127.0.0.1."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from local_swarm import LocalSwarm  # noqa: E402
from model_tools import make_random_checkpoint  # noqa: E402

T = TypeVar("T")
# Generous: the suite must hold while other processes keep both cores busy.
WAIT_TIMEOUT = 60.0


def wait_until(condition: Callable[[], T], what: str, timeout: float = WAIT_TIMEOUT, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)


# Peers in tests log warnings only and use one compute thread each: tests run several processes on 2 cores.
PEER_ARGS = ["--log-level", "WARNING"]
# Peers started by tests share one throughput cache of this test run, not the user's (~/.cache/blockswarm).
os.environ.setdefault(
    "SWARM_PEER_THROUGHPUT_CACHE", str(Path(tempfile.mkdtemp(prefix="blockswarm-tests-")) / "throughput.json")
)


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", "llama", seed=1)


@pytest.fixture(scope="session")
def qwen2_ckpt(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2", "qwen2", seed=2)


def start_swarm(ckpt: Path, peers: int = 2, extra_args: list[str] | None = None, **kwargs) -> LocalSwarm:
    return LocalSwarm(
        ckpt, peers=peers, threads_per_peer=1, extra_args=PEER_ARGS + list(extra_args or []), **kwargs
    ).start()


@pytest.fixture(scope="module")
def llama_swarm(llama_ckpt):
    swarm = start_swarm(llama_ckpt)
    yield swarm
    swarm.stop_checked()


@pytest.fixture(scope="module")
def llama_client(llama_ckpt, llama_swarm):
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(llama_ckpt, initial_peers=llama_swarm.initial_peers)
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def replicated(llama_ckpt):
    """Blocks 0-1 on one peer; blocks 2-3 on three peers, so two can die; and a client of that swarm."""
    from swarm import AutoDistributedModelForCausalLM

    swarm = start_swarm(llama_ckpt, peers=4, spans=[(0, 2), (2, 4), (2, 4), (2, 4)])
    # No spot checks: a check sends a span's work to a second replica, and these tests count which peers saw what
    # (spot checks have their own tests in test_verification.py).
    model = AutoDistributedModelForCausalLM.from_pretrained(
        llama_ckpt, initial_peers=swarm.initial_peers, failover_timeout=5.0, check_rate=0.0
    )
    yield swarm, model
    model.shutdown()
    swarm.stop()  # some peers are killed on purpose: their exit codes are not checked


@pytest.fixture(scope="session")
def local_model():
    """Local transformers models, cached per checkpoint."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, torch.nn.Module] = {}

    def get(path: Path) -> torch.nn.Module:
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get
