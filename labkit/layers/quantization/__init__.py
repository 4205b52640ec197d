"""Quantized weights for the linear layers: FP8 (float8_e4m3fn weights with float32 scales).

scheme.py reads a checkpoint's `quantization_config` (and the `quantization` option) into an
Fp8Scheme; fp8.py holds the numerics (quantizing, dequantizing, the reference FP8 GEMM);
linear_method.py is what a parallel linear layer delegates its FP8 weights to (creating them,
loading this rank's share of the scales, quantizing float weights after loading, the forward);
fp8_cuda.py the forward on CUDA (the decode kernel, torch._scaled_mm), imported only there.

May import: distributed, kernels, observe and the foundation modules; never models or above.
"""
