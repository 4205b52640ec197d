"""One engine loop for every HTTP connection: continuous batching across requests.

The engine is not thread-safe, so one thread owns it and is the only one to call it. The asyncio
side sends commands (add, abort, drain, stop) through a thread-safe queue; the engine thread
steps the engine and hands each HTTP request what its choices gained (the engine's DELTA outputs)
through that request's asyncio.Queue, fed with loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from labkit.engine.engine import LLMEngine
from labkit.entrypoints.server.errors import APIError
from labkit.observe.metrics import ServerMetrics
from labkit.outputs import Logprob, RequestOutput
from labkit.sampling_params import SamplingParams

log = logging.getLogger("labkit.server")


@dataclass
class ChoiceDelta:
    """What one choice gained in one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_logprobs: list | None = None  # on a choice's first delta, when asked for


@dataclass
class Update:
    choices: list[ChoiceDelta]
    finished: bool  # every choice of the HTTP request is done


_ACCEPTED = object()  # first item on a request's queue once the engine took it


@dataclass
class _Add:
    request_id: str
    prompts: list[dict]
    params: SamplingParams
    arrival_time: float
    priority: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Drain:
    deadline: float


_STOP = object()


@dataclass(eq=False)
class _Group:
    """One HTTP request: one engine request per prompt, each with params.n choices."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    pending: set[str] = field(default_factory=set)

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more


@dataclass(eq=False)
class _Tracked:
    """The engine thread's view of one engine request (one prompt, params.n choices)."""

    group: _Group
    base: int  # choice index of this prompt's first sequence
    started: list[bool]  # per choice: has it sent anything yet
    done: list[bool]  # per choice: has it sent its finish_reason
    last_token_time: list[float | None]
    first_token_seen: bool = False


