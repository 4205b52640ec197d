"""FP8 weights in the linear layers: the schemes read from checkpoints' quantization_config, each
layer's output against a float reference computed from the dequantized weight, this rank's
share of the weights and scales under tensor parallelism, and quantizing float weights at load.

The weights are quantized by the tests' own code (tests/fp8_checkpoints.py), not labkit's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp8_checkpoints import (
    FP8,
    compressed_tensors_config,
    hf_fp8_config,
    input_group,
    quantize_blocks,
    quantize_rows,
    round_inputs,
)

from labkit.distributed import TPGroup
from labkit.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from labkit.layers.quantization.fp8 import dequantize
from labkit.layers.quantization.scheme import Fp8Scheme, fp8_scheme
from labkit.layers.switches import KernelSwitches

CONFIGS = {
    "block": hf_fp8_config(),
    "channel": compressed_tensors_config("channel"),
    "tensor": compressed_tensors_config("tensor"),
}
H = 256  # hidden size: two 128-blocks


def _layer(name: str, scheme: Fp8Scheme | None, tp: TPGroup):
    """(layer, {shard: full checkpoint shape}) of one kind of projection."""
    args = dict(tp=tp, switches=KernelSwitches(), workspace=None, quant=scheme)
    if name == "qkv":  # q 512 rows, k and v 256 each
        return QKVParallelLinear(H, 128, 4, 2, **args), {
            "q": (512, H),
            "k": (256, H),
            "v": (256, H),
        }
    if name == "gate_up":
        return MergedColumnParallelLinear(H, [512, 512], **args), {0: (512, H), 1: (512, H)}
    if name == "column":
        return ColumnParallelLinear(H, 512, **args), {None: (512, H)}
    if name == "column_partial":  # 2.5 blocks of rows
        return ColumnParallelLinear(H, 320, **args), {None: (320, H)}
    return RowParallelLinear(512, H, **args), {None: (H, 512)}


def _checkpoint(kind: str, shapes: dict, seed: int = 0) -> dict:
    """{shard: (fp8 weight, scale as the checkpoint stores it, dequantized float32 weight)}."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for shard, shape in shapes.items():
        w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        parts[shard] = quantize_blocks(w) if kind == "block" else quantize_rows(w, kind == "tensor")
    return parts


def _load(layer, parts: dict) -> None:
    """As labkit.models.loader does: each tensor through its parameter's weight_loader."""
    for shard, (q, scale, _) in parts.items():
        for param, tensor in ((layer.weight, q), (layer.weight_scale, scale.float())):
            extra = () if shard is None else (shard,)
            param.weight_loader(param, tensor, *extra)
    layer.process_weights_after_loading()


def _dequantized(layer, kind: str) -> torch.Tensor:
    scheme = fp8_scheme(CONFIGS[kind], None)
    return dequantize(layer.weight, layer.weight_scale, scheme.block, torch.float32)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("name", ["qkv", "gate_up", "column", "column_partial", "row"])
