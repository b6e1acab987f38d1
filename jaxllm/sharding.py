"""Tensor parallelism: a model's weights and KV cache spread over a device mesh, with
JAX's own sharding (`NamedSharding`; XLA's SPMD partitioner inserts the collectives).

Megatron's split, written as data. Every weight names its logical axes (`AXES`) and
one table (`RULES`) maps logical axes to mesh axes, so another split is a change of
table, not of model code:
  - column-parallel: wqkv [D, q+k+v] and w_in [D, 2F] split their outputs, so each
    device holds the q, k and v of its own heads (its share of gate and up) and
    attention and the activation run without communication;
  - row-parallel: wo [H*Dh, D] and w_out [F, D] split their inputs; each device's
    product is a partial sum, which XLA all-reduces: one all-reduce after attention,
    one after the MLP, per layer;
  - the embedding and the head split the vocabulary (where it divides); the KV cache
    splits its kv heads.
  - norms, and the biases added after an all-reduce, are replicated;
  - mixture-of-experts layers split every expert as a dense MLP (`EXPERT_AXES`), and
    attention sinks split with their heads.

Fused projections are stored in per-shard order ([q_0 k_0 v_0 | q_1 k_1 v_1 | ...],
[gate_0 up_0 | gate_1 up_1 | ...]): a device's columns are then one contiguous block,
and `config.tensor_parallel` tells the model to split them so (ops.split_fused).
Two ways to run the split, decided once, here (`shard(..., layers=)`):
  - "per_shard" (the default where the weights allow): each decoder layer runs under
    `shard_map` on every device's share, the single-device code with its Pallas
    kernels on a config of that share (`shard_config`: H/n heads, K/n kv heads, F/n
    ffn), and the output projection's and the MLP's partial sums are all-reduced
    inside (`config.shard_of`; model.py). The embedding and head stay outside, split
    by XLA's partitioner.
  - "xla": the XLA paths (`kernels="xla"`) over the sharded arrays; XLA's SPMD
    partitioner inserts the collectives. Fp8 weights (their activations' per-row
    scale) and OLMoE's norms over the whole q and k projections (statistics across
    every device's part) run this way.

Quantized weights shard with their scales (rows of `values` are outputs, columns of
`scales` are outputs; an Fp8Weight's rows and scales are outputs). 8-bit weights
split exactly like dense ones. Packed 4-6-bit weights hold output rows i and i + N/2
in one byte, so a device's block of packed rows is not its block of outputs: per
shard, the column-parallel ones are repacked by device (weights.pack_by_block); under
XLA's partitioner they are left as they are, which it computes correctly with more
communication (benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .cache import Cache, PagedKVCache, PagedLayer
from .config import ModelConfig
from .layout import untranspose
from .params import Layer, Params
from .weights import Experts, Fp8Weight, QuantizedWeight, pack_by_block, permute_outputs

AXIS = "model"  # the mesh axis tensor parallelism splits over

# logical axis -> mesh axis (None: replicated)
RULES: dict[str, Optional[str]] = {"embed": None, "heads": AXIS, "ffn": AXIS, "vocab": AXIS, "kv_heads": AXIS,
                                   "experts": None}

# The logical axes of each weight as a dense [in, out] matrix (a bias: its out axis).
AXES: dict[str, tuple[str, ...]] = {
    "wqkv": ("embed", "heads"), "bqkv": ("heads",), "wo": ("heads", "embed"),
    "w_in": ("embed", "ffn"), "b_in": ("ffn",), "w_out": ("ffn", "embed"),
    "embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "lm_head_bias": ("vocab",),
    "sinks": ("heads",),
}
# Mixture-of-experts layers: every expert splits as a dense MLP does (its share of each
# expert's gate, up and down on every device: no expert moves), stacked on a replicated
# leading axis; the router, its bias and the biases added after the all-reduce are whole.
EXPERT_AXES: dict[str, tuple[str, ...]] = {
    "w_in": ("experts", "embed", "ffn"), "b_in": ("experts", "ffn"), "w_out": ("experts", "ffn", "embed")}


def make_mesh(n: int, devices: Optional[Sequence] = None) -> Mesh:
    """A one-axis mesh over the first n devices."""
    devices = list(devices if devices is not None else jax.devices())
    if not 1 <= n <= len(devices):
        raise ValueError(f"tensor parallelism over {n} devices, but JAX sees {len(devices)}")
    return Mesh(np.array(devices[:n]), (AXIS,))


def _specs(w, axes: tuple[str, ...], rules: dict[str, Optional[str]]):
    """The PartitionSpecs of weight w's arrays (a pytree like w), whose dense form has
    logical `axes` (stacked experts: a leading "experts" axis on every array)."""
    if isinstance(w, Experts):
        return Experts(_specs(w.w, axes, rules))
    named = lambda *names: PartitionSpec(*(rules[a] for a in names))
    if isinstance(w, QuantizedWeight):
        *lead, k_axis, n_axis = axes
        rows = named(*lead, n_axis, k_axis)  # values, high: [N (packed), K]
        cols = named(*lead, k_axis, n_axis)  # scales, mins: [K/G, N]
        return QuantizedWeight(rows, cols, None if w.mins is None else cols,
                               None if w.high is None else rows, w.bits, w.compute_dtype)
    if isinstance(w, Fp8Weight):  # t [N, K], one scale per output
        *lead, k_axis, n_axis = axes
        return Fp8Weight(named(*lead, n_axis, k_axis), named(*lead, n_axis), w.compute_dtype)
    return named(*axes)


def _per_shard(sizes: Sequence[int], shards: int) -> np.ndarray:
    """The column order that puts each shard's share of every part side by side:
    parts of `sizes` columns, concatenated, -> [part 0 of shard 0, part 1 of shard 0,
    ..., part 0 of shard 1, ...]."""
    starts = np.cumsum([0, *sizes[:-1]])
    return np.concatenate([np.arange(start + s * (size // shards), start + (s + 1) * (size // shards))
                           for s in range(shards) for start, size in zip(starts, sizes)])


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _rules(config: ModelConfig, n: int) -> dict[str, Optional[str]]:
    # A vocabulary that does not divide (GPT-2's 50,257) keeps the embedding and head whole on every device.
    return RULES if config.vocab_size % n == 0 else {**RULES, "vocab": None}


def _field_specs(tree, config: ModelConfig, rules):
    """{field: PartitionSpec pytree} for a Params' or Layer's array fields (not None,
    not the layers): split by AXES (EXPERT_AXES for experts), else replicated."""
    out = {}
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if value is None or f.name == "layers":
            continue
        axes = (EXPERT_AXES if config.n_experts and f.name in EXPERT_AXES else AXES).get(f.name)
        out[f.name] = PartitionSpec() if axes is None else _specs(value, axes, rules)
    return out


def layer_specs(layer: Layer, config: ModelConfig) -> Layer:
    """A Layer of PartitionSpecs: how `shard` placed this layer's arrays (shard_map's
    in_specs for a per-shard layer)."""
    return layer.replace(**_field_specs(layer, config, _rules(config, config.tensor_parallel)))


def _named(specs, mesh: Mesh):
    """A pytree of PartitionSpecs as NamedShardings on mesh."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def layer_shardings(layer: Layer, config: ModelConfig, mesh: Mesh) -> Layer:
    """Where `shard` puts this layer's arrays on `mesh` (a Layer of NamedShardings):
    init_params(each_layer=...) spreads random layers so as they are made."""
    return _named(layer_specs(layer, config.replace(tensor_parallel=mesh.shape[AXIS])), mesh)


