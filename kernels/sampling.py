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
whatever the bandwidth. Up to SPLIT_MAX_ROWS rows the passes are split by chunks of the row:
one program per row and chunk writes the chunk's max, normalisers and argmax; one per row
combines them (greedy rows end there) and makes the first draw's walk inside the one chunk where
the chunks' cumulative mass passes the target; one per row and chunk sums the mass above that
candidate; one per row keeps or rejects it, and after a rejection (rare: about 1 - top_p of the
draws) goes on drawing over the whole row, as the one-program path does. Four launches of short
programs instead of two or three passes in one.

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
def _min_logit(min_p, r, m, t):
    """Row r's min-p as a logit: p >= min_p * p_max  <=>  (l - m) / T >= log(min_p)."""
    mp = tl.load(min_p + r)
    return tl.where(mp > 0, m + t * tl.log(tl.maximum(mp, 1e-30)), -float("inf"))


@triton.jit
def _mass_above(row, lo, hi, lc, kth, min_logit, m, inv_t, BLOCK: tl.constexpr):
    """Over entries [lo, hi): the mass above the candidate's logit lc within top-k (for
    top-p), and the part of it that min-p keeps (the next proposal's, should lc be rejected)."""
    offs = tl.arange(0, BLOCK)
    above = 0.0
    above_min = 0.0
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        lg = tl.load(row + idx, mask=idx < hi, other=-float("inf")).to(tl.float32)
        p = tl.where((lg > lc) & (lg >= kth), tl.exp((lg - m) * inv_t), 0.0)
        above += tl.sum(p, 0)
        above_min += tl.sum(tl.where(lg >= min_logit, p, 0.0), 0)
    return above, above_min


