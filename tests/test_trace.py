"""Step tracing (peers.trace) and the latency breakdown built from it (scripts/trace_steps.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trace_steps import Event, breakdown, floor, read_events

from peers import trace

REPO = Path(__file__).resolve().parent.parent
ROUTE = [(0, 2), (2, 4)]


def _step(t0: int, offsets: dict[tuple[str, str], int], pids: dict[str, int]) -> list[Event]:
    """One step's events at t0 + offset µs; CPU time advances with wall time (all work, no waiting)."""
    events = []
    for (where, what), offset in offsets.items():
        ns = (t0 + offset) * 1000
        events.append(Event(pids[where], pids[where], where, what, -1, ns, ns))
    return events


def _offsets() -> dict[tuple[str, str], int]:
    p0, p1 = trace.place("peer", *ROUTE[0]), trace.place("peer", *ROUTE[1])
    c0, c1 = trace.place("client", *ROUTE[0]), trace.place("client", *ROUTE[1])
    chain = [
        (trace.CLIENT, trace.STEP_CALLED),
        (c0, trace.SENT),
        (p0, trace.RECEIVED),
        (p0, trace.ACCEPTED),
        (p0, trace.COMPUTE_BEGAN),
        (p0, trace.COMPUTE_ENDED),
        (p0, trace.COMPUTED),
        (p0, trace.PUSHED),
        (p1, trace.RECEIVED),
        (p1, trace.ACCEPTED),
        (p1, trace.COMPUTE_BEGAN),
        (p1, trace.COMPUTE_ENDED),
        (p1, trace.COMPUTED),
        (p1, trace.REPLIED),
        (c1, trace.REPLY_READ),
        (c1, trace.OUTPUT),
        (trace.CLIENT, trace.STEP_RETURNED),
    ]
    gaps = [10, 100, 20, 30, 1000, 5, 40, 200, 20, 30, 900, 5, 50, 150, 25, 15]
    offsets, t = {chain[0]: 0}, 0
    for point, gap in zip(chain[1:], gaps, strict=True):
        t += gap
        offsets[point] = t
    return offsets


def test_breakdown_names_each_segment_of_the_critical_path_and_skips_incomplete_steps():
    pids = {
        trace.CLIENT: 1,
        trace.place("client", *ROUTE[0]): 1,
        trace.place("client", *ROUTE[1]): 1,
        trace.place("peer", *ROUTE[0]): 2,
        trace.place("peer", *ROUTE[1]): 3,
    }
    offsets = _offsets()
    events: list[Event] = []
    for n in range(8):
        step = _step(n * 5000, offsets, pids)
        if n == 6:  # a late push: peer 1 also received the step from the client (a second RECEIVED)
            late = [e for e in step if e.where == trace.place("peer", *ROUTE[1]) and e.what == trace.RECEIVED][0]
            step.append(Event(3, 3, late.where, late.what, -1, late.ns + 1, late.ns + 1))
        events += step
    events.append(Event(1, 1, trace.CLIENT, trace.STEP_CALLED, -1, 8 * 5000 * 1000, 8 * 5000 * 1000))
    events.sort(key=lambda e: e.ns)

    result = breakdown(events, skip=2)
    walls = {row["segment"]: row["wall_us"] for row in result["segments"]}
    assert result["steps"] == 5  # 8 steps, 2 skipped as warm-up, 1 with an extra event
    assert walls["send_to_peer0"] == 100 and walls["push_to_peer1"] == 200 and walls["reply_to_client"] == 150
    assert walls["peer0_layers"] == 1000 and walls["peer1_layers"] == 900 and walls["peer0_pushes"] == 40
    assert walls["client_between_steps"] == 5000 - offsets[(trace.CLIENT, trace.STEP_RETURNED)]
    assert result["cycle_us"] == 5000 and result["layers_us"] == 1900
    assert sum(walls.values()) == pytest.approx(result["cycle_us"])
    cpus = {row["segment"]: row["cpu_us"] for row in result["segments"]}
    assert cpus["peer0_layers"] == 1000 and cpus["send_to_peer0"] is None  # across processes: no CPU time

    with pytest.raises(ValueError, match="no peer events"):
        breakdown([e for e in events if not e.where.startswith("peer")])


