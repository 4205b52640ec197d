"""Each Triton kernel against its plain-torch reference on fresh random inputs.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py
before anything imports triton), at small shapes: this is how CI runs them. On a GPU the same tests
run
compiled. The interpreter has no bfloat16 `tl.dot` (it multiplies the raw bit patterns), so the
attention kernels' half-precision tests use float16 there; the elementwise kernels test bfloat16.
"""

import json
import os
import random

import numpy as np
import pytest
import torch
from packaging.version import Version

triton = pytest.importorskip("triton")
if (
    os.environ.get("TRITON_INTERPRET") == "1"
    and Version(triton.__version__) < Version("3.7.1")
    and Version(np.__version__) >= Version("2.4")
):
    # Its interpreter calls int() on 1-element arrays (loop bounds loaded from memory), which
    # numpy 2.4 refuses; triton 3.7.1 fixed it.
    pytest.skip(
        "the Triton interpreter needs triton>=3.7.1 with numpy>=2.4", allow_module_level=True
    )

from labkit.kernels.fused_add_rmsnorm import (  # noqa: E402
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_ref,
)
from labkit.kernels.fused_moe import MoeConfig, fused_moe, fused_moe_ref, moe_align_block_size  # noqa: E402
from labkit.kernels.gemv import GemvWorkspace, gemv, gemv_ref  # noqa: E402
from labkit.kernels.gemv_configs import GemvConfig  # noqa: E402
from labkit.kernels.moe_route import moe_route  # noqa: E402
from labkit.kernels.one_shot_all_reduce import (  # noqa: E402
    BLOCK,
    MAX_PROGRAMS,
    one_shot_all_reduce,
    one_shot_all_reduce_ref,
)
from labkit.kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_ref  # noqa: E402
from labkit.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from labkit.kernels.rotary_store_kvcache import rotary_store_kvcache, rotary_store_kvcache_ref  # noqa: E402
from labkit.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref  # noqa: E402
from labkit.layers.attention import SeqSlice  # noqa: E402
from labkit.layers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from labkit.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from labkit.layers.fused_moe import experts_torch, route  # noqa: E402
from labkit.layers.norm import QKNorm, RMSNorm  # noqa: E402
from labkit.layers.rotary import RotaryEmbedding  # noqa: E402
from labkit.layers.switches import KernelSwitches  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16  # see the module docstring
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# Elementwise kernels round once from float32 where torch rounds after each op, and the
# interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest: one bf16 ulp.
ELEMENTWISE_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}


def paged_cache(ctx_lens: list[int], block_size: int, hkv: int, d: int, dtype: torch.dtype):
    """Random caches with a few spare blocks, and a block table of shuffled (non-contiguous)
    blocks for each sequence."""
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks * block_size, hkv, d, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(ctx_lens), max(need), dtype=torch.int32)
    start = 0
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor(perm[start : start + n])
        start += n
    return k_cache, v_cache, table.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_store_kvcache(dtype, qk_norm):
    """q rotated in place, rotated k and v written by slot mapping (a -1 slot skipped), k and v
    themselves untouched, every other cache slot untouched; with qk_norm every q and k head
    RMS-normalised first (Qwen3), on inputs far from unit scale."""
    t, hq, hkv, d, slots = 7, 6, 2, 32, 40
    rotary = RotaryEmbedding(d, 64, 10000.0).to(DEVICE)
    qkv = torch.randn(t, hq + 2 * hkv, d, dtype=dtype, device=DEVICE) * (8.0 if qk_norm else 1.0)
    norm = {}
    if qk_norm:
        norm = dict(
            q_norm_weight=torch.rand(d, dtype=dtype, device=DEVICE) + 0.5,
            k_norm_weight=torch.rand(d, dtype=dtype, device=DEVICE) + 0.5,
            norm_eps=1e-6,
        )
    positions = torch.randint(0, 64, (t,), device=DEVICE)
    mapping = torch.randperm(slots, device=DEVICE)[:t]
    mapping[3] = -1  # padding
    caches = [torch.randn(slots, hkv, d, dtype=dtype, device=DEVICE) for _ in range(2)]
    refs = [c.clone() for c in caches]
    ref_qkv = qkv.clone()
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)  # strided views, as the qkv split gives
    rq, rk, rv = ref_qkv.split([hq, hkv, hkv], dim=1)
    rotary_store_kvcache(
        positions, q, k, v, rotary.cos, rotary.sin, *caches, mapping.to(torch.int32), **norm
    )
    rotary_store_kvcache_ref(positions, rq, rk, rv, rotary.cos, rotary.sin, *refs, mapping, **norm)
    torch.testing.assert_close(q, rq, **ELEMENTWISE_TOL[dtype])
    assert torch.equal(qkv[:, hq:], ref_qkv[:, hq:])  # k and v untouched
    torch.testing.assert_close(caches[0], refs[0], **ELEMENTWISE_TOL[dtype])
    assert torch.equal(caches[1], refs[1])
    untouched = torch.ones(slots, dtype=torch.bool, device=DEVICE)
    untouched[mapping[mapping >= 0]] = False
    assert torch.equal(caches[0][untouched], refs[0][untouched])


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("block_size,num_splits", [(4, 1), (8, 3), (16, None)])
@pytest.mark.parametrize("window", [None, 20, 100])
def test_paged_attention_decode(dtype, block_size, num_splits, window):
    """A sliding window of 20 is shorter than most contexts; one of 100 leaves the 150-token
    context a window of two tiles, not tile-aligned."""
    hkv, group, d = 2, 2, 32
    # 150 tokens: more than two 64-token tiles, so three splits get two non-empty ones.
    ctx_lens = [random.randint(1, 40) for _ in range(2)] + [150]
    k_cache, v_cache, table = paged_cache(ctx_lens, block_size, hkv, d, dtype)
    q = torch.randn(len(ctx_lens), hkv * group, d, dtype=dtype, device=DEVICE)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, table, lens, d**-0.5, block_size)
    torch.testing.assert_close(
        paged_attention_decode(*args, num_splits=num_splits, window=window),
        paged_attention_decode_ref(*args, window=window),
        **TOL[dtype],
    )


