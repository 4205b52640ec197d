"""Next tokens from a batch of logits in one launch, without sorting the vocabulary.

A sort of every row (the textbook way to apply top-p) costs milliseconds a step at a 152k
vocabulary and a few hundred rows; this kernel reads each row two or three times instead. One
program per row:

1. One pass: the row's max `m`, its normaliser (the raw log-sum-exp, for logprobs), the mass
   `z_k` of what top-k keeps (top-k arrives as a threshold: the k-th largest logit), and for a
   greedy row (temperature 0) the argmax (the lowest index among equal maxima).
2. Sampled rows draw by inverse CDF: one uniform per draw from Philox (the row's seed, the draw's
   number), the cumulative mass walked in vocabulary order until it passes u times the
   proposal's mass (the walk stops there).
3. Top-p and min-p by rejection: a candidate is kept if the mass strictly above it is under
   top_p times `z_k` (top-p over the top-k distribution, as vLLM applies them) and its
   probability is at least min_p times the top one. A rejected candidate's logit becomes the
   next proposal's floor: every token the filters keep lies above it, and the proposal, the
   distribution cut below that floor, still holds them all in their ratios, so the accepted draw
   follows the filtered distribution exactly. Most draws are kept at once; each rejection halves
   the proposal on average.

A few rows cannot fill the card with one program each: one program reads a 152k row in ~40 us,
whatever the bandwidth. Up to SPLIT_MAX_ROWS rows, step 1 is split: one program per row and
chunk of `block` entries writes the chunk's max, normalisers and argmax, and a second launch per
row combines them and makes the first draw's walk inside the one chunk where the cumulative mass
of the chunks passes the target (later draws, after a rejection, walk the row as before).

Ties: the threshold tests keep or cut equal logits together, where a sort keeps some of them.
The torch version, the CPU's path and this kernel's reference, is labkit.engine.sampler
(apply_top_k_top_p_min_p, then a draw from the softmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Far more than a real distribution needs (each rejection halves the proposal on average); a
# row that runs out keeps its last candidate, drawn from a superset of what the filters keep.
MAX_DRAWS = 64
# Up to this many rows step 1 is split by chunks (b x chunks programs): at 64 rows a 152k
# vocabulary already gives 2,432 programs.
SPLIT_MAX_ROWS = 64


@triton.jit
def _cdf_walk(row, lo, hi, m, inv_t, floor, lower, target, BLOCK: tl.constexpr):
    """The first token (in index order, among entries [lo, hi)) of the proposal {l > floor,
    l >= lower} at which the cumulative mass exp((l - m) / T) reaches `target`; the proposal's
    last token there if rounding leaves its total short."""
    offs = tl.arange(0, BLOCK)
    acc = 0.0
    found = hi
    last = lo
    start = lo
    while (start < hi) & (found == hi):
        idx = start + offs
        lg = tl.load(row + idx, mask=idx < hi, other=-float("inf")).to(tl.float32)
        keep = (lg > floor) & (lg >= lower)
        p = tl.where(keep, tl.exp((lg - m) * inv_t), 0.0)
        c = tl.cumsum(p, 0) + acc
        found = tl.min(tl.where(keep & (c >= target), idx, hi), 0)
        last = tl.maximum(last, tl.max(tl.where(keep, idx, lo), 0))
        acc += tl.sum(p, 0)
        start += BLOCK
    return tl.where(found < hi, found, last)


@triton.jit
def _first_walk(
    row, V, m, inv_t, lower, target, chunk_mass, CHUNKS: tl.constexpr, BLOCK: tl.constexpr
):
    """_cdf_walk over the whole row for the first proposal {l >= lower}, given each chunk's
    mass of it (`chunk_mass` [CHUNKS], chunks of BLOCK entries): the walk runs inside the first
    chunk holding mass where the chunks' cumulative mass reaches `target` (the last chunk
    holding any, if rounding leaves the total short). Only a chunk holding mass: a target of 0
    (u = 0) must not pick a chunk whose tokens the proposal leaves out, e.g. a grammar's."""
    c_idx = tl.arange(0, CHUNKS)
    cum = tl.cumsum(chunk_mass, 0)
    held = tl.max(tl.where(chunk_mass > 0, c_idx, 0), 0)
    reached = (cum >= target) & (chunk_mass > 0)
    c = tl.minimum(tl.min(tl.where(reached, c_idx, CHUNKS), 0), held)
    before = tl.sum(tl.where(c_idx < c, chunk_mass, 0.0), 0)
    lo = c * BLOCK
    return _cdf_walk(
        row, lo, tl.minimum(lo + BLOCK, V), m, inv_t, -float("inf"), lower, target - before, BLOCK
    )


@triton.jit
def _row_filters(temperature, kth_logit, r):
    """Row r's temperature, top-k threshold, greedy flag and 1 / temperature (1 if greedy)."""
    t = tl.load(temperature + r)
    greedy = t == 0
    return t, tl.load(kth_logit + r), greedy, tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))


