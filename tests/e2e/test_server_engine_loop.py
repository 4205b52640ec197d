"""The server's engine loop in-process (no HTTP): what happens when the engine raises, when the
server drains for shutdown, and when one prompt of a batch is refused."""

from __future__ import annotations

import asyncio
import time

import pytest

from labkit.config import EngineConfig
from labkit.engine.engine import LLMEngine
from labkit.engine.resolved_config import resolve
from labkit.entrypoints.server.engine_loop import EngineLoop
from labkit.entrypoints.server.errors import APIError
from labkit.observe.metrics import ServerMetrics
from labkit.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(params=[False, True], ids=["sync", "async_scheduling"])
def engine_loop(tiny_ckpts, request):
    # With async scheduling a step is always in flight while requests run: failures, drains and
    # refusals must still leave nothing behind.
    engine = LLMEngine(
        resolve(
            EngineConfig(
                model=str(tiny_ckpts["llama"]), num_kv_blocks=64, async_scheduling=request.param
            )
        )
    )
    loop = EngineLoop(engine, ServerMetrics("tiny"))
    loop.start()
    yield loop
    loop.stop()
    assert engine._closed


def _prompt(ids: list[int]) -> dict:
    return {"prompt_token_ids": ids}


def _long() -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=500, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )


async def _first_update(handle):
    it = handle.__aiter__()
    await it.__anext__()
    return it


def test_engine_failure_fails_requests_and_reports_unhealthy(engine_loop, monkeypatch):
    def broken_step():
        raise RuntimeError("device lost")

    async def main():
        it = await _first_update(
            await engine_loop.submit("a", [_prompt([1, 2, 3])], _long(), time.time())
        )
        monkeypatch.setattr(engine_loop.engine, "step", broken_step)
        with pytest.raises(APIError) as err:
            async for _ in it:
                pass
        assert err.value.status == 500 and "device lost" in err.value.message
        with pytest.raises(APIError) as err:
            await engine_loop.submit("b", [_prompt([1, 2])], _long(), time.time())
        assert err.value.status == 500

    asyncio.run(main())
    assert not engine_loop.healthy and "device lost" in engine_loop.error
    assert engine_loop.engine.stats().kv_blocks_used == 0


def test_drain_ends_in_flight_requests_and_refuses_new_ones(engine_loop):
    async def main():
        it = await _first_update(
            await engine_loop.submit("a", [_prompt([1, 2, 3])], _long(), time.time())
        )
        engine_loop.begin_drain(0.0)
        with pytest.raises(APIError) as err:
            async for _ in it:
                pass
        assert err.value.status == 503
        with pytest.raises(APIError) as err:
            await engine_loop.submit("b", [_prompt([1, 2])], _long(), time.time())
        assert err.value.status == 503

    asyncio.run(main())
    assert engine_loop.healthy
    assert engine_loop.engine.stats().kv_blocks_used == 0


def test_a_refused_prompt_leaves_nothing_behind(engine_loop):
    async def main():
        max_len = engine_loop.engine.config.max_model_len
        with pytest.raises(ValueError, match="prompt"):
            await engine_loop.submit(
                "a", [_prompt([1, 2]), _prompt([1] * max_len)], _long(), time.time()
            )
        params = SamplingParams(max_tokens=3, n=2, output_kind=RequestOutputKind.DELTA)
        handle = await engine_loop.submit(
            "b", [_prompt([1, 2]), _prompt([3, 4])], params, time.time()
        )
        tokens: dict[int, list[int]] = {}
        async for update in handle:
            for d in update.choices:
                tokens.setdefault(d.index, []).extend(d.token_ids)
        return tokens

    tokens = asyncio.run(main())
    assert sorted(tokens) == [0, 1, 2, 3]  # 2 prompts x n=2, indexed as vLLM does
    assert all(1 <= len(t) <= 3 for t in tokens.values())
    assert not engine_loop.engine.has_unfinished_requests()
    assert engine_loop.engine.stats().kv_blocks_used == 0


class _ExplodingDetokenizer:
    def step(self, token_id: int) -> str:
        raise MemoryError("no memory for this request's text")


def test_one_failing_request_gets_a_500_and_the_others_run_on(engine_loop):
    short = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )

    async def tokens_of(handle) -> list[int]:
        tokens = []
        async for update in handle:
            for d in update.choices:
                tokens.extend(d.token_ids)
        return tokens

    async def main():
        alone = await tokens_of(
            await engine_loop.submit("ref", [_prompt([5, 6, 7])], short, time.time())
        )
        bad = await engine_loop.submit(
            "bad", [_prompt([1, 2, 3]), _prompt([4, 5])], _long(), time.time()
        )
        # The engine thread owns the requests; an attribute swap is what a fault looks like.
        engine_loop.engine.output_processor.requests["bad-1"][
            0
        ].detokenizer = _ExplodingDetokenizer()
        good = await engine_loop.submit("good", [_prompt([5, 6, 7])], short, time.time())
        with pytest.raises(APIError) as err:
            await tokens_of(bad)
        assert err.value.status == 500 and "MemoryError" in err.value.message
        assert await tokens_of(good) == alone

    asyncio.run(main())
    assert engine_loop.healthy
    assert not engine_loop.engine.has_unfinished_requests()
    assert engine_loop.engine.stats().kv_blocks_used == 0
