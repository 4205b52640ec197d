"""Structured outputs with xgrammar: the grammar compiler and its cache, each sequence's matcher,
and the token bitmask that constrains its logits.

Compiling runs on a thread of its own (xgrammar releases the GIL), off the engine's step: a
request waits outside the scheduler until its grammar is ready (the engine core's job), and the
same constraint is compiled once (`_futures` keeps one future per constraint). Syntax errors are
found when a request is validated, by parsing the grammar without the tokenizer, which is cheap.

A matcher takes each token of its sequence as the token lands from the device, just before it is
appended (`advance`), and counts what it took, so it holds exactly the sequence's output tokens:
preemption and recompute keep those tokens, so the matcher needs no rollback, and async
scheduling's token in flight is accepted before the next sampling step's mask is filled (the
engine samples step n only after taking step n-1's tokens).

Masks are filled on the host for the constrained rows only, on a thread of their own (xgrammar
releases the GIL): with async scheduling a step's masks start filling as soon as the previous
step's tokens are accepted, while the host appends those tokens and runs the stop checks, and the
device runs the forward pass. They are applied where the logits are: xgrammar's kernel on CUDA,
torch on the CPU.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch

try:
    import xgrammar as xgr
except ImportError:  # a base install has it; an environment without it runs unconstrained only
    xgr = None

from labkit.structured_params import StructuredOutputsParams
from labkit.transfer import to_device

log = logging.getLogger("labkit")

# JSON's free whitespace comes in runs of at most this many characters (deep indentation fits):
# unbounded, a small model at temperature 0 can emit newlines until max_tokens runs out.
MAX_WHITESPACE = 16
CACHE_SIZE = 256  # compiled constraints kept (LRU); a compiled JSON schema is ~100 kB
_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: ": the user needs the rest.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass(eq=False)
class GrammarState:
    """One sequence's constraint: its compile future, then its matcher."""

    future: Future
    matcher: xgr.GrammarMatcher | None = None
    num_accepted: int = 0  # output tokens the matcher has taken

    @property
    def ready(self) -> bool:
        return self.future.done()

    def start(self) -> None:
        """Build the matcher once the grammar compiled (raises its compile error)."""
        self.matcher = xgr.GrammarMatcher(self.future.result())


@dataclass(eq=False)
class MaskFill:
    """A step's token bitmask being filled: rows `rows` (of the step's rows to sample) of the
    host buffer the future returns."""

    future: Future
    rows: list[int]


