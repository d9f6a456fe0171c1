"""Step tracing, for latency breakdowns of the decode path (scripts/trace_steps.py): off unless the environment
variable BLOCKSWARM_TRACE_DIR names a directory.

When on, each process (the client and every peer) appends one line per event to ``<dir>/<pid>.csv``:
``where,what,step,monotonic ns,thread CPU ns,thread id``. CLOCK_MONOTONIC is one clock for all the processes of a
machine, so the events of a client and its peers on one host line up into a timeline of each token; the thread CPU
time tells work from waiting between two events of one thread. Events are buffered and written in blocks (and at
exit), so a trace costs a few microseconds per event; call sites test ``ENABLED`` first, so tracing off costs one
attribute read.
"""

from __future__ import annotations

import atexit
import os
import threading
import time

DIRECTORY_VARIABLE = "BLOCKSWARM_TRACE_DIR"
DIRECTORY = os.environ.get(DIRECTORY_VARIABLE, "")
ENABLED = bool(DIRECTORY)
FLUSH_EVERY = 512  # events per write

# Event names, shared by the code that records them and the script that reads them.
CLIENT = "client"  # `where` of the client's main thread; a stream's events use place("client", start, end)
STEP_CALLED = "step_called"  # the client's main thread hands a step to the session
STEP_RETURNED = "step_returned"  # ... and has its output back
SENT = "sent"  # the client is about to encode and send a step to a stream
REPLY_READ = "reply_read"  # a stream's reader took a reply off the connection
OUTPUT = "output"  # the session has a stream's output (decoded, checked)
RECEIVED = "received"  # a peer's session took a request from its inbox (from the client or pushed)
PUSH_ARRIVED = "push_arrived"  # a peer's push handler read a pushed step
ACCEPTED = "accepted"  # the step is decoded and checked, its cache prepared
COMPUTE_BEGAN = "compute_began"  # the span's layers begin
COMPUTE_ENDED = "compute_ended"  # ... and end
COMPUTED = "computed"  # the session has the step's output
PUSHED = "pushed"  # the output went to the next peer
REPLIED = "replied"  # the reply went to the client

_lines: list[str] = []
_lock = threading.Lock()


def place(role: str, start: int, end: int) -> str:
    """`where` for a session's events: "peer[0:4]" on the peer serving blocks 0-3, "client[0:4]" for its stream."""
    return f"{role}[{start}:{end}]"


def enable(directory: str | os.PathLike) -> None:
    """Trace this process into `directory` from now on, and the processes it starts (through the environment)."""
    global DIRECTORY, ENABLED
    already = ENABLED
    DIRECTORY, ENABLED = str(directory), True
    os.environ[DIRECTORY_VARIABLE] = DIRECTORY
    if not already:
        atexit.register(flush)


def event(where: str, what: str, step: int | None = None) -> None:
    now, cpu, thread = time.monotonic_ns(), time.thread_time_ns(), threading.get_native_id()
    line = f"{where},{what},{-1 if step is None else step},{now},{cpu},{thread}\n"
    with _lock:
        _lines.append(line)
        if len(_lines) >= FLUSH_EVERY:
            _flush_locked()


def flush() -> None:
    with _lock:
        _flush_locked()


def _flush_locked() -> None:
    if not _lines:
        return
    os.makedirs(DIRECTORY, exist_ok=True)
    with open(os.path.join(DIRECTORY, f"{os.getpid()}.csv"), "a") as f:
        f.writelines(_lines)
    _lines.clear()


if ENABLED:
    atexit.register(flush)