def test_a_traced_swarm_gives_a_timeline_of_every_token(tmp_path):
    """The script end to end: peers and client trace into one directory; every segment is measured, the segments
    add up to the cycle, and time in one thread is never less than its CPU time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(trace.DIRECTORY_VARIABLE, None)
    # Its own process group: if it hangs, the peers it started are killed with it, not left behind.
    script = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "trace_steps.py"), "--tokens", "12", "--repeats", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        stdout, stderr = script.communicate(timeout=600)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.communicate()
    assert script.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["steps"] >= 10
    rows = {row["segment"]: row for row in result["segments"]}
    assert {"send_to_peer0", "peer0_layers", "push_to_peer1", "peer1_replies", "client_between_steps"} <= set(rows)
    # A sender's event comes after its write returns, so on a busy machine the receiver may note the frame first:
    # a hop alone may come out negative, never the hop with the sending segment before it.
    hops = {"send_to_peer0": "client_prepares", "push_to_peer1": "peer0_pushes", "reply_to_client": "peer1_replies"}
    for name, row in rows.items():
        if name in hops:
            assert row["wall_us"] + rows[hops[name]]["wall_us"] > 0, name
        else:
            assert row["wall_us"] > 0, name
    assert result["layers_us"] > 0 and result["rest_us"] > 0
    assert sum(row["wall_us"] for row in rows.values()) == pytest.approx(result["cycle_us"], rel=0.25)
    for row in rows.values():
        if row["cpu_us"] is not None:
            assert row["cpu_us"] <= row["wall_us"] * 1.05 + 20, row
    # the floor: local layers and step from hooks, three bare hops of each transport; the parts add up
    bound = result["floor"]
    assert 0 < bound["local_layers_us"] < bound["local_step_us"]
    assert bound["hops"] == 3 and min(bound["libp2p_hop_us"], bound["tls_hop_us"], bound["tcp_hop_us"]) > 0
    assert min(bound["peer0_blocks_hot_us"], bound["peer0_blocks_after_idle_us"]) > 0
    assert bound["glue_us"] + bound["bare_transport_us"] == pytest.approx(result["rest_us"], abs=0.2)
    parts = bound["compute_penalty_us"] + bound["bare_transport_us"] + bound["glue_us"]
    assert parts == pytest.approx(bound["overhead_us"], abs=0.5)
    assert bound["compute_penalty_layers_us"] == pytest.approx(result["layers_us"] - bound["local_layers_us"], abs=0.2)


def test_floor_splits_the_overhead_into_compute_penalty_transport_and_glue():
    result = {"cycle_us": 16500.0, "layers_us": 7000.0, "client_between_steps_us": 6500.0, "rest_us": 3000.0}
    bound = floor(
        result,
        local_us=12000.0,
        local_layers_us=6000.0,
        hop={"libp2p": 300.0, "tls": 150.0, "tcp": 80.0},
        hops=3,
        resume={"hot": 3000.0, "after_idle": 3400.0},
    )
    assert bound["local_step_us"] == 12000.0 and bound["overhead_us"] == 16500.0 - 12000.0
    assert bound["compute_penalty_layers_us"] == 1000.0  # the peers' layers against local's
    assert bound["compute_penalty_client_us"] == 500.0  # the client's work against local's rest of a token
    assert bound["compute_penalty_us"] == 1500.0
    assert bound["bare_transport_us"] == 900.0 and bound["glue_us"] == 2100.0
    assert bound["compute_penalty_us"] + bound["bare_transport_us"] + bound["glue_us"] == bound["overhead_us"]
    assert (bound["libp2p_hop_us"], bound["tls_hop_us"], bound["tcp_hop_us"]) == (300.0, 150.0, 80.0)
    assert (bound["peer0_blocks_hot_us"], bound["peer0_blocks_after_idle_us"]) == (3000.0, 3400.0)


def test_read_events_parses_what_event_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(trace, "DIRECTORY", str(tmp_path))
    trace.event(trace.place("peer", 0, 2), trace.ACCEPTED, 7)
    trace.event(trace.CLIENT, trace.STEP_CALLED)
    trace.flush()
    events = read_events(tmp_path)
    assert [(e.where, e.what, e.step, e.pid) for e in events] == [
        ("peer[0:2]", trace.ACCEPTED, 7, os.getpid()),
        (trace.CLIENT, trace.STEP_CALLED, -1, os.getpid()),
    ]
    assert events[0].ns <= events[1].ns
