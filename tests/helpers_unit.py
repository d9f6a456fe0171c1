"""Shared helpers of the unit tests (checkpoints, safetensors spying, limits, peer IDs). Not a conftest."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from model_tools import make_random_checkpoint  # noqa: E402

from peers.wire.validation import Limits  # noqa: E402

__all__ = [
    "INDEX_FILE",
    "REPO",
    "SafeOpenSpy",
    "make_limits",
    "make_random_checkpoint",
    "one_torch_thread",
    "shard_map",
    "tensor_names",
]

INDEX_FILE = "model.safetensors.index.json"


def tensor_names(path: Path) -> list[str]:
    """All tensor names of a checkpoint dir, read straight from the safetensors headers (not via blocks/)."""
    names = []
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names.extend(f.keys())
    return names


def shard_map(path: Path) -> dict[str, str]:
    """tensor name -> shard file name, from a sharded checkpoint's index json."""
    with open(Path(path) / INDEX_FILE) as f:
        return dict(json.load(f)["weight_map"])


class SafeOpenSpy:
    """Stands in for safetensors.safe_open and records which files are opened and which tensors are read."""

    def __init__(self) -> None:
        self.opened: list[str] = []  # file names, in order
        self.read: list[str] = []  # tensor names passed to get_tensor, in order
        self.sliced: list[str] = []  # tensor names passed to get_slice (parts of them read), in order

    def __call__(self, filename: Any, framework: str, **kwargs: Any) -> _SpyHandle:
        self.opened.append(Path(filename).name)
        return _SpyHandle(self, safe_open(filename, framework=framework, **kwargs))


class _SpyHandle:
    def __init__(self, spy: SafeOpenSpy, handle: Any) -> None:
        self._spy, self._handle = spy, handle

    def __enter__(self) -> _SpyHandle:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get_tensor(self, name: str) -> Any:
        self._spy.read.append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name: str) -> Any:
        self._spy.sliced.append(name)
        return self._handle.get_slice(name)


def make_limits(**overrides: Any) -> Limits:
    values = dict(
        start=2,
        end=6,
        hidden_size=16,
        max_length=64,
        max_batch=4,
        max_forward_tokens=128,
        max_message_bytes=1 << 20,
        max_backward_tokens=16384,
        max_lora_rank=64,
        max_prompt_length=256,
        max_held_tokens=16384,
        train_hold_timeout=60.0,
    )
    values.update(overrides)
    return Limits(**values)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is much faster than OpenMP threads spinning on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
