"""Input processing, as vLLM V1's InputProcessor: from a user's prompt and SamplingParams to the
engine's Requests. Owns the tokenizer and the EOS ids; tokenizes prompts, checks them against the
model and the KV cache, and builds the n sequences of one parent request (seeded generators,
detokenizers, bad-words ids, prompt-logprob setup)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from labkit.engine.detokenizer import incremental_detokenizer
from labkit.engine.request import Request
from labkit.engine.resolved_config import ResolvedConfig
from labkit.sampling_params import SamplingParams

log = logging.getLogger("labkit")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(config: ResolvedConfig):
    """The checkpoint's tokenizer (or `tokenizer=`). A directory with no tokenizer files, such as
    a lone config.json for `load_format="dummy"`, runs without one: token-id prompts only."""
    path = config.tokenizer_dir
    if config.tokenizer is None and not any((path / f).exists() for f in TOKENIZER_FILES):
        log.info(
            "no tokenizer files in %s: running without a tokenizer (token-id prompts only)", path
        )
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_token_ids(config: ResolvedConfig, tokenizer) -> set[int]:
    """Every id that ends a sequence: the model config's, generation_config.json's and the
    tokenizer's."""
    ids = set(config.model_config.eos_token_id)
    gen = config.model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for, checked before any work is done for it (the server checks
    these before it tokenizes)."""

    max_logprobs: int  # -1: up to the vocabulary size
    max_n: int  # the engine's max_num_seqs
    vocab_size: int

    def check(self, params: SamplingParams, logprobs_field: str = "logprobs") -> None:
        """Raise ValueError naming the field; `logprobs_field` is the name the caller gave
        `params.logprobs` (the chat API calls it top_logprobs)."""
        if params.n > self.max_n:
            raise ValueError(
                f"n={params.n} is invalid: at most max_num_seqs ({self.max_n}) choices per request"
            )
        cap = (
            self.vocab_size if self.max_logprobs == -1 else min(self.max_logprobs, self.vocab_size)
        )
        for name, k in (
            (logprobs_field, params.logprobs),
            ("prompt_logprobs", params.prompt_logprobs),
        ):
            if k is not None and k > cap:
                raise ValueError(
                    f"{name}={k} is invalid: at most {cap} (the engine's "
                    f"max_logprobs is {self.max_logprobs}; the vocabulary has "
                    f"{self.vocab_size} tokens)"
                )


class InputProcessor:
    """`tokenizer` may be None (token-id prompts only). The limits a prompt is checked against
    are given explicitly: the longest sequence, the KV cache's block size and block count, and
    the vocabulary size. Generators of seeded requests live on `device`."""

    def __init__(
        self,
        tokenizer,
        eos_token_ids: set[int],
        *,
        limits: RequestLimits,
        max_model_len: int,
        block_size: int,
        num_kv_blocks: int,
        device: torch.device,
    ):
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.vocab_size = limits.vocab_size
        self.device = device

    @classmethod
    def from_config(
        cls, config: ResolvedConfig, tokenizer, num_kv_blocks: int, device: torch.device
    ) -> InputProcessor:
        """The engine's: its limits and EOS ids from `config`, its KV cache's size."""
        limits = RequestLimits(
            config.max_logprobs, config.max_num_seqs, config.model_config.vocab_size
        )
        return cls(
            tokenizer,
            eos_token_ids(config, tokenizer),
            limits=limits,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            num_kv_blocks=num_kv_blocks,
            device=device,
        )

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a string, a list of ids, or a {"prompt",
        "prompt_token_ids"} dict (given ids win over the text)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "prompt: text prompts need a tokenizer and this engine has none "
                    "(skip_tokenizer_init=True, or no tokenizer files in the model "
                    "directory): pass token ids or tokenizer=<path>"
                )
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(
            f"prompt: expected a string, a list of token ids or a dict, got {type(prompt).__name__}"
        )

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, naming the field, for a prompt or params the engine cannot run."""
        self.limits.check(params)
        n = len(prompt_token_ids)
        vocab = self.vocab_size
        if n == 0:
            raise ValueError("prompt: the prompt is empty; give at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids: every id must be an integer in [0, {vocab})")
        max_len = self.max_model_len
        if n >= max_len:
            raise ValueError(
                f"prompt: the prompt has {n} tokens; max_model_len is {max_len}, "
                "so it must be shorter than that to leave room for an output token"
            )
        blocks = -(-(n + 1) // self.block_size)
        if blocks > self.num_kv_blocks:
            raise ValueError(
                f"prompt: {n} tokens need {blocks} KV blocks but the cache holds "
                f"{self.num_kv_blocks}; raise the KV cache size"
            )
        for name, ids in (
            ("allowed_token_ids", params.allowed_token_ids or []),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias or {})),
        ):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name}: every token id must be in [0, {vocab})")

    def build_requests(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        priority: int,
    ) -> list[Request]:
        """The `params.n` sequences of one validated parent request; sequence i of a seeded
        request samples with seed + i."""
        bad_words = self._bad_words_ids(params.bad_words or [])
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            req = Request(
                f"{request_id}-{i}" if params.n > 1 else request_id,
                request_id,
                i,
                prompt,
                prompt_token_ids,
                params,
                priority,
                arrival_time,
                generator=gen,
            )
            req.bad_words_token_ids = bad_words
            if params.prompt_logprobs is not None:
                req.skip_prefix_cache = True  # cached positions would have no logits
                req.prompt_logprobs = [None]
            if self.tokenizer is not None:
                req.detokenizer = incremental_detokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                )
            seqs.append(req)
        return seqs

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