def kv_specs(kv):
    """PartitionSpecs of one cache layer ((k, v) [B, S, K, Dh], or a PagedLayer's pools
    [N, P, K, Dh] and table): keys and values split by kv head, the table replicated."""
    heads = PartitionSpec(None, None, RULES["kv_heads"], None)
    if isinstance(kv, PagedLayer):
        return PagedLayer(heads, heads, PartitionSpec())
    return type(kv)(heads for _ in kv)


def shard_config(config: ModelConfig) -> ModelConfig:
    """The config of one device's share of a per-shard layer: its heads, kv heads and
    ffn width, fused projections whole (tensor_parallel 1), outputs of the row-parallel
    projections partial sums over `shard_of` devices."""
    n = config.tensor_parallel
    ffn = {"expert_d_ff": config.expert_d_ff // n} if config.n_experts else {"d_ff": config.d_ff // n}
    return config.replace(n_heads=config.n_heads // n, n_kv_heads=config.n_kv_heads // n, tensor_parallel=1,
                          shard_layers=False, shard_of=n, **ffn)


def runs_per_shard(params: Params, config: ModelConfig) -> bool:
    """Whether every layer's share on a device can be a model of its own: no fp8
    weight (its activations are scaled per row by the row's largest value, across every
    device's part of the row) and no norm across every head (OLMoE's qk_norm_whole).
    Packed 4-6-bit weights can: shard repacks their column-parallel ones by device."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Fp8Weight))
    return not any(isinstance(w, Fp8Weight) for w in leaves) and not config.qk_norm_whole


def check(config: ModelConfig, n: int) -> None:
    """Raise ValueError where the model cannot split over n devices."""
    if n == 1:
        return
    ffn = ("expert_d_ff", config.expert_d_ff) if config.n_experts else ("d_ff", config.d_ff)
    for name, size in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads), ffn):
        if size % n:
            raise ValueError(f"tensor parallelism over {n} devices needs {name} ({size}) divisible by {n}")


def shard(params: Params, config: ModelConfig, mesh: Mesh,
          layers: Literal["per_shard", "xla"] = "per_shard") -> tuple[Params, ModelConfig]:
    """params laid out in per-shard order and placed on `mesh`, and the config that
    runs them (tensor_parallel = the mesh's size): each layer per shard with the
    config's kernels where the weights allow (`runs_per_shard`), else the XLA paths
    partitioned by XLA."""
    n = mesh.shape[AXIS]
    check(config, n)
    if n == 1:
        return params, config
    params = untranspose(params)  # the XLA paths and a shard's kernels read [K, N]
    qkv = _per_shard([config.q_size, config.kv_size, config.kv_size], n)
    gated = config.mlp != "gelu"
    ffn = _per_shard([config.expert_d_ff if config.n_experts else config.d_ff] * 2, n) if gated else None

    per_shard = layers == "per_shard" and runs_per_shard(params, config)
    # Per shard, a device's packed rows must hold its own outputs (weights.pack_by_block).
    by_device = (lambda w: pack_by_block(w, n) if isinstance(w, QuantizedWeight) else w) if per_shard \
        else (lambda w: w)

    def layer(p: Layer) -> Layer:
        p = p.replace(wqkv=by_device(permute_outputs(p.wqkv, qkv)),
                      bqkv=None if p.bqkv is None else p.bqkv[qkv])
        if isinstance(p.w_in, Experts):  # each expert's gate and up in per-shard order
            p = p.replace(w_in=Experts(jax.vmap(lambda w: by_device(permute_outputs(w, ffn)))(p.w_in.w)),
                          b_in=None if p.b_in is None else p.b_in[:, ffn])
        elif ffn is not None:
            p = p.replace(w_in=by_device(permute_outputs(p.w_in, ffn)), b_in=None if p.b_in is None else p.b_in[ffn])
        else:  # an ungated MLP's input projection needs no reordering, only its packing by device
            p = p.replace(w_in=by_device(p.w_in))
        return p

    rules = _rules(config, n)

    def place(tree):
        specs = _field_specs(tree, config, rules)
        return tree.replace(**{name: jax.device_put(_from_host(getattr(tree, name)), _named(spec_tree, mesh))
                               for name, spec_tree in specs.items()})

    # Layer by layer: each layer's reordered copy goes to its devices before the next
    # is made, so no device ever holds more than one layer's whole weights.
    params = place(params).replace(layers=tuple(place(layer(p)) for p in params.layers))
    return params, config.replace(tensor_parallel=n, shard_layers=per_shard,
                                  kernels=config.kernels if per_shard else "xla")


def _from_host(tree):
    """Arrays a loader staged in host memory (the CPU device, models.load with
    tensor_parallel) as NumPy arrays, which device_put splits onto a mesh of any
    process's devices; others unchanged."""
    on_host = lambda a: isinstance(a, jax.Array) and all(d.platform == "cpu" for d in a.devices())
    return jax.tree.map(lambda a: np.asarray(a) if on_host(a) else a, tree)


def mesh_of(params: Params) -> Optional[Mesh]:
    """The mesh `shard` placed params on, or None for a single device."""
    sharding = getattr(params.final_norm.scale, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def cache_sharding(params: Params) -> Optional[NamedSharding]:
    """Where a KV cache for params lives: [B, S, K, Dh] split by kv head (None: one device)."""
    mesh = mesh_of(params)
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(None, None, RULES["kv_heads"], None))


def place_cache(cache: Cache, params: Params) -> Cache:
    """cache on params' mesh (unchanged for a single device): keys and values (a paged
    cache's pools [N, P, K, Dh] alike) split by kv head, the rest replicated."""
    sharding = cache_sharding(params)
    if sharding is None:
        return cache
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    rest = {"pages": jax.device_put(cache.pages, replicated)} if isinstance(cache, PagedKVCache) else {}
    return cache.replace(k=tuple(jax.device_put(a, sharding) for a in cache.k),
                         v=tuple(jax.device_put(a, sharding) for a in cache.v),
                         lengths=jax.device_put(cache.lengths, replicated), **rest)

