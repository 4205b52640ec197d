"""Response shapes, as vLLM writes them: a choice accumulated from the engine's deltas
(Choice), and the completions and chat formats of whole responses and SSE chunks (text offsets,
logprobs, prompt logprobs, usage)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from labkit.entrypoints.server.engine_loop import ChoiceDelta
from labkit.outputs import Logprob


@dataclass
class Choice:
    """One choice of a non-streamed response, accumulated from the deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list | None = None


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Format(Protocol):
    """How one endpoint shapes responses and stream chunks."""

    object: str
    chunk_object: str
    logprobs: int | None  # top logprobs asked for, None when not

    def choice(self, index: int, c: Choice) -> dict: ...
    def chunk_choice(self, d: ChoiceDelta, offset: int, first: bool) -> dict: ...


class CompletionsFormat:
    object = chunk_object = "text_completion"

    def __init__(self, logprobs: int | None):
        self.logprobs = logprobs

    def _logprobs(
        self, token_ids: list[int], entries: list[dict[int, Logprob]] | None, offset: int
    ):
        if self.logprobs is None or entries is None:
            return None
        out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for tok, entry in zip(token_ids, entries):
            chosen = entry[tok]
            out["text_offset"].append(offset)
            out["token_logprobs"].append(chosen.logprob)
            out["tokens"].append(chosen.decoded_token)
            out["top_logprobs"].append({lp.decoded_token: lp.logprob for lp in entry.values()})
            offset += len(chosen.decoded_token or "")
        return out

    def choice(self, index: int, c: Choice) -> dict:
        out = {
            "index": index,
            "text": c.text,
            "logprobs": self._logprobs(c.token_ids, c.logprobs, 0),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        if c.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs_body(c.prompt_logprobs)
        return out

    def chunk_choice(self, d: ChoiceDelta, offset: int, first: bool) -> dict:
        out = {
            "index": d.index,
            "text": d.text,
            "logprobs": self._logprobs(d.token_ids, d.logprobs, offset),
            "finish_reason": d.finish_reason,
            "stop_reason": d.stop_reason,
        }
        if d.prompt_logprobs is not None:  # on each choice's first chunk, as vLLM
            out["prompt_logprobs"] = prompt_logprobs_body(d.prompt_logprobs)
        return out


class ChatFormat:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, top_logprobs: int | None):
        self.logprobs = top_logprobs

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]] | None):
        if self.logprobs is None or entries is None:
            return None
        content = []
        for tok, entry in zip(token_ids, entries):
            top = sorted(entry.values(), key=lambda lp: lp.rank or 0)[: self.logprobs]
            content.append(
                {**chat_logprob(entry[tok]), "top_logprobs": [chat_logprob(lp) for lp in top]}
            )
        return {"content": content}

    def choice(self, index: int, c: Choice) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self._logprobs(c.token_ids, c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    def chunk_choice(self, d: ChoiceDelta, offset: int, first: bool) -> dict:
        delta = (
            {"role": "assistant", "content": d.text}
            if first
            else ({"content": d.text} if d.text else {})
        )
        return {
            "index": d.index,
            "delta": delta,
            "logprobs": self._logprobs(d.token_ids, d.logprobs),
            "finish_reason": d.finish_reason,
            "stop_reason": d.stop_reason,
        }


def prompt_logprobs_body(entries: list | None) -> list | None:
    """vLLM's shape: per prompt position (None for the first) {token_id: {logprob, rank,
    decoded_token}}."""
    if entries is None:
        return None
    return [
        None
        if e is None
        else {
            tok: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for tok, lp in e.items()
        }
        for e in entries
    ]


def chat_logprob(lp: Logprob) -> dict:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode("utf-8"))}