class RequestHandle:
    """The asyncio side of one HTTP request. Iterate it for Updates; close() aborts the request
    unless it finished (a client that went away must not keep holding KV blocks)."""

    def __init__(self, engine_loop: EngineLoop, request_ids: list[str], q: asyncio.Queue):
        self._engine_loop = engine_loop
        self.request_ids = request_ids
        self.queue = q
        self.finished = False

    async def __aiter__(self):
        while not self.finished:
            item = await self.queue.get()
            if isinstance(item, APIError):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine_loop.abort(self.request_ids)


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self.error: str | None = None  # set when an engine step raised: the engine is dead
        self.draining = False
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._drain_deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="labkit-engine", daemon=True)
        self._stopped = False

    # ---- called from the asyncio thread ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def submit(
        self,
        request_id: str,
        prompts: list[dict],
        params: SamplingParams,
        arrival_time: float,
        priority: int = 0,
    ) -> RequestHandle:
        """Add one engine request per prompt (each a {"prompt", "prompt_token_ids"} dict);
        `params` must ask for RequestOutputKind.DELTA outputs. Raises ValueError (naming the
        field) when the engine refuses a prompt, APIError when the engine is dead or the server
        is shutting down."""
        self._check_open()
        q: asyncio.Queue = asyncio.Queue()
        handle = RequestHandle(self, [f"{request_id}-{k}" for k in range(len(prompts))], q)
        self._inbox.put(
            _Add(request_id, prompts, params, arrival_time, priority, asyncio.get_running_loop(), q)
        )
        try:
            first = await q.get()
        except asyncio.CancelledError:
            handle.close()  # the client left before the engine answered
            raise
        if first is not _ACCEPTED:
            handle.finished = True
            raise first
        return handle

    def _check_open(self) -> None:
        if self.error is not None:
            raise APIError(500, f"the engine has failed ({self.error}); restart the server")
        if self.draining or self._stopped:
            raise APIError(503, "the server is shutting down")

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(_Abort(request_ids))

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests; in-flight ones get `timeout_s` to finish, then end with an error.
        Safe to call from a signal handler (SimpleQueue.put is reentrant)."""
        self.draining = True
        self._inbox.put(_Drain(time.monotonic() + timeout_s))

    def stop(self) -> None:
        """End what is in flight, shut the engine down (TP workers exit) and join the thread."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join()
        else:
            self.engine.shutdown()

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                busy = self.error is None and self.engine.has_unfinished_requests()
                commands = self._take(block=not busy)
                if _STOP in commands:
                    return
                for cmd in commands:
                    self._handle(cmd)
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    self._fail_all(
                        APIError(503, "the server shut down before the request finished")
                    )
                if self.error is None and self.engine.has_unfinished_requests():
                    self._step()
                self._update_gauges()
        except BaseException:
            log.exception("the engine loop crashed")
            self.error = self.error or "the engine loop crashed"
        finally:
            self._fail_all(APIError(503, "the server shut down before the request finished"))
            try:
                self.engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")

    def _take(self, block: bool) -> list:
        commands = []
        try:
            commands.append(self._inbox.get(block=block))
            while True:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Add):
            self._add(cmd)
        elif isinstance(cmd, _Abort):
            for rid in cmd.request_ids:
                t = self._tracked.pop(rid, None)
                if t is not None:
                    t.group.pending.discard(rid)
                    self.engine.abort_request(rid)
                    self.metrics.finished("abort")
        elif isinstance(cmd, _Drain):
            self._drain_deadline = min(cmd.deadline, self._drain_deadline or cmd.deadline)

    def _add(self, cmd: _Add) -> None:
        group = _Group(cmd.loop, cmd.queue)
        if self.error is not None:
            group.post(APIError(500, f"the engine has failed ({self.error}); restart the server"))
            return
        if self._drain_deadline is not None:
            group.post(APIError(503, "the server is shutting down"))
            return
        params, n = cmd.params, cmd.params.n
        try:
            # Validate every prompt first: a bad one refuses the request without leaving the
            # other prompts of a batch in the engine.
            for p in cmd.prompts:
                self.engine.validate(p["prompt_token_ids"], params)
            for k, p in enumerate(cmd.prompts):
                rid = f"{cmd.request_id}-{k}"
                self.engine.add_request(
                    rid, p, params, arrival_time=cmd.arrival_time, priority=cmd.priority
                )
                self._tracked[rid] = _Tracked(group, k * n, [False] * n, [False] * n, [None] * n)
                group.pending.add(rid)
        except Exception as e:  # a ValueError is the client's (400); anything else is ours
            for rid in list(group.pending):
                self._tracked.pop(rid)
                self.engine.abort_request(rid)
            if not isinstance(e, ValueError):
                log.exception("adding request %s failed; the engine serves on", cmd.request_id)
                e = APIError(500, f"the request failed: {type(e).__name__}: {e}")
            group.post(e)
            return
        group.post(_ACCEPTED)

    def _step(self) -> None:
        steps_before = self.engine.stats().num_steps
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("an engine step failed; the engine is dead")
            self.error = f"{type(e).__name__}: {e}"
            self._fail_all(APIError(500, f"the engine failed: {self.error}"))
            return
        now = time.time()
        stats = self.engine.stats()
        if stats.num_steps > steps_before:  # a step that ran records itself last
            rec = stats.last_step
            self.metrics.observe(
                "iteration_tokens_total", rec.num_prefill_tokens + rec.num_decode_seqs
            )
            self.metrics.inc("num_preemptions", rec.num_preemptions)
            self.metrics.inc("prefix_cache_queries", rec.prefix_cache_queries)
            self.metrics.inc("prefix_cache_hits", rec.prefix_cache_hits)
        groups: dict[_Group, list[ChoiceDelta]] = {}
        failed: dict[_Group, str] = {}
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:
                continue
            if out.error is not None:
                failed[t.group] = out.error
            groups.setdefault(t.group, []).extend(self._deltas(out, t, now))
        for group, error in failed.items():
            # One failed prompt fails its HTTP request; the other prompts of it end too.
            for rid in list(group.pending):
                del self._tracked[rid]
                self.engine.abort_request(rid)
            group.pending.clear()
            groups.pop(group)
            group.post(APIError(500, f"the request failed: {error}; the server serves on"))
        for group, deltas in groups.items():
            group.post(Update(deltas, finished=not group.pending))

    def _deltas(self, out: RequestOutput, t: _Tracked, now: float) -> list[ChoiceDelta]:
        m = out.metrics
        if not t.first_token_seen and m is not None and m.first_token_time is not None:
            t.first_token_seen = True
            self.metrics.inc("prompt_tokens", len(out.prompt_token_ids))
            self.metrics.observe("time_to_first_token_seconds", m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.metrics.observe(
                    "request_queue_time_seconds", m.first_scheduled_time - m.arrival_time
                )
                self.metrics.observe(
                    "request_prefill_time_seconds", m.first_token_time - m.first_scheduled_time
                )
        deltas = []
        for c in out.outputs:  # DELTA outputs: only what is new since the last step
            i = c.index
            if t.done[i] or not (c.text or c.token_ids or c.finish_reason):
                continue
            if c.token_ids:
                self.metrics.inc("generation_tokens", len(c.token_ids))
                if t.last_token_time[i] is not None:
                    self.metrics.observe(
                        "time_per_output_token_seconds",
                        (now - t.last_token_time[i]) / len(c.token_ids),
                        len(c.token_ids),
                    )
                t.last_token_time[i] = now
            prompt_logprobs = None if t.started[i] else out.prompt_logprobs
            t.started[i], t.done[i] = True, c.finish_reason is not None
            deltas.append(
                ChoiceDelta(
                    t.base + i,
                    c.text,
                    c.token_ids,
                    c.logprobs,
                    c.finish_reason,
                    c.stop_reason,
                    prompt_logprobs,
                )
            )
        if out.finished:
            del self._tracked[out.request_id]
            t.group.pending.discard(out.request_id)
            self.metrics.finished(out.outputs[0].finish_reason or "stop")
            if m is not None:
                self.metrics.observe("e2e_request_latency_seconds", now - m.arrival_time)
                if m.first_token_time is not None:
                    self.metrics.observe("request_decode_time_seconds", now - m.first_token_time)
        return deltas

    def _fail_all(self, err: APIError) -> None:
        """End every in-flight request with `err` and free its KV blocks."""
        groups = {t.group for t in self._tracked.values()}
        for rid in list(self._tracked):
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.exception("aborting %s failed", rid)
        self._tracked.clear()
        for group in groups:
            group.pending.clear()
            group.post(err)

    def _update_gauges(self) -> None:
        stats = self.engine.stats()
        self.metrics.set_gauges(stats.num_running, stats.num_waiting, stats.kv_cache_usage)
