"""Session-wide fixtures: the tiny checkpoints, HF reference models and shared engines.

Everything expensive (building checkpoints, loading HF models, loading the 135M default model,
HF reference generations) happens once per session; the suite must fit in a few minutes on two
CPU cores.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from labkit import LLM

REPO = Path(__file__).resolve().parents[1]

# One torch thread, here and in the processes the tests start (the CLI, scripts), unless
# OMP_NUM_THREADS says otherwise. The machine has 2 cores, shared with those processes and
# whatever else runs; once threads outnumber cores, OpenMP's spin-waiting makes every matmul
# several times slower (a default-model batch took 16-25 s with 2 threads under load vs 4-7 s
# with one), while one thread can cost at most 2x on an idle machine.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# Without a GPU the Triton kernels run under Triton's interpreter. Triton reads the switch when it
# is first imported, so it is set here, before any test module (or what it imports) imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items):
    # The marker's meaning (pyproject): loads the default model or spawns worker processes.
    for item in items:
        if "default_llm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def _load_tiny_builder():
    # data/ is not a package: import the script by path.
    spec = importlib.util.spec_from_file_location(
        "make_tiny_checkpoints", REPO / "data" / "make_tiny_checkpoints.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    """{kind: dir} for every kind data/make_tiny_checkpoints.py builds (llama, qwen2, qwen3,
    qwen3_moe, mixtral, mistral): tiny random-weight HF checkpoints, built once."""
    return _load_tiny_builder().build_all(tmp_path_factory.mktemp("tiny-ckpts"))


@pytest.fixture(scope="session")
def fp8_ckpts(tmp_path_factory) -> dict[str, Path]:
    """{kind: dir} of the FP8 checkpoints tests/fp8_checkpoints.py writes ("block": 128x128
    block-wise in transformers' format, "channel" and "tensor": compressed-tensors), each with
    its dequantized float32 twin ("<kind>-dequant"), built once."""
    from fp8_checkpoints import build_all

    tokenizer_dir = _load_tiny_builder().smollm2_tokenizer_dir()
    return build_all(tmp_path_factory.mktemp("fp8-ckpts"), tokenizer_dir)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from labkit.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_models(tiny_ckpts, default_gguf):
    """Lazily loaded HF models by key ("llama", "qwen2", "default"), each loaded at most once:
    the GGUF one takes ~30 s, so only tests that need it pay for it."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def get(key: str):
        if key not in cache:
            if key == "default":
                m = AutoModelForCausalLM.from_pretrained(
                    str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
                )
            else:
                m = AutoModelForCausalLM.from_pretrained(str(tiny_ckpts[key]), dtype=torch.float32)
            cache[key] = m.eval()
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_reference(hf_models):
    """hf_reference(key, prompts, max_new_tokens) -> [(token_ids, chosen-token logprobs)],
    from HF generate() one prompt at a time (no padding), memoised per arguments."""
    cache: dict = {}

    @torch.inference_mode()
    def get(key: str, prompts: list[list[int]], max_new_tokens: int):
        ck = (key, tuple(map(tuple, prompts)), max_new_tokens)
        if ck not in cache:
            model = hf_models(key)
            refs = []
            for p in prompts:
                r = model.generate(
                    torch.tensor([p]),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                ids = r.sequences[0, len(p) :].tolist()
                lps = torch.stack(r.logits, 1)[0].float().log_softmax(-1)
                refs.append((ids, [lps[i, t].item() for i, t in enumerate(ids)]))
            cache[ck] = refs
        return cache[ck]

    return get


@pytest.fixture(scope="session")
def default_llm():
    """The default model with default engine settings, shared by tests that need nothing
    special (they must not assume a fresh step log)."""
    llm = LLM(dtype="float32")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def tiny_llms(tiny_ckpts):
    """tiny_llms(kind) -> a shared TP=1 LLM with default settings for that tiny checkpoint."""
    cache: dict[str, LLM] = {}

    def get(kind: str) -> LLM:
        if kind not in cache:
            cache[kind] = LLM(str(tiny_ckpts[kind]), dtype="float32")
        return cache[kind]

    yield get
    for llm in cache.values():
        llm.shutdown()


@pytest.fixture
def interpreter_fp8_rounding(monkeypatch):
    """Under Triton's interpreter, float32 -> float8_e4m3fn rounded as torch (and the GPU's
    cvt.rn.satfinite) round: the interpreter gives half the value where the rounded mantissa
    carries into the exponent, and rounds ties away from zero. The kernels' own code runs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def to_fp8_as_torch(data, src, dst, rounding):
        if dst == tl.float8e4nv and src == tl.float32:
            t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        return convert(data, src, dst, rounding)

    monkeypatch.setattr(interpreter, "_convert_float", to_fp8_as_torch)
