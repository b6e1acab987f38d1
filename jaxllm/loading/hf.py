"""Hugging Face checkpoints: config.json to ModelConfig, and the name map from
their state-dict keys to our parameter pytree.

HF linear weights are [out, in] (torch); ours are [in, out]. GPT-2's Conv1D
weights are already [in, out] and its q/k/v come fused.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig, RopeScaling, YarnScaling
from ..errors import ModelFileError, UnsupportedArchitectureError
from ..params import Layer, Norm, Params
from ..weights import Experts
from .dequant import mxfp4_openai

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt2", "gemma2", "gemma3_text", "qwen3_moe",
             "mixtral", "olmoe", "gpt_oss")

# Module names inside each layer that differ from Llama's (attention in, attention
# out, MLP in, MLP out); Phi-3 stores q/k/v and gate/up already fused.
LAYER_NAMES = {
    "phi": (("q_proj", "k_proj", "v_proj"), "dense", ("fc1",), "fc2"),
    "phi3": (("qkv_proj",), "o_proj", ("gate_up_proj",), "down_proj"),
}
LLAMA_NAMES = (("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_proj", "up_proj"), "down_proj")
# Mixture-of-experts layers in checkpoint files: (the MLP's module, each expert's gate,
# up and down). transformers >= 5 holds them in memory as "mlp" with stacked
# experts.gate_up_proj [E, 2F, D] and experts.down_proj [E, D, F]; both are read.
MOE_NAMES = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj"), "down_proj"),
             "olmoe": ("mlp", ("gate_proj", "up_proj"), "down_proj"),
             "mixtral": ("block_sparse_moe", ("w1", "w3"), "w2")}


def _rope(cfg: dict) -> tuple[float, RopeScaling | YarnScaling | None, float | None]:
    """(global theta, llama-3 or YaRN scaling, local theta) from either config spelling."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # Gemma 3: one entry per layer type
        local = params.get("sliding_attention", {}).get("rope_theta")
        params = params["full_attention"]
    else:
        local = cfg.get("rope_local_base_freq")
    legacy = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    src = params if params.get("rope_type") else legacy
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling(float(src["factor"]), float(src["low_freq_factor"]),
                              float(src["high_freq_factor"]),
                              int(src["original_max_position_embeddings"]))
    elif kind == "yarn":
        if any(src.get(k) is not None for k in ("attention_factor", "mscale", "mscale_all_dim")):
            raise UnsupportedArchitectureError("YaRN with an explicit attention_factor or mscale is not supported")
        scaling = YarnScaling(float(src["factor"]), int(src["original_max_position_embeddings"]),
                              float(src.get("beta_fast") or 32.0), float(src.get("beta_slow") or 1.0),
                              bool(src.get("truncate", True)))
    elif kind not in ("default", None):
        raise UnsupportedArchitectureError(
            f"rope scaling type {kind!r} is not supported (supported: default, llama3, yarn)")
    return float(theta), scaling, None if local is None else float(local)


