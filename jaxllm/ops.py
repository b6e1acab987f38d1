"""The operations a decoder layer is written in: projections, norms, rotary
embeddings, attention. Each follows the `KernelPolicy` in `config.kernels` to a
Pallas kernel (jaxllm/kernels/) or its XLA reference; model.py only composes them.

`linear` is the one place that reads a weight's kind (weights.py): it asks the policy
for a `Plan` once per projection and dispatches through `KERNELS`.

Axes: B batch, T new tokens, S cache slots, H query heads, K kv heads,
G = H / K query heads per kv head, Dh head dim, D model width, V vocab.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .cache import PagedLayer
from .config import ModelConfig, YarnScaling
from .kernels.add_norm import add_norm_pallas
from .kernels.cpu_qmatvec import qmatvec_cpu
from .kernels.decode_attention import AttentionSpec, decode_attention_pallas
from .kernels.expert_matvec import expert_matmul_pallas, expert_matvec_pallas, sort_into_blocks
from .kernels.matvec import GatedInput, PartialSums, activate, matvec_pallas
from .kernels.qmatvec import qmatmul_pallas, qmatvec_pallas
from .kernels.rowmatvec import rowmatvec_pallas
from .params import Norm
from .policy import KernelPolicy, Plan
from .weights import Experts, InputTap, fp8_linear, fp8_take_rows, kind_of, linear_reference, take_rows

Delta = Union[None, jax.Array, PartialSums]


class Residual(NamedTuple):
    """The residual stream x [..., D] with a block's output not yet added: delta is
    None (nothing pending), an array like x, or a projection's split-K `PartialSums`,
    which the next norm's kernel adds (kernels/add_norm.py)."""

    x: jax.Array
    delta: Delta = None

    def total(self) -> jax.Array:
        if self.delta is None:
            return self.x
        if isinstance(self.delta, PartialSums):
            return self.x + self.delta.total(self.x.dtype).reshape(self.x.shape)
        return self.x + self.delta


class DeferredNorm(NamedTuple):
    """An RMSNorm of x [..., D] left to the kernels around the projection after it:
    norm(x) @ W = (x * weight) @ W * factor, weight = offset + scale, factor =
    rsqrt(mean(x^2) + eps) [..., 1]. The row-major kernel (kernels/rowmatvec.py)
    takes x and the weight and does both. Before the other kernels, XLA forms the
    product `scaled` (together with the residual add) and the kernel after the
    projection applies the factor: decode attention computes it from x itself, so
    the norm costs no kernel of its own; before XLA's matrix multiplies, the
    activation's kernel applies it, and XLA computes the product and the sum of
    squares in one kernel where a norm written out took two (NOTES variant 15)."""

    x: jax.Array
    scale: jax.Array
    offset: float
    eps: float

    @property
    def scaled(self) -> jax.Array:
        return (self.x.astype(jnp.float32) * (self.offset + self.scale.astype(jnp.float32))).astype(self.x.dtype)

    @property
    def factor(self) -> jax.Array:
        return rms_factor(self.x.astype(jnp.float32), self.eps)

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype


# ---- projections -----------------------------------------------------------------------

def plan_for(policy: KernelPolicy, w, rows: int) -> Plan:
    return policy.plan(kind_of(w), rows, w.shape, getattr(w, "bits", 16))


def _rows_of(x) -> int:
    return x.sums.shape[1] if isinstance(x, GatedInput) else math.prod(x.shape[:-1])


def _flat(kernel):
    """A kernel over x [M, K] applied to x [..., K] (a GatedInput passes whole); split-K
    partial sums are returned as they are."""
    def run(x, w, plan, out_dtype, keep_partial, policy):
        if isinstance(x, GatedInput):
            return kernel(x, w, plan, out_dtype, keep_partial, policy)
        y = kernel(x.reshape(-1, x.shape[-1]), w, plan, out_dtype, keep_partial, policy)
        return y if isinstance(y, PartialSums) else y.reshape(*x.shape[:-1], w.shape[1])
    return run


