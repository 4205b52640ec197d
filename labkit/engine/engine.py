"""LLMEngine: add_request / step / abort_request. Owns the scheduler, the KV block manager, the
model runner (and TP workers), the sampler and the per-step log."""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit.config import EngineConfig
from labkit.engine.block_manager import BlockManager
from labkit.engine.detokenizer import IncrementalDetokenizer
from labkit.engine.model_runner import ModelRunner, SeqWork
from labkit.engine.request import Request
from labkit.engine.sampler import PendingSample, SampleResult, Sampler
from labkit.engine.scheduler import ScheduledBatch, Scheduler
from labkit.engine.workers import WorkerGroup
from labkit.observe.labels import label_layers
from labkit.observe.step_log import StepRecord
from labkit.observe.timer import Marks
from labkit.outputs import CompletionOutput, Logprob, RequestOutput
from labkit.sampling_params import RequestOutputKind, SamplingParams
from labkit.transfer import to_device

log = logging.getLogger("labkit")

MAX_STEP_RECORDS = 200_000


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(config: EngineConfig):
    """The checkpoint's tokenizer (or `tokenizer=`). A directory with no tokenizer files, such as
    a lone config.json for `load_format="dummy"`, runs without one: token-id prompts only."""
    path = Path(config.tokenizer or config.model_dir)
    if config.tokenizer is None and not any((path / f).exists() for f in TOKENIZER_FILES):
        log.info("no tokenizer files in %s: running without a tokenizer (token-id prompts only)", path)
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _eos_ids(config: EngineConfig, tokenizer) -> set[int]:
    ids = set(config.model_config.eos_token_id)
    gen = config.model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass(eq=False)
