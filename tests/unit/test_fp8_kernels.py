"""The FP8 paths on CUDA against the dequantizing reference (labkit.layers.quantization.fp8's
fp8_linear), run by Triton's interpreter on a CPU: the decode kernel with per-row and block weight
scales and every input rounding (per token and per tensor quantized before the call, as the
layers do), the input quantizer, the scale algebra handed to _scaled_mm (emulated: it has no CPU
kernel), and which path a layer's rows take.

The interpreter's float32 -> float8_e4m3fn rounding is replaced by torch's (the GPU's): see the
`interpreter_fp8_rounding` fixture in conftest.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from fp8_checkpoints import quantize_blocks, quantize_rows

triton = pytest.importorskip("triton")

from labkit.kernels import gemv_configs  # noqa: E402
from labkit.kernels.fp8_quant import quantize_fp8, quantize_fp8_ref  # noqa: E402
from labkit.kernels.fused_add_rmsnorm import (  # noqa: E402
    fused_add_rmsnorm,
    rmsnorm,
    rmsnorm_fp8,
)
from labkit.kernels.gemv import GemvWorkspace, gemv  # noqa: E402
from labkit.kernels.gemv_configs import GemvConfig  # noqa: E402
from labkit.kernels.gemv_tiles import Fp8Operands  # noqa: E402
from labkit.layers.activation import SiluAndMul  # noqa: E402
from labkit.layers.norm import RMSNorm  # noqa: E402
from labkit.layers.quantization import fp8_cuda  # noqa: E402
from labkit.layers.quantization.fp8 import Fp8Input, fp8_linear, quantize_per_token  # noqa: E402
from labkit.layers.quantization.scheme import Fp8Scheme  # noqa: E402
from labkit.layers.switches import KernelSwitches  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16  # no bf16 tl.dot interpreted
N, K = 192, 256


@pytest.fixture(autouse=True)
def fp8_rounding(interpreter_fp8_rounding):
    pass


def _weight(kind: str, n: int = N, k: int = K) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(float8 weight, float32 scale, block) quantized by the tests' own code."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) / k**0.5
    if kind == "block":
        q, scale, _ = quantize_blocks(w)
        return q.to(DEVICE), scale.to(DEVICE), (128, 128)
    q, scale, _ = quantize_rows(w, per_tensor=False)
    return q.to(DEVICE), scale.float().reshape(-1).to(DEVICE), None


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within accumulation-order and rounding differences: the kernel keeps per-row weight
    scales out of the products, where the reference rounds each q * scale to x's dtype, and an
    input element may round to the neighbouring float8 value when the kernel's scale differs
    from torch's in the last bit."""
    err = (got.float() - ref.float()).norm() / ref.float().norm()
    tol = 1e-5 if got.dtype == torch.float32 else 5e-3
    assert err < tol, err
    torch.testing.assert_close(got.float(), ref.float(), atol=5e-2, rtol=5e-2)


# (rows, config): FMAs at 1-2 rows (split-K over 2), tensor cores up to 16 (split-K over 2).
CASES = [
    (1, GemvConfig(4, 128, 2, False)),
    (2, GemvConfig(8, 128, 2, False, split_k=2)),
    (3, GemvConfig(16, 128, 4, True)),
    (16, GemvConfig(64, 128, 4, True, split_k=2)),
]
SCHEMES = [  # (weight scales, input rounding)
    ("channel", "token"),
    ("channel", "tensor"),
    ("channel", None),
    ("block", "group"),
    ("block", "token"),
]


