"""Model configuration: one frozen dataclass describes every supported decoder.

Architecture differences are fields read where they apply (norm kind, MLP kind,
position kind, biases, sliding window, ...). Presets for the benchmark shapes
live in `PRESETS`; loaders build configs from GGUF metadata or config.json.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from .policy import KernelPolicy

NormKind = Literal["rms", "layer"]
# "swiglu_oai": gpt-oss's SwiGLU, gate clamped above and up on both sides at
# swiglu_limit, gate * sigmoid(swiglu_alpha * gate) * (up + 1)
MlpKind = Literal["swiglu", "gelu", "geglu", "swiglu_oai"]
PositionKind = Literal["rope", "learned"]


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3" in config.json)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class YarnScaling:
    """YaRN ("rope_type": "yarn"; gpt-oss): frequencies interpolated by `factor`
    outside the band between beta_fast and beta_slow rotations over the original
    context, extrapolated inside it, with a linear ramp between; queries and keys
    are scaled by 0.1 * ln(factor) + 1 (`attention_factor`). `truncate` rounds the
    band's ends to whole dimensions (HF's default; gpt-oss sets it False)."""

    factor: float = 32.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    @property
    def attention_factor(self) -> float:
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    Shapes: V vocab, D d_model, H heads of size `head_dim`, K kv heads
    (H % K == 0, grouped-query attention), F d_ff, L layers.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: Optional[int] = None  # default d_model // n_heads
    max_seq_len: int = 2048  # the model's trained context length

    norm: NormKind = "rms"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm bias (GPT-2)
    mlp: MlpKind = "swiglu"
    gelu_approximate: bool = True  # tanh GELU (GPT-2 "gelu_new", Gemma)

    position: PositionKind = "rope"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # Phi-2: rotate only the first fraction of each head
    # Per-frequency divisors (GGUF's rope_freqs tensor: Llama 3.1+ scaling, precomputed)
    rope_freq_factors: Optional[tuple[float, ...]] = None
    rope_scaling: Optional[Union[RopeScaling, YarnScaling]] = None

    qkv_bias: bool = False  # Qwen2, GPT-2
    out_bias: bool = False  # attention output projection bias (GPT-2)
    mlp_bias: bool = False  # GPT-2
    lm_head_bias: bool = False  # Phi-2
    parallel_block: bool = False  # Phi-2: attention and MLP both read one norm of x
    tie_embeddings: bool = True
    sliding_window: Optional[int] = None  # Mistral: attend to the last W positions
    # Gemma 2/3: layer i is global (full attention) iff (i + 1) % period == 0, the
    # others use `sliding_window` and `rope_local_theta`. None: every layer alike.
    global_layer_period: Optional[int] = None
    rope_local_theta: Optional[float] = None

    qk_norm: bool = False  # RMSNorm on queries and keys per head (Gemma 3, Qwen3)
    qk_norm_whole: bool = False  # OLMoE: those norms span the whole q and k projections
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma 2/3)
    norm_weight_offset: float = 0.0  # HF Gemma stores w and scales by (1 + w)
    embed_scale: Optional[float] = None  # Gemma multiplies embeddings by sqrt(D)
    query_scale: Optional[float] = None  # attention scale; default head_dim ** -0.5
    attn_softcap: Optional[float] = None  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: Optional[float] = None  # Gemma 2: same on the output logits
    # gpt-oss: a learned logit per query head joins every softmax over the keys (and
    # takes its share of the probability, attending to nothing): Layer.sinks [H]
    attn_sinks: bool = False

    # Mixture of experts (Qwen3-MoE, Mixtral): every layer's MLP is n_experts SwiGLU
    # experts of width expert_d_ff (default d_ff), of which each token takes the
    # n_active_experts with the highest router softmax, weighted by those
    # probabilities (renormalised over the chosen ones with router_norm_topk).
    n_experts: int = 0
    n_active_experts: int = 0
    expert_d_ff: Optional[int] = None
    router_norm_topk: bool = True
    router_bias: bool = False  # gpt-oss: Layer.router_bias [E] added to the router logits
    swiglu_alpha: float = 1.702  # mlp "swiglu_oai" only
    swiglu_limit: float = 7.0

    # Which kernels run (policy.py), part of every jit key. A name is turned into the
    # policy for the default backend when the config is built: "auto" uses Pallas
    # kernels where they were measured faster (GPU, small batches), "xla" never,
    # "pallas" for every small-batch projection (interpreted on the CPU: for tests).
    kernels: Union[KernelPolicy, Literal["auto", "xla", "pallas"]] = "auto"

    # Devices the weights are split over (sharding.py): fused projections are stored
    # in per-shard order, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], which the model splits so.
    tensor_parallel: int = 1
    # How the split runs (sharding.shard decides): True, each layer per device under
    # shard_map on a config of its share (sharding.shard_config), with the kernels;
    # False, XLA's partitioner over the whole model's XLA paths.
    shard_layers: bool = False
    # On one device's share of a per-shard layer: the output projection's and the
    # MLP's products are partial sums over this many devices, all-reduced (model.py).
    shard_of: int = 1

    # What the KV cache stores: "auto" the weights' compute dtype; "fp8" float8 e4m3
    # (saturated at +-448, no scales, as vLLM's uncalibrated fp8 cache): half the bytes
    # that long-context decode reads (cache.py).
    kv_cache: Literal["auto", "fp8"] = "auto"

    arch: str = "llama"  # informational: where the config came from
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.kernels, str):
            object.__setattr__(self, "kernels", KernelPolicy.for_backend(self.kernels))
        if self.kv_cache not in ("auto", "fp8"):
            raise ValueError(f"kv_cache must be 'auto' or 'fp8', got {self.kv_cache!r}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.n_experts:
            if not 0 < self.n_active_experts <= self.n_experts:
                raise ValueError(f"n_active_experts must be in [1, n_experts={self.n_experts}], "
                                 f"got {self.n_active_experts}")
            if self.mlp not in ("swiglu", "swiglu_oai") or self.parallel_block:
                raise ValueError("mixture-of-experts layers are SwiGLU MLPs")
            if self.expert_d_ff is None:
                object.__setattr__(self, "expert_d_ff", self.d_ff)
        elif self.mlp == "swiglu_oai" or self.router_bias:
            raise ValueError("the swiglu_oai activation and router biases belong to mixture-of-experts layers")
        if self.position == "rope" and self.rotary_dim % 2:
            raise ValueError(f"rotary embeddings need an even rotary dimension, got {self.rotary_dim}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        """What q . k is multiplied by: query_scale (default head_dim ** -0.5), times
        YaRN's attention factor squared (it scales both queries and keys)."""
        scale = self.query_scale if self.query_scale is not None else self.head_dim ** -0.5
        if isinstance(self.rope_scaling, YarnScaling):
            scale *= self.rope_scaling.attention_factor ** 2
        return scale

    def layer_window(self, layer: int) -> Optional[int]:
        """Sliding window of one layer (None: full attention)."""
        if self.global_layer_period and (layer + 1) % self.global_layer_period == 0:
            return None
        return self.sliding_window

    def layer_rope_theta(self, layer: int) -> float:
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta
        return self.rope_theta

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """Every weight, bias, norm and sink of the model (as init_params makes it)."""
        D, L, qkv = self.d_model, self.n_layers, self.q_size + 2 * self.kv_size
        norm = D * (2 if self.norm == "layer" and self.norm_bias else 1)
        attn = D * qkv + self.q_size * D + qkv * self.qkv_bias + D * self.out_bias + self.n_heads * self.attn_sinks
        if self.qk_norm:
            attn += self.q_size + self.kv_size if self.qk_norm_whole else 2 * self.head_dim
        width = 2 if self.mlp != "gelu" else 1  # gate and up, or one input projection
        if self.n_experts:
            E, F = self.n_experts, self.expert_d_ff
            mlp = E * (width + 1) * D * F + D * E + E * self.router_bias + E * (width * F + D) * self.mlp_bias
        else:
            F = self.d_ff
            mlp = (width + 1) * D * F + (width * F + D) * self.mlp_bias
        norms = norm * ((1 if self.parallel_block else 2) + 2 * self.sandwich_norm)
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2) + self.vocab_size * self.lm_head_bias
        positions = self.max_seq_len * D if self.position == "learned" else 0
        return L * (attn + mlp + norms) + embed + positions + norm