# XLA's path for each kind of weight.
XLA = {
    "quantized": _flat(lambda x, w, plan, dt, keep, policy: linear_reference(x, w, dt)),
    "fp8": _flat(lambda x, w, plan, dt, keep, policy: fp8_linear(x, w, dt)),
    "by_row": lambda x, w, plan, dt, keep, policy: jnp.einsum(
        "...i,oi->...o", x, w.t.astype(x.dtype), preferred_element_type=dt),
    # A float32 result only where asked for: requesting it on every projection
    # changes XLA's fusions of batch-1 dots and cost ~10% on llama8b decode.
    "dense": lambda x, w, plan, dt, keep, policy: jnp.einsum(
        "...i,io->...o", x, w.astype(x.dtype), preferred_element_type=dt),
}

# Each plan's kernel: (x [..., K] or a GatedInput, w, plan, out_dtype, keep_partial, policy).
KERNELS = {
    "rowmatvec": lambda x, w, plan, dt, keep, policy: _row_major(x, w, plan, dt, None, None, policy.interpret),
    "matvec": _flat(lambda x, w, plan, dt, keep, policy: matvec_pallas(
        x, w, dt, tiling=plan.tiling, interpret=policy.interpret, sum_splits=not keep)),
    "qmatvec": _flat(lambda x, w, plan, dt, keep, policy: qmatvec_pallas(
        x, w, dt, tiling=plan.tiling, interpret=policy.interpret, sum_splits=not keep,
        int8_activations=policy.int8_activations)),
    "qmatmul": _flat(lambda x, w, plan, dt, keep, policy: qmatmul_pallas(
        x, w, dt, tiling=plan.tiling, interpret=policy.interpret)),
    "native": _flat(lambda x, w, plan, dt, keep, policy: qmatvec_cpu(x, w, dt)),
    "xla": lambda x, w, *rest: XLA[kind_of(w)](x, w, *rest),
}


def linear(x, w, policy: KernelPolicy, b: Optional[jax.Array] = None, out_dtype=None, *,
           keep_partial: bool = False, gate: Optional[str] = None, residual: Optional[jax.Array] = None,
           plan: Optional[Plan] = None):
    """x [..., In] @ w [In, Out] (+ b [Out]) with float32 accumulation, in out_dtype
    (default x's), w of any kind (weights.py). x may be a `DeferredNorm`, or a
    `GatedInput` [S, rows, 2 In] (the MLP's down projection at decode), which the
    kernels take whole. keep_partial: a split-K kernel may return its `PartialSums`
    [S, rows, Out] for the kernel after it to add up. Epilogue: gate ("silu" or
    "gelu_tanh"), act(y1) * y2 of the output's two halves; residual [..., Out],
    residual + y in its dtype. The row-major kernel applies the norm and the epilogue
    itself (plan.fuses). plan: the policy's choice, unless given."""
    if isinstance(w, InputTap):
        w.observe(x)
        w = w.weight
    plan = plan or plan_for(policy, w, _rows_of(x))
    if plan.fuses and b is None:
        return _row_major(x, w, plan, out_dtype, gate, residual, policy.interpret)
    epilogue = gate is not None or residual is not None
    dtype = jnp.float32 if epilogue else out_dtype
    if isinstance(x, DeferredNorm):
        # The projection returns x's dtype (asking XLA for float32 outputs changes its
        # fusions, NOTES variant 7); the factor is applied in float32 after it.
        y = _product(x.scaled, w, plan, None, False, policy)
        y = (y.astype(jnp.float32) * x.factor).astype(dtype or x.dtype)
    else:
        y = _product(x, w, plan, dtype, keep_partial and b is None and not epilogue, policy)
    if b is not None and not isinstance(y, PartialSums):
        y = y + b.astype(y.dtype)
    if not epilogue:
        return y
    if gate is not None:
        g, u = jnp.split(y, 2, axis=-1)
        y = activate(g, gate) * u
    return y.astype(out_dtype or x.dtype) if residual is None else residual + y.astype(residual.dtype)


def _product(x, w, plan: Plan, out_dtype, keep_partial: bool, policy: KernelPolicy):
    if isinstance(x, GatedInput) and not plan.split_k:
        x = x.value(out_dtype or jnp.float32)
    return KERNELS[plan.kernel](x, w, plan, out_dtype, keep_partial, policy)