@triton.jit
def _draw(
    row,
    r,
    V,
    m,
    t,
    inv_t,
    kth,
    z_k,
    top_p,
    min_p,
    seeds,
    out_ids,
    chunk_mass,
    CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_DRAWS: tl.constexpr,
):
    """Steps 2 and 3 for sampled row r (max m, top-k mass z_k); CHUNKS > 0: the first walk
    goes by `chunk_mass` (_first_walk)."""
    offs = tl.arange(0, BLOCK)
    p_top = tl.load(top_p + r)
    # p >= min_p * p_max  <=>  (l - m) / T >= log(min_p)
    mp = tl.load(min_p + r)
    min_logit = tl.where(mp > 0, m + t * tl.log(tl.maximum(mp, 1e-30)), -float("inf"))
    seed = tl.load(seeds + r)
    floor = -float("inf")  # the proposal: l > floor and l >= lower
    lower = kth
    mass = z_k  # the proposal's
    draw = 0
    done = 0
    cand = 0
    while (done == 0) & (draw < MAX_DRAWS):
        u = tl.rand(seed, draw)
        if CHUNKS > 0:
            if draw == 0:
                cand = _first_walk(row, V, m, inv_t, lower, u * mass, chunk_mass, CHUNKS, BLOCK)
            else:
                cand = _cdf_walk(row, 0, V, m, inv_t, floor, lower, u * mass, BLOCK)
        else:
            cand = _cdf_walk(row, 0, V, m, inv_t, floor, lower, u * mass, BLOCK)
        lc = tl.load(row + cand).to(tl.float32)
        if (p_top >= 1.0) & (lc >= min_logit):
            done = 1
        else:
            # The mass above the candidate within top-k (for top-p), and the part of it
            # that min-p keeps (the next proposal's, should this candidate be rejected)
            above = 0.0
            above_min = 0.0
            for start in range(0, V, BLOCK):
                idx = start + offs
                lg = tl.load(row + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
                p = tl.where((lg > lc) & (lg >= kth), tl.exp((lg - m) * inv_t), 0.0)
                above += tl.sum(p, 0)
                above_min += tl.sum(tl.where(lg >= min_logit, p, 0.0), 0)
            if (above < p_top * z_k) & (lc >= min_logit):
                done = 1
            else:
                floor = lc
                lower = tl.maximum(kth, min_logit)
                mass = above_min
        draw += 1
    tl.store(out_ids + r, cand.to(tl.int64))


@triton.jit
def _sample_kernel(
    logits,
    stride,
    V,
    temperature,
    kth_logit,
    top_p,
    min_p,
    seeds,
    out_ids,
    out_lse,
    BLOCK: tl.constexpr,
    MAX_DRAWS: tl.constexpr,
):
    r = tl.program_id(0)
    row = logits + r.to(tl.int64) * stride
    t, kth, greedy, inv_t = _row_filters(temperature, kth_logit, r)
    offs = tl.arange(0, BLOCK)
    m = -float("inf")
    z = 0.0  # sum exp(l - m): the raw normaliser
    z_k = 0.0  # sum over l >= kth of exp((l - m) / T)
    best = -float("inf")
    best_i = 0
    for start in range(0, V, BLOCK):
        idx = start + offs
        lg = tl.load(row + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
        bm = tl.max(lg, 0)
        new_m = tl.maximum(m, bm)
        safe = tl.where(new_m == -float("inf"), 0.0, new_m)  # a block of -inf (masked) only
        z = z * tl.exp(m - safe) + tl.sum(tl.exp(lg - safe), 0)
        z_k = z_k * tl.exp((m - safe) * inv_t)
        z_k += tl.sum(tl.where(lg >= kth, tl.exp((lg - safe) * inv_t), 0.0), 0)
        m = new_m
        if bm > best:  # strictly: the first block with the max keeps it
            best = bm
            best_i = start + tl.argmax(lg, 0)
    tl.store(out_lse + r, m + tl.log(z))
    if greedy:
        tl.store(out_ids + r, best_i.to(tl.int64))
    else:
        none = tl.zeros([1], tl.float32)
        _draw(
            row,
            r,
            V,
            m,
            t,
            inv_t,
            kth,
            z_k,
            top_p,
            min_p,
            seeds,
            out_ids,
            none,
            0,
            BLOCK,
            MAX_DRAWS,
        )


@triton.jit
def _chunk_stats_kernel(
    logits, stride, V, temperature, kth_logit, stats, arg, CHUNKS, BLOCK: tl.constexpr
):
    """Program (r, c): entries [c * BLOCK, (c + 1) * BLOCK) of row r: their max, sum exp(l -
    max), sum over l >= kth of exp((l - max) / T), into stats[0..2, r, c], and their first
    argmax into arg[r, c]."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    _, kth, _, inv_t = _row_filters(temperature, kth_logit, r)
    idx = c * BLOCK + tl.arange(0, BLOCK)
    lg = tl.load(logits + r.to(tl.int64) * stride + idx, mask=idx < V, other=-float("inf"))
    lg = lg.to(tl.float32)
    cm = tl.max(lg, 0)
    safe = tl.where(cm == -float("inf"), 0.0, cm)
    out = stats + r * CHUNKS + c
    plane = tl.num_programs(0) * CHUNKS
    tl.store(out, cm)
    tl.store(out + plane, tl.sum(tl.exp(lg - safe), 0))
    tl.store(out + 2 * plane, tl.sum(tl.where(lg >= kth, tl.exp((lg - safe) * inv_t), 0.0), 0))
    tl.store(arg + r * CHUNKS + c, c * BLOCK + tl.argmax(lg, 0))


@triton.jit
def _combine_draw_kernel(
    logits,
    stride,
    V,
    temperature,
    kth_logit,
    top_p,
    min_p,
    seeds,
    stats,
    arg,
    out_ids,
    out_lse,
    NUM_CHUNKS,
    CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_DRAWS: tl.constexpr,
):
    """Row r from its chunks' statistics: step 1's results, then steps 2-3 (_draw)."""
    r = tl.program_id(0)
    row = logits + r.to(tl.int64) * stride
    t, kth, greedy, inv_t = _row_filters(temperature, kth_logit, r)
    c_idx = tl.arange(0, CHUNKS)
    ok = c_idx < NUM_CHUNKS
    at = stats + r * NUM_CHUNKS + c_idx
    plane = tl.num_programs(0) * NUM_CHUNKS
    cm = tl.load(at, mask=ok, other=-float("inf"))
    m = tl.max(cm, 0)
    shift = tl.where(cm == -float("inf"), 0.0, tl.exp(cm - m))  # each chunk's max to m
    z = tl.sum(tl.load(at + plane, mask=ok, other=0.0) * shift, 0)
    shift_t = tl.where(cm == -float("inf"), 0.0, tl.exp((cm - m) * inv_t))
    chunk_mass = tl.load(at + 2 * plane, mask=ok, other=0.0) * shift_t
    tl.store(out_lse + r, m + tl.log(z))
    if greedy:
        first = tl.min(tl.where(ok & (cm == m), c_idx, CHUNKS), 0)
        tl.store(out_ids + r, tl.load(arg + r * NUM_CHUNKS + first).to(tl.int64))
    else:
        z_k = tl.sum(chunk_mass, 0)
        _draw(
            row,
            r,
            V,
            m,
            t,
            inv_t,
            kth,
            z_k,
            top_p,
            min_p,
            seeds,
            out_ids,
            chunk_mass,
            CHUNKS,
            BLOCK,
            MAX_DRAWS,
        )


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    kth_logit: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    block: int = 8192,
    num_warps: int = 16,
    split: bool | None = None,
    split_block: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B] int64, raw log-sum-exp [B] float32) for logits [B, V] (any float dtype,
    unit stride along V). Per row: temperature (0: greedy), kth_logit (the k-th largest logit
    for top-k, -inf for none), top_p (1: none), min_p (0: none), seeds (int64, Philox).
    `block`: vocabulary entries a program reads at a time (a power of two); a row is one
    program's, so at small batches only wide reads keep enough bytes in flight. The defaults
    were the fastest of those timed on an H100 at 1-256 rows (dev/gpu_sampler.py), bar 16,384
    entries, which was faster at 1-64 rows and slower at 256. `split` (default: up to
    SPLIT_MAX_ROWS rows): step 1 by chunks of `split_block` entries, one program each (see the
    module's docstring); the draws then read `split_block` entries at a time."""
    b, v = logits.shape
    ids = torch.empty(b, dtype=torch.int64, device=logits.device)
    lse = torch.empty(b, dtype=torch.float32, device=logits.device)
    if not b:
        return ids, lse
    args = (logits, logits.stride(0), v, temperature, kth_logit)
    if split if split is not None else b <= SPLIT_MAX_ROWS:
        chunks = triton.cdiv(v, split_block)
        stats = torch.empty((3, b, chunks), dtype=torch.float32, device=logits.device)
        arg = torch.empty((b, chunks), dtype=torch.int32, device=logits.device)
        warps = min(num_warps, max(1, split_block // 1024))
        _chunk_stats_kernel[(b, chunks)](
            *args, stats, arg, chunks, BLOCK=split_block, num_warps=warps
        )
        _combine_draw_kernel[(b,)](
            *args,
            top_p,
            min_p,
            seeds,
            stats,
            arg,
            ids,
            lse,
            chunks,
            CHUNKS=triton.next_power_of_2(chunks),
            BLOCK=split_block,
            MAX_DRAWS=MAX_DRAWS,
            num_warps=min(num_warps, max(1, split_block // 256)),
        )
        return ids, lse
    _sample_kernel[(b,)](
        *args,
        top_p,
        min_p,
        seeds,
        ids,
        lse,
        BLOCK=block,
        MAX_DRAWS=MAX_DRAWS,
        num_warps=min(num_warps, max(1, block // 256)),
    )
    return ids, lse