# Benchmark shapes from ../shared/anchors/*.json (real architectures, random weights).
PRESETS: dict[str, ModelConfig] = {
    "smol135m": ModelConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, arch="llama",
    ),
    "llama1b": ModelConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        max_seq_len=131072, tie_embeddings=True, arch="llama",
    ),
    "llama8b": ModelConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        max_seq_len=131072, tie_embeddings=False, arch="llama",
    ),
    # Llama 3.1 70B (issue 29): 141 GB of bf16 weights, more than one H200 holds
    "llama70b": ModelConfig(
        vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        max_seq_len=131072, tie_embeddings=False, arch="llama",
    ),
    # Qwen3-30B-A3B: 128 experts, 8 per token (issue 30)
    "qwen3moe30b": ModelConfig(
        vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144,
        n_experts=128, n_active_experts=8, expert_d_ff=768, qk_norm=True, rope_theta=1e6,
        max_seq_len=40960, tie_embeddings=False, arch="qwen3moe",
    ),
    # gpt-oss-20b: 32 experts, 4 per token; sliding window 128 on alternate layers
    "gptoss20b": ModelConfig(
        vocab_size=201088, d_model=2880, n_layers=24, n_heads=64, n_kv_heads=8, head_dim=64, d_ff=2880,
        n_experts=32, n_active_experts=4, expert_d_ff=2880, mlp="swiglu_oai", mlp_bias=True,
        router_bias=True, attn_sinks=True, qkv_bias=True, out_bias=True, sliding_window=128,
        global_layer_period=2, rope_theta=150000.0,
        rope_scaling=YarnScaling(32.0, 4096, 32.0, 1.0, truncate=False),
        max_seq_len=131072, tie_embeddings=False, arch="gpt-oss",
    ),
}