def _row_major(x, w, plan: Plan, out_dtype, gate, residual, interpret: bool):
    rows = math.prod(x.shape[:-1])
    norm, x_in = {}, x
    if isinstance(x, DeferredNorm):
        norm, x_in = dict(norm_scale=x.scale, norm_offset=x.offset, norm_eps=x.eps), x.x
    y = rowmatvec_pallas(
        x_in.reshape(rows, -1), w.t, out_dtype, gate=gate, **norm,
        residual=None if residual is None else residual.reshape(rows, -1), tiling=plan.tiling,
        row_scales=w.scales if kind_of(w) == "fp8" else None, interpret=interpret)
    return y.reshape(*x.shape[:-1], -1)


EMBEDDINGS = {"quantized": take_rows, "fp8": fp8_take_rows, "dense": lambda table, ids: table[ids]}


def lookup(table, ids: jax.Array) -> jax.Array:
    """Rows ids [...] of an embedding table [V, D] of any kind: [..., D]."""
    return EMBEDDINGS[kind_of(table)](table, ids)


def head_logits(x: jax.Array, head, bias: Optional[jax.Array], norm: Norm, config: ModelConfig) -> jax.Array:
    """The final norm and the output head: x [..., D] -> float32 logits [..., V]. A head
    stored by row (a tied embedding table) runs on the row-major kernel with the norm
    inside where the policy has it (row_major_head), else on XLA's matrix multiply."""
    policy, rows = config.kernels, math.prod(x.shape[:-1])
    plan = plan_for(policy, head, rows)
    if kind_of(head) == "by_row":
        if (plan.fuses and bias is None and policy.row_major_head
                and defers_norm(config, norm, head, rows)):
            x = DeferredNorm(x, norm.scale, config.norm_weight_offset, config.norm_eps)
            return linear(x, head, policy, out_dtype=jnp.float32, plan=plan)
        plan = Plan("xla")
    return linear(apply_norm(x, norm, config), head, policy, bias, jnp.float32, plan=plan)


# ---- norms -----------------------------------------------------------------------------

def defers_norm(config: ModelConfig, norm: Norm, w, rows: int, kernel_applies: bool = False) -> bool:
    """Whether the norm before projection w is left to the kernels after it
    (`DeferredNorm`): RMSNorm without bias, where the kernel after w applies the factor
    itself (kernel_applies: decode attention), where w's kernel fuses it (row-major),
    or before XLA's matrix multiply on the GPU (`defers_norm_before_xla`)."""
    policy = config.kernels
    if not (policy.deferred_norm and config.norm == "rms" and norm.bias is None and policy.mode != "xla"):
        return False
    if kind_of(w) == "experts":  # moe_mlp routes on the normed activations
        return False
    plan = plan_for(policy, w, rows)
    if kernel_applies or plan.fuses or policy.deferred_norm == "always":
        return True
    return policy.defers_norm_before_xla() and kind_of(w) in ("dense", "by_row") and plan.kernel == "xla"


def add_norm(stream: Residual, p: Norm, config: ModelConfig, deferred: bool = False):
    """The residual add of a block's output and the norm after it: (x + delta, its
    norm), x [..., D]; with deferred, the norm as a `DeferredNorm` for the projection
    after it. Few partial sums are added together with the norm in one kernel."""
    x, delta = stream
    if deferred:
        x = stream.total()
        return x, DeferredNorm(x, p.scale, config.norm_weight_offset, config.norm_eps)
    if delta is None:
        return x, apply_norm(x, p, config)
    rows, D = math.prod(x.shape[:-1]), x.shape[-1]
    if isinstance(delta, PartialSums) and config.kernels.add_norm_kernel(delta.sums.shape[0], D):
        x2, h2 = add_norm_pallas(
            x.reshape(rows, D), delta, p.scale, p.bias, layer_norm=config.norm == "layer",
            eps=config.norm_eps, offset=config.norm_weight_offset, interpret=config.kernels.interpret)
        return x2.reshape(x.shape), h2.reshape(x.shape)
    x = stream.total()
    return x, apply_norm(x, p, config)


