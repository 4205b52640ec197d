"""Launch configurations of the decode matmul (gemv.py): the config dataclass, the per-card tuned
tables (configs/gemv_<card>.json, written by dev/gpu_gemv.py for bf16 weights and by
dev/gpu_fp8.py for FP8 ones) and the choice between them, a heuristic and cuBLAS.

A table maps "bucket,n,k" (bf16 weights) or "fp8,bucket,n,k" (float8_e4m3fn weights) to a
configuration, or to null where the library GEMM (F.linear; torch._scaled_mm for FP8) is faster.
An FP8 weight is half the bytes of a bf16 one, so the best tile and split differ: its entries are
tuned and looked up apart.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

FMA_MAX_ROWS = 2
MAX_ROWS = 16
CONFIG_DIR = Path(__file__).with_name("configs")
# Programs that keep an H100/H200 (132 SMs) busy with a pass over a weight: two per SM.
TARGET_PROGRAMS = 264


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows (outputs) per program
    block_k: int  # input features per tile
    num_warps: int
    dot: bool  # tensor cores (rows padded to 16) instead of FMAs
    split_k: int = 1  # programs per row block, each over a slice of K
    # For a gated input: silu(gate) * up inside this kernel, or by silu_and_mul first. Fused, it
    # is recomputed by every row block: cheap for a wide weight, not for down_proj's 3584 rows.
    fuse_act: bool = True


def row_bucket(m: int) -> int:
    """Row counts share a configuration by bucket: 1, 2, 4, 8, 16."""
    return triton.next_power_of_2(max(m, 1))


def table_key(m: int, n: int, k: int, fp8: bool = False) -> str:
    """The table entry of an [m, k] x [n, k]^T product (fp8: of a float8_e4m3fn weight)."""
    return f"{'fp8,' if fp8 else ''}{row_bucket(m)},{n},{k}"


def config_path(device_name: str) -> Path:
    return CONFIG_DIR / f"gemv_{device_name.replace(' ', '_')}.json"


@functools.cache
def _table(device: torch.device) -> dict[str, GemvConfig | None]:
    """This card's tuned entries, table_key -> config, or None where the library GEMM is faster,
    from configs/gemv_<card name>.json."""
    path = config_path(torch.cuda.get_device_name(device))
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["configs"]
    return {key: GemvConfig(**c) if c else None for key, c in entries.items()}


def heuristic_config(m: int, k: int) -> GemvConfig:
    """For bf16 shapes no table covers: FMAs up to FMA_MAX_ROWS rows, tensor cores above."""
    if m <= FMA_MAX_ROWS:
        return GemvConfig(
            block_n=4, block_k=min(512, triton.next_power_of_2(k)), num_warps=2, dot=False
        )
    return GemvConfig(
        block_n=64, block_k=min(128, max(16, triton.next_power_of_2(k))), num_warps=4, dot=True
    )


def fp8_heuristic_config(m: int, n: int, k: int) -> GemvConfig:
    """For FP8 shapes no table covers: the bf16 heuristic's tiles at the same bytes per tile
    (twice the columns, at least 128 so that a tile holds whole 128-column activation groups),
    split-K where the row blocks alone are too few programs to keep enough bytes in flight
    (o_proj, down_proj at 3-16 rows), and the MLP's activation by silu_and_mul first: fused,
    every row block would recompute it (and a per-token input is quantized before the call)."""
    base = heuristic_config(m, k)
    block_k = min(2 * base.block_k, max(128, triton.next_power_of_2(k)))
    blocks = triton.cdiv(n, base.block_n)
    split = 1
    while blocks * split < TARGET_PROGRAMS and split < 8 and k >= 2 * split * block_k:
        split *= 2
    return GemvConfig(base.block_n, block_k, base.num_warps, base.dot, split, fuse_act=False)


def choose_config(
    m: int, n: int, k: int, device: torch.device, fp8: bool = False
) -> GemvConfig | None:
    """The launch configuration for an [m, k] x [n, k]^T product on a CUDA device (fp8: the
    weight is float8_e4m3fn), or None where the library GEMM is the better choice: the card's
    tuned table first. Untuned bf16 shapes get the heuristic up to FMA_MAX_ROWS rows (a weight
    read at a few rows has one good shape on any card) and cuBLAS above; untuned FP8 shapes get
    the FP8 heuristic up to MAX_ROWS rows (the alternative, torch._scaled_mm, first quantizes the
    input in a kernel of its own and pads a few rows to a GEMM tile)."""
    if m > MAX_ROWS:
        return None
    table = _table(device)
    key = table_key(m, n, k, fp8)
    if key in table:
        return table[key]
    if fp8:
        return fp8_heuristic_config(m, n, k)
    return heuristic_config(m, k) if m <= FMA_MAX_ROWS else None
