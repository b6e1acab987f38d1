"""GGUF files (llama.cpp, ollama): metadata to ModelConfig, tensors to Params.

Read with gguf_reader.py, memory-mapped. GGUF stores a matrix as
[out, in] rows of blocks; we dequantize to float32 and transpose to [in, out].
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig, YarnScaling
from ..errors import ModelFileError, UnsupportedArchitectureError, UnsupportedTensorTypeError
from ..params import Layer, Norm, Params
from ..quant import HostBlocks, concat_rows, pack, stack_experts
from ..weights import Experts
from .dequant import FORMATS, SUPPORTED_TYPES, blocks, dequantize
from .gguf_reader import GGUFFormatError, read_gguf

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "olmoe", "gpt-oss", "phi2", "phi3", "gpt2", "gemma2",
                   "gemma3")
# the tokenizer's vocabulary-sized arrays, kept out of `metadata` (which `jaxllm info` prints)
ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
              "tokenizer.ggml.token_type")


class GGUFFile:
    """An opened, validated GGUF file: `metadata` (dict) and tensors by name."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ModelFileError(f"{path}: no such file")
        try:
            self.version, fields, self.tensors = read_gguf(path)
        except GGUFFormatError as e:
            raise ModelFileError(f"{path}: {e}") from None
        self.path = path
        self._arrays = {key: fields.pop(key) for key in ARRAY_KEYS if key in fields}
        self.metadata = fields

    def array(self, key: str) -> list[Any] | None:
        """A metadata array (tokens, merges, scores, token types), or None."""
        return self._arrays.get(key, self.metadata.get(key))

    def tensor_type(self, name: str) -> str:
        return self.tensors[name].type_name

    def _checked(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name} is missing")
        if t.type_name not in SUPPORTED_TYPES:
            raise UnsupportedTensorTypeError(
                f"{self.path}: tensor {name} has type {t.type_name}, which jaxllm cannot "
                f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
        return t

    def load(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in GGUF's row order ([out, in] for matrices)."""
        t = self._checked(name)
        return dequantize(np.asarray(t.data), t.type_name).reshape(t.shape)

    def load_blocks(self, name: str) -> HostBlocks | None:
        """A block-quantized matrix kept quantized ([out, in] rows), or None for
        float tensors."""
        t = self._checked(name)
        if t.type_name not in FORMATS:
            return None
        return blocks(np.asarray(t.data), t.type_name)


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    md = g.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedArchitectureError(
            f"{g.path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    get = lambda key, default=None: md.get(f"{arch}.{key}", default)
    D, H = int(get("embedding_length")), int(get("attention.head_count"))
    kv = get("attention.head_count_kv", H)
    vocab = get("vocab_size") or len(g.array("tokenizer.ggml.tokens") or [])
    eos = md.get("tokenizer.ggml.eos_token_id")
    eot = md.get("tokenizer.ggml.eot_token_id")
    fields = dict(
        vocab_size=int(vocab), d_model=D, n_layers=int(get("block_count")), n_heads=H,
        n_kv_heads=int(kv), d_ff=int(get("feed_forward_length")),
        head_dim=int(get("attention.key_length", D // H)),
        max_seq_len=int(get("context_length", 2048)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", get("attention.layer_norm_epsilon", 1e-5))),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in g.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted({int(t) for t in (eos, eot) if t is not None})),
        arch=arch,
    )
    scaling = get("rope.scaling.type", "none")
    if scaling == "yarn":
        # gpt-oss was trained with the band's ends unrounded (its config.json's
        # "truncate": false, as OpenAI's reference); llama.cpp rounds them for every model.
        fields["rope_scaling"] = YarnScaling(
            float(get("rope.scaling.factor")), int(get("rope.scaling.original_context_length")),
            float(get("rope.scaling.yarn_beta_fast", 32.0)), float(get("rope.scaling.yarn_beta_slow", 1.0)),
            truncate=arch != "gpt-oss")
    elif scaling not in ("none", None):
        raise UnsupportedArchitectureError(f"{g.path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in g.tensors:  # Llama 3.1+: scaling stored as per-frequency factors
        fields["rope_freq_factors"] = tuple(float(f) for f in g.load("rope_freqs.weight").ravel())
    head_dim = fields["head_dim"]
    fields["rotary_fraction"] = int(get("rope.dimension_count", head_dim)) / head_dim
    if arch == "qwen2":
        fields["qkv_bias"] = True
    if arch in ("qwen3", "qwen3moe"):
        fields["qk_norm"] = True
    if arch == "olmoe":  # norms over the whole q and k projections
        fields.update(qk_norm=True, qk_norm_whole=True)
    if get("expert_count"):  # Qwen3-MoE; Mixtral is llama with experts
        fields.update(n_experts=int(get("expert_count")), n_active_experts=int(get("expert_used_count")),
                      expert_d_ff=int(get("expert_feed_forward_length", fields["d_ff"])),
                      router_norm_topk=bool(get("expert_weights_norm", True)))
    if arch == "gpt-oss":
        fields.update(mlp="swiglu_oai", mlp_bias=True, router_bias=True, attn_sinks=True, qkv_bias=True,
                      out_bias=True, sliding_window=get("attention.sliding_window"), global_layer_period=2)
    if arch == "phi2":
        fields.update(norm="layer", norm_bias=True, mlp="gelu", qkv_bias=True, out_bias=True,
                      mlp_bias=True, parallel_block=True, lm_head_bias="output.bias" in g.tensors)
    if arch == "phi3":
        if "rope_factors_long.weight" in g.tensors or any(".rope_factors" in n for n in g.tensors):
            raise UnsupportedArchitectureError(
                f"{g.path}: Phi-3 long-context rope scaling (rope_factors) is not supported; "
                "the 4k-context Phi-3 files are")
        fields["sliding_window"] = get("attention.sliding_window")
    if arch == "gpt2":
        fields.update(norm="layer", norm_bias=True, mlp="gelu", position="learned", qkv_bias=True,
                      out_bias=True, mlp_bias=True, n_kv_heads=H, rope_theta=10000.0)
    if arch in ("gemma2", "gemma3"):
        fields.update(
            mlp="geglu", sandwich_norm=True, embed_scale=float(D) ** 0.5,
            # llama.cpp's converter stores Gemma's norm weights with the +1 applied.
            norm_weight_offset=0.0,
            query_scale=head_dim ** -0.5, sliding_window=get("attention.sliding_window"),
            attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"),
            global_layer_period=6 if arch == "gemma3" else 2,
            rope_local_theta=10000.0 if arch == "gemma3" else None, qk_norm=arch == "gemma3")
    return ModelConfig(**fields)


def _unpermute_rope_rows(w, n_heads: int):
    """llama.cpp's converter reorders Q/K rows of Llama-family models so that rotary
    pairs are adjacent (x0, x1), (x2, x3), ...; our rotary embedding pairs each
    half of a head with the other (HF's layout). Undo: rows [out, in] of a float
    array or of HostBlocks (whose groups run along a row, so this is lossless)."""
    out = w.shape[0] if isinstance(w, np.ndarray) else w.q.shape[0]
    order = np.arange(out).reshape(n_heads, out // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)
    return w[order] if isinstance(w, np.ndarray) else w.rows(order)


def _progress(total: int, desc: str):
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty() and os.environ.get("JAXLLM_PROGRESS") != "1")


def params_from_gguf(g: GGUFFile, config: ModelConfig, dtype, quantized: bool = True) -> Params:
    """Params from the file's tensors. With `quantized`, block-quantized matrices
    stay quantized on the device (QuantizedWeight, lossless repacking); otherwise
    every tensor is dequantized to `dtype`."""
    bar = _progress(len(g.tensors), f"loading {os.path.basename(g.path)}")
    permute = config.arch == "llama"

    def load(name):
        bar.update(1)
        return g.load(name)

    def vec(name):
        return jnp.asarray(load(name), dtype)

    def optional(name, f):
        return f(name) if name in g.tensors else None

    def rows(name, heads=None, keep_quantized=False):
        """GGUF [out, in] rows: HostBlocks when kept quantized, else float32."""
        w = g.load_blocks(name) if keep_quantized else None
        if w is None:
            w = g.load(name)
        bar.update(1)
        return _unpermute_rope_rows(w, heads) if heads is not None and permute else w

    def fused(*parts):
        """The [in, sum(out)] weight from GGUF [out, in] pieces, or None if the
        first is absent; quantized when every piece is."""
        if parts[0][0] not in g.tensors:
            return None
        keep = quantized and all(g.tensor_type(p[0]) in FORMATS for p in parts)
        pieces = [rows(*part, keep_quantized=keep) for part in parts]
        if keep:
            return pack(concat_rows(pieces), dtype)
        return jnp.asarray(np.concatenate(pieces, axis=0).T, dtype)

    def mat(name):
        return fused((name,))

    def embedding(name):
        """[V, D] table, or a QuantizedWeight standing for its transpose [D, V]
        (the tied output head's orientation; rows are looked up by take_rows)."""
        if quantized and g.tensor_type(name) in FORMATS:
            return mat(name)
        return vec(name)

    def stacked(*names):
        """Experts from [E, out, in] tensors fused along out (gate and up): kept packed
        when every one is block-quantized, each expert repacked alone, else dense."""
        if quantized and all(g.tensor_type(n) in FORMATS for n in names):
            parts = [rows(n, keep_quantized=True) for n in names]  # HostBlocks [E * out, in]
            E = config.n_experts
            expert = lambda b, e: HostBlocks(*(None if a is None else a[e * len(b.q) // E:(e + 1) * len(b.q) // E]
                                               for a in (b.q, b.scales, b.mins)), b.bits)
            return stack_experts([pack(concat_rows([expert(b, e) for b in parts]), dtype) for e in range(E)])
        w = np.concatenate([rows(n).transpose(0, 2, 1) for n in names], axis=2)
        return Experts(jnp.asarray(w, dtype))

    def experts(p):
        """A mixture-of-experts layer: the router [D, E] and the stacked experts (gate
        and up fused in the file or not), with their biases where the model has them."""
        ins = ("gate_up",) if p + "ffn_gate_up_exps.weight" in g.tensors else ("gate", "up")
        b_in = None
        if config.mlp_bias:
            b_in = jnp.asarray(np.concatenate([load(f"{p}ffn_{n}_exps.bias") for n in ins], axis=-1), dtype)
        return dict(router=jnp.asarray(load(p + "ffn_gate_inp.weight").T, dtype),
                    router_bias=optional(p + "ffn_gate_inp.bias", vec),
                    w_in=stacked(*(f"{p}ffn_{n}_exps.weight" for n in ins)), b_in=b_in,
                    w_out=stacked(p + "ffn_down_exps.weight"), b_out=optional(p + "ffn_down_exps.bias", vec))

    def layer(i):
        p = f"blk.{i}."
        if "blk.0.attn_qkv.weight" in g.tensors:  # GPT-2 stores q, k, v fused already
            wqkv, bqkv = fused((p + "attn_qkv.weight",)), optional(p + "attn_qkv.bias", vec)
        else:
            wqkv = fused((p + "attn_q.weight", config.n_heads), (p + "attn_k.weight", config.n_kv_heads),
                         (p + "attn_v.weight",))
            bqkv = None
            if p + "attn_q.bias" in g.tensors:
                bqkv = jnp.asarray(np.concatenate([load(p + f"attn_{x}.bias") for x in "qkv"]), dtype)
        gemma = config.sandwich_norm
        # gpt-oss's converter names its MLP norm as Gemma's norm after attention
        mlp_norm = "post_attention_norm.weight" if config.arch == "gpt-oss" else "ffn_norm.weight"
        gated = p + "ffn_gate.weight" in g.tensors
        if config.n_experts:
            mlp = experts(p)
        else:
            mlp = dict(w_in=fused((p + "ffn_gate.weight",), (p + "ffn_up.weight",)) if gated
                       else mat(p + "ffn_up.weight"),
                       w_out=mat(p + "ffn_down.weight"),
                       b_in=optional(p + "ffn_up.bias", vec), b_out=optional(p + "ffn_down.bias", vec))
        return Layer(
            attn_norm=Norm(vec(p + "attn_norm.weight"), optional(p + "attn_norm.bias", vec)),
            wqkv=wqkv, bqkv=bqkv,
            wo=mat(p + "attn_output.weight"), bo=optional(p + "attn_output.bias", vec),
            q_norm=Norm(vec(p + "attn_q_norm.weight")) if config.qk_norm else None,
            k_norm=Norm(vec(p + "attn_k_norm.weight")) if config.qk_norm else None,
            post_attn_norm=Norm(vec(p + "post_attention_norm.weight")) if gemma else None,
            sinks=vec(p + "attn_sinks.weight") if config.attn_sinks else None,
            mlp_norm=None if config.parallel_block else Norm(vec(p + mlp_norm),
                                                             optional(p + "ffn_norm.bias", vec)),
            post_mlp_norm=Norm(vec(p + "post_ffw_norm.weight")) if gemma else None, **mlp)

    try:
        params = Params(
            embed=embedding("token_embd.weight"),
            layers=tuple(layer(i) for i in range(config.n_layers)),
            final_norm=Norm(vec("output_norm.weight"), optional("output_norm.bias", vec)),
            lm_head=None if config.tie_embeddings else mat("output.weight"),
            lm_head_bias=optional("output.bias", vec),
            pos_embed=optional("position_embd.weight", vec))
    finally:
        bar.close()
    return params