def rms_factor(x32: jax.Array, eps: float) -> jax.Array:
    """rsqrt(mean(x^2) + eps) over the last axis, kept as [..., 1]."""
    return jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)


def moe_mlp(x: jax.Array, router: jax.Array, w_in: Experts, w_out: Experts, config: ModelConfig, *,
            router_bias: Optional[jax.Array] = None, b_in: Optional[jax.Array] = None,
            b_out: Optional[jax.Array] = None) -> jax.Array:
    """A mixture-of-experts MLP's output delta for x [..., D]: each token goes to the
    n_active_experts experts with the highest router softmax (router [D, E], plus
    router_bias [E] for gpt-oss), whose gated MLP outputs (expert biases b_in [E, 2F],
    b_out [E, D] where the model has them) are summed weighted by those probabilities
    (renormalised over the chosen experts with config.router_norm_topk: a softmax
    over the chosen logits, gpt-oss's order). The policy picks how the experts run
    (`KernelPolicy.moe_route`); both ways compute the same sums."""
    shape, k = x.shape, config.n_active_experts
    x = x.reshape(-1, shape[-1])
    logits = jnp.dot(x, router, preferred_element_type=jnp.float32)
    if router_bias is not None:
        logits = logits + router_bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)  # [N, k]; ties go to the lower index
    if config.router_norm_topk:
        weights = weights / weights.sum(-1, keepdims=True)
    route = config.kernels.moe_route(x.shape[0] * k, w_in.kind, w_in.bits)
    run = {"kernel": partial(_experts_in_place, config.kernels), "gather": _experts_gathered,
           "grouped": _experts_grouped, "grouped_kernel": partial(_experts_grouped_kernel, config.kernels)}[route]
    y = run(x, experts, ExpertProjection(w_in, b_in), ExpertProjection(w_out, b_out),
            partial(gated_activation, config))
    return jnp.einsum("nk,nkd->nd", weights, y).astype(x.dtype).reshape(shape)