def test_layer_equals_float_reference_of_dequantized_weight(kind, name):
    layer, shapes = _layer(name, fp8_scheme(CONFIGS[kind], None), TPGroup())
    parts = _checkpoint(kind, shapes)
    _load(layer, parts)
    assert layer.weight.dtype == FP8
    w = torch.cat([deq for _, _, deq in parts.values()])
    x = torch.randn(7, w.shape[1])
    y = layer(x)
    # Exactly what an FP8 GEMM computes: the input rounded through FP8, times the weight.
    torch.testing.assert_close(y, F.linear(round_inputs(x, input_group(kind)), w))
    # And the float product, within the rounding of the input to FP8's 3 mantissa bits.
    ref = F.linear(x, w)
    assert (y - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("name", ["qkv", "gate_up", "column", "row"])
def test_scales_shard_with_their_weights(kind, name):
    """Each of 2 ranks holds exactly its rows (column-parallel; merged parts each sliced) or
    columns (row-parallel) of the dequantized weight: per-channel scales go with their rows,
    per-tensor scales fill their part's rows, block scales split on block boundaries."""
    scheme = fp8_scheme(CONFIGS[kind], None)
    whole, shapes = _layer(name, scheme, TPGroup())
    parts = _checkpoint(kind, shapes, seed=1)
    _load(whole, parts)
    full = _dequantized(whole, kind)
    ranks = []
    for rank in range(2):
        layer, _ = _layer(name, scheme, TPGroup(rank, 2))
        _load(layer, parts)
        ranks.append(_dequantized(layer, kind))
    if name == "row":
        assert torch.equal(torch.cat(ranks, dim=1), full)
        return
    # Rank r holds the r-th half of every part, in the parts' order.
    sizes = [shape[0] for shape in shapes.values()]
    halves = [p.chunk(2) for p in full.split(sizes)]
    for rank, got in enumerate(ranks):
        assert torch.equal(got, torch.cat([h[rank] for h in halves]))


def test_float_weights_are_quantized_per_output_channel_at_load():
    scheme = fp8_scheme(None, "fp8")
    assert scheme == Fp8Scheme(None, "channel", "token")
    layer, _ = _layer("gate_up", scheme, TPGroup())
    w = torch.randn(1024, H) * torch.logspace(-3, 0, 1024)[:, None]  # rows of every magnitude
    for shard, half in enumerate(w.chunk(2)):
        layer.weight.weight_loader(layer.weight, half, shard)
    layer.process_weights_after_loading()
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (1024,)
    torch.testing.assert_close(layer.weight_scale, w.abs().amax(dim=1) / 448)
    deq = dequantize(layer.weight, layer.weight_scale, None, torch.float32)
    # Rounded to the nearest of 3 mantissa bits: within 2^-4 of each value (or, below the
    # normal range, half the subnormal step of 2^-9 times the scale).
    bound = torch.maximum(w.abs() / 16, layer.weight_scale[:, None] * 2**-10)
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()
    x = torch.randn(3, H)
    torch.testing.assert_close(layer(x), F.linear(round_inputs(x, None), deq))


def test_schemes_read_from_the_checkpoints_configs():
    assert fp8_scheme(hf_fp8_config(), None) == Fp8Scheme("fp8", "block", "group", (128, 128), 128)
    assert fp8_scheme(hf_fp8_config(), "fp8") == fp8_scheme(hf_fp8_config(), None)
    per_tensor = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    assert fp8_scheme(per_tensor, None) == Fp8Scheme("fp8", "tensor", "tensor")
    for strategy in ("channel", "tensor"):
        got = fp8_scheme(compressed_tensors_config(strategy), None)
        assert got == Fp8Scheme("compressed-tensors", strategy, "token")
    weight_only = compressed_tensors_config("channel")
    weight_only["config_groups"]["group_0"]["input_activations"] = None
    assert fp8_scheme(weight_only, None).activations is None
    assert fp8_scheme(None, None) is None


def test_the_start_up_log_says_what_the_scheme_is():
    assert fp8_scheme(hf_fp8_config(), None).describe() == (
        "FP8 weights as stored (fp8), a scale per 128x128 block, "
        "inputs quantized per token and 128 columns"
    )
    assert fp8_scheme(None, "fp8").describe() == (
        "FP8 weights quantized at load, a scale per output channel, inputs quantized per token"
    )


def _ct(weights: dict | None = None, activations: dict | None = None, **top) -> dict:
    qc = compressed_tensors_config("channel")
    group = qc["config_groups"]["group_0"]
    group["weights"].update(weights or {})
    group["input_activations"].update(activations or {})
    return {**qc, **top}


@pytest.mark.parametrize(
    "config, named",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
        ({"quant_method": "awq"}, "quant_method='awq'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
        ({**hf_fp8_config(), "activation_scheme": "static"}, "activation_scheme='static'"),
        ({**hf_fp8_config(), "fmt": "e5m2"}, "fmt='e5m2'"),
        (_ct({"type": "int"}), "weights of type 'int'"),  # W8A8-INT8
        (_ct({"num_bits": 4}), "with 4 bits"),
        (_ct(activations={"dynamic": False}), "dynamic=False"),
        (_ct(format="pack-quantized"), "format 'pack-quantized'"),
        (_ct(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    ],
)
def test_unsupported_formats_are_refused_by_name(config, named):
    with pytest.raises(ValueError, match="^quantization: .*labkit loads") as e:
        fp8_scheme(config, None)
    assert named in str(e.value)


def test_a_conflicting_quantization_option_is_named():
    with pytest.raises(ValueError, match="quant_method='gptq' .quantization='fp8' was asked"):
        fp8_scheme({"quant_method": "gptq"}, "fp8")


def test_a_rank_share_that_splits_a_scale_block_is_refused():
    scheme = fp8_scheme(hf_fp8_config(), None)
    layer, shapes = _layer("column_partial", scheme, TPGroup(0, 2))  # 160 rows per rank
    with pytest.raises(ValueError, match="160 rows .* 128-row boundaries"):
        _load(layer, _checkpoint("block", shapes))
