"""LLM: vLLM's offline API (generate, chat) over the engine, safe to build and close many times
in one notebook kernel."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time

from labkit.config import EngineConfig
from labkit.engine.engine import LLMEngine
from labkit.engine.resolved_config import resolve
from labkit.entrypoints.beam_search import BeamSearchOutput, beam_search
from labkit.outputs import RequestOutput
from labkit.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

log = logging.getLogger("labkit")


class LLM:
    """`LLM(model=None, tensor_parallel_size=1, dtype="auto", ...)`; model=None loads the
    embedded default model. Close with `shutdown()`, a `with` block, or `del`."""

    _ids = itertools.count()

    def __init__(self, model: str | None = None, **kwargs):
        start = time.perf_counter()
        self.config = resolve(EngineConfig.from_kwargs(model=model, **kwargs))
        self.engine: LLMEngine | None = None
        self.engine = LLMEngine(self.config)
        log.info("LLM() started in %.1f s", time.perf_counter() - start)

    # ---- generation -----------------------------------------------------------------------
    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        engine = self._engine()
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        # generate() returns finished outputs only: the engine need not build the others.
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        if len(params) != len(prompts):
            raise ValueError(
                f"sampling_params: got {len(params)} for {len(prompts)} prompts; "
                "give one, or one per prompt"
            )
        priority = list(priority) if priority is not None else [0] * len(prompts)
        if len(priority) != len(prompts):
            raise ValueError(f"priority: got {len(priority)} values for {len(prompts)} prompts")
        # Tokenize and validate everything before the first request is added: a bad prompt
        # fails the call without leaving half a batch in the engine.
        tokenized = [engine.tokenize(p) for p in prompts]
        for (_, ids), sp in zip(tokenized, params):
            engine.validate(ids, sp)
        ids = []
        for (text, tok_ids), sp, prio in zip(tokenized, params, priority):
            prompt = (
                {"prompt_token_ids": tok_ids}
                if text is None
                else {"prompt": text, "prompt_token_ids": tok_ids}
            )
            ids.append(engine.add_request(str(next(self._ids)), prompt, sp, priority=prio))
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages,
        sampling_params=None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(
                conv,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            # The template already holds any special tokens: don't add a BOS on top.
            prompts.append(
                {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
            )
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self, prompts, params: BeamSearchParams, *, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """Per prompt, the `beam_width` best sequences, best first (`.sequences[i].tokens`,
        `.text`, `.cum_logprob`)."""
        engine = self._engine()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        tok = engine.tokenizer
        return beam_search(
            lambda ps, sp: self.generate(ps, sp, use_tqdm=use_tqdm),
            engine.tokenize,
            engine.eos_token_ids,
            (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok else (lambda ids: None),
            list(prompts),
            params,
        )

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache (False, and nothing done, while requests hold blocks)."""
        return self._engine().reset_prefix_cache()

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self._engine()
        pending = set(request_ids)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in pending:  # an interrupt or error must not leave KV blocks held
                engine.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [done[r] for r in request_ids]

    # ---- introspection --------------------------------------------------------------------
    def get_tokenizer(self):
        return self._engine().tokenizer

    def step_log(self):
        """Every engine step so far as a pandas DataFrame (timings in ms)."""
        from labkit.observe.step_log import to_dataframe

        return to_dataframe(self._engine().step_records())

    # ---- life cycle -----------------------------------------------------------------------
    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("this LLM has been shut down; build a new one")
        return self.engine

    def shutdown(self) -> None:
        """Release the model, the KV cache (GPU memory too) and the TP worker processes."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()
        gc.collect()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
