"""Rotary position embedding (neox/HF "rotate half" layout), with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


SUPPORTED_ROPE_TYPES = ("default", "llama3")


class RotaryEmbedding(nn.Module):
    profile_category = "norm/rope/activation"

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type != "default":
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self._step: tuple | None = None  # (positions, cos, sin) of the current step

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D]; returned in their dtype. The torch path: the Triton
        attention backend rotates inside its cache-write kernel, from the same tables."""
        # Every layer shares this module and sees the same positions tensor within a step:
        # look the tables up once per step, not once per layer.
        if self._step is None or self._step[0] is not positions:
            cos = self.cos[positions].unsqueeze(1).to(q.dtype)
            sin = self.sin[positions].unsqueeze(1).to(q.dtype)
            self._step = (positions, cos, sin)
        _, cos, sin = self._step
        hq = q.shape[1]
        if (
            k.stride() == q.stride()
            and k.storage_offset() == q.storage_offset() + hq * q.shape[2]
            and k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
        ):
            # k's heads follow q's in the same rows (both views of the qkv output): rotate them
            # as one tensor, half the ops of two calls (per-op overhead dominates at decode).
            qk = _rotate(
                q.as_strided((q.shape[0], hq + k.shape[1], q.shape[2]), q.stride()), cos, sin
            )
            return qk[:, :hq], qk[:, hq:]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
