"""One K/V tile of a flash-attention online softmax over the paged cache: the loop body that the
decode and prefill attention kernels share (paged_attention_decode, prefill_attention).

Not a kernel of its own: a `@triton.jit` helper that Triton inlines into each caller, so the
callers compile as if the loop body were written out in them. What differs between them is only
which scores count: prefill's causal bound (and a sliding window's lower bound) come in as
arguments. The cache may be float8_e4m3fn (`kv_cache_dtype="fp8"`, scale 1.0): its tiles are
widened to the queries' dtype as they are loaded.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_kv_tile(
    q_tile,
    m_i,
    l_i,
    acc,
    n,
    n_mask,
    last_key,
    block_table_row,
    k_cache,
    v_cache,
    kvh,
    stride_cs,
    stride_ch,
    offs_d,
    d_mask,
    scale_log2,
    PAGE_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    first_key=None,
):
    """Fold keys `n` ([BLOCK_N] token positions of one sequence) into the running softmax of the
    query rows `q_tile` ([rows, BLOCK_D]) for KV head `kvh`; returns the updated (m_i, l_i, acc).

    n_mask ([BLOCK_N]): the positions that exist; only those are looked up, loaded and scored.
    last_key ([rows]): causal, row r sees only keys n <= last_key[r]; None: every row sees them
    all. (A bound, not a ready mask: built here after the dot, as it was inline; a mask built
    before the call compiled to a longer prefill kernel.)
    first_key ([rows]): sliding window, row r sees only keys n >= first_key[r]; None: no lower
    bound. A windowed row may have no key in a tile while its m_i is still -inf: the update
    then leaves it at zero instead of computing exp2(-inf + inf).
    block_table_row: the sequence's row of the block table (page ids by position).
    m_i, l_i ([rows]) and acc ([rows, BLOCK_D]) are the running max, sum and output, in base 2;
    a row with no score counting here must already have a finite m_i (else exp2(-inf + inf)).
    """
    page = tl.load(block_table_row + n // PAGE_SIZE, mask=n_mask, other=0)
    slot = page.to(tl.int64) * PAGE_SIZE + n % PAGE_SIZE
    kv_off = slot[:, None] * stride_cs + kvh * stride_ch + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    # An FP8 cache's values (scale 1.0) widen to the queries' dtype for the tensor cores.
    k = tl.load(k_cache + kv_off, mask=kv_mask, other=0.0).to(q_tile.dtype)
    # scale * log2(e) folded in: the softmax runs in base 2 (exp2 is the native instruction).
    s = tl.dot(q_tile, tl.trans(k), input_precision=PRECISION) * scale_log2
    if first_key is not None:
        visible = (n[None, :] <= last_key[:, None]) & (n[None, :] >= first_key[:, None])
        s = tl.where(visible & n_mask[None, :], s, float("-inf"))
    elif last_key is not None:
        s = tl.where((n[None, :] <= last_key[:, None]) & n_mask[None, :], s, float("-inf"))
    else:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = m_new
    if first_key is not None:  # still -inf: no score yet; subtract 0 (m_i stays -inf)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache + kv_off, mask=kv_mask, other=0.0).to(q_tile.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc
