"""What the peer computes next: iteration-level scheduling of session steps into batches, one computation at a time.

Each iteration runs either one batch of session steps that are ready now (blocks.batching: the sessions' tokens
share every matrix product, attention stays per session) or one solo job (a whole-sequence forward, a training
call, a step of a session with adapters). A session's step waits only for the batch it is in, never for another
session's generation. What runs next is fair across clients (``FairShare``: a client sending small steps is
not kept behind another client's flood of large forwards), and batches are filled fairly (``select_batch``):
round robin over clients, each client held to a share of the batch's tokens while others wait. Small computations
run on the event loop, where a hand-off to a thread costs more than the step (a lone session's small step without
even a turn through the queue); larger ones, and every batch while
other sessions are open, run on the compute thread so that the loop keeps reading the next steps meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_arrivals = itertools.count()


@dataclass(frozen=True)
class BatchSettings:
    """The batching limits of a peer (from PeerConfig)."""

    max_batch_tokens: int = 512  # tokens (batch x length) of all steps in one batch
    max_batch_sessions: int = 32  # sessions in one batch; 1 turns batching off
    # Seconds a batch may wait for the steps of other open sessions, at most a quarter of the last batch's compute
    # time; never when the step's session is the only one open (0: never waits).
    batch_wait: float = 0.05
    client_share: float = 0.5  # most of a batch's tokens one client may take while other clients' steps wait
    prefill_chunk_tokens: int = 256  # a longer step is cut into chunks of this many tokens, other steps in between
    inline_tokens: int = 16  # at most this many tokens run on the event loop when nothing else is pending


@dataclass(frozen=True)
class Candidate:
    """A ready step as the batch selection sees it."""

    client: str
    group: Any  # steps of one batch must share it (blocks served, dtype)
    tokens: int


def select_batch(candidates: list[Candidate], settings: BatchSettings) -> list[int]:
    """Indices of the ready steps (in arrival order) that form the next batch.

    Rules: the first step (the scheduler puts the one FairShare picked first, the others follow in arrival order)
    always runs, and decides the group; only steps of its group join. Clients take turns
    (round robin in the order they first appear), one step per turn, while the batch has room for the step's tokens
    (max_batch_tokens) and another session (max_batch_sessions). While another client still has a step of the
    group waiting, a client stops at client_share x max_batch_tokens, so one client cannot fill every batch.
    """
    if not candidates:
        return []
    group = candidates[0].group
    queues: dict[str, collections.deque[int]] = {}
    for i, c in enumerate(candidates):
        if c.group == group:
            queues.setdefault(c.client, collections.deque()).append(i)
    chosen = [queues[candidates[0].client].popleft()]
    tokens = candidates[0].tokens
    taken = collections.Counter({candidates[0].client: tokens})
    share = settings.client_share * settings.max_batch_tokens
    progress = True
    while progress and len(chosen) < settings.max_batch_sessions:
        progress = False
        for client, queue in queues.items():
            if not queue or len(chosen) >= settings.max_batch_sessions:
                continue
            i = queue[0]
            others_waiting = any(q for other, q in queues.items() if other != client)
            if tokens + candidates[i].tokens > settings.max_batch_tokens:
                continue
            if others_waiting and taken[client] + candidates[i].tokens > share:
                continue
            queue.popleft()
            chosen.append(i)
            tokens += candidates[i].tokens
            taken[client] += candidates[i].tokens
            progress = True
    return sorted(chosen)


class FairShare:
    """Start-time fair queuing over clients: which client's work runs next, so that each client with work waiting
    gets an equal share of the compute whatever the others send.

    Work is measured in cost units (tokens, weighted by kind). Each client has a finish tag: the virtual time at
    which the work it was given so far ends; `now` is the start tag of the work picked last. A client that had
    nothing waiting starts at `now` (idle time earns no credit). The next work is the oldest of the client whose
    next piece would finish first (start tag + its cost), so a client sending small steps goes ahead of one whose
    next piece is a large forward, and waits at most for the piece being computed."""

    def __init__(self) -> None:
        self.now = 0.0
        self._finish: dict[str, float] = {}

    def start_tag(self, client: str) -> float:
        return max(self._finish.get(client, 0.0), self.now)

    def pick(self, jobs: list[tuple[str, float]]) -> int:
        """Index (into `jobs`: (client, cost) in arrival order) of the work to run next."""
        oldest: dict[str, int] = {}
        for i, (client, _) in enumerate(jobs):
            oldest.setdefault(client, i)
        return min(oldest.values(), key=lambda i: (self.start_tag(jobs[i][0]) + jobs[i][1], i))

    def charge(self, costs: dict[str, float]) -> None:
        """The work just picked: `costs` per client (one client, or the clients of a batch)."""
        starts = {client: self.start_tag(client) for client in costs}
        self.now = max(self.now, min(starts.values()))
        for client, cost in costs.items():
            self._finish[client] = starts[client] + cost
        for client in [c for c, f in self._finish.items() if f <= self.now]:
            del self._finish[client]  # behind virtual time: it would start at `now` anyway

    @property
    def clients(self) -> int:
        return len(self._finish)


@dataclass
class _Job:
    client: str
    tokens: int
    future: asyncio.Future | None  # None: run at once, never queued (ComputeScheduler._step_now)
    check: Callable[[], None] | None
    arrival: int = field(default_factory=lambda: next(_arrivals))
    cost: float = 0.0  # in FairShare's units; 0: the tokens


@dataclass
class _Step(_Job):
    group: Any = None
    prepare: Callable[[], Any] | None = None  # on the compute thread, just before the batch: -> its batch input
    session: Any = None  # whose step (None: a forward, which has no next step)


@dataclass
class _Solo(_Job):
    fn: Callable[[], Any] | None = None


class ComputeScheduler:
    """Runs the peer's computations one at a time, steps of sessions batched (see the module docstring)."""

    def __init__(self, settings: BatchSettings, run_batch: Callable[[list[Any]], list[Any]]):
        self.settings = settings
        self._run_batch = run_batch  # batch inputs (from each step's prepare) -> each step's result
        self.compute_seconds = 0.0
        self.batches = 0
        self.batched_steps = 0
        self.last_batch_sessions = 0
        self.last_batch_tokens = 0
        self.open_sessions: Callable[[], int] = lambda: 1  # set by the service: inline only when alone
        self._pending: list[_Job] = []
        self._ready = asyncio.Event()
        self._arrived = asyncio.Event()
        self._last_compute = 0.0  # seconds the last computation took
        self._returns = ReturnTimes()
        self._worker: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # held while computing, and by exclusive()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.fair = FairShare()

    @property
    def queue_length(self) -> int:
        return sum(not job.future.done() for job in self._pending)

    async def run(
        self,
        fn: Callable[[], T],
        tokens: int,
        check: Callable[[], None] | None = None,
        client: str = "",
        cost: float = 0.0,
    ):
        """`fn()` alone, when its turn comes; `check()` runs first, when the turn has come (e.g. to refuse work for
        blocks the peer stopped serving while the request waited). `cost` (default: `tokens`) is what the work
        counts for `client`'s fair share (e.g. a backward costs about three forwards of its tokens)."""
        return await self._submit(_Solo(client, tokens, self._new_future(), check, cost=cost or tokens, fn=fn))

    async def step(
        self,
        prepare: Callable[[], Any],
        tokens: int,
        group: Any,
        client: str,
        check: Callable[[], None] | None = None,
        session: Any = None,
    ) -> Any:
        """A step that may share a batch with other steps of `group`: `prepare()` gives its batch input (run_batch's
        element) and runs right before the batch, on the compute thread. `session` (hashable) names the session
        whose steps these are, so that the scheduler learns how soon its next step comes back."""
        if session is not None:
            self._returns.arrived(session)
        if not self._lock.locked() and self._alone(tokens):  # nothing runs now either: no need to queue
            return self._step_now(prepare, tokens, client, check, session)
        job = _Step(client, tokens, self._new_future(), check, cost=tokens, group=group, prepare=prepare)
        job.session = session
        return await self._submit(job)

    def _alone(self, tokens: int) -> bool:
        """Work of `tokens` tokens may run inline, on the loop: nothing else waits, one session is open, it is small."""
        return not self._pending and self.open_sessions() <= 1 and tokens <= self.settings.inline_tokens

    def _step_now(
        self, prepare: Callable[[], Any], tokens: int, client: str, check: Callable[[], None] | None, session: Any
    ) -> Any:
        """A lone session's step, without the queue: what _submit, _work and _execute would do for it (the check,
        the fair-share charge, the batch of one, the return time), minus the future and the worker task's turns
        of the event loop (~0.2 ms per step in a peer whose caches the layers just flushed; scripts/trace_steps.py).
        """
        if check is not None:
            check()
        self.fair.charge({client: tokens})
        try:
            result = self._compute([_Step(client, tokens, None, None, cost=tokens, prepare=prepare)])[0]
        finally:
            if session is not None:
                self._returns.finished(session)
        if isinstance(result, BaseException):
            raise result
        return result

    def forget(self, session: Any) -> None:
        """The session ended."""
        self._returns.forget(session)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """No computation runs while the block is open (e.g. while the peer swaps its blocks)."""
        async with self._lock:
            yield

    def _new_future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, job: _Job) -> Any:
        self._pending.append(job)
        self._ready.set()
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await job.future

    async def _work(self) -> None:
        while True:
            await self._ready.wait()
            self._pending = [job for job in self._pending if not job.future.done()]  # cancelled: its client left
            if not self._pending:
                self._ready.clear()
                continue
            await self._wait_for_company()
            jobs = self._next_jobs()
            for job in jobs:
                self._pending.remove(job)
            async with self._lock:
                await self._execute(jobs)
            await asyncio.sleep(0)  # let steps that arrived meanwhile be read before the next choice

    async def _wait_for_company(self) -> None:
        """Let the steps of sessions that are due back now join the batch: without it, sessions that start a step
        during another batch settle into alternating half-full batches. Only sessions expected within the wait are
        waited for (from how long each took to come back before), so a session busy on another peer of its route
        is not waited for and pipelining across peers is kept. Bounded by batch_wait and by a quarter of the last
        batch's compute time, so waiting never costs more than a fraction of a step."""
        if not isinstance(self._lead(), _Step):
            return
        deadline = time.monotonic() + min(self.settings.batch_wait, 0.25 * self._last_compute)
        while True:
            pending = {job.session for job in self._pending if isinstance(job, _Step)}
            if not self._returns.due_by(deadline) - pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _lead(self) -> _Job:
        """The job that runs next (FairShare over clients); a step leads a batch of its group."""
        return self._pending[self.fair.pick([(job.client, job.cost) for job in self._pending])]

    def _next_jobs(self) -> list[_Job]:
        lead = self._lead()
        if isinstance(lead, _Solo) or self.settings.max_batch_sessions <= 1:
            jobs = [lead]
        else:
            steps = [lead] + [job for job in self._pending if isinstance(job, _Step) and job is not lead]
            candidates = [Candidate(job.client, job.group, job.tokens) for job in steps]
            jobs = [steps[i] for i in select_batch(candidates, self.settings)]
        costs: collections.Counter[str] = collections.Counter()
        for job in jobs:
            costs[job.client] += job.cost
        self.fair.charge(costs)
        return jobs

    async def _execute(self, jobs: list[_Job]) -> None:
        runnable = []
        for job in jobs:
            try:
                if job.check is not None:
                    job.check()
                runnable.append(job)
            except Exception as e:  # this job's own problem: the others still run
                if not job.future.done():
                    job.future.set_exception(e)
        if not runnable:
            return
        tokens = sum(job.tokens for job in runnable)
        work = functools.partial(self._compute, runnable)
        try:
            if len(runnable) == 1 and self._alone(tokens):
                results = work()
            else:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except Exception as e:
            results = [e] * len(runnable)
        for job, result in zip(runnable, results, strict=True):
            if isinstance(job, _Step) and job.session is not None:
                self._returns.finished(job.session)
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _compute(self, jobs: list[_Job]) -> list[Any]:
        """On the compute thread (or inline): the jobs' results, or the exception each raised."""
        began = time.perf_counter()
        try:
            if isinstance(jobs[0], _Solo):
                try:
                    return [jobs[0].fn()]
                except Exception as e:
                    return [e]
            inputs, results, ok = [], [None] * len(jobs), []
            for i, job in enumerate(jobs):
                try:
                    inputs.append(job.prepare())
                    ok.append(i)
                except Exception as e:  # e.g. a session whose cache no longer fits its position
                    results[i] = e
            if ok:
                with torch.inference_mode():
                    outputs = self._run_batch(inputs)
                for i, out in zip(ok, outputs, strict=True):
                    results[i] = out
                self.batches += 1
                self.batched_steps += len(ok)
                self.last_batch_sessions = len(ok)
                self.last_batch_tokens = sum(jobs[i].tokens for i in ok)
            return results
        finally:
            self._last_compute = time.perf_counter() - began
            self.compute_seconds += self._last_compute

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)


class ReturnTimes:
    """For each session: when its last step finished here, and how long its next step usually takes to come back
    (the client's turn, and the rest of its route): a moving average of the gaps seen."""

    SMOOTHING = 0.3

    def __init__(self) -> None:
        self._finished: dict[Any, float] = {}
        self._gap: dict[Any, float] = {}

    def finished(self, session: Any) -> None:
        self._finished[session] = time.monotonic()

    def arrived(self, session: Any) -> None:
        finished = self._finished.pop(session, None)
        if finished is not None:
            gap = time.monotonic() - finished
            previous = self._gap.get(session)
            self._gap[session] = gap if previous is None else (1 - self.SMOOTHING) * previous + self.SMOOTHING * gap

    def due_by(self, deadline: float) -> set[Any]:
        """Sessions whose next step is expected by `deadline` (monotonic time)."""
        return {s for s, t in self._finished.items() if s in self._gap and t + self._gap[s] <= deadline}

    def forget(self, session: Any) -> None:
        self._finished.pop(session, None)
        self._gap.pop(session, None)
