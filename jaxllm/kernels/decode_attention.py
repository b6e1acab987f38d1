"""Decode attention: one new token per row, fused with the query/key norms, the
rotary embedding and the cache write, in one launch per layer.

For one new token the XLA path runs ~11 kernels per layer (slice, two rotary
concatenations, two cache writes, the QK dot, the mask, two softmax reductions,
the PV dot, a conversion), each a launch for a few kB of work: a large part of a
small model's decode step (benchmarks/NOTES.md,
`benchmarks/profile_decode.py`). Here program (b, g, s) handles row b's kv head g
for the query heads that share it and split s of the cache slots:
  - rotate the group's queries and the new key (and normalise them per head first
    when the model has query/key norms);
  - split 0 writes the new key and value at slot lengths[b] and starts its online
    softmax from them, so no program reads a slot another program writes;
  - walk the split's visible slots (<= the position, inside the window) in blocks,
    reading only the filled ones rather than the whole capacity.
With one split the program writes the output; with several (long caches, so that
more programs read in parallel: flash-decoding) each writes its running max, sum
and weighted values, and XLA combines them.

A float8 cache (config.kv_cache "fp8") is read as stored and widened to the model's
dtype (out_dtype) for the tensor cores; the new key and value are written saturated (cache.to_storage).

Layout: qkv [B, (H + 2K) * Dh] is the fused projection's output (queries of head
h at h * Dh, keys from H * Dh, values from (H + K) * Dh); caches [B, S, K, Dh].
The query heads of kv head g are g * G ... g * G + G - 1 (G = H / K), as in
`model.attend`. Head dims are handled as two halves (the rotate-half pairing), so a
head dim need not be a power of two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..cache import to_storage
from .matvec import PartialSums, _pow2

GROUP_ROWS = 16  # query heads per program padded to the tensor cores' smallest M
SLOTS_PER_SPLIT = 512  # caches longer than this are read by several programs per head
MASKED = -1e30  # finite: an empty block must not produce exp(-inf + inf)
# The projection's split-K partial sums are added here, one load per split, unrolled
# (independent loads, so their latencies overlap); more splits are summed by XLA first.
MAX_QKV_SPLITS = 32


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's decode attention needs beyond its arrays (static, hashable)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    rope: bool  # rotate queries and keys (all of each head: partial rotary takes the XLA path)
    window: Optional[int] = None  # attend to positions > position - window
    softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap)
    qk_norm: bool = False  # RMSNorm of each query and key head before the rotation
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # the norm multiplies by (offset + scale)
    sinks: bool = False  # a learned logit per query head in each softmax, going to no value (gpt-oss)


def _splits(batch: int, spec: AttentionSpec, capacity: int, programs: int = 256) -> int:
    """Static split count: one for short caches; for long ones enough splits for about
    `programs` programs in all, each reading at least SLOTS_PER_SPLIT slots."""
    if capacity <= SLOTS_PER_SPLIT:
        return 1
    return int(max(1, min(capacity // SLOTS_PER_SPLIT, programs // (batch * spec.n_kv_heads))))


def _kernel(qkv_ref, k_ref, v_ref, lengths_ref, freq_ref, qn_ref, kn_ref, nr_ref, sink_ref, pages_ref, live_ref,
            *out_refs,
            spec: AttentionSpec, S: int, page: Optional[int], half: int, hp: int, bs: int, chunk: int, splits: int,
            qkv_splits: int, norm_width: Optional[int], prefetch: bool, compute):
    o_ref, k_out, v_out = out_refs[:3]
    b, g, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    H, K, Dh, G = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.n_heads // spec.n_kv_heads
    rows = jnp.arange(GROUP_ROWS)
    row_ok = rows < G
    d_ok = jnp.arange(hp) < half
    # Head halves padded to hp lanes: masks keep the loads and stores inside the head,
    # but Pallas rejects a static slice that passes an array's end, so the start is
    # a traced zero plus the offset.
    zero = b * 0
    halves = (pl.ds(zero, hp), pl.ds(zero + half, hp))
    pos = lengths_ref[b]
    slot = jnp.minimum(pos, S - 1)  # where XLA's dynamic_update_slice would write
    lo = jnp.int32(0) if spec.window is None else jnp.maximum(pos - spec.window + 1, 0)
    first = jnp.maximum(lo, split * chunk)
    # A paged cache's blocks start on multiples of bs (bs divides the page size), so
    # that a block never straddles two pages.
    start = first if page is None else first // bs * bs
    stop = jnp.minimum(jnp.minimum(pos + 1, S), (split + 1) * chunk)  # exclusive
    # a row that is not decoding (a free serving slot) reads none of its cache
    n_blocks = jnp.where(live_ref[b] > 0, jnp.maximum(stop - start + bs - 1, 0) // bs, 0)

    def visible(i):  # [bs] the slots of block i this program reads
        slots = start + i * bs + jnp.arange(bs)
        return (slots >= first) & (slots < stop) & (slots != slot)

    def at(ref, s0, n, h):  # positions s0 .. s0 + n - 1 of row b, kv head g, half h
        if page is None:
            return ref.at[b, pl.ds(s0, n), g, h]
        return ref.at[pages_ref[b, jnp.minimum(s0 // page, S // page - 1)], pl.ds(s0 % page, n), g, h]

    def load_block(i):  # block i's key and value halves [bs, hp], zero where not visible
        ok = visible(i)
        return tuple(plgpu.load(at(ref, start + i * bs, bs, h), mask=ok[:, None] & d_ok[None, :], other=0.0)
                     for ref in (k_ref, v_ref) for h in halves)

    first_block = load_block(0) if prefetch else None

    def head_rows(first, n_ok):  # [GROUP_ROWS, hp] x 2 of qkv, rows first, first + 1, ...
        def load(i, h):  # qkv_ref [splits, B, H + 2K, Dh]: the projection's partial sums
            return plgpu.load(qkv_ref.at[zero + i, b, pl.ds(first, GROUP_ROWS), h],
                              mask=n_ok[:, None] & d_ok[None, :], other=0.0).astype(jnp.float32)
        parts = [sum(load(i, h) for i in range(qkv_splits)) for h in halves]
        return parts if norm_width is None else [t * norm_factor for t in parts]

    if norm_width is not None:  # the RMSNorm factor of row b of the projection's input
        wp = _pow2(norm_width)
        xr = plgpu.load(nr_ref.at[b, pl.ds(zero, wp)], mask=jnp.arange(wp) < norm_width,
                        other=0.0).astype(jnp.float32)
        norm_factor = jax.lax.rsqrt(jnp.sum(xr * xr) / norm_width + spec.norm_eps)

    def norm(x1, x2, scale_ref):
        ms = (jnp.sum(x1 * x1, axis=1, keepdims=True) + jnp.sum(x2 * x2, axis=1, keepdims=True)) / Dh
        r = jax.lax.rsqrt(ms + spec.norm_eps)
        w = [spec.norm_offset + plgpu.load(scale_ref.at[h], mask=d_ok, other=0.0).astype(jnp.float32)
             for h in halves]
        return x1 * r * w[0][None, :], x2 * r * w[1][None, :]

    def rotate(x1, x2):
        angle = pos.astype(jnp.float32) * plgpu.load(freq_ref.at[halves[0]], mask=d_ok, other=0.0)
        cos, sin = jnp.cos(angle)[None, :], jnp.sin(angle)[None, :]
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    q1, q2 = head_rows(g * G, row_ok)
    one = rows < 1
    k1, k2 = head_rows(H + g, one)
    v1, v2 = head_rows(H + K + g, one)
    if spec.qk_norm:
        q1, q2 = norm(q1, q2, qn_ref)
        k1, k2 = norm(k1, k2, kn_ref)
    if spec.rope:
        q1, q2 = rotate(q1, q2)
        k1, k2 = rotate(k1, k2)
    store, dtype = k_ref.dtype, compute
    # The new key and value as vectors [hp] (their tiles hold one row). The cache
    # keeps them in its dtype; the new token's score uses the same rounded values
    # that later steps will read back.
    k1, k2, v1, v2 = (to_storage(jnp.sum(t, axis=0), store) for t in (k1, k2, v1, v2))

    @pl.when(split == 0)
    def _():
        for h, kh, vh in ((halves[0], k1, v1), (halves[1], k2, v2)):
            if page is None:
                k_at, v_at = k_out.at[b, slot, g, h], v_out.at[b, slot, g, h]
            else:  # past the row's table: the scratch page, as cache.write_layer
                target = jnp.where(pos < S, pages_ref[b, slot // page], 0)
                k_at, v_at = k_out.at[target, pos % page, g, h], v_out.at[target, pos % page, g, h]
            plgpu.store(k_at, kh, mask=d_ok)
            plgpu.store(v_at, vh, mask=d_ok)

    k1, k2, v1, v2 = (t.astype(jnp.float32) for t in (k1, k2, v1, v2))
    q1, q2 = q1.astype(dtype), q2.astype(dtype)

    def scores_of(s):  # [GROUP_ROWS, n] float32, scaled and capped
        s = s * spec.scale
        if spec.softcap is not None:
            s = spec.softcap * jnp.tanh(s / spec.softcap)
        return s

    # The new token's own score starts split 0's softmax; other splits start empty.
    s_new = scores_of(jnp.sum(q1.astype(jnp.float32) * k1[None, :], axis=1)
                      + jnp.sum(q2.astype(jnp.float32) * k2[None, :], axis=1))  # [GROUP_ROWS]
    own = (split == 0).astype(jnp.float32)  # 1 in split 0, else 0
    m = s_new * own + MASKED * (1.0 - own)
    l = jnp.full_like(s_new, 1.0) * own
    acc1 = own * jnp.broadcast_to(v1[None, :], (GROUP_ROWS, hp))
    acc2 = own * jnp.broadcast_to(v2[None, :], (GROUP_ROWS, hp))

    def attend(i, blk, m, l, acc1, acc2):
        ok = visible(i)
        blk = [t.astype(dtype) for t in blk]  # a float8 cache widened
        s = plgpu.dot(q1, blk[0], trans_b=True) + plgpu.dot(q2, blk[1], trans_b=True)
        s = jnp.where(ok[None, :], scores_of(s), MASKED)  # [GROUP_ROWS, bs]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        p = p.astype(dtype)
        acc1 = acc1 * alpha[:, None] + plgpu.dot(p, blk[2])
        acc2 = acc2 * alpha[:, None] + plgpu.dot(p, blk[3])
        return m_new, l, acc1, acc2

    if prefetch:
        def body(i, carry):
            *state, blk = carry
            ahead = load_block(i + 1)
            return attend(i, blk, *state) + (ahead,)
        m, l, acc1, acc2 = jax.lax.fori_loop(0, n_blocks, body, (m, l, acc1, acc2, first_block))[:4]
    else:
        m, l, acc1, acc2 = jax.lax.fori_loop(
            0, n_blocks, lambda i, carry: attend(i, load_block(i), *carry), (m, l, acc1, acc2))
    out_mask = row_ok[:, None] & d_ok[None, :]
    if splits == 1:
        if spec.sinks:  # one more logit per head in the softmax's sum (several splits: XLA adds it)
            sink = plgpu.load(sink_ref.at[pl.ds(g * G, GROUP_ROWS)], mask=row_ok, other=MASKED)
            top = jnp.maximum(m, sink)
            alpha = jnp.exp(m - top)
            l = l * alpha + jnp.exp(sink - top)
            acc1, acc2 = acc1 * alpha[:, None], acc2 * alpha[:, None]
        for h, acc in zip(halves, (acc1, acc2)):
            plgpu.store(o_ref.at[b, pl.ds(g * G, GROUP_ROWS), h], (acc / l[:, None]).astype(o_ref.dtype),
                        mask=out_mask)
    else:
        m_ref, l_ref = out_refs[3:5]
        plgpu.store(m_ref.at[b, g, split], m)
        plgpu.store(l_ref.at[b, g, split], l)
        for h, acc in zip(halves, (acc1, acc2)):
            plgpu.store(o_ref.at[b, g, split, :, h], acc,
                        mask=jnp.broadcast_to(d_ok[None, :], (GROUP_ROWS, hp)))


@functools.partial(jax.jit, static_argnames=("spec", "block_slots", "num_warps", "num_stages",
                                             "interpret", "out_dtype", "prefetch", "programs"),
                   donate_argnames=("k_cache", "v_cache"))
def decode_attention_pallas(qkv: jax.Array | PartialSums, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                            inv_freq: Optional[jax.Array], q_norm: Optional[jax.Array],
                            k_norm: Optional[jax.Array], norm_rows: Optional[jax.Array] = None,
                            sinks: Optional[jax.Array] = None, pages: Optional[jax.Array] = None,
                            live: Optional[jax.Array] = None, *,
                            spec: AttentionSpec, block_slots: int = 64, num_warps: int = 4,
                            num_stages: int = 3, interpret: bool = False, out_dtype=None,
                            prefetch: bool | str = "lean", programs: int = 256):
    """qkv [B, (H + 2K) * Dh] (or its PartialSums [splits, B, (H + 2K) * Dh]) of one
    new token per row at positions lengths [B]; caches [B, S, K, Dh]; inv_freq
    [Dh / 2] (rope); q_norm, k_norm [Dh] (qk_norm). With norm_rows [B, D], each row
    of qkv is first multiplied by rsqrt(mean(norm_rows[b]^2) + norm_eps): the factor
    of the RMSNorm before the projection, left to this kernel (model.DeferredNorm).
    sinks [H] (spec.sinks): each head's softmax sums one more logit, whose share
    goes to no value. pages [B, W] (a cache.PagedKVCache's table): the caches are page
    pools [N, P, K, Dh] and row b's position s lives at slot s % P of page
    pages[b, s // P] (P a power of two >= 16); S is then W x P. live [B]: rows where it
    is 0 read no cache (their output is the new token's value alone, meaningless: a
    free serving slot's step); their new key and value are still written.
    Returns (attention output [B, H * Dh] in out_dtype (default: qkv's, or the cache's
    for partial sums), k_cache, v_cache) with the new keys and values written at slot
    min(lengths[b], S - 1).

    prefetch: load each cache block one step ahead (block 0 before the new token's
    queries and keys, so that their memory latencies overlap; block i + 1 while block
    i is scored). "lean": only where qkv arrives as one array with no norm factor to
    compute (the row-major projections): after split-K partial sums and a norm's rows
    their loads already fill the registers (NOTES variants 23 and 28).
    programs: about how many programs read a long cache (more splits for fewer rows);
    block_slots: the cache slots one step of a program reads."""
    if pages is None:
        B, S, K, Dh = k_cache.shape
        page = None
    else:
        (B, W), (_, page, K, Dh) = pages.shape, k_cache.shape
        S = W * page
        if page < 16 or page & (page - 1):
            raise ValueError(f"the paged kernel takes pages of a power of two >= 16 positions, not {page}")
    dtype = out_dtype or (k_cache.dtype if isinstance(qkv, PartialSums) else qkv.dtype)
    if k_cache.dtype.itemsize == 1:  # a float8 cache: the dots take the model's dtype
        dtype = out_dtype or (jnp.bfloat16 if isinstance(qkv, PartialSums) else qkv.dtype)
    if isinstance(qkv, PartialSums) and qkv.sums.shape[0] > MAX_QKV_SPLITS:
        qkv = qkv.total(dtype)
    qkv_parts = qkv.sums if isinstance(qkv, PartialSums) else qkv[None]
    H = spec.n_heads
    half = Dh // 2
    hp = max(16, _pow2(half))
    bs = max(16, min(block_slots, _pow2(S), page or S))
    splits = _splits(B, spec, S, programs)
    chunk = pl.cdiv(S, splits) if page is None else pl.cdiv(pl.cdiv(S, splits), bs) * bs
    qkv4 = qkv_parts.reshape(qkv_parts.shape[0], B, H + 2 * K, Dh)
    dummy = jnp.zeros((hp,), jnp.float32)
    if spec.sinks != (sinks is not None):
        raise ValueError("sinks are given exactly when spec.sinks is set")
    # padded past the last group's GROUP_ROWS rows, so that no masked load leaves the array
    sink_rows = dummy if sinks is None else jnp.pad(sinks.astype(jnp.float32), (0, GROUP_ROWS), constant_values=MASKED)
    operands = (qkv4, k_cache, v_cache, lengths.astype(jnp.int32),
                dummy if inv_freq is None else inv_freq.astype(jnp.float32),
                dummy if q_norm is None else q_norm, dummy if k_norm is None else k_norm,
                dummy[None] if norm_rows is None else norm_rows, sink_rows,
                jnp.zeros((1, 1), jnp.int32) if pages is None else pages.astype(jnp.int32),
                jnp.ones((B,), jnp.int32) if live is None else live.astype(jnp.int32))
    cache_shapes = [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                    jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((B, H, Dh), dtype)] + cache_shapes
    else:
        out_shape = ([jax.ShapeDtypeStruct((B, K, splits, GROUP_ROWS, Dh), jnp.float32)] + cache_shapes
                     + [jax.ShapeDtypeStruct((B, K, splits, GROUP_ROWS), jnp.float32)] * 2)
    kernel = functools.partial(_kernel, spec=spec, S=S, page=page, half=half, hp=hp, bs=bs, chunk=chunk,
                               splits=splits, qkv_splits=qkv4.shape[0],
                               norm_width=None if norm_rows is None else norm_rows.shape[1],
                               compute=jnp.dtype(dtype if k_cache.dtype.itemsize == 1 else k_cache.dtype),
                               prefetch=(qkv4.shape[0] == 1 and norm_rows is None) if prefetch == "lean"
                               else prefetch)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, K, splits),
        input_output_aliases={1: 1, 2: 2}, interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                    num_stages=num_stages),
    )(*operands)
    if splits == 1:
        out, k_cache, v_cache = outs
        return out.reshape(B, H * Dh), k_cache, v_cache
    acc, k_cache, v_cache, m, l = outs
    G = H // K
    top = m.max(axis=2, keepdims=True)  # [B, K, 1, GROUP_ROWS]
    if sinks is not None:
        sink = jnp.pad(sinks.astype(jnp.float32).reshape(K, G), ((0, 0), (0, GROUP_ROWS - G)),
                       constant_values=MASKED)[None, :, None]
        top = jnp.maximum(top, sink)
    weight = jnp.exp(m - top)  # [B, K, splits, GROUP_ROWS]
    total = (weight * l).sum(2) + (jnp.exp(sink - top)[:, :, 0] if sinks is not None else 0.0)
    out = (weight[..., None] * acc).sum(2) / total[..., None]
    out = out[:, :, :G].reshape(B, H * Dh).astype(dtype)
    return out, k_cache, v_cache
