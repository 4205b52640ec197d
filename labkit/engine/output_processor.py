"""Output processing, as vLLM V1's OutputProcessor: a step's sampled tokens and prompt-logprob
logits go onto the requests (tokens, logprob entries, detokenized text), the stop checks end them
(stop token or EOS, stop string, length), and the parents a step touched get their
RequestOutputs, shaped by their output kind (CUMULATIVE, DELTA, FINAL_ONLY).

It never frees anything itself: the calls that end requests return them, and the engine core
releases them in the scheduler."""

from __future__ import annotations

import torch

from labkit.engine.request import Request
from labkit.engine.sampler import SampleResult
from labkit.outputs import CompletionOutput, Logprob, RequestOutput
from labkit.sampling_params import RequestOutputKind
from labkit.transfer import to_device


class OutputProcessor:
    """`tokenizer` (or None) gives the logprob entries their token text; a sequence ends on one
    of `eos_token_ids` (unless it ignores EOS) or when it reaches `max_model_len` tokens."""

    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[str, list[Request]] = {}  # parent id -> its n sequences
        self._finished_parents: set[str] = set()

    # ---- the parents ----------------------------------------------------------------------
    def add_request(self, request_id: str, seqs: list[Request]) -> None:
        """Track a new parent (the engine core has checked that its id is not in use)."""
        self.requests[request_id] = seqs

    def abort_request(self, request_id: str) -> list[Request]:
        """Forget the parent; returns its sequences that had not finished, now ended by "abort"
        (the engine core frees them)."""
        aborted = []
        for req in self.requests.pop(request_id, []):
            if not req.finished:
                req.finish_reason = "abort"
                aborted.append(req)
        return aborted

    def end(self, r: Request, reason: str, now: float) -> None:
        """End a sequence for a reason found outside the stop checks."""
        r.finish_reason = reason
        self._ended(r, now)

    def fail(self, r: Request, exc: BaseException, now: float) -> None:
        """End a sequence whose processing raised; its parent's output carries the error."""
        r.error = f"{type(exc).__name__}: {exc}"
        self.end(r, "error", now)

    def _ended(self, r: Request, now: float) -> None:
        r.metrics.finished_time = now
        self._finished_parents.add(r.parent_id)

    # ---- a step's results -----------------------------------------------------------------
    def record_prompt_logprobs(
        self, r: Request, start_pos: int, num_tokens: int, logits: torch.Tensor
    ) -> None:
        """Prompt logprob entries from the logits of the `num_tokens` positions from
        `start_pos` on."""
        # Row i predicts the token after it; only rows whose next token is a prompt token count.
        nxt = r.token_ids[start_pos + 1 : min(start_pos + num_tokens + 1, r.num_prompt_tokens)]
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
                top_ids, top_lps = top.indices[i].tolist(), top.values[i].tolist()
                for j, (tid, lp) in enumerate(zip(top_ids, top_lps), 1):
                    entry.setdefault(tid, Logprob(lp, j, self._token_text(tid)))
            r.prompt_logprobs.append(entry)

    def split_logits(self, scheduled: list, work: list, logits: torch.Tensor):
        """A step's logits -> (the rows to sample, their requests, the requests whose prompt
        logprobs failed, with the error); prompt logprobs are recorded from the `all_logits`
        rows. `scheduled`: the batch's (request, tokens) pairs; `work`: their SeqWork."""
        rows, to_sample, failed, at = [], [], [], 0
        for (r, n), w in zip(scheduled, work):
            if w.all_logits:
                try:
                    self.record_prompt_logprobs(r, w.start_pos, n, logits[at : at + n])
                except Exception as e:
                    failed.append((r, e))
                at += n
                if w.sample:
                    rows.append(at - 1)
                    to_sample.append(r)
            elif w.sample:
                rows.append(at)
                to_sample.append(r)
                at += 1
        if not to_sample:
            return None, to_sample, failed
        if rows == list(range(logits.shape[0])):  # the usual case: every row, in order
            return logits, to_sample, failed
        return logits[to_device(rows, torch.long, logits.device)], to_sample, failed

    def append_tokens(self, reqs: list[Request], result: SampleResult, now: float) -> list[Request]:
        """Append each request's sampled token (row i of `result` is `reqs[i]`'s) and run the
        stop checks; returns the requests that this ended, in order."""
        ended = []
        for i, r in enumerate(reqs):
            r.num_pending = 0
            if r.finished:  # aborted while its step was in flight
                continue
            try:
                self._append_token(r, i, result, now)
            except Exception as e:  # this request's text or logprobs, not the engine's state
                self.fail(r, e, now)
            if r.finish_reason is not None:
                ended.append(r)
        return ended

    def _append_token(self, r: Request, i: int, result: SampleResult, now: float) -> None:
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
        if r.detokenizer is not None and (
            r.finish_reason is None or r.params.include_stop_str_in_output
        ):
            r.output_text += r.detokenizer.step(tok)
        if r.finish_reason is None:
            self._check_stop_text(r)
        if r.finish_reason is not None:
            self._ended(r, now)

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
                    cut = at + (len(s) if p.include_stop_str_in_output else 0)
                    r.output_text = r.output_text[:cut]
                    r.finish_reason, r.stop_reason = "stop", s
                    return
        if (
            p.max_tokens is not None and r.num_output_tokens >= p.max_tokens
        ) or r.num_tokens >= self.max_model_len:
            r.finish_reason = "length"

    # ---- outputs --------------------------------------------------------------------------
    def outputs(self, touched: set[str]) -> list[RequestOutput]:
        """RequestOutputs of the parents in `touched` and of those whose last sequence ended
        since the last call; a parent whose output is final is forgotten."""
        outs = []
        for pid in touched | self._drain_finished():
            seqs = self.requests.get(pid)
            if seqs is None:
                continue
            done = all(s.finished for s in seqs)
            kind = seqs[0].params.output_kind
            if kind == RequestOutputKind.FINAL_ONLY and not done:
                continue
            outs.append(
                RequestOutput(
                    request_id=pid,
                    prompt=seqs[0].prompt,
                    prompt_token_ids=seqs[0].prompt_token_ids,
                    outputs=[_completion(s, kind == RequestOutputKind.DELTA) for s in seqs],
                    finished=done,
                    metrics=seqs[0].metrics,
                    prompt_logprobs=seqs[0].prompt_logprobs,
                    num_cached_tokens=seqs[0].num_cached_tokens,
                    error=next((s.error for s in seqs if s.error is not None), None),
                )
            )
            if done:
                del self.requests[pid]
        return outs

    def _drain_finished(self) -> set[str]:
        """Parents whose every sequence has finished since the last call (only those that just
        finished are looked at: a scan of all requests costs O(batch) every step)."""
        done = {
            pid
            for pid in self._finished_parents
            if pid in self.requests and all(s.finished for s in self.requests[pid])
        }
        self._finished_parents.clear()
        return done


def _completion(s: Request, delta: bool) -> CompletionOutput:
    text, tokens, lps = s.output_text, s.output_token_ids, s.output_logprobs
    if delta:
        # Hold back what could still turn out to be the start of a stop string, which
        # would be cut from the final text.
        hold = 0 if s.finished or not s.params.stop else max(map(len, s.params.stop)) - 1
        end = max(s.sent_text_len, len(text) - hold)
        text, tokens = text[s.sent_text_len : end], tokens[s.sent_token_len :]
        lps = None if lps is None else lps[s.sent_token_len :]
        s.sent_text_len, s.sent_token_len = end, s.num_output_tokens
    return CompletionOutput(
        s.index, text, tokens, s.cumulative_logprob, lps, s.finish_reason, s.stop_reason
    )
