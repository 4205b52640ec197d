"""Whether a model's FP8 weights can be built and sharded as its checkpoint stores them, checked
from config.json alone, before any process starts or any weight loads.

Block-wise scales (one per bn x bk block) shard only by whole blocks: every rank's share of a
column-parallel projection's rows (q, k, v, gate, up) must be a whole number of bn-row blocks,
and so must each part merged into one matmul (q/k/v, gate/up), even on one rank; every rank's
share of a row-parallel projection's input (o, down) a whole number of bk-column blocks.
"""

from __future__ import annotations

from labkit.layers.quantization.scheme import Fp8Scheme
from labkit.models.model_config import ModelConfig


def check_fp8_sharding(mc: ModelConfig, scheme: Fp8Scheme, tp: int) -> None:
    """A ValueError naming the projection, its size and the TP size if `tp` ranks would split
    one of its FP8 scale blocks; one for mixture-of-experts models, whose experts have no FP8
    path yet."""
    if mc.num_experts:
        raise ValueError(
            f"quantization: FP8 weights are not supported for mixture-of-experts models yet "
            f"({mc.architecture} has {mc.num_experts} experts per layer)"
        )
    if scheme.block is None:
        return
    bn, bk = scheme.block
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    inter = mc.intermediate_size
    # v and up are as large as k and gate; o and down are split only by more than one rank.
    rows = "output rows"
    splits = [("q_proj", q, bn, rows), ("k_proj/v_proj", kv, bn, rows)]
    splits.append(("gate_proj/up_proj", inter, bn, rows))
    if tp > 1:
        splits += [("o_proj", q, bk, "input columns"), ("down_proj", inter, bk, "input columns")]
    for name, size, block, what in splits:
        if size % (tp * block) == 0:
            continue
        if tp == 1:
            raise ValueError(
                f"quantization: this FP8 checkpoint's {name} has {size} {what}, not a whole "
                f"number of its {bn}x{bk} scale blocks, so its parts cannot share one matmul"
            )
        raise ValueError(
            f"tensor_parallel_size={tp} is invalid for this FP8 checkpoint: {name} has "
            f"{size} {what}, {size / tp:g} per rank, which splits its {bn}x{bk} scale blocks; "
            f"each rank's share must be a multiple of {block}"
        )
