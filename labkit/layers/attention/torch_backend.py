"""The reference attention backend in plain torch (any device; the CPU's path)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from labkit.layers.attention import SeqSlice
from labkit.layers.norm import QKNorm
from labkit.layers.rotary import RotaryEmbedding


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode: int  # decode rows come first, one token each
    decode_blocks: torch.Tensor | None = None  # [B, W] block ids of each decode context
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, W * block_size] True where real
    decode_lens: torch.Tensor | None = None  # [B] context length of each decode row
    # Decode masks of sliding-window layers, by window, built by the first layer that needs one.
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    prefills: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)
    # (first row, q_len, ctx_len, block ids) for each sequence with q_len > 1


class TorchAttentionBackend:
    """Reference backend: gathers K/V through the block table, whole blocks at a time
    (index_select of block_size-token rows, far cheaper than a gather per token), and calls SDPA."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def prepare(self, seqs: list[SeqSlice]) -> TorchAttentionMetadata:
        bs = self.block_size
        slots, decode, prefills, row = [], [], [], 0
        for s in seqs:
            nblk = -(-s.ctx_len // bs)
            slots.extend(
                s.block_table[p // bs] * bs + p % bs for p in range(s.ctx_len - s.q_len, s.ctx_len)
            )
            if s.q_len == 1:
                decode.append((s.block_table[:nblk], s.ctx_len))
            else:
                prefills.append(
                    (
                        row,
                        s.q_len,
                        s.ctx_len,
                        torch.tensor(s.block_table[:nblk], device=self.device),
                    )
                )
            row += s.q_len
        meta = TorchAttentionMetadata(
            torch.tensor(slots, dtype=torch.long, device=self.device),
            len(decode),
            prefills=prefills,
        )
        if decode:
            width = max(len(b) for b, _ in decode)
            meta.decode_blocks = torch.tensor(
                [b + [0] * (width - len(b)) for b, _ in decode], device=self.device
            )
            lens = torch.tensor([n for _, n in decode], device=self.device)
            meta.decode_lens = lens
            meta.decode_mask = (torch.arange(width * bs, device=self.device) < lens[:, None])[
                :, None, None, :
            ]
        return meta

    def _decode_mask(self, meta: TorchAttentionMetadata, window: int | None) -> torch.Tensor:
        """The decode rows' mask: every cached key, or with a window only the last `window`."""
        if window is None:
            return meta.decode_mask
        mask = meta.window_masks.get(window)
        if mask is None:
            width = meta.decode_mask.shape[-1]
            first = (meta.decode_lens - window)[:, None, None, None]
            mask = meta.decode_mask & (torch.arange(width, device=self.device) >= first)
            meta.window_masks[window] = mask
        return mask

    def _gather(
        self, cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """[*blocks.shape, block_size, Hkv, D] -> tokens flattened:
        [..., n * block_size, Hkv, D], in `dtype` (an FP8 cache's values, scale 1.0)."""
        hkv, d = cache.shape[1:]
        out = cache.view(-1, self.block_size, hkv, d).index_select(0, blocks.reshape(-1))
        return out.view(*blocks.shape[:-1], -1, hkv, d).to(dtype)

    def forward(
        self,
        positions,
        q,
        k,
        v,
        rotary: RotaryEmbedding,
        k_cache,
        v_cache,
        meta: TorchAttentionMetadata,
        scale: float,
        window: int | None = None,
        qk_norm: QKNorm | None = None,
    ):
        """positions: [T]; q: [T, H, D]; k, v: [T, Hkv, D] (before rotary); caches:
        [num_blocks * block_size, Hkv, D]; window: sliding window (None: full attention);
        qk_norm: per-head norms of q and k before rotary."""
        if qk_norm is not None:
            q, k = qk_norm.q(q), qk_norm.k(k)
        q, k = rotary(positions, q, k)
        store(k_cache, meta.slot_mapping, k)
        store(v_cache, meta.slot_mapping, v)
        out = torch.empty_like(q)
        n, h, d = meta.num_decode, q.shape[1], q.shape[2]
        hkv = k.shape[1]
        if n:
            # Grouped queries as the "length" axis: one SDPA call, no K/V repeat for GQA.
            qq = q[:n].view(n, hkv, h // hkv, d)
            kk = self._gather(k_cache, meta.decode_blocks, q.dtype).transpose(1, 2)
            vv = self._gather(v_cache, meta.decode_blocks, q.dtype).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=self._decode_mask(meta, window), scale=scale
            )
            out[:n] = o.reshape(n, h, d)
        for row, q_len, ctx, blocks in meta.prefills:
            qq = q[row : row + q_len].transpose(0, 1).unsqueeze(0)
            kk = self._gather(k_cache, blocks, q.dtype)[:ctx].transpose(0, 1).unsqueeze(0)
            vv = self._gather(v_cache, blocks, q.dtype)[:ctx].transpose(0, 1).unsqueeze(0)
            if ctx == q_len and (window is None or window >= ctx):
                o = F.scaled_dot_product_attention(
                    qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True
                )
            else:  # a chunk after cached tokens: query i sees keys up to ctx - q_len + i
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
                if window is not None:  # ... and none window or more tokens before itself
                    mask = mask.triu(ctx - q_len - window + 1)
                o = F.scaled_dot_product_attention(
                    qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True
                )
            out[row : row + q_len] = o[0].transpose(0, 1)
        return out


def store(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Rows `slots` of the cache = x, rounded to the cache's dtype (saturating, for FP8)."""
    if cache.dtype == x.dtype:
        cache.index_copy_(0, slots, x)
    else:  # by bytes: torch has no float8 index_copy_ on the CPU
        cache.view(torch.uint8).index_copy_(0, slots, x.to(cache.dtype).view(torch.uint8))