class GrammarWaitlist:
    """Constrained requests whose grammar is still compiling wait here, outside the scheduler,
    so that the batch runs on without them."""

    def __init__(self):
        self._waiting: list = []  # Requests, in arrival order

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, req) -> None:
        self._waiting.append(req)

    def discard(self, req) -> None:
        if req in self._waiting:
            self._waiting.remove(req)

    def take_compiled(self) -> tuple[list, list[tuple[object, Exception]]]:
        """The requests whose grammar compiled (their matcher started), and those whose grammar
        failed, with the error; the others keep waiting."""
        ready, failed, waiting = [], [], []
        for req in self._waiting:
            if not req.grammar.ready:
                waiting.append(req)
                continue
            try:
                req.grammar.start()
            except Exception as e:
                failed.append((req, e))
                continue
            ready.append(req)
        self._waiting = waiting
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Until one grammar is compiled, or `timeout` seconds."""
        wait_futures(
            [r.grammar.future for r in self._waiting], timeout=timeout, return_when=FIRST_COMPLETED
        )


class StructuredOutputManager:
    """`tokenizer` (HF) and `vocab_size` (the model's logits width) describe the vocabulary;
    `eos_token_ids` end a finished grammar. Nothing is built until the first constrained
    request: xgrammar's view of the vocabulary takes ~0.2 s."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], device: torch.device):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self.num_compiled = 0  # constraints compiled (cache misses), for tests and logs
        self._compiler: xgr.GrammarCompiler | None = None
        self._thread: ThreadPoolExecutor | None = None  # compiles
        self._filler: ThreadPoolExecutor | None = None  # masks: never queued behind a compile
        self._futures: OrderedDict[tuple, Future] = OrderedDict()
        self._batch: xgr.BatchGrammarMatcher | None = None
        self._pinned: list[torch.Tensor] = []  # CUDA: two host buffers, used in turn
        self._turn = 0

    # ---- requests -----------------------------------------------------------------------
    def validate(self, so: StructuredOutputsParams) -> None:
        """ValueError, naming the field, for a constraint that cannot compile."""
        if xgr is None:
            raise ValueError(
                "structured_outputs: needs xgrammar, which is not installed (pip install xgrammar)"
            )
        if self.tokenizer is None:
            raise ValueError("structured_outputs: needs a tokenizer (this engine has none)")
        if _key(so) in self._futures:  # compiled before: nothing to check
            return
        try:
            _parse(so)
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            detail = _CPP_PREFIX.sub("", str(e).strip()).strip()
            raise ValueError(
                f"structured_outputs: the {so.kind} cannot be compiled: {detail}"
            ) from None

    def state(self, so: StructuredOutputsParams) -> GrammarState:
        """A new sequence's state; its grammar compiles in the background unless cached."""
        compiler = self._get_compiler()
        key = _key(so)
        future = self._futures.get(key)
        if future is None or (future.done() and future.exception() is not None):
            self.num_compiled += 1
            future = self._thread.submit(_compile, compiler, so)
            self._futures[key] = future
            while len(self._futures) > CACHE_SIZE:
                self._futures.popitem(last=False)
        self._futures.move_to_end(key)
        return GrammarState(future)

    def _get_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            # Built on the engine's thread: the HF tokenizer is not shared across threads.
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="labkit-grammar")
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="labkit-mask")
            self._batch = xgr.BatchGrammarMatcher()
        return self._compiler

    # ---- each step ----------------------------------------------------------------------
    def sync(self, st: GrammarState, token_ids: list[int], num_prompt_tokens: int) -> bool:
        """Feed the matcher the output tokens (of the sequence's `token_ids`, after its prompt)
        it has not seen. False if one breaks the grammar (only possible when nothing was
        allowed, e.g. min_tokens forbidding the stop token)."""
        # One slice of what is new (usually nothing), not a copy of the whole output each step.
        for tok in token_ids[num_prompt_tokens + st.num_accepted :]:
            if not st.matcher.accept_token(tok):
                return False
            st.num_accepted += 1
        return True

    def advance(self, reqs: list, new_tokens: list[int]) -> tuple[list, list]:
        """Feed each live constrained request its newly sampled token (new_tokens[i] is
        reqs[i]'s, not yet appended to its sequence): (those whose grammar has terminated, those
        whose token broke it)."""
        ended, broken = [], []
        for r, tok in zip(reqs, new_tokens):
            st = r.grammar
            if st is None or r.finished:
                continue
            synced = self.sync(st, r.token_ids, r.num_prompt_tokens)
            if not (synced and st.matcher.accept_token(tok)):
                broken.append(r)
                continue
            st.num_accepted += 1
            if st.matcher.is_terminated():
                ended.append(r)
        return ended, broken

    def start_fill(self, reqs: list) -> MaskFill | None:
        """Start filling the bitmask of the next token of each constrained request among `reqs`
        (a step's rows to sample, in order) whose grammar can go on; None if there is none. Row
        k of the buffer is reqs[k]'s (xgrammar's kernel reads mask rows by logits rows)."""
        rows = [
            k
            for k, r in enumerate(reqs)
            if r.grammar is not None and not r.finished and not r.grammar.matcher.is_terminated()
        ]
        if not rows:
            return None
        bitmask = self._host_buffer(len(reqs))
        matchers = [reqs[k].grammar.matcher for k in rows]
        # The fill thread needs the GIL to enter xgrammar, which then releases it. Left alone it
        # would get the GIL only when this thread blocks or after the interpreter's switch
        # interval (5 ms), i.e. after the postprocessing it is meant to run beside: wait (the
        # GIL released) until it has started.
        started = threading.Event()
        fill = MaskFill(self._filler.submit(self._fill, matchers, bitmask, rows, started), rows)
        started.wait()
        return fill

    def _fill(
        self, matchers: list, bitmask: torch.Tensor, rows: list[int], started: threading.Event
    ) -> torch.Tensor:
        started.set()
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        return bitmask

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set the logits of the tokens `bitmask` (a finished fill's) disallows to -inf in
        `rows`, in place."""
        # The logits come from the forward pass's inference mode: only there may they change.
        with torch.inference_mode():
            if logits.is_cuda:
                mask = bitmask.to(logits.device, non_blocking=True)
                # A tensor from pinned memory: xgrammar would copy a list from pageable memory,
                # a copy that may wait for the device.
                indices = to_device(rows, torch.int32, logits.device)
                xgr.apply_token_bitmask_inplace(
                    logits, mask, vocab_size=self.vocab_size, indices=indices
                )
            else:
                apply_bitmask(logits, bitmask, rows)

    def _host_buffer(self, n: int) -> torch.Tensor:
        if self.device.type != "cuda":
            return xgr.allocate_token_bitmask(n, self.vocab_size)
        # Pinned, for a copy that does not wait for the device. Two in turn: the buffer of step
        # k is refilled at step k+2, after step k's sampled tokens (which follow its copy on
        # the stream) have reached the host.
        self._turn ^= 1
        if len(self._pinned) < 2 or self._pinned[self._turn].shape[0] < n:
            size = max(n, 64)
            while len(self._pinned) < 2:
                self._pinned.append(torch.empty(0))
            buffer = xgr.allocate_token_bitmask(size, self.vocab_size)
            self._pinned[self._turn] = buffer.pin_memory()
        return self._pinned[self._turn][:n]

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._filler.shutdown(wait=True)  # a fill in progress reads the matchers


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """torch's version of xgrammar's kernel, for `rows` of the logits and of the bitmask:
    token t is allowed when bit t % 8 of byte t // 8 is set (the int32 words, little-endian, read
    as bytes). Masks in place, row by row unless every row is constrained (no gathered copy)."""
    n, vocab = len(rows), logits.shape[-1]
    words = bitmask if n == bitmask.shape[0] else bitmask[rows]
    bits = _BITS.to(words.device)
    banned = ((words.contiguous().view(torch.uint8)[:, :, None] & bits) == 0).view(n, -1)[:, :vocab]
    banned = banned.to(logits.device)
    if n == logits.shape[0]:
        logits.masked_fill_(banned, float("-inf"))
    else:
        for k, r in enumerate(rows):
            logits[r].masked_fill_(banned[k], float("-inf"))


# ---- constraints to xgrammar ---------------------------------------------------------------
def _key(so: StructuredOutputsParams) -> tuple:
    return so.kind, so.spec, so.disable_any_whitespace


def _parse(so: StructuredOutputsParams) -> None:
    """Parse the constraint without a tokenizer: raises on a bad schema, regex or grammar."""
    kind = so.kind
    if kind == "json":
        _json_schema_grammar(so.spec, so)
    elif kind == "regex":
        xgr.Grammar.from_regex(so.regex)
    elif kind == "choice":
        xgr.Grammar.from_ebnf(_choice_ebnf(so.choice))
    elif kind == "grammar":
        if _is_ebnf(so.grammar):
            xgr.Grammar.from_ebnf(so.grammar)
        else:
            xgr.Grammar.from_lark(so.grammar)
    elif kind == "structural_tag":
        xgr.Grammar.from_structural_tag(*_structural_tag_args(so.structural_tag))


def _compile(compiler: xgr.GrammarCompiler, so: StructuredOutputsParams) -> xgr.CompiledGrammar:
    kind = so.kind
    if kind == "json":
        return compiler.compile_grammar(_json_schema_grammar(so.spec, so))
    if kind == "json_object":
        # Any object: a schema without strict mode (which would allow only {}), for the same
        # bound on whitespace as a schema's.
        return compiler.compile_grammar(
            _json_schema_grammar('{"type": "object"}', so, strict_mode=False)
        )
    if kind == "regex":
        return compiler.compile_regex(so.regex)
    if kind == "choice":
        return compiler.compile_grammar(_choice_ebnf(so.choice))
    if kind == "grammar":
        if _is_ebnf(so.grammar):
            return compiler.compile_grammar(so.grammar)
        return compiler.compile_lark(so.grammar)
    return compiler.compile_structural_tag(*_structural_tag_args(so.structural_tag))


# xgrammar (0.2.9 and earlier) lowers a string with minLength/maxLength to a bounded repetition
# of this class, which lets in raw control characters (U+0000-U+001F but CR and LF): JSON forbids
# them and strict parsers (Python's json.loads) reject the document (xgrammar issue #800). Its
# plain strings use the class without them.
_LENGTH_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _json_schema_grammar(spec: str, so: StructuredOutputsParams, **options) -> xgr.Grammar:
    """xgrammar's grammar of a JSON schema, its length-bounded strings without raw control
    characters."""
    grammar = xgr.Grammar.from_json_schema(spec, **_json_options(so), **options)
    text = str(grammar)
    if _LENGTH_BOUNDED_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LENGTH_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


def _json_options(so: StructuredOutputsParams) -> dict:
    if so.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE}


def _is_ebnf(grammar: str) -> bool:
    return "::=" in grammar


def _choice_ebnf(choices: list[str]) -> str:
    # JSON's string escapes are EBNF's.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _structural_tag_args(text: str) -> tuple:
    """vLLM's two formats: {"structures": [{"begin", "schema", "end"}], "triggers"} (the first
    one), or xgrammar's own structural tag JSON, passed as it is."""
    tag = json.loads(text)
    if isinstance(tag, dict) and "structures" in tag:
        items = [
            xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
            for s in tag["structures"]
        ]
        return items, list(tag["triggers"])
    return (text,)
