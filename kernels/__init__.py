"""labkit's Triton kernels, installed as `labkit.kernels` (a bare `kernels` would shadow the PyPI
distribution of that name).

One file per kernel, each exposing the Triton launcher `<name>(...)` beside its plain-torch
reference `<name>_ref(...)`; tests/test_kernels.py compares the two on fresh random inputs (under
TRITON_INTERPRET=1 on a CPU), benchmarks/gpu_kernels.py at real shapes on a GPU.

- rotary_store_kvcache: rotary embedding (neox "rotate half") on q in place and on k on its way
  into the paged cache, v copied there too, by slot mapping: one kernel per layer.
- paged_attention_decode: one query per sequence, GQA, split along the KV length (flash-decoding).
- prefill_attention: causal variable-length chunks reading the cached prefix via the block table.
- fused_add_rmsnorm (and rmsnorm): residual add + RMSNorm in float32, HF rounding.
- silu_and_mul: silu(gate) * up for the merged gate/up projection.
- gemv: the matmuls of a decode step's 1-16 rows (weight prefetch before the PDL wait, FMA or
  tensor-core loop, split-K reduced in-kernel), with configs/gemv_<card>.json saying per shape
  where it beats cuBLAS (benchmarks/gpu_gemv.py writes it).
- attention_tile: no kernel, the K/V-tile loop body (paged gather, online softmax) that
  paged_attention_decode and prefill_attention both inline.
- pdl: programmatic dependent launch (Hopper+) for all of the above; LABKIT_PDL=0 turns it off.
  (The decode matmuls run from labkit.layers.linear.)

labkit.layers.attention_triton builds the engine's Triton attention backend from the first three.
Importing this package imports triton; the engine does so only on CUDA.
"""
