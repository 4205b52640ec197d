"""LLMEngine, the engine core: add_request / step / abort_request. Owns the scheduler, the KV
block manager, the model runner (and TP workers) and the sampler, warms them up (warmup.py), and
orchestrates each step (schedule, launch the forward pass, sample, complete), async scheduling
keeping one step in flight; records every step. Prompts become Requests in the InputProcessor,
sampled tokens RequestOutputs in the OutputProcessor; neighbours read `stats()` and
`step_records()` (stats.py). A constrained request (structured outputs) waits outside the
scheduler until its grammar has compiled; its rows of the logits are masked before sampling."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from labkit.engine.executor import start_workers
from labkit.engine.input_processor import InputProcessor, RequestLimits, load_tokenizer
from labkit.engine.model_runner import ModelRunner, RankPlacement, SeqWork
from labkit.engine.output_processor import OutputProcessor
from labkit.engine.request import Request
from labkit.engine.resolved_config import ResolvedConfig
from labkit.engine.sampler import PendingSample, Sampler
from labkit.engine.scheduler import ScheduledBatch, Scheduler, launch_work
from labkit.engine.stats import EngineStats, StepHistory, step_record
from labkit.engine.structured_output import GrammarWaitlist, MaskFill, StructuredOutputManager
from labkit.engine.warmup import WarmupSummary, script, warm_up
from labkit.observe.labels import label_layers
from labkit.observe.step_log import StepRecord
from labkit.observe.timer import Marks
from labkit.outputs import RequestOutput
from labkit.sampling_params import SamplingParams
from labkit.transfer import to_device

log = logging.getLogger("labkit")


@dataclass(eq=False)
class _Step:
    """A launched engine step: its forward is queued (or done), its sampling maybe in flight."""

    batch: ScheduledBatch
    work: list[SeqWork]
    start: float  # time.time() when the launching call began
    logits: torch.Tensor | None  # all of the forward's, then only the rows to sample
    to_sample: list[Request] = field(default_factory=list)
    mask: MaskFill | None = None  # structured outputs: the rows' bitmask, filling
    sample: PendingSample | None = None
    marks: Marks = field(default_factory=list)
    call_ms: float | None = None  # wall time of the launching step() call
    prefix_queries: int = 0
    prefix_hits: int = 0


class LLMEngine:
    def __init__(self, config: ResolvedConfig):
        self.config = config
        tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
        self.workers = start_workers(config)
        placement = self.workers.rank0_placement() if self.workers else RankPlacement()
        try:
            self.runner = ModelRunner(config, placement)
            if self.workers:
                self.workers.wait_ready()
            self.input_processor = InputProcessor.from_config(
                config, tokenizer, self.runner.num_blocks, self.runner.device
            )
            self.structured = StructuredOutputManager(
                tokenizer, config.model_config.vocab_size, self.eos_token_ids, self.runner.device
            )
            self.timer = self.runner.timer
            self._closed = False
            self._start_fresh()
            if self.runner.device.type == "cuda":
                self.warm_up()
        except BaseException:  # the worker processes must not outlive a failed start
            if self.workers:
                self.workers.shutdown()
            raise

    def _start_fresh(self) -> None:
        """What runs change, new: no requests, steps or prefix cache; the seed's generator."""
        c = self.config
        self.scheduler = Scheduler.from_config(c, self.runner.num_blocks)
        self.block_manager = self.scheduler.bm
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, c.max_model_len)
        self.sampler = Sampler(c.seed, self.eos_token_ids, self.runner.device, self.runner.switches)
        self._compiling = GrammarWaitlist()
        self._history = StepHistory()
        self._inflight: _Step | None = None  # async scheduling: launched, not yet completed

    def warm_up(self) -> WarmupSummary:
        """warmup.py's script (CUDA start-up runs it), then a fresh start that leaves no trace."""
        summary = warm_up(self, script(self.config, self.runner.num_blocks), self.limits.vocab_size)
        self._start_fresh()
        return summary

    @property
    def tokenizer(self):
        return self.input_processor.tokenizer

    @property
    def limits(self) -> RequestLimits:
        return self.input_processor.limits

    @property
    def eos_token_ids(self) -> set[int]:
        return self.input_processor.eos_token_ids

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        return self.input_processor.tokenize(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.input_processor.validate(prompt_token_ids, params)
        if params.structured_outputs is not None:
            self.structured.validate(params.structured_outputs)

    def add_request(
        self,
        request_id: str | None,
        prompt,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        self.validate(ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.output_processor.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        seqs = self.input_processor.build_requests(
            request_id, text, ids, params, arrival_time or time.time(), priority
        )
        # Tracked first: should adding to the scheduler fail, abort_request finds every part.
        self.output_processor.add_request(request_id, seqs)
        so = params.structured_outputs
        for req in seqs:
            if so is None:
                self.scheduler.add(req)
            else:
                req.grammar = self.structured.state(so)
                self._compiling.add(req)
        self._admit_compiled()
        return request_id

    def abort_request(self, request_id: str) -> None:
        for req in self.output_processor.abort_request(request_id):
            self._compiling.discard(req)
            self.scheduler.finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None or bool(self._compiling)

    def _admit_compiled(self) -> None:
        """Hand the requests whose grammar has compiled to the scheduler (their rank is their
        arrival, so waiting did not cost them their place); a grammar that failed to compile
        ends its request."""
        if not self._compiling:
            return
        ready, failed = self._compiling.take_compiled()
        for req, err in failed:  # validated, so rare: it fails this request, not the engine
            self._fail_request(req, err)
        for req in ready:
            self.scheduler.add(req)

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def profile_labels(self):
        """A context in which this process's layers label their calls for torch.profiler."""
        return label_layers(self.runner.model)

    # ---- what neighbours read -------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_steps=self._history.num_steps,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._compiling),
            num_unfinished_requests=len(self.output_processor.requests),
            kv_blocks_used=self.block_manager.num_used,
            kv_blocks_total=self.block_manager.num_blocks,
            last_step=self._history.last,
        )

    def step_records(self, since: int = 0) -> list[StepRecord]:
        """The records of steps `since` and later (the most recent ones are kept: stats.py)."""
        return self._history.since(since)

    # ---- one step -------------------------------------------------------------------------
    # A step is launched (scheduled, its forward queued on the device, then sampled) and later
    # completed (its sampled tokens appended, stop checks, outputs, its step record). Without
    # async scheduling both happen in one `step()` call. With it, call n launches step n and then
    # completes step n-1, whose results the device has produced meanwhile: the host's work for
    # both runs while the device computes step n, and step n's inputs that step n-1 sampled are
    # taken from the device (`SeqWork.pending_row`). Sampling waits until step n-1 is
    # completed, so it sees every token so far (penalties, stop checks, finished requests);
    # step n's grammar masks start filling once step n-1's tokens are accepted.
    def step(self) -> list[RequestOutput]:
        call_start = time.time()
        prev, self._inflight = self._inflight, None
        queries, hits = self.scheduler.prefix_queries, self.scheduler.prefix_hits
        with self.timer.phase("schedule", host=True):
            self._admit_compiled()
            batch = self.scheduler.schedule()
        if not batch.work and prev is None:
            self.timer.take()
            if self._compiling and not self.scheduler.has_work():
                # Only grammars compiling: wait for one rather than spin.
                self._compiling.wait(timeout=0.05)
            self._fail_unschedulable()
            return self.output_processor.outputs(set())
        try:
            touched = self._run(batch, prev, call_start, (queries, hits))
        except Exception as e:
            touched = self._fail_step(e, batch, prev)
        outputs = self.output_processor.outputs(touched)
        if self._inflight is not None:
            self._inflight.call_ms = (time.time() - call_start) * 1e3
        return outputs

    def _run(
        self,
        batch: ScheduledBatch,
        prev: _Step | None,
        call_start: float,
        prefix_before: tuple[int, int],
    ) -> set[str]:
        """Launch `batch` (if any) and complete `prev` (if any), and `batch` too unless it stays
        in flight. Returns the parent ids whose requests were touched."""
        launched = None
        if batch.work:
            launched = self._launch(batch, call_start, prev)
            launched.prefix_queries = self.scheduler.prefix_queries - prefix_before[0]
            launched.prefix_hits = self.scheduler.prefix_hits - prefix_before[1]
        if launched is not None:
            self._take_rows(launched)
        front = self.timer.take()
        touched = self._complete(prev, launched) if prev is not None else set()
        if launched is not None:
            self._sample(launched)
            launched.marks = front + self.timer.take()
            if self.config.async_scheduling and self.scheduler.has_work():
                self._inflight = launched
            else:
                touched |= self._complete(launched)
        return touched

    def _fail_step(self, exc: Exception, batch: ScheduledBatch, prev: _Step | None) -> set[str]:
        """A step raised after scheduling: end the requests of that step (and of the one in
        flight) with finish_reason "error" and go on with the others. Re-raises when the engine's
        state cannot be trusted any more: with TP workers (a rank may be left inside a
        collective) or after a device error (the CUDA context is lost); the engine is dead."""
        device_error = isinstance(
            exc, getattr(torch, "AcceleratorError", ())
        ) or "CUDA error" in str(exc)
        if self.workers is not None or device_error:
            raise exc
        log.exception("an engine step failed; its requests end with an error")
        self._inflight = None
        self.timer.take()
        now = time.time()
        failed = [r for r, _ in batch.work] + ([r for r, _ in prev.batch.work] if prev else [])
        for r in failed:
            r.num_pending = 0
            if not r.finished:
                self.output_processor.fail(r, exc, now)
                self.scheduler.finish(r)
        return {r.parent_id for r in failed}

    def _fail_request(self, r: Request, exc: Exception) -> None:
        """End one request whose processing raised, alone."""
        log.error("request %s failed: %s: %s", r.request_id, type(exc).__name__, exc)
        self.output_processor.fail(r, exc, time.time())
        self.scheduler.finish(r)

    def _launch(self, batch: ScheduledBatch, call_start: float, prev: _Step | None) -> _Step:
        """Build the step's work, advance the requests' computed counts (the next schedule may
        run before this step completes) and queue the forward pass."""
        work = launch_work(batch, call_start)
        if self.workers:
            self.workers.call("execute", work)
        sampled = prev.sample.token_ids if prev is not None and prev.sample is not None else None
        logits = self.runner.execute(work, sampled)
        return _Step(batch, work, call_start, logits)

    def _take_rows(self, step: _Step) -> None:
        """Keep only the step's logits rows to sample (recording prompt logprobs)."""
        with self.timer.phase("sample"):
            step.logits, step.to_sample, failed = self.output_processor.split_logits(
                step.batch.work, step.work, step.logits
            )
        for r, e in failed:  # this request's prompt logprobs, not the engine's state
            self._fail_request(r, e)

    def _sample(self, step: _Step) -> None:
        """Queue sampling for the step's rows whose requests are still live (a request that
        finished or was aborted after the step was launched gets nothing)."""
        rows, to_sample = step.logits, step.to_sample
        step.logits = None
        if step.mask is None and any(r.grammar is not None for r in to_sample):
            step.mask = self.structured.start_fill(to_sample)  # every token so far accepted
        if step.mask is not None:  # rows of requests that ended since are masked, unused
            with self.timer.phase("structured", host=True):
                bitmask = step.mask.future.result()
            with self.timer.phase("structured"):
                self.structured.apply(rows, bitmask, step.mask.rows)
            step.mask = None
        with self.timer.phase("sample"):
            live = [i for i, r in enumerate(to_sample) if not r.finished]
            if len(live) < len(to_sample):
                to_sample = [to_sample[i] for i in live]
                rows = rows[to_device(live, torch.long, rows.device)] if live else None
        step.to_sample = to_sample
        if not to_sample:
            return
        with self.timer.phase("sample"):
            step.sample = self.sampler(rows, to_sample)
        for j, r in enumerate(to_sample):
            r.num_pending, r.pending_row = 1, j

    def _complete(self, step: _Step, next_step: _Step | None = None) -> set[str]:
        """Take the step's sampled tokens, run the stop checks, and record the step; the grammar
        masks of `next_step` (launched, not yet sampled) fill meanwhile. Returns the parent ids
        whose requests it touched."""
        # Waiting for the device's sampled ids is not postprocessing: outside the phase.
        result = step.sample.result() if step.sample is not None else None
        grammars = ([], [])
        if result is not None and any(r.grammar is not None for r in step.to_sample):
            with self.timer.phase("structured", host=True):
                grammars = self.structured.advance(step.to_sample, result.token_ids)
        if next_step is not None and any(r.grammar is not None for r in next_step.to_sample):
            with self.timer.phase("structured", host=True):
                next_step.mask = self.structured.start_fill(next_step.to_sample)
        with self.timer.phase("postprocess", host=True):
            now = time.time()
            for r, _ in step.batch.work:
                if not r.finished:
                    self.block_manager.commit(r)
            if result is not None:
                for r in self.output_processor.append_tokens(step.to_sample, result, now):
                    self.scheduler.finish(r)
        self._end_grammars(*grammars, now)
        ms = self.timer.resolve(step.marks + self.timer.take())
        batch = step.batch
        total = step.call_ms if step.call_ms is not None else (time.time() - step.start) * 1e3
        self._history.add(
            step_record(
                self._history.num_steps,
                step.start,
                ms,
                total,
                batch,
                self.scheduler,
                self.block_manager,
                (step.prefix_queries, step.prefix_hits),
            )
        )
        return {r.parent_id for r, _ in batch.work}

    def _end_grammars(self, ended: list[Request], broken: list[Request], now: float) -> None:
        """A sequence whose grammar has terminated (a stop token that ignore_eos kept going)
        ends with "stop", one whose token broke the grammar (nothing was allowed) with "error",
        unless its stop checks ended it first."""
        for r in ended:
            if not r.finished:
                self.output_processor.end(r, "stop", now)
                self.scheduler.finish(r)
        for r in broken:
            if not r.finished:
                self._fail_request(r, ValueError(f"token {r.token_ids[-1]} breaks the grammar"))

    def _fail_unschedulable(self) -> None:
        """Nothing could be scheduled although requests wait: the first one cannot fit even in
        an empty cache (it grew past the cache's size). End it rather than spin forever."""
        if self.scheduler.waiting and not self.scheduler.running:
            r = self.scheduler.waiting[0]
            self.output_processor.end(r, "length", time.time())
            self.scheduler.finish(r)

    # ---- life cycle -----------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.structured.shutdown()
        if self.workers:
            self.workers.shutdown()
        self.runner.close()
        self.runner = self.scheduler = self.block_manager = None
