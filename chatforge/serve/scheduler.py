"""Continuous batching for the server: one thread owns the Engine, requests reach it through a bounded queue.

The Engine is not thread-safe, so exactly one thread calls add_request/abort/step. HTTP handlers (on the asyncio
loop) hand work over through an inbox and receive Deltas back on an asyncio.Queue per job, fed with
loop.call_soon_threadsafe. Sequences join the running batch at the next token boundary, when the engine admits them
into a free slot, and leave it when they finish or are aborted; that is the engine's step() contract.

The bound counts sequences (a request with n=4 is four), running or waiting: when max_batch_size + max_queue of them
are outstanding, submit() refuses at once (the server answers 429) rather than letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from chatforge.errors import ChatforgeError


class QueueFull(Exception):
    """More sequences outstanding than the server accepts; the client should retry later."""


@dataclass
class Job:
    """One HTTP request: its choices (one engine request each) and the stream their Deltas arrive on."""

    prompts: list[list[int]]  # one prompt per choice (n choices of one prompt share the same list)
    params: list  # one SamplingParams per choice
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (choice index, Delta) | Exception | None (end)
    requests: list = field(default_factory=list)  # engine Requests; touched only by the engine thread
    open_choices: int = 0
    finished: bool = False  # set by the engine thread when all choices ended or the job was aborted

    def cached_tokens(self, per_prompt: int = 1) -> int:
        """Prompt tokens the prefix cache served, once per prompt (choices come `per_prompt` to a prompt, and only
        the first of them counts: usage counts a prompt once). Read after the job ended."""
        return sum(r.cached_tokens for r in self.requests[::per_prompt])

    def _emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone (server shutting down): nobody is listening
            pass

    async def batches(self) -> AsyncIterator[list[tuple[int, object]]]:
        """Lists of (choice index, Delta): whatever has arrived, so a reader that fell behind catches up in one
        write. Ends when every choice has finished; raises what the engine raised."""
        while True:
            batch, item = [], await self.events.get()
            while item is not None and not isinstance(item, BaseException):
                batch.append(item)
                if self.events.empty():
                    break
                item = self.events.get_nowait()
            if batch:
                yield batch
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item

    async def stream(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, Delta) pairs until every choice has finished; raises what the engine raised."""
        async for batch in self.batches():
            for item in batch:
                yield item


class Scheduler:
    """Owns an Engine in a background thread; the only way the server touches it."""

    def __init__(self, engine, max_batch_size: int, max_queue: int = 64):
        self.engine = engine
        self.capacity = max_batch_size + max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add" | "abort", Job) | None (stop)
        self._lock = threading.Lock()
        self._outstanding = 0  # sequences submitted and not yet finished or aborted
        self._thread: threading.Thread | None = None
        self._by_request: dict[int, tuple[Job, int]] = {}  # engine request id -> (job, choice); engine thread only
        self.peak_batch = 0  # the most sequences that produced a token in one step
        self.generated_tokens = 0
        self.steps = 0

    # -- called from the event loop ---------------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], params: list) -> Job:
        """Queue one sequence per (prompt, params) pair, or raise QueueFull without queueing any of them."""
        with self._lock:
            if self._outstanding + len(params) > self.capacity:
                raise QueueFull(f"the server is busy ({self._outstanding} sequences in progress, "
                                f"capacity {self.capacity}); retry later")
            self._outstanding += len(params)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chatforge-engine", daemon=True)
                self._thread.start()
        job = Job(list(prompts), list(params), asyncio.get_running_loop())
        self._inbox.put(("add", job))
        return job

    def abort(self, job: Job) -> None:
        """Stop generating for a job whose client went away; safe to call after it finished."""
        if not job.finished:
            self._inbox.put(("abort", job))

    @property
    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    # -- the engine thread ------------------------------------------------------------------------------------

    def _release(self, job: Job) -> None:
        if job.finished:
            return
        job.finished = True
        for r in job.requests:
            self._by_request.pop(r.id, None)
        with self._lock:
            self._outstanding -= len(job.params)

    def _handle(self, message) -> bool:
        if message is None:
            return False
        kind, job = message
        if kind == "add":
            try:
                for i, (prompt, p) in enumerate(zip(job.prompts, job.params)):
                    request = self.engine.add_request(prompt, p)
                    job.requests.append(request)
                    self._by_request[request.id] = (job, i)
                    job.open_choices += 1
            except ChatforgeError as e:  # the server validates first; this is the engine's own last word
                for r in job.requests:
                    self.engine.abort(r)
                self._release(job)
                job._emit(e)
        elif kind == "abort" and not job.finished:
            for r in job.requests:
                if not r.finished:
                    self.engine.abort(r)
            self._release(job)
            job._emit(None)
        return True

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                try:
                    busy = self.engine.has_work()
                    # Idle: sleep until something arrives. Busy: take what has arrived, then decode one token.
                    message = self._inbox.get() if not busy else self._next_nowait()
                    while message is not False:
                        if not self._handle(message):
                            return
                        message = self._next_nowait()
                    if self.engine.has_work():
                        self._step()
                except Exception as e:  # a bug in generation: fail the jobs in flight, keep serving the rest
                    for job, _ in list(self._by_request.values()):
                        if not job.finished:
                            for r in job.requests:
                                if not r.finished:
                                    self.engine.abort(r)
                            self._release(job)
                            job._emit(e)

    def _next_nowait(self):
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return False

    def _step(self) -> None:
        events = self.engine.step()
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len({r.id for r, _ in events}))
        # One hand-over per event loop per step, not one per token: each wakes the loop and takes the GIL.
        out: dict[asyncio.AbstractEventLoop, list] = {}
        for request, delta in events:
            entry = self._by_request.get(request.id)
            if entry is None:  # aborted in the meantime
                continue
            job, index = entry
            self.generated_tokens += len(delta.token_ids)
            items = out.setdefault(job.loop, [])
            items.append((job.events, (index, delta)))
            if delta.finish_reason is not None:
                job.open_choices -= 1
                if job.open_choices == 0:
                    self._release(job)
                    items.append((job.events, None))
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass


def _deliver(items: list) -> None:
    for events, item in items:
        events.put_nowait(item)
