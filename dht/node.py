"""Starting this process's hivemind DHT node (a child process that also runs the libp2p daemon)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from functools import partial

from hivemind.dht import DHT

from dht.budget import StorageBudget, install_storage_budget
from dht.maddrs import parse_announce_maddrs, parse_host_maddrs, parse_initial_peers

_PR_SET_PDEATHSIG = 1


class IsolatedDHT(DHT):
    """A hivemind DHT whose child process lives in its own process group and dies with its parent.

    Ctrl-C, `timeout` or a service manager signal a whole process group; if that reached the DHT process and its
    libp2p daemon, the peer could not announce itself offline on the way out. In their own group they are shut
    down by the parent, in order. If the parent is killed outright, the kernel ends the DHT process too (and its
    daemon exits on its idle timeout), so nothing is left behind.
    """

    die_with_parent = True

    def run(self) -> None:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.die_with_parent and sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() == 1:  # the parent died before prctl took effect
                os._exit(1)
        super().run()


def start_dht_node(
    initial_peers: list[str],
    host_maddrs: list[str],
    announce_maddrs: list[str] | None = None,
    identity_path: str | None = None,
    record_validators: list | None = None,
    client_mode: bool = False,
    storage_budget: StorageBudget | None = None,
) -> DHT:
    """Start the DHT node and wait until it has joined.

    The kernel's parent-death signal fires when the *thread* that forked the child exits, so it is only armed when
    this runs on the main thread; otherwise the node is a daemon process that ends with a normal exit.
    The addresses are checked first (dht.maddrs; the configs did already): a bad one raises MaddrError, never
    reaching the daemon. A node that serves others (not `client_mode`) with a `storage_budget` stores for other
    nodes only within it (dht.budget).
    """
    dht = IsolatedDHT(
        initial_peers=parse_initial_peers(initial_peers, "initial_peers"),
        start=False,
        host_maddrs=parse_host_maddrs(host_maddrs, "host_maddrs"),
        announce_maddrs=parse_announce_maddrs(announce_maddrs or [], "announce_maddrs") or None,
        identity_path=identity_path,
        record_validators=record_validators or [],
        client_mode=client_mode,
    )
    dht.die_with_parent = threading.current_thread() is threading.main_thread()
    dht.run_in_background(await_ready=True)
    if storage_budget is not None and not client_mode:
        dht.run_coroutine(partial(install_storage_budget, budget=storage_budget))
    return dht