def test_paged_attention_decode_empty_context_gives_zeros():
    k_cache, v_cache, table = paged_cache([5, 1], 4, 1, 16, torch.float32)
    q = torch.randn(2, 2, 16, device=DEVICE)
    lens = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, table, lens, 0.25, 4)
    for splits in (1, 2):
        out = paged_attention_decode(*args, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out, paged_attention_decode_ref(*args), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_prefill_attention(dtype, block_size, window):
    """Sliding windows: 5 (every row's window starts inside its tile's first key tile or
    later: whole key tiles masked for some rows), 40 (crosses the 64-token tile edges)."""
    hkv, group, d = 2, 2, 16
    # A fresh prompt, a chunk after a cached prefix, a one-token chunk, a chunk past 64 tokens
    # (two query tiles).
    q_lens = [random.randint(2, 20), random.randint(2, 12), 1, 70]
    ctx_lens = [q_lens[0], q_lens[1] + random.randint(1, 28), random.randint(2, 30), 75]
    k_cache, v_cache, table = paged_cache(ctx_lens, block_size, hkv, d, dtype)
    q = torch.randn(sum(q_lens), hkv * group, d, dtype=dtype, device=DEVICE)
    cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, cu, lens, table, d**-0.5, block_size)
    torch.testing.assert_close(
        prefill_attention(*args, max(q_lens), window=window),
        prefill_attention_ref(*args, window=window),
        **TOL[dtype],
    )


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_attention_kernels_read_an_fp8_cache(dtype):
    """kv_cache_dtype="fp8": the decode and prefill kernels widen the float8 cache's values
    (scale 1.0) as the references do, whatever the queries' dtype."""
    hkv, group, d, block_size = 2, 2, 32, 8
    ctx_lens = [random.randint(1, 40), 150]
    k_cache, v_cache, table = paged_cache(ctx_lens, block_size, hkv, d, torch.float32)
    k_cache, v_cache = (4 * k_cache).to(FP8), (4 * v_cache).to(FP8)  # well inside its range
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(ctx_lens), hkv * group, d, dtype=dtype, device=DEVICE)
    args = (q, k_cache, v_cache, table, lens, d**-0.5, block_size)
    for splits in (1, 3):
        torch.testing.assert_close(
            paged_attention_decode(*args, num_splits=splits),
            paged_attention_decode_ref(*args),
            **TOL[dtype],
        )
    q_lens = [ctx_lens[0], 70]  # a fresh prompt, and a chunk after a cached prefix
    q = torch.randn(sum(q_lens), hkv * group, d, dtype=dtype, device=DEVICE)
    cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    args = (q, k_cache, v_cache, cu, lens, table, d**-0.5, block_size)
    torch.testing.assert_close(
        prefill_attention(*args, max(q_lens)), prefill_attention_ref(*args), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_store_kvcache_rounds_into_an_fp8_cache(dtype, interpreter_fp8_rounding):
    """Rotated k and v rounded to float8_e4m3fn (saturating: 1000 becomes 448) by slot. The
    kernel rotates in float32 and rounds once; the reference rotates in `dtype` (bfloat16: off by
    up to ~0.1 at these magnitudes) and rounds that, so a value may land a float8 step away."""
    t, hq, hkv, d, slots = 5, 4, 2, 32, 16
    rotary = RotaryEmbedding(d, 64, 10000.0).to(DEVICE)
    qkv = torch.randn(t, hq + 2 * hkv, d, dtype=dtype, device=DEVICE) * 20
    qkv[0, hq + hkv, 0] = 1000.0  # a v element past float8's 448
    positions = torch.randint(0, 64, (t,), device=DEVICE)
    mapping = torch.randperm(slots, device=DEVICE)[:t]
    caches = [torch.zeros(slots, hkv, d, dtype=FP8, device=DEVICE) for _ in range(2)]
    refs = [c.clone() for c in caches]
    q, k, v = qkv.clone().split([hq, hkv, hkv], dim=1)
    rq, rk, rv = qkv.clone().split([hq, hkv, hkv], dim=1)
    rotary_store_kvcache(positions, q, k, v, rotary.cos, rotary.sin, *caches, mapping)
    rotary_store_kvcache_ref(positions, rq, rk, rv, rotary.cos, rotary.sin, *refs, mapping)
    for got, ref in zip(caches, refs):
        # one float8 step: 2**-3 of the value at most (2**-9 among the subnormals)
        atol = 2**-9 if dtype == torch.float32 else 0.25
        torch.testing.assert_close(got.float(), ref.float(), rtol=0.126, atol=atol)
    assert caches[1][mapping[0], 0, 0].float() == 448.0
    assert (caches[1].float() != 0).sum() > 0.9 * t * hkv * d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_fused_add_rmsnorm(dtype, hidden):
    x = torch.randn(5, hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn_like(x)
    weight = torch.rand(hidden, dtype=dtype, device=DEVICE) + 0.5
    out, new_res = fused_add_rmsnorm(x, residual, weight, 1e-6)
    ref_out, ref_res = fused_add_rmsnorm_ref(x, residual, weight, 1e-6)
    torch.testing.assert_close(new_res, ref_res, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(out, ref_out, **ELEMENTWISE_TOL[dtype])
    torch.testing.assert_close(
        rmsnorm(x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6), **ELEMENTWISE_TOL[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = torch.randn(5, 2 * 1100, dtype=dtype, device=DEVICE)  # two column blocks, one partial
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **ELEMENTWISE_TOL[dtype])


def test_moe_align_block_size():
    """Slots sorted by expert, each expert's run padded to the block size with T * k, the
    expert of each block, the padded total; blocks past it (worst-case sizing) clamp."""
    ids = torch.tensor([[0, 2], [2, 1], [0, 2]], device=DEVICE)
    sorted_ids, experts, total = moe_align_block_size(ids, 4, 4)
    pad = 6
    assert sorted_ids.tolist() == [0, 4, pad, pad, 3, pad, pad, pad, 1, 2, 5, pad] + [pad] * 8
    assert experts.tolist() == [0, 1, 2, 3, 3] and total.tolist() == [12]


# (tokens, experts, top-k, hidden, intermediate, config): a decode-sized batch with the default
# config (per slot; experts without tokens), per slot with partial K tiles, per slot at top-3
# (a padding slot in the down read's sum) with partial N and K tiles, a small batch in 16-row
# blocks, a batch over several row blocks per expert with odd feature counts (partial N and K
# tiles) and grouped ordering, top-3.
MOE_CASES = [
    (5, 4, 2, 32, 16, None),
    (3, 8, 2, 48, 40, MoeConfig(1, 16, 32, per_slot=True)),
    (4, 8, 3, 50, 24, MoeConfig(1, 16, 16, per_slot=True)),
    (9, 4, 2, 32, 16, MoeConfig(16, 64, 64, group_m=1)),
    (37, 8, 2, 48, 40, MoeConfig(16, 32, 16, group_m=4)),
    (70, 4, 3, 32, 24, MoeConfig(32, 16, 32)),
]


@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: f"T{c[0]}_E{c[1]}_k{c[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_fused_moe(case, dtype):
    """Both grouped GEMMs, SiLU-and-mul between and the routing weights against the float32
    reference; the MoE layer's torch path (labkit.layers.fused_moe) against it too."""
    t, e, k, h, i, cfg = case
    x = torch.randn(t, h, dtype=dtype, device=DEVICE)
    w13 = torch.randn(e, 2 * i, h, dtype=dtype, device=DEVICE) / h**0.5
    w2 = torch.randn(e, h, i, dtype=dtype, device=DEVICE) / i**0.5
    weights, ids = route(torch.randn(t, e, device=DEVICE), k, True, dtype)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, config=cfg), ref, **TOL[dtype])
    torch.testing.assert_close(experts_torch(x, w13, w2, weights, ids), ref, **TOL[dtype])


@pytest.mark.parametrize(
    "experts,top_k,renormalize", [(8, 2, True), (60, 4, False), (128, 8, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_moe_route(experts, top_k, renormalize, dtype):
    """The router kernel picks the experts route() picks, in its order, with its weights; a row
    of equal logits takes the lowest ids first."""
    # Distinct in every dtype (sixteenths of small integers), except row 3: all equal.
    logits = torch.stack([torch.randperm(experts) - experts // 2 for _ in range(7)]) / 16
    logits = logits.to(device=DEVICE, dtype=dtype)
    logits[3] = 0.0
    weights, ids = moe_route(logits, top_k, renormalize, dtype)
    ref_w, ref_i = route(logits, top_k, renormalize, dtype)
    assert ids.dtype == ref_i.dtype and torch.equal(
        ids[[0, 1, 2, 4, 5, 6]], ref_i[[0, 1, 2, 4, 5, 6]]
    )
    assert ids[3].tolist() == list(range(top_k))
    torch.testing.assert_close(weights, ref_w, **TOL[dtype])


def test_fused_moe_tables_and_dispatch(monkeypatch, tmp_path):
    """A per-card table (configs/fused_moe_<card>.json) gives the entry of the nearest row
    bucket for its shapes; other shapes, and cards without a table, get the default."""
    from labkit.kernels import fused_moe as M

    for path in M.CONFIG_DIR.glob("fused_moe_*.json"):  # committed tables parse
        for by_m in json.loads(path.read_text())["configs"].values():
            cfgs = [M.MoeConfig(**c) for c in by_m.values()]
            assert all(c.per_slot or c.block_m >= 16 for c in cfgs)
    small, large = (
        dict(block_m=16, block_n=32, block_k=64),
        dict(block_m=64, block_n=128, block_k=64),
    )
    (tmp_path / "fused_moe_Test_Card.json").write_text(
        json.dumps({"card": "Test Card", "configs": {"8,256,64": {"1": small, "256": large}}})
    )
    monkeypatch.setattr(M, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test Card")
    M._table.cache_clear()
    try:
        dev = torch.device("cuda", 0)  # only its name (above) is read
        assert M.choose_config(2, 8, 256, 64, dev) == M.MoeConfig(**small)
        assert M.choose_config(300, 8, 256, 64, dev) == M.MoeConfig(**large)
        assert M.choose_config(2, 8, 512, 64, dev) == M.default_config(2)
        assert M.choose_config(300, 8, 256, 64, torch.device("cpu")) == M.default_config(300)
    finally:
        M._table.cache_clear()


# (rows, config): FMAs up to 2 rows, tensor cores up to 16. K = 200 is no multiple of the tiles;
# split-K over 3 programs of 96 columns (the last one partial) and over 3 of 128 (the last one
# empty); N = 37 fills the last row block only in part.
GEMV_CASES = [
    (1, GemvConfig(4, 64, 2, False)),
    (2, GemvConfig(8, 32, 1, False, split_k=3)),
    (5, GemvConfig(16, 64, 4, True)),
    (16, GemvConfig(16, 128, 4, True, split_k=3)),
]


@pytest.mark.parametrize("rows,config", GEMV_CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("gated,bias", [(False, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_gemv(rows, config, gated, bias, dtype):
    """y = x w^T (+ bias), gated: silu(gate) * up of x first; x a strided view (as the o_proj
    input is); every output element checked against the float32 reference."""
    n, k = 37, 200
    x = torch.randn(rows, 3 * k, dtype=dtype, device=DEVICE)[:, : (2 * k if gated else k)]
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k**0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    ref = gemv_ref(x, w, b, gated=gated)
    workspace = GemvWorkspace(DEVICE)
    # Twice: split-K's arrival counts must be back at zero after a call.
    for _ in range(2):
        torch.testing.assert_close(
            gemv(x, w, b, gated=gated, config=config, workspace=workspace), ref, **TOL[dtype]
        )


def test_gemv_tables_and_dispatch(monkeypatch):
    """Every committed per-card table parses into launchable configurations; on the H200, tuned
    shapes get their entry (None: cuBLAS), untuned ones the kernel at 1-2 rows, cuBLAS above."""
    from labkit.kernels import gemv_configs as G

    for path in G.CONFIG_DIR.glob("gemv_*.json"):
        for key, entry in json.loads(path.read_text())["configs"].items():
            bucket, n, k = map(int, key.removeprefix("fp8,").split(","))
            if entry is not None:
                cfg = G.GemvConfig(**entry)
                assert cfg.dot or bucket <= G.FMA_MAX_ROWS, (path.name, key)
                assert cfg.block_n & (cfg.block_n - 1) == 0 and cfg.split_k >= 1
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    G._table.cache_clear()
    try:
        dev = torch.device("cuda", 0)  # only its name (above) is read
        assert G.choose_config(1, 3584, 18944, dev) == G.GemvConfig(64, 128, 4, True, 8, False)
        assert G.choose_config(16, 3584, 18944, dev) is None
        assert G.choose_config(1, 4608, 3584, dev) == G.GemvConfig(2, 1024, 4, False)
        assert G.choose_config(2, 4608, 3584, dev) is None
        assert G.choose_config(2, 64, 96, dev) == G.heuristic_config(2, 96)
        assert (
            G.choose_config(8, 64, 96, dev) is None and G.choose_config(17, 3584, 3584, dev) is None
        )
    finally:
        G._table.cache_clear()


BACKEND_CASES = [(None, False), (10, False), (None, True)]  # (window, qk_norm)


@pytest.mark.parametrize(
    "dtype,window,qk_norm,kv",
    [
        *((dt, w, qn, None) for dt in (torch.float32, HALF) for w, qn in BACKEND_CASES),
        (torch.float32, None, False, torch.float8_e4m3fn),
    ],
)
def test_triton_backend_matches_torch_backend(dtype, window, qk_norm, kv, interpreter_fp8_rounding):
    """Both backends on one mixed step; qk_norm: Qwen3's per-head norms (RMSNorm modules in
    torch, inside the rotary kernel in Triton); kv: an FP8 cache (kv_cache_dtype="fp8")."""
    block_size, hkv, group, d = 8, 2, 2, 16
    norm = None
    if qk_norm:
        norm = QKNorm(*(RMSNorm(d, 1e-6, switches=KernelSwitches()) for _ in range(2)))
        for m in (norm.q, norm.k):
            m.weight.data = torch.rand(d, dtype=dtype, device=DEVICE) + 0.5
    # Three decodes, then a chunk of 9 after 20 cached tokens and a fresh 6-token prompt.
    q_lens, ctx_lens = [1, 1, 1, 9, 6], [random.randint(1, 40), 17, 33, 29, 6]
    k_cache, v_cache, table = paged_cache(ctx_lens, block_size, hkv, d, dtype)
    if kv is not None:
        k_cache, v_cache = k_cache.to(kv), v_cache.to(kv)
    seqs = [SeqSlice(ql, cl, row.tolist()) for ql, cl, row in zip(q_lens, ctx_lens, table.cpu())]
    t = sum(q_lens)
    rotary = RotaryEmbedding(d, 64, 10000.0).to(DEVICE)
    positions = torch.cat([torch.arange(c - ql, c) for ql, c in zip(q_lens, ctx_lens)]).to(DEVICE)
    qkv = torch.randn(t, hkv * (group + 2), d, dtype=dtype, device=DEVICE)
    outs, caches = [], []
    for backend in (
        TorchAttentionBackend(block_size, DEVICE),
        TritonAttentionBackend(block_size, DEVICE, KernelSwitches()),
    ):
        kc, vc = k_cache.clone(), v_cache.clone()
        # strided views, as the model passes (the Triton backend rotates q in place: a copy each)
        q, k, v = qkv.clone().split([hkv * group, hkv, hkv], dim=1)
        outs.append(
            backend.forward(
                positions, q, k, v, rotary, kc, vc, backend.prepare(seqs), d**-0.5, window, norm
            )
        )
        caches.append((kc, vc))
    assert torch.equal(caches[1][1], caches[0][1])
    if kv is not None:  # a new key may round to the neighbouring float8 step
        torch.testing.assert_close(caches[1][0].float(), caches[0][0].float(), rtol=0.126, atol=0)
        torch.testing.assert_close(outs[1], outs[0], rtol=0.02, atol=0.02)
        return
    torch.testing.assert_close(outs[1], outs[0], **TOL[dtype])
    # Rotary rounds once in the kernel, after each op in torch: k's cache rows within an ulp.
    torch.testing.assert_close(caches[1][0], caches[0][0], **ELEMENTWISE_TOL.get(dtype, TOL[dtype]))


def _all_reduce_rank(rank, world, xs, outs, buf_ptrs, sig_ptrs):
    for it in range(xs.shape[0]):
        x = xs[it, rank].clone()
        one_shot_all_reduce(x, buf_ptrs, sig_ptrs, rank, world)
        outs[it, rank] = x


@pytest.mark.skipif(
    DEVICE.type == "cuda",
    reason="ranks as CPU processes; on GPUs see dev/gpu_allreduce.py (several cards, CUDA IPC)",
)
@pytest.mark.parametrize("world,numel", [(2, 300), (3, BLOCK * (MAX_PROGRAMS + 1) + 5)])
def test_one_shot_all_reduce(world, numel):
    """Ranks are forked processes over shared CPU memory (the interpreter runs each launch's
    programs one after another, as a GPU may): every rank gets the rank-order sum, bit for bit,
    call after call (the larger case has programs that handle two chunks), and the signal pads
    are back to zero after each call."""
    import multiprocessing as mp

    iters = 2
    bufs = [torch.zeros(numel).share_memory_() for _ in range(world)]
    sigs = [
        torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32).share_memory_() for _ in range(world)
    ]
    xs = torch.randn(iters, world, numel).share_memory_()
    outs = torch.zeros(iters, world, numel).share_memory_()
    buf_ptrs = torch.tensor([b.data_ptr() for b in bufs])
    sig_ptrs = torch.tensor([s.data_ptr() for s in sigs])
    procs = [
        mp.get_context("fork").Process(
            target=_all_reduce_rank, args=(r, world, xs, outs, buf_ptrs, sig_ptrs)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs)
    for it in range(iters):
        ref = one_shot_all_reduce_ref(list(xs[it]))
        assert all(torch.equal(outs[it, r], ref) for r in range(world))
    assert all(int(s.abs().sum()) == 0 for s in sigs)


def test_triton_metadata_views_are_16_byte_aligned():
    """Triton specialises pointer arguments on their alignment: a step whose metadata views
    landed at odd offsets would compile a new kernel variant mid-run (~1 s on a GPU)."""
    backend = TritonAttentionBackend(4, DEVICE, KernelSwitches())
    for q_lens, ctx_lens in (([1, 1, 1, 5], [3, 9, 6, 5]), ([1, 7, 3], [2, 7, 10]), ([5], [5])):
        seqs = [
            SeqSlice(q, c, list(range(i * 4, i * 4 + -(-c // 4))))
            for i, (q, c) in enumerate(zip(q_lens, ctx_lens))
        ]
        meta = backend.prepare(seqs)
        tensors = [t for t in vars(meta).values() if torch.is_tensor(t)]
        assert len(tensors) > 1 and all(t.data_ptr() % 16 == 0 for t in tensors)


def test_padded_block_table():
    from labkit.layers.attention import padded_block_table

    table = padded_block_table([[3, 1, 4], [1], [], [5, 9]])
    assert table.dtype == np.int32
    assert table.tolist() == [[3, 1, 4], [1, 0, 0], [0, 0, 0], [5, 9, 0]]


def test_kernel_switches_come_from_the_env_given():
    """Each engine reads its switches when it starts, from the environment it is given; PDL is
    off under the interpreter, and everything is off on the CPU."""
    cuda = torch.device("cuda")
    assert not KernelSwitches.from_env(cuda, {"LABKIT_GEMV": "0"}).use_gemv
    assert KernelSwitches.from_env(cuda, {}).use_gemv
    assert KernelSwitches.from_env(cuda, {"LABKIT_PDL": "0"}).pdl == 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert KernelSwitches.from_env(cuda, {}).pdl == 0
    assert KernelSwitches.from_env(torch.device("cpu"), {}) == KernelSwitches()
