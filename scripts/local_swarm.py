"""Start a local swarm on 127.0.0.1: N `swarm-peer` processes that together cover a model; stop them cleanly.

    python scripts/local_swarm.py MODEL_DIR --peers 2        # prints the initial peers; Ctrl-C stops the swarm

Also a Python API for tests, benchmarks and the demo: ``with LocalSwarm(model, peers=2) as swarm: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class SwarmStartError(RuntimeError):
    pass


@dataclass
class PeerProcess:
    process: subprocess.Popen
    ready_file: Path
    log_file: Path
    args: list[str]
    info: dict | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def even_spans(num_blocks: int, peers: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / peers) for i in range(peers + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(peers)]


class LocalSwarm:
    """Peers on loopback. `spans` defaults to an even split of the model's blocks over `peers` processes."""

    def __init__(
        self,
        model: str | os.PathLike,
        peers: int = 2,
        spans: list[tuple[int, int]] | None = None,
        extra_args: list[str] | None = None,
        threads_per_peer: int | None = None,
        start_timeout: float = 180.0,
        workdir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        bootstrap: list[str] | None = None,
    ):
        self.model = str(model)
        if spans is None:
            config = json.loads((Path(model) / "config.json").read_text())
            config = config.get("text_config", config)  # a multimodal model's blocks are its language model's
            spans = even_spans(int(config["num_hidden_layers"]), peers)
        self.spans = spans
        self.extra_args = list(extra_args or [])
        self.threads_per_peer = threads_per_peer
        self.start_timeout = start_timeout
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="blockswarm-swarm-"))
        self.env = env or {}
        self.peers: list[PeerProcess] = []
        self.bootstrap = bootstrap  # multiaddrs of a DHT node outside this swarm, to join through instead of peer 0

    @property
    def initial_peers(self) -> list[str]:
        if self.bootstrap:
            return list(self.bootstrap)
        return list(self.peers[0].info["maddrs"]) if self.peers and self.peers[0].info else []

    def start_peer(
        self,
        span: tuple[int, int] | None = None,
        extra_args: list[str] | None = None,
        wait: bool = True,
        name: str | None = None,
        launcher: list[str] | None = None,
    ) -> PeerProcess:
        """Start one more peer; `launcher` prefixes its command (e.g. ``ip netns exec NS`` for another host)."""
        index = len(self.peers)
        name = name or f"peer{index}"
        ready = self.workdir / f"{name}.ready.json"
        log = self.workdir / f"{name}.log"
        ready.unlink(missing_ok=True)
        args = [*(launcher or []), sys.executable, "-m", "peers", self.model]
        args += ["--host-maddrs", LOOPBACK, "--ready-file", str(ready)]
        if span is not None:
            args += ["--blocks", f"{span[0]}:{span[1]}"]
        args += ["--initial-peers", *self.initial_peers] if self.initial_peers else ["--new-swarm"]
        if self.threads_per_peer:
            args += ["--num-threads", str(self.threads_per_peer)]
        args += self.extra_args + list(extra_args or [])
        env = {**os.environ, **self.env}
        with open(log, "wb") as log_handle:
            process = subprocess.Popen(
                args, stdout=log_handle, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
            )
        peer = PeerProcess(process, ready, log, args)
        self.peers.append(peer)
        if wait:
            self.wait_ready(peer)
        return peer

    def wait_ready(self, peer: PeerProcess) -> dict:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if peer.ready_file.exists():
                peer.info = json.loads(peer.ready_file.read_text())
                return peer.info
            if peer.process.poll() is not None:
                raise SwarmStartError(f"peer exited with code {peer.process.returncode}:\n{peer.log_tail()}")
            time.sleep(0.1)
        raise SwarmStartError(f"peer not ready after {self.start_timeout:.0f} s:\n{peer.log_tail()}")

    def start(self) -> LocalSwarm:
        try:
            self.start_peer(self.spans[0])  # the first peer bootstraps the DHT
            started = [self.start_peer(span, wait=False) for span in self.spans[1:]]
            for peer in started:
                self.wait_ready(peer)
        except BaseException:
            self.stop()
            raise
        return self

    def stop_peer(
        self, peer: PeerProcess, sig: int = signal.SIGTERM, timeout: float = 20.0, signalled: bool = False
    ) -> int | None:
        """Signal the peer (unless `signalled` already) and wait for it; kill it if it does not exit in time."""
        if peer.process.poll() is None:
            if not signalled:
                peer.process.send_signal(sig)
            try:
                peer.process.wait(timeout)
            except subprocess.TimeoutExpired:
                peer.process.kill()
                peer.process.wait()
        return peer.process.returncode

    def stop(self) -> list[int | None]:
        for peer in self.peers:  # signal all first, so they shut down in parallel
            if peer.process.poll() is None:
                peer.process.send_signal(signal.SIGTERM)
        return [self.stop_peer(peer, signalled=True) for peer in self.peers]

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def stop_checked(self) -> None:
        """Stop every peer and raise, with their logs, if any did not exit with code 0."""
        codes = self.stop()
        bad = [(peer, code) for peer, code in zip(self.peers, codes, strict=True) if code != 0]
        if bad:
            details = "\n".join(f"--- {p.log_file} (exit {code}):\n{p.log_tail()}" for p, code in bad)
            raise SwarmStartError(f"{len(bad)} peer(s) did not exit cleanly:\n{details}")

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--threads-per-peer", type=int, default=None)
    parser.epilog = "Extra swarm-peer flags go after --, e.g. ... MODEL --peers 2 -- --quant nf4"
    argv = sys.argv[1:]
    # split by hand: argparse's REMAINDER after a positional would swallow this script's own flags too
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]
    swarm = LocalSwarm(args.model, args.peers, extra_args=extra, threads_per_peer=args.threads_per_peer)
    with swarm:
        for peer, span in zip(swarm.peers, swarm.spans, strict=True):
            print(f"peer {peer.info['peer_id']} serves blocks {span[0]}:{span[1]} (log: {peer.log_file})")
        print("initial peers:", " ".join(swarm.initial_peers), flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    print("swarm stopped")


if __name__ == "__main__":
    main()