@triton.jit
def _draw(
    row,
    r,
    V,
    m,
    inv_t,
    kth,
    min_logit,
    z_k,
    p_top,
    seed,
    out_ids,
    rejected,
    rejected_mass,
    AFTER_REJECTION: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_DRAWS: tl.constexpr,
):
    """Steps 2 and 3 for sampled row r (max m, top-k mass z_k): draws until one is kept and
    stores it. AFTER_REJECTION: draw 0 was the logit `rejected` (the split path's), so the
    draws go on from draw 1 with the proposal above it, of mass `rejected_mass`."""
    if AFTER_REJECTION:
        draw = 1
        floor = rejected  # the proposal: l > floor and l >= lower
        lower = tl.maximum(kth, min_logit)
        mass = rejected_mass  # the proposal's
    else:
        draw = 0
        floor = -float("inf")
        lower = kth
        mass = z_k
    done = 0
    cand = 0
    while (done == 0) & (draw < MAX_DRAWS):
        u = tl.rand(seed, draw)
        cand = _cdf_walk(row, 0, V, m, inv_t, floor, lower, u * mass, BLOCK)
        lc = tl.load(row + cand).to(tl.float32)
        if (p_top >= 1.0) & (lc >= min_logit):
            done = 1
        else:
            above, above_min = _mass_above(row, 0, V, lc, kth, min_logit, m, inv_t, BLOCK)
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
        min_logit = _min_logit(min_p, r, m, t)
        p_top, seed = tl.load(top_p + r), tl.load(seeds + r)
        _draw(
            row,
            r,
            V,
            m,
            inv_t,
            kth,
            min_logit,
            z_k,
            p_top,
            seed,
            out_ids,
            m,
            z_k,
            False,
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
def _combine_kernel(
    logits,
    stride,
    V,
    temperature,
    kth_logit,
    seeds,
    stats,
    arg,
    state,
    out_ids,
    out_lse,
    NUM_CHUNKS,
    CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row r from its chunks' statistics: the normaliser, a greedy row's token, and a sampled
    row's first draw (by the chunks' masses, then inside one chunk), stored as its token until
    a check rejects it; its max and top-k mass go to state[0..1, r] for the check."""
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
        u = tl.rand(tl.load(seeds + r), r * 0)  # draw 0 (tl.rand takes a tensor offset)
        cand = _first_walk(row, V, m, inv_t, kth, u * z_k, chunk_mass, CHUNKS, BLOCK)
        tl.store(out_ids + r, cand.to(tl.int64))
        tl.store(state + r, m)
        tl.store(state + tl.num_programs(0) + r, z_k)


@triton.jit
def _first_check(logits, stride, temperature, kth_logit, top_p, min_p, state, out_ids, r):
    """What the check of row r's first draw needs: (whether it needs one, the row, its max,
    1 / T, the top-k threshold, min-p's logit, top-p, the candidate's logit). A greedy row, or
    a sampled one whose candidate no filter can reject (no top-p, min-p keeps it), needs none
    (a greedy row's max was never stored: its min-p logit means nothing and goes unused)."""
    row = logits + r.to(tl.int64) * stride
    t, kth, _, inv_t = _row_filters(temperature, kth_logit, r)
    m = tl.load(state + r)
    min_logit = _min_logit(min_p, r, m, t)
    p_top = tl.load(top_p + r)
    lc = tl.load(row + tl.load(out_ids + r)).to(tl.float32)
    needed = (t != 0) & ((p_top < 1.0) | (lc < min_logit))
    return needed, row, m, inv_t, kth, min_logit, p_top, lc


@triton.jit
def _chunk_above_kernel(
    logits,
    stride,
    V,
    temperature,
    kth_logit,
    top_p,
    min_p,
    state,
    out_ids,
    above,
    NUM_CHUNKS,
    BLOCK: tl.constexpr,
):
    """Program (r, c): the mass above row r's first candidate in chunk c (_mass_above), into
    above[0..1, r, c], where the candidate needs a check."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    needed, row, m, inv_t, kth, min_logit, _, lc = _first_check(
        logits, stride, temperature, kth_logit, top_p, min_p, state, out_ids, r
    )
    if needed:
        lo = c * BLOCK
        a, a_min = _mass_above(
            row, lo, tl.minimum(lo + BLOCK, V), lc, kth, min_logit, m, inv_t, BLOCK
        )
        out = above + r * NUM_CHUNKS + c
        tl.store(out, a)
        tl.store(out + tl.num_programs(0) * NUM_CHUNKS, a_min)


@triton.jit
def _check_kernel(
    logits,
    stride,
    V,
    temperature,
    kth_logit,
    top_p,
    min_p,
    seeds,
    state,
    out_ids,
    above,
    NUM_CHUNKS,
    CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_DRAWS: tl.constexpr,
):
    """Row r's first candidate kept or rejected from the chunks' masses above it; after a
    rejection the draws go on in this program (_draw), over the whole row."""
    r = tl.program_id(0)
    needed, row, m, inv_t, kth, min_logit, p_top, lc = _first_check(
        logits, stride, temperature, kth_logit, top_p, min_p, state, out_ids, r
    )
    if needed:
        c_idx = tl.arange(0, CHUNKS)
        ok = c_idx < NUM_CHUNKS
        at = above + r * NUM_CHUNKS + c_idx
        a = tl.sum(tl.load(at, mask=ok, other=0.0), 0)
        a_min = tl.sum(tl.load(at + tl.num_programs(0) * NUM_CHUNKS, mask=ok, other=0.0), 0)
        z_k = tl.load(state + tl.num_programs(0) + r)
        if (a >= p_top * z_k) | (lc < min_logit):
            seed = tl.load(seeds + r)
            _draw(
                row,
                r,
                V,
                m,
                inv_t,
                kth,
                min_logit,
                z_k,
                p_top,
                seed,
                out_ids,
                lc,
                a_min,
                True,
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
    filters: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B] int64, raw log-sum-exp [B] float32) for logits [B, V] (any float dtype,
    unit stride along V). Per row: temperature (0: greedy), kth_logit (the k-th largest logit
    for top-k, -inf for none), top_p (1: none), min_p (0: none), seeds (int64, Philox).
    `block`: vocabulary entries a program reads at a time (a power of two); a row is one
    program's, so at small batches only wide reads keep enough bytes in flight. The defaults
    were the fastest of those timed on an H100 at 1-256 rows (dev/gpu_sampler.py), bar 16,384
    entries, which was faster at 1-64 rows and slower at 256. `split` (default: up to
    SPLIT_MAX_ROWS rows): the rows' passes by chunks of `split_block` entries, one program each
    (see the module's docstring). `filters` False promises that no sampled row has a top-p or
    a min-p, which spares the split path its check's two launches."""
    b, v = logits.shape
    ids = torch.empty(b, dtype=torch.int64, device=logits.device)
    lse = torch.empty(b, dtype=torch.float32, device=logits.device)
    if not b:
        return ids, lse
    args = (logits, logits.stride(0), v, temperature, kth_logit)
    if not (split if split is not None else b <= SPLIT_MAX_ROWS):
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
    chunks = triton.cdiv(v, split_block)
    pow2 = triton.next_power_of_2(chunks)
    stats = torch.empty((3, b, chunks), dtype=torch.float32, device=logits.device)
    arg = torch.empty((b, chunks), dtype=torch.int32, device=logits.device)
    state = torch.empty((2, b), dtype=torch.float32, device=logits.device)
    chunk_warps = min(num_warps, max(1, split_block // 1024))
    row_warps = min(num_warps, max(1, split_block // 256))
    _chunk_stats_kernel[(b, chunks)](
        *args, stats, arg, chunks, BLOCK=split_block, num_warps=chunk_warps
    )
    _combine_kernel[(b,)](
        *args,
        seeds,
        stats,
        arg,
        state,
        ids,
        lse,
        chunks,
        CHUNKS=pow2,
        BLOCK=split_block,
        num_warps=row_warps,
    )
    if filters:
        above = torch.empty((2, b, chunks), dtype=torch.float32, device=logits.device)
        check = (*args, top_p, min_p)
        _chunk_above_kernel[(b, chunks)](
            *check, state, ids, above, chunks, BLOCK=split_block, num_warps=chunk_warps
        )
        _check_kernel[(b,)](
            *check,
            seeds,
            state,
            ids,
            above,
            chunks,
            CHUNKS=pow2,
            BLOCK=split_block,
            MAX_DRAWS=MAX_DRAWS,
            num_warps=row_warps,
        )
    return ids, lse