class _Step:
    """A launched engine step: its forward is queued (or done), its sampling maybe in flight."""
    batch: ScheduledBatch
    work: list[SeqWork]
    start: float                               # time.time() when the launching call began
    logits: torch.Tensor | None
    to_sample: list[Request] = field(default_factory=list)
    sample: PendingSample | None = None
    marks: Marks = field(default_factory=list)
    call_ms: float | None = None               # wall time of the launching step() call
    prefix_queries: int = 0
    prefix_hits: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
        self.workers = WorkerGroup(config) if config.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(config, 0, self.workers.port if self.workers else 0)
            if self.workers:
                self.workers.wait_ready()
        except BaseException:
            if self.workers:
                self.workers.shutdown()
            raise
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill,
                                   config.scheduling_policy, config.max_model_len)
        self.eos_token_ids = _eos_ids(config, self.tokenizer)
        self.sampler = Sampler(config.seed, self.eos_token_ids, self.runner.device)
        self.requests: dict[str, list[Request]] = {}   # parent id -> its n sequences
        # The most recent steps (a server runs for days); `num_steps` counts them all.
        self.step_records: deque[StepRecord] = deque(maxlen=MAX_STEP_RECORDS)
        self.num_steps = 0
        self._finished_parents: set[str] = set()
        self._inflight: _Step | None = None   # async scheduling: launched, not yet completed
        self.timer = self.runner.timer
        self._closed = False

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer and this engine has none "
                                 "(skip_tokenizer_init=True, or no tokenizer files in the model "
                                 "directory): pass token ids or tokenizer=<path>")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt: expected a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        vocab = self.config.model_config.vocab_size
        if n == 0:
            raise ValueError("prompt: the prompt is empty; give at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids: every id must be an integer in [0, {vocab})")
        max_len = self.config.max_model_len
        if n >= max_len:
            raise ValueError(f"prompt: the prompt has {n} tokens; max_model_len is {max_len}, "
                             "so it must be shorter than that to leave room for an output token")
        blocks = -(-(n + 1) // self.config.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"prompt: {n} tokens need {blocks} KV blocks but the cache holds "
                             f"{self.block_manager.num_blocks}; raise the KV cache size")
        for name, k in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if k is not None and k > vocab:
                raise ValueError(f"{name}={k} is invalid: must be at most the vocabulary size ({vocab})")
        for name, ids in (("allowed_token_ids", params.allowed_token_ids or []),
                          ("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", list(params.logit_bias or {}))):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name}: every token id must be in [0, {vocab})")

    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> str:
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        self.validate(ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        arrival = arrival_time or time.time()
        bad_words = self._bad_words_ids(params.bad_words or [])
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            req = Request(f"{request_id}-{i}" if params.n > 1 else request_id, request_id, i,
                          text, ids, params, priority, arrival, generator=gen)
            req.bad_words_token_ids = bad_words
            if params.prompt_logprobs is not None:
                req.skip_prefix_cache = True   # cached positions would have no logits
                req.prompt_logprobs = [None]
            if self.tokenizer is not None:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            seqs.append(req)
            self.scheduler.add(req)
        self.requests[request_id] = seqs
        return request_id

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        if words and self.tokenizer is None:
            raise ValueError("bad_words: needs a tokenizer (skip_tokenizer_init=True)")
        seqs = []
        for w in words:  # as vLLM: the word alone and after a space, which BPE tokenizes apart
            for variant in (w, " " + w.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def abort_request(self, request_id: str) -> None:
        for req in self.requests.pop(request_id, []):
            if not req.finished:
                req.finish_reason = "abort"
                self.scheduler.finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def profile_labels(self):
        """A context in which this process's model layers label their calls for
        torch.profiler (labkit.observe.labels)."""
        return label_layers(self.runner.model)

    # ---- one step -------------------------------------------------------------------------
    # A step is launched (scheduled, its forward queued on the device, then sampled) and later
    # completed (its sampled tokens appended, stop checks, outputs, its step record). Without
    # async scheduling both happen in one `step()` call. With it, call n launches step n and then
    # completes step n-1, whose results the device has produced meanwhile: the host's work for
    # both runs while the device computes step n, and step n's inputs that step n-1 sampled are
    # taken from the device (`SeqWork.pending_row`). Sampling waits until step n-1 is
    # completed, so it sees every token so far (penalties, stop checks, finished requests).
    def step(self) -> list[RequestOutput]:
        call_start = time.time()
        prev, self._inflight = self._inflight, None
        queries, hits = self.scheduler.prefix_queries, self.scheduler.prefix_hits
        with self.timer.phase("schedule", host=True):
            batch = self.scheduler.schedule()
        if not batch.work and prev is None:
            self.timer.take()
            self._fail_unschedulable()
            return self._outputs(self._drain_finished())
        launched = None
        if batch.work:
            launched = self._launch(batch, call_start, prev)
            launched.prefix_queries = self.scheduler.prefix_queries - queries
            launched.prefix_hits = self.scheduler.prefix_hits - hits
        front = self.timer.take()
        touched = self._complete(prev) if prev is not None else set()
        if launched is not None:
            with self.timer.phase("sample"):
                self._sample(launched)
            launched.marks = front + self.timer.take()
            if self.config.async_scheduling and self.scheduler.has_work():
                self._inflight = launched
            else:
                touched |= self._complete(launched)
        outputs = self._outputs(touched | self._drain_finished())
        if self._inflight is not None:
            self._inflight.call_ms = (time.time() - call_start) * 1e3
        return outputs

    def _launch(self, batch: ScheduledBatch, call_start: float, prev: "_Step | None") -> "_Step":
        """Build the step's work, advance the requests' computed counts (the next schedule may
        run before this step completes) and queue the forward pass."""
        # The block tables are read (or pickled to the TP workers) within this call, before the
        # scheduler touches them again: no copies.
        work = []
        for r, n in batch.work:
            c = r.num_computed_tokens
            ids = r.token_ids[c:c + n]
            pending_row = -1
            if len(ids) < n:   # the last input token was sampled last step: still on the device
                ids.append(0)
                pending_row = r.pending_row
            work.append(SeqWork(ids, c, r.block_table, sample=c + n == r.num_tokens + r.num_pending,
                                all_logits=r.prompt_logprobs is not None and c < r.num_prompt_tokens,
                                pending_row=pending_row))
            r.num_computed_tokens = c + n
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = call_start
                r.metrics.time_in_queue = call_start - r.metrics.arrival_time
        if self.workers:
            self.workers.call("execute", work)
        sampled = prev.sample.token_ids if prev is not None and prev.sample is not None else None
        logits = self.runner.execute(work, sampled)
        return _Step(batch, work, call_start, logits)

    def _sample(self, step: "_Step") -> None:
        """Queue sampling for the step's rows whose requests are still live (a request that
        finished or was aborted after the step was launched gets nothing)."""
        rows, to_sample = self._split_logits(step.batch.work, step.work, step.logits)
        step.logits = None
        live = [i for i, r in enumerate(to_sample) if not r.finished]
        if len(live) < len(to_sample):
            to_sample = [to_sample[i] for i in live]
            rows = rows[to_device(live, torch.long, rows.device)] if live else None
        if not to_sample:
            return
        step.to_sample = to_sample
        step.sample = self.sampler(rows, to_sample)
        for j, r in enumerate(to_sample):
            r.num_pending, r.pending_row = 1, j

    def _complete(self, step: "_Step") -> set[str]:
        """Take the step's sampled tokens, run the stop checks, and record the step. Returns
        the parent ids whose requests it touched."""
        # Waiting for the device's sampled ids is not postprocessing: outside the phase.
        result = step.sample.result() if step.sample is not None else None
        with self.timer.phase("postprocess", host=True):
            now = time.time()
            for r, _ in step.batch.work:
                if not r.finished:
                    self.block_manager.commit(r)
            if result is not None:
                self._append_tokens(step.to_sample, result, now)
        ms = self.timer.resolve(step.marks + self.timer.take())
        batch = step.batch
        total = step.call_ms if step.call_ms is not None else (time.time() - step.start) * 1e3
        self.step_records.append(StepRecord(
            step=self.num_steps, start_time=step.start,
            schedule_ms=ms.get("schedule", 0.0), prepare_ms=ms.get("prepare", 0.0),
            forward_ms=ms.get("forward", 0.0), sample_ms=ms.get("sample", 0.0),
            postprocess_ms=ms.get("postprocess", 0.0), total_ms=total,
            num_prefill_tokens=batch.num_prefill_tokens,
            num_prefill_seqs=len(batch.work) - batch.num_decode, num_decode_seqs=batch.num_decode,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.block_manager.num_used, kv_blocks_free=self.block_manager.num_free,
            num_preemptions=batch.num_preempted,
            prefix_cache_queries=step.prefix_queries, prefix_cache_hits=step.prefix_hits))
        self.num_steps += 1
        return {r.parent_id for r, _ in batch.work}

    def _split_logits(self, scheduled, work: list[SeqWork], logits):
        """Rows for the sampler, and prompt logprobs recorded from `all_logits` rows."""
        rows, to_sample, at = [], [], 0
        for (r, n), w in zip(scheduled, work):
            if w.all_logits:
                self._record_prompt_logprobs(r, w, logits[at:at + n])
                at += n
                if w.sample:
                    rows.append(at - 1)
                    to_sample.append(r)
            elif w.sample:
                rows.append(at)
                to_sample.append(r)
                at += 1
        if not to_sample:
            return None, to_sample
        if rows == list(range(logits.shape[0])):   # the usual case: every row, in order
            return logits, to_sample
        return logits[to_device(rows, torch.long, logits.device)], to_sample

    def _record_prompt_logprobs(self, r: Request, w: SeqWork, logits: torch.Tensor) -> None:
        # Row i predicts the token after it; only rows whose next token is a prompt token count.
        nxt = r.token_ids[w.start_pos + 1:min(w.start_pos + len(w.token_ids) + 1, r.num_prompt_tokens)]
        if not nxt:
            return
        lps = logits[: len(nxt)].float().log_softmax(-1).cpu()
        k = r.params.prompt_logprobs
        chosen = lps.gather(-1, torch.tensor(nxt)[:, None])[:, 0]
        top = lps.topk(k) if k else None
        for i, tok in enumerate(nxt):
            rank = int((lps[i] > chosen[i]).sum()) + 1
            entry = {tok: Logprob(chosen[i].item(), rank, self._token_text(tok))}
            if top is not None:
                for j, (tid, lp) in enumerate(zip(top.indices[i].tolist(), top.values[i].tolist()), 1):
                    entry.setdefault(tid, Logprob(lp, j, self._token_text(tid)))
            r.prompt_logprobs.append(entry)

    def _append_tokens(self, reqs: list[Request], result: SampleResult, now: float) -> None:
        for i, r in enumerate(reqs):
            r.num_pending = 0
            if r.finished:   # aborted while its step was in flight
                continue
            tok = result.token_ids[i]
            r.token_ids.append(tok)
            r.cumulative_logprob += result.logprobs[i]
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = now
            r.metrics.last_token_time = now
            if r.output_logprobs is not None:
                entry = {tok: Logprob(result.logprobs[i], result.ranks[i], self._token_text(tok))}
                for rank, (tid, lp) in enumerate(result.top_logprobs[i], start=1):
                    entry.setdefault(tid, Logprob(lp, rank, self._token_text(tid)))
                r.output_logprobs.append(entry)
            self._check_stop_token(r, tok)
            # As vLLM V1: a stop token's (or EOS's) text stays out unless asked for.
            if r.detokenizer is not None and (r.finish_reason is None or r.params.include_stop_str_in_output):
                r.output_text += r.detokenizer.step(tok)
            if r.finish_reason is None:
                self._check_stop_text(r)
            if r.finish_reason is not None:
                r.metrics.finished_time = now
                self._finish(r)

    def _token_text(self, tok: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([tok])

    def _check_stop_token(self, r: Request, tok: int) -> None:
        p = r.params
        if r.num_output_tokens < p.min_tokens:
            return
        if tok in p.stop_token_ids:
            r.finish_reason, r.stop_reason = "stop", tok
        elif not p.ignore_eos and tok in self.eos_token_ids:
            r.finish_reason = "stop"

    def _check_stop_text(self, r: Request) -> None:
        p = r.params
        if r.num_output_tokens >= p.min_tokens:
            for s in p.stop:
                at = r.output_text.find(s)
                if at != -1:
                    r.output_text = r.output_text[: at + (len(s) if p.include_stop_str_in_output else 0)]
                    r.finish_reason, r.stop_reason = "stop", s
                    return
        if (p.max_tokens is not None and r.num_output_tokens >= p.max_tokens) \
                or r.num_tokens >= self.config.max_model_len:
            r.finish_reason = "length"

    def _fail_unschedulable(self) -> None:
        """Nothing could be scheduled although requests wait: the first one cannot fit even in
        an empty cache (it grew past the cache's size). End it rather than spin forever."""
        if self.scheduler.waiting and not self.scheduler.running:
            r = self.scheduler.waiting[0]
            r.finish_reason = "length"
            r.metrics.finished_time = time.time()
            self._finish(r)

    def _finish(self, r: Request) -> None:
        self.scheduler.finish(r)
        self._finished_parents.add(r.parent_id)

    def _drain_finished(self) -> set[str]:
        """Parents whose every sequence has finished since the last call (only those that just
        finished are looked at: a scan of all requests costs O(batch) every step)."""
        done = {pid for pid in self._finished_parents
                if pid in self.requests and all(s.finished for s in self.requests[pid])}
        self._finished_parents.clear()
        return done

    def _outputs(self, parent_ids) -> list[RequestOutput]:
        outs = []
        for pid in parent_ids:
            seqs = self.requests.get(pid)
            if seqs is None:
                continue
            done = all(s.finished for s in seqs)
            kind = seqs[0].params.output_kind
            if kind == RequestOutputKind.FINAL_ONLY and not done:
                continue
            outs.append(RequestOutput(
                request_id=pid, prompt=seqs[0].prompt, prompt_token_ids=seqs[0].prompt_token_ids,
                outputs=[self._completion(s, kind == RequestOutputKind.DELTA) for s in seqs],
                finished=done, metrics=seqs[0].metrics, prompt_logprobs=seqs[0].prompt_logprobs,
                num_cached_tokens=seqs[0].num_cached_tokens))
            if done:
                del self.requests[pid]
        return outs

    @staticmethod
    def _completion(s: Request, delta: bool) -> CompletionOutput:
        text, tokens, lps = s.output_text, s.output_token_ids, s.output_logprobs
        if delta:
            # Hold back what could still turn out to be the start of a stop string, which
            # would be cut from the final text.
            hold = 0 if s.finished or not s.params.stop else max(map(len, s.params.stop)) - 1
            end = max(s.sent_text_len, len(text) - hold)
            text, tokens = text[s.sent_text_len:end], tokens[s.sent_token_len:]
            lps = None if lps is None else lps[s.sent_token_len:]
            s.sent_text_len, s.sent_token_len = end, s.num_output_tokens
        return CompletionOutput(s.index, text, tokens, s.cumulative_logprob, lps,
                                s.finish_reason, s.stop_reason)

    # ---- life cycle -----------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.workers:
            self.workers.shutdown()
        self.runner.close()
        self.runner = self.scheduler = self.block_manager = None