def _rotary_fraction(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _global_period(layer_types) -> int | None:
    """Gemma's layer_types list as a period (global every n-th layer)."""
    if not layer_types:
        return None
    globals_ = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    if not globals_:
        return len(layer_types) + 1
    period = globals_[0] + 1
    expected = [(i + 1) % period == 0 for i in range(len(layer_types))]
    if expected != [t == "full_attention" for t in layer_types]:
        raise UnsupportedArchitectureError(f"irregular layer_types pattern: {layer_types}")
    return period


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from a config.json dict."""
    arch = cfg.get("model_type")
    if arch == "gemma3" and "text_config" in cfg:
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        arch = "gemma3_text"
    if arch not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"Hugging Face model_type {arch!r} is not supported (supported: {', '.join(SUPPORTED)})")
    common = dict(bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos(cfg),
                  tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))
    if arch == "gpt2":
        D = cfg["n_embd"]
        return ModelConfig(
            vocab_size=cfg["vocab_size"], d_model=D, n_layers=cfg["n_layer"], n_heads=cfg["n_head"],
            n_kv_heads=cfg["n_head"], d_ff=cfg.get("n_inner") or 4 * D,
            max_seq_len=cfg.get("n_positions", 1024), norm="layer", norm_bias=True,
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5), mlp="gelu",
            gelu_approximate=cfg.get("activation_function", "gelu_new") != "gelu",
            position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, arch="gpt2", **common)
    theta, scaling, local_theta = _rope(cfg)
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    fields = dict(
        vocab_size=cfg["vocab_size"], d_model=D, n_layers=cfg["num_hidden_layers"], n_heads=H,
        n_kv_heads=cfg.get("num_key_value_heads") or H, d_ff=cfg["intermediate_size"],
        head_dim=cfg.get("head_dim") or D // H,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        out_bias=bool(cfg.get("attention_bias", False)) and arch != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)), arch=arch, **common)
    fields["rotary_fraction"] = _rotary_fraction(cfg)
    if arch in ("mistral", "phi3") or (arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window")):
        fields["sliding_window"] = cfg.get("sliding_window")
    if arch in ("qwen3", "qwen3_moe"):
        fields.update(qk_norm=True, qkv_bias=bool(cfg.get("attention_bias", False)),
                      out_bias=bool(cfg.get("attention_bias", False)))
    if arch in MOE_NAMES:
        if arch == "qwen3_moe" and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1):
            raise UnsupportedArchitectureError("Qwen3-MoE with dense layers among the sparse ones "
                                               "(mlp_only_layers, decoder_sparse_step) is not supported")
        fields.update(n_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                      n_active_experts=cfg["num_experts_per_tok"],
                      expert_d_ff=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                      router_norm_topk=bool(cfg.get("norm_topk_prob", True)))
        if arch == "mixtral":
            fields["sliding_window"] = cfg.get("sliding_window")
        if arch == "olmoe":
            if cfg.get("clip_qkv") is not None:
                raise UnsupportedArchitectureError("OLMoE with clip_qkv is not supported")
            fields.update(qk_norm=True, qk_norm_whole=True)
    if arch == "gpt_oss":
        fields.update(n_experts=cfg["num_local_experts"], n_active_experts=cfg["num_experts_per_tok"],
                      expert_d_ff=cfg["intermediate_size"], mlp="swiglu_oai", mlp_bias=True, router_bias=True,
                      swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                      swiglu_limit=float(cfg.get("swiglu_limit", 7.0)), attn_sinks=True,
                      sliding_window=cfg.get("sliding_window"),
                      global_layer_period=_global_period(cfg.get("layer_types")) or 2)
    if arch == "phi":
        if cfg.get("qk_layernorm"):
            raise UnsupportedArchitectureError("Phi with qk_layernorm is not supported")
        fields.update(norm="layer", norm_bias=True, norm_eps=cfg.get("layer_norm_eps", 1e-5),
                      mlp="gelu", gelu_approximate=cfg.get("hidden_act", "gelu_new") != "gelu",
                      qkv_bias=True, out_bias=True, mlp_bias=True, lm_head_bias=True,
                      parallel_block=True)
    if arch == "phi3" and (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}).get(
            "rope_type") not in (None, "default"):
        raise UnsupportedArchitectureError(
            "Phi-3 long-context rope scaling ('longrope'/'su') is not supported; the 4k-context "
            "Phi-3 checkpoints (default rope) are")
    if arch.startswith("gemma"):
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        fields.update(
            mlp="geglu", gelu_approximate=act != "gelu", sandwich_norm=True,
            norm_weight_offset=1.0, embed_scale=float(D) ** 0.5,
            query_scale=float(cfg.get("query_pre_attn_scalar") or fields["head_dim"]) ** -0.5,
            attn_softcap=cfg.get("attn_logit_softcapping"),
            final_softcap=cfg.get("final_logit_softcapping"),
            sliding_window=cfg.get("sliding_window"),
            global_layer_period=_global_period(cfg.get("layer_types"))
            or cfg.get("sliding_window_pattern") or (6 if arch == "gemma3_text" else 2),
            rope_local_theta=local_theta if arch == "gemma3_text" else None,
            qk_norm=arch == "gemma3_text", qkv_bias=bool(cfg.get("attention_bias", False)))
    return ModelConfig(**fields)


def params_from_hf(config: ModelConfig, lookup: Callable[[str], np.ndarray | None], dtype) -> Params:
    """Build Params from `lookup(name)`, which returns an HF tensor or None if absent."""

    def get(name):
        t = lookup(name)
        if t is None:
            raise ModelFileError(f"checkpoint tensor {name} is missing")
        return np.asarray(t)

    cast = lambda a: jnp.asarray(np.asarray(a, np.float32), dtype)
    vec = lambda name: cast(get(name))
    # Fused [in, out] matrix (and bias) from HF's [out, in] pieces, concatenated along out.
    fused = lambda *names: cast(np.concatenate([get(n).T for n in names], axis=1))
    fused_bias = lambda present, *names: cast(np.concatenate([get(n) for n in names])) if present else None

    if config.arch == "gpt2":
        prefix = "transformer." if lookup("transformer.wte.weight") is not None else ""

        def gpt2_layer(i):
            p = f"{prefix}h.{i}."
            return Layer(  # Conv1D weights are [in, out], q/k/v already fused in that order
                attn_norm=Norm(vec(p + "ln_1.weight"), vec(p + "ln_1.bias")),
                wqkv=vec(p + "attn.c_attn.weight"), bqkv=vec(p + "attn.c_attn.bias"),
                wo=vec(p + "attn.c_proj.weight"), bo=vec(p + "attn.c_proj.bias"),
                mlp_norm=Norm(vec(p + "ln_2.weight"), vec(p + "ln_2.bias")),
                w_in=vec(p + "mlp.c_fc.weight"), b_in=vec(p + "mlp.c_fc.bias"),
                w_out=vec(p + "mlp.c_proj.weight"), b_out=vec(p + "mlp.c_proj.bias"))

        return Params(
            embed=vec(prefix + "wte.weight"), pos_embed=vec(prefix + "wpe.weight"),
            layers=tuple(gpt2_layer(i) for i in range(config.n_layers)),
            final_norm=Norm(vec(prefix + "ln_f.weight"), vec(prefix + "ln_f.bias")))

    gemma = config.sandwich_norm
    attn_in, attn_out, mlp_in, mlp_out = LAYER_NAMES.get(config.arch, LLAMA_NAMES)
    norm_bias = lambda name: vec(name) if config.norm_bias else None

    def gpt_oss_experts(p: str) -> dict:
        """gpt-oss: router with a bias; experts.gate_up_proj [E, D, 2F] with gate and up
        interleaved (columns 0::2 and 1::2), down_proj [E, F, D], each with biases, or
        the checkpoint's MXFP4 blocks and scales instead of the weights."""
        m = p + "mlp."
        halves = lambda a: np.concatenate([a[..., 0::2], a[..., 1::2]], axis=-1)
        w_in, w_out = (get_experts(m + "experts." + n) for n in ("gate_up_proj", "down_proj"))
        return dict(router=fused(m + "router.weight"), router_bias=vec(m + "router.bias"),
                    w_in=Experts(cast(halves(w_in))), w_out=Experts(cast(w_out)),
                    b_in=cast(halves(get(m + "experts.gate_up_proj_bias"))), b_out=vec(m + "experts.down_proj_bias"))

    def get_experts(name: str) -> np.ndarray:
        """[E, in, out] from a dense tensor, or from MXFP4 `_blocks` / `_scales` [E, out, ...]."""
        if lookup(name) is not None:
            return get(name)
        return mxfp4_openai(get(name + "_blocks"), get(name + "_scales")).transpose(0, 2, 1)

    def experts(p: str) -> dict:
        """A mixture-of-experts layer's router and stacked experts."""
        if config.arch == "gpt_oss":
            return gpt_oss_experts(p)
        block, ins, out = MOE_NAMES[config.arch]
        m = f"{p}mlp." if lookup(f"{p}mlp.gate.weight") is not None else f"{p}{block}."
        if lookup(m + "experts.gate_up_proj") is not None:
            w_in = get(m + "experts.gate_up_proj").transpose(0, 2, 1)
            w_out = get(m + "experts.down_proj").transpose(0, 2, 1)
        else:
            E = range(config.n_experts)
            w_in = np.stack([np.concatenate([get(f"{m}experts.{e}.{n}.weight").T for n in ins], axis=1)
                             for e in E])
            w_out = np.stack([get(f"{m}experts.{e}.{out}.weight").T for e in E])
        return dict(router=fused(m + "gate.weight"), w_in=Experts(cast(w_in)), w_out=Experts(cast(w_out)))

    def layer(i):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        if config.parallel_block:
            mlp_norm = None
        else:
            mlp_norm = Norm(vec(p + ("pre_feedforward_layernorm.weight" if gemma
                                     else "post_attention_layernorm.weight")))
        return Layer(
            attn_norm=Norm(vec(p + "input_layernorm.weight"), norm_bias(p + "input_layernorm.bias")),
            wqkv=fused(*(a + n + ".weight" for n in attn_in)),
            bqkv=fused_bias(config.qkv_bias, *(a + n + ".bias" for n in attn_in)),
            wo=fused(a + attn_out + ".weight"),
            bo=fused_bias(config.out_bias, a + attn_out + ".bias"),
            sinks=vec(a + "sinks") if config.attn_sinks else None,
            q_norm=Norm(vec(a + "q_norm.weight")) if config.qk_norm else None,
            k_norm=Norm(vec(a + "k_norm.weight")) if config.qk_norm else None,
            post_attn_norm=Norm(vec(p + "post_attention_layernorm.weight")) if gemma else None,
            mlp_norm=mlp_norm,
            post_mlp_norm=Norm(vec(p + "post_feedforward_layernorm.weight")) if gemma else None,
            **(experts(p) if config.n_experts else dict(
                w_in=fused(*(m + n + ".weight" for n in mlp_in)),
                w_out=fused(m + mlp_out + ".weight"),
                b_in=fused_bias(config.mlp_bias, *(m + n + ".bias" for n in mlp_in)),
                b_out=fused_bias(config.mlp_bias, m + mlp_out + ".bias"))))

    final = "model.final_layernorm." if config.arch == "phi" else "model.norm."
    return Params(
        embed=vec("model.embed_tokens.weight"),
        layers=tuple(layer(i) for i in range(config.n_layers)),
        final_norm=Norm(vec(final + "weight"), norm_bias(final + "bias")),
        lm_head=None if config.tie_embeddings else fused("lm_head.weight"),
        lm_head_bias=fused_bias(config.lm_head_bias, "lm_head.bias"))


def load_hf_folder(path: str, dtype=jnp.bfloat16):
    """(config, params) from a folder with config.json and *.safetensors
    (a single file or shards listed in model.safetensors.index.json)."""
    from safetensors import safe_open  # noqa: PLC0415

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelFileError(f"{path}: no config.json (expected a Hugging Face model folder)")
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f))
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        single = os.path.join(path, "model.safetensors")
        if not os.path.isfile(single):
            raise ModelFileError(f"{path}: no model.safetensors or model.safetensors.index.json")
        weight_map = None
    handles = {}

    def lookup(name):
        file = weight_map.get(name) if weight_map is not None else "model.safetensors"
        if file is None:
            return None
        if file not in handles:
            try:
                # "flax" rather than "numpy": numpy has no bfloat16 of its own.
                handles[file] = safe_open(os.path.join(path, file), framework="flax")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise ModelFileError(f"{os.path.join(path, file)}: cannot read safetensors: {e}") from e
        h = handles[file]
        return h.get_tensor(name) if name in h.keys() else None

    return config, params_from_hf(config, lookup, dtype)