def split_fused(x: jax.Array, sizes: Sequence[int], shards: int = 1) -> list[jax.Array]:
    """The parts of a fused projection's output x [..., sum(sizes)], stored whole one
    after another (shards 1), or in per-shard order: each of `shards` blocks holds its
    share of every part (sharding.py). Each part comes back in its own order."""
    if shards == 1:
        return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    blocks = x.reshape(*x.shape[:-1], shards, -1)
    parts = jnp.split(blocks, np.cumsum([size // shards for size in sizes])[:-1].tolist(), axis=-1)
    return [part.reshape(*x.shape[:-1], -1) for part in parts]


def gated_activation(config: ModelConfig, h: jax.Array, dtype) -> jax.Array:
    """A gated MLP's hidden activation from its [gate | up] halves h [..., 2F] (in
    per-shard order under tensor parallelism: split_fused)."""
    gate, up = split_fused(h, [h.shape[-1] // 2] * 2, config.tensor_parallel)
    if config.mlp == "swiglu_oai":
        limit = config.swiglu_limit
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
        return (gate * jax.nn.sigmoid(config.swiglu_alpha * gate) * (up + 1)).astype(dtype)
    return (jax.nn.silu(gate) * up).astype(dtype)


class ExpertProjection(NamedTuple):
    """A projection of every expert (stacked) and their biases [E, N] (or None)."""

    w: Experts
    b: Optional[jax.Array]

    def biased(self, y: jax.Array, ids: jax.Array) -> jax.Array:
        """y [..., N] (float32) of the rows that went through experts ids [...]."""
        return y if self.b is None else y + self.b[ids].astype(jnp.float32)


def _experts_gathered(x, experts, w_in: ExpertProjection, w_out: ExpertProjection, act) -> jax.Array:
    """[N, k, D] float32: token n through expert experts[n, j], reading only the
    routed experts' weights (few tokens: decode)."""
    h = jnp.einsum("nd,nkdf->nkf", x, w_in.w.dense(experts).astype(x.dtype), preferred_element_type=jnp.float32)
    h = act(w_in.biased(h, experts), x.dtype)
    y = jnp.einsum("nkf,nkfd->nkd", h, w_out.w.dense(experts).astype(x.dtype), preferred_element_type=jnp.float32)
    return w_out.biased(y, experts)


def _experts_in_place(policy: KernelPolicy, x, experts, w_in: ExpertProjection, w_out: ExpertProjection,
                      act) -> jax.Array:
    """Same as _experts_gathered, each pair's expert read where it is stored
    (kernels/expert_matvec.py)."""
    ids = experts.reshape(-1)
    return _experts_by_kernel(lambda rows, w: expert_matvec_pallas(
        rows, w, ids, tiling=policy.experts, qtiling=policy.qmatvec_tiling(w.bits),
        int8_activations=policy.int8_activations, interpret=policy.interpret), x, experts, w_in, w_out, act)


def _experts_grouped_kernel(policy: KernelPolicy, x, experts, w_in: ExpertProjection, w_out: ExpertProjection,
                            act) -> jax.Array:
    """Same as _experts_grouped for quantized experts: the pairs sorted by expert into
    blocks of rows once, both projections' tiles dequantized in registers
    (kernels/expert_matvec.py's expert_matmul_pallas)."""
    tiling = policy.expert_matmul_tiling(experts.size, w_in.w.shape[0])
    blocks = sort_into_blocks(experts.reshape(-1), w_in.w.shape[0], tiling.block_m)
    return _experts_by_kernel(lambda rows, w: expert_matmul_pallas(
        rows, w, blocks, tiling=tiling, interpret=policy.interpret), x, experts, w_in, w_out, act)


def _experts_by_kernel(run, x, experts, w_in: ExpertProjection, w_out: ExpertProjection, act) -> jax.Array:
    """[N, k, D] float32 through run(rows [P, K], w: Experts) -> [P, N] float32, which
    multiplies row p by the expert of pair p (pairs in experts.reshape(-1)'s order)."""
    N, k = experts.shape
    ids = experts.reshape(-1)
    h = act(w_in.biased(run(jnp.repeat(x, k, axis=0), w_in.w), ids), x.dtype)
    return w_out.biased(run(h, w_out.w), ids).reshape(N, k, -1)


def _experts_grouped(x, experts, w_in: ExpertProjection, w_out: ExpertProjection, act) -> jax.Array:
    """Same as _experts_gathered, with the (token, expert) pairs sorted by expert and
    each expert's rows multiplied by its weights once (a grouped matrix multiply)."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    ids = flat[order]
    sizes = jnp.bincount(flat, length=w_in.w.shape[0]).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[order // k], w_in.w.dense().astype(x.dtype), sizes, preferred_element_type=jnp.float32)
    h = act(w_in.biased(h, ids), x.dtype)
    y = jax.lax.ragged_dot(h, w_out.w.dense().astype(x.dtype), sizes, preferred_element_type=jnp.float32)
    y = w_out.biased(y, ids)
    return jnp.zeros_like(y).at[order].set(y).reshape(N, k, -1)


def apply_norm(x: jax.Array, p: Norm, config: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32, with the
    architecture's weight offset (Gemma's 1 + scale)."""
    x32 = x.astype(jnp.float32)
    if config.norm == "layer":
        x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * rms_factor(x32, config.norm_eps) * (config.norm_weight_offset + p.scale.astype(jnp.float32))
    if p.bias is not None:
        y = y + p.bias.astype(jnp.float32)
    return y.astype(x.dtype)


# ---- positions and attention -----------------------------------------------------------

def rope_inv_freq(config: ModelConfig, theta: float) -> np.ndarray:
    """Rotary inverse frequencies [R/2] (R = rotary_dim), with Llama-3 or YaRN
    scaling when configured (YaRN's attention factor is in config.attention_scale)."""
    dim = config.rotary_dim
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = config.rope_scaling
    if isinstance(s, YarnScaling):
        inv_freq = _yarn(inv_freq, s, dim, theta)
    elif s is not None:
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / s.factor,
                            np.where(wavelen < high_wavelen, inv_freq, mid))
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
    return inv_freq.astype(np.float32)


def _yarn(inv_freq: np.ndarray, s: YarnScaling, dim: int, theta: float) -> np.ndarray:
    """YaRN (arXiv 2309.00071): dimension d rotates original_max_position * inv_freq[d]
    / 2 pi times over the original context; those turning more than beta_fast times
    keep their frequency, those turning fewer than beta_slow times are divided by
    `factor`, and a linear ramp over dimensions blends the two between."""
    def dim_of(rotations):
        return dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / max(high - low, 1e-3), 0, 1)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, T, N, Dh] rotated by positions [B, T] (rotate-half pairing, as in HF).
    Only the first R = 2 * len(inv_freq) dims rotate; the rest pass through (Phi-2)."""
    rot = 2 * inv_freq.shape[0]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x[..., :rot].astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return out if rot == x.shape[-1] else jnp.concatenate([out, x[..., rot:]], axis=-1)


def attend(q, k, v, q_pos, k_pos, config: ModelConfig, window: Optional[int],
           sinks: Optional[jax.Array] = None) -> jax.Array:
    """Causal grouped-query attention.

    q [B, T, H, Dh]; k, v [B, S, K, Dh]; q_pos [B, T] and k_pos [B, S] are the
    sequence positions of queries and keys. A key is visible when
    q_pos - window < k_pos <= q_pos. sinks [H] (gpt-oss): one more logit per head
    in each softmax, whose probability goes to no value. Returns [B, T, H, Dh].
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    if k.dtype.itemsize == 1:  # a float8 cache, widened to the queries' dtype
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    q = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * config.attention_scale
    if config.attn_softcap is not None:
        scores = config.attn_softcap * jnp.tanh(scores / config.attn_softcap)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        sink = sinks.astype(jnp.float32).reshape(1, K, H // K, 1, 1)
        top = jnp.maximum(scores.max(-1, keepdims=True), sink)
        e = jnp.exp(scores - top)
        probs = e / (e.sum(-1, keepdims=True) + jnp.exp(sink - top))
    # A padded query row may see no key at all; its output is never used.
    probs = jnp.where(visible[:, None, None], probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, Dh)


def _attention_programs(policy: KernelPolicy, cache_dtype) -> int:
    return policy.attention_programs_fp8 if jnp.dtype(cache_dtype).itemsize == 1 else policy.attention_programs


def decode_attention(p, config: ModelConfig, index: int, qkv, kv, starts, dtype,
                     norm_rows: Optional[jax.Array] = None, live: Optional[jax.Array] = None):
    """qkv [B, 1, q + 2kv] (or its PartialSums [S, B, q + 2kv]) of one new token per
    row at positions starts [B] -> (attention output [B, 1, q_size] in dtype, kv)
    through kernels/decode_attention.py. norm_rows [B, D]: the projection's input was
    a DeferredNorm of these rows, whose factor the kernel applies. live [B]: rows not
    decoding (0) skip reading their cache."""
    rope = config.position == "rope"
    spec = AttentionSpec(
        n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
        scale=config.attention_scale,
        rope=rope, window=config.layer_window(index), softcap=config.attn_softcap,
        qk_norm=config.qk_norm, norm_eps=config.norm_eps, norm_offset=config.norm_weight_offset,
        sinks=config.attn_sinks)
    inv_freq = jnp.asarray(rope_inv_freq(config, config.layer_rope_theta(index))) if rope else None
    norms = (p.q_norm.scale, p.k_norm.scale) if config.qk_norm else (None, None)
    paged = isinstance(kv, PagedLayer)
    k_cache, v_cache = (kv.k, kv.v) if paged else kv
    out, k_cache, v_cache = decode_attention_pallas(
        qkv if isinstance(qkv, PartialSums) else qkv[:, 0], k_cache, v_cache, starts, inv_freq, *norms,
        norm_rows, p.sinks, kv.pages if paged else None, live, spec=spec, interpret=config.kernels.interpret,
        out_dtype=dtype, prefetch=config.kernels.attention_prefetch,
        programs=_attention_programs(config.kernels, k_cache.dtype), block_slots=config.kernels.attention_block_slots)
    return out[:, None], kv.replace(k=k_cache, v=v_cache) if paged else (k_cache, v_cache)