@pytest.mark.parametrize("rows,config", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("weights,activations", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_fp8_decode_kernel_equals_dequantized_reference(rows, config, weights, activations, dtype):
    q, scale, block = _weight(weights)
    group = 128 if activations == "group" else None
    x = torch.randn(rows, K, dtype=dtype, device=DEVICE)
    b = torch.randn(N, dtype=dtype, device=DEVICE)
    ref = fp8_linear(
        x, q, scale, block=block, activations=activations, activation_group=group, bias=b
    )
    fp8 = Fp8Operands(scale, block, activations, group)
    if fp8.quantized_input:
        xq, x_scale = fp8_cuda.quantize_input(x, activations)
        x, fp8 = xq, dataclasses.replace(fp8, input_scale=x_scale, dtype=x.dtype)
    workspace = GemvWorkspace(DEVICE)
    for _ in range(2):  # split-K's arrival counts must be back at zero after a call
        _close(gemv(x, q, b, config=config, workspace=workspace, fp8=fp8), ref)


@pytest.mark.parametrize("rows,config", [CASES[0], CASES[2]], ids=lambda c: str(c))
def test_fp8_decode_kernel_fuses_the_mlp_activation(rows, config):
    """down_proj's input silu(gate) * up computed in the kernel, then rounded per group of
    columns."""
    q, scale, _ = _weight("channel")
    gate_up = torch.randn(rows, 2 * K, device=DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = fp8_linear(
        F.silu(gate) * up, q, scale, block=None, activations="group", activation_group=128
    )
    fp8 = Fp8Operands(scale, None, "group", 128)
    _close(gemv(gate_up, q, gated=True, config=config, fp8=fp8), ref)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("given", [False, True])
def test_quantize_fp8_equals_reference(given, gated):
    """Gated: the input is [gate | up] and silu(gate) * up (rounded to its dtype) is quantized."""
    x = torch.randn(5, 600 if gated else 300, dtype=HALF, device=DEVICE) * 3
    x[2] = 0  # an all-zero row gets the smallest scale, not 0
    scale = torch.tensor([0.02], device=DEVICE) if given else None
    q, s = quantize_fp8(x, scale, gated=gated)
    if gated:
        gate, up = x.float().chunk(2, dim=-1)
        x = (F.silu(gate) * up).to(x.dtype)
    q_ref, s_ref = quantize_fp8_ref(x, scale)
    assert s.shape == (5, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, atol=0, rtol=1e-6)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_rmsnorm_fp8_output_equals_quantizing_the_norm(residual, dtype):
    """The norm's FP8 output is bit for bit what the quantizer makes of its float output, and
    the residual sum is unchanged."""
    x = torch.randn(5, 300, dtype=dtype, device=DEVICE) * 3
    r = torch.randn(5, 300, dtype=dtype, device=DEVICE) if residual else None
    w = (torch.rand(300, device=DEVICE) + 0.5).to(dtype)
    x[3] = 0
    if r is not None:
        r[3] = 0  # an all-zero row gets the smallest scale
    q, s, new_r = rmsnorm_fp8(x, r, w, 1e-6)
    if r is None:
        out = rmsnorm(x, w, 1e-6)
        assert new_r is None
    else:
        out, res = fused_add_rmsnorm(x, r, w, 1e-6)
        assert torch.equal(new_r, res)
    q_ref, s_ref = quantize_fp8(out)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("residual", [False, True])
def test_the_norm_layer_hands_over_its_output_rounded_per_token(residual):
    """RMSNorm(fp8_output=True) on its kernel path (run here by the interpreter) returns what
    quantize_per_token makes of the float norm's output, and the same residual sum."""
    weight = torch.rand(300, device=DEVICE) + 0.5
    norms = [RMSNorm(300, 1e-6, switches=KernelSwitches(), fp8_output=f) for f in (True, False)]
    for norm in norms:
        norm.weight.data = weight
    x = torch.randn(4, 300, device=DEVICE) * 3
    r = torch.randn(4, 300, device=DEVICE) if residual else None
    got, ref = (norm._forward_cuda(x, r) for norm in norms)
    if residual:
        (got, got_r), (ref, ref_r) = got, ref
        assert torch.equal(got_r, ref_r)
    ref = quantize_per_token(ref)
    assert isinstance(got, Fp8Input) and got.dtype == torch.float32
    assert torch.equal(got.scale, ref.scale)
    assert torch.equal(got.q.view(torch.uint8), ref.q.view(torch.uint8))


def _emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm's row-wise path, with the layout it demands checked."""
    m, n = a.shape[0], b.shape[1]
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.is_contiguous()
    assert b.stride(0) == 1, "the second operand must be column-major"
    assert scale_a.shape == (m, 1) and scale_b.shape == (1, n) and out_dtype == torch.bfloat16
    assert scale_a.dtype == scale_b.dtype == torch.float32
    return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_scaled_mm_path_computes_the_reference(monkeypatch, activations):
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    q, scale, _ = _weight("channel")
    x = torch.randn(40, K, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(N, dtype=torch.bfloat16, device=DEVICE)
    got = fp8_cuda.scaled_mm_linear(x, q, scale, activations, b)
    ref = fp8_linear(x, q, scale, block=None, activations=activations, bias=b)
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("activations", ["token", "tensor"])
def test_scaled_mm_path_takes_the_mlp_activation(monkeypatch, activations):
    """The merged gate/up output in: per token the quantizer computes silu(gate) * up as it
    reads, per tensor the activation runs first; either way the product of the activated input.
    In float32: a bf16 activation computed two ways may differ in its last bit, which moves an
    element to the neighbouring float8 value."""
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    q, scale, _ = _weight("channel")
    x = torch.randn(40, 2 * K, device=DEVICE)
    b = torch.randn(N, dtype=torch.bfloat16, device=DEVICE)
    act = SiluAndMul(KernelSwitches())
    got = fp8_cuda.scaled_mm_linear(x, q, scale, activations, b, act=act)
    _close(got, fp8_cuda.scaled_mm_linear(act(x), q, scale, activations, b))


@pytest.mark.parametrize("rows", [1, 40])
def test_an_fp8_input_goes_to_the_kernels_as_it_is(monkeypatch, rows):
    """An input the norm rounded already (Fp8Input) gives the product of quantizing the float
    input in the layer, on the decode kernel (1 row) and _scaled_mm (40), and the reference."""
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    monkeypatch.setattr(gemv_configs, "_table", lambda device: {})
    q, scale, _ = _weight("channel")
    x = torch.randn(rows, K, dtype=torch.bfloat16, device=DEVICE)
    xq = quantize_per_token(x)
    scheme = Fp8Scheme(None, "channel", "token")
    switches = KernelSwitches(use_gemv=True)
    args = (q, scale, scheme, None, None, switches, GemvWorkspace(DEVICE))
    ref = fp8_linear(x, q, scale, block=None, activations="token")
    assert torch.equal(fp8_linear(xq, q, scale, block=None, activations="token"), ref)
    got = fp8_cuda.fp8_linear_cuda(xq, *args)
    assert torch.equal(got, fp8_cuda.fp8_linear_cuda(x, *args))
    _close(got, ref)


@pytest.mark.parametrize(
    "rows,scheme,use_gemv,path",
    [
        (1, Fp8Scheme(None, "channel", "token"), True, "gemv"),
        (16, Fp8Scheme("fp8", "block", "group", (128, 128), 128), True, "gemv"),
        (17, Fp8Scheme(None, "channel", "token"), True, "scaled_mm"),
        (1, Fp8Scheme(None, "channel", "token"), False, "scaled_mm"),
        (17, Fp8Scheme("fp8", "block", "group", (128, 128), 128), True, "reference"),
        (17, Fp8Scheme("compressed-tensors", "channel", None), True, "reference"),
    ],
)
def test_rows_and_schemes_choose_their_path(monkeypatch, rows, scheme, use_gemv, path):
    taken = []
    monkeypatch.setattr(gemv_configs, "_table", lambda device: {})  # no tuned table
    monkeypatch.setattr(fp8_cuda, "gemv", lambda *a, **kw: taken.append("gemv"))
    monkeypatch.setattr(fp8_cuda, "scaled_mm_linear", lambda *a, **kw: taken.append("scaled_mm"))
    monkeypatch.setattr(fp8_cuda, "fp8_linear", lambda *a, **kw: taken.append("reference"))
    q, scale, _ = _weight("block" if scheme.block else "channel")
    x = torch.randn(rows, K, dtype=torch.bfloat16)
    switches = KernelSwitches(use_gemv=use_gemv)
    fp8_cuda.fp8_linear_cuda(x, q, scale, scheme, None, None, switches, None)
    assert taken == [path]


def test_fp8_table_entries_are_keyed_apart(monkeypatch, tmp_path):
    """A card's table holds bf16 and FP8 entries of one shape apart; untuned FP8 shapes get the
    FP8 heuristic up to 16 rows (whole 128-column groups per tile, split-K for few row blocks),
    cuBLAS above."""
    G = gemv_configs
    fp8_cfg = dict(block_n=8, block_k=1024, num_warps=4, dot=False)
    (tmp_path / "gemv_Test_Card.json").write_text(
        json.dumps({"configs": {"1,64,256": None, "fp8,1,64,256": fp8_cfg, "fp8,4,64,256": None}})
    )
    monkeypatch.setattr(G, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test Card")
    G._table.cache_clear()
    try:
        dev = torch.device("cuda", 0)  # only its name (above) is read
        assert G.choose_config(1, 64, 256, dev) is None
        assert G.choose_config(1, 64, 256, dev, fp8=True) == GemvConfig(**fp8_cfg)
        assert G.choose_config(3, 64, 256, dev, fp8=True) is None
        assert G.choose_config(8, 3584, 18944, dev, fp8=True) == G.fp8_heuristic_config(
            8, 3584, 18944
        )
        assert G.choose_config(17, 3584, 18944, dev, fp8=True) is None
    finally:
        G._table.cache_clear()
    down = G.fp8_heuristic_config(8, 3584, 18944)
    assert down.dot and down.block_k % 128 == 0 and down.split_k > 1
    assert G.fp8_heuristic_config(1, 4608, 3584).block_k % 128 == 0


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("weights,activations", [("block", "group"), ("channel", "token")])
def test_the_layer_path_runs_the_kernel_with_the_mlp_activation(
    monkeypatch, rows, weights, activations
):
    """fp8_linear_cuda end to end (no tuned table: the FP8 heuristic, which runs the SiLU first;
    per token, the input quantized before the kernel) against the reference, down_proj-like: the
    merged gate/up output in."""
    monkeypatch.setattr(gemv_configs, "_table", lambda device: {})
    q, scale, block = _weight(weights)
    group = 128 if activations == "group" else None
    gate_up = torch.randn(rows, 2 * K, device=DEVICE)
    switches = KernelSwitches(use_gemv=True)
    scheme = Fp8Scheme("fp8", weights, activations, block, group)
    got = fp8_cuda.fp8_linear_cuda(
        gate_up, q, scale, scheme, None, SiluAndMul(switches), switches, GemvWorkspace(DEVICE)
    )
    gate, up = gate_up.chunk(2, dim=-1)
    ref = fp8_linear(
        F.silu(gate) * up, q, scale, block=block, activations=activations, activation_group=group
    )
    _close(got, ref)
