"""Per-request state as the engine sees it: one Request per output sequence (a prompt with
n > 1 becomes n Requests sharing a parent id)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from labkit.outputs import Logprob, RequestMetrics
from labkit.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    parent_id: str
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.time)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, in order
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    skip_prefix_cache: bool = False  # prompt_logprobs need every prompt position computed
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None
    output_text: str = ""
    output_logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # why it ended with finish_reason "error"
    num_preemptions: int = 0
    order: int = 0  # admission counter: breaks ties in arrival time
    sched_key: tuple = ()  # (priority, arrival, order): the scheduler's rank
    metrics: RequestMetrics | None = None
    detokenizer: object = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    prompt_logprobs: list | None = None  # per prompt position, filled as its chunks run
    sent_text_len: int = 0  # for DELTA outputs: how much was returned already
    sent_token_len: int = 0
    num_prompt_tokens: int = field(init=False, default=0)
    # Async scheduling: a token sampled on the device whose id the host has not seen yet (0 or
    # 1), and its row in that sampling step's output (the next step's input is taken from there).
    num_pending: int = 0
    pending_row: int = -1
    # Structured outputs: the sequence's GrammarState (labkit.engine.structured_output), or None.
    grammar: object = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        # Read several times per request per step: a plain attribute, not a len() each time.
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.params.logprobs is not None:
            self.output_logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
