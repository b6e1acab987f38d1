"""Random-weight GGUF files of a model shape, laid out as llama.cpp's converter writes
each architecture (llama, qwen3moe, gpt-oss), so that llama.cpp (benchmarks/
llamacpp_peer.py) and jaxllm can read files of the benchmark shapes (speed does not
depend on the values).

Large matrices are F16, or written quantized directly (Q8_0, MXFP4): one block of
random numbers is quantized once and its bytes tiled through every tensor, since
drawing (and quantizing) 20e9 numbers would take many minutes. Norms, biases, sinks
and routers are float32, as the converter writes them. The vocabulary is placeholder
SentencePiece pieces (llama-bench draws random token ids and never reads them).

    python benchmarks/random_gguf.py gptoss20b out.gguf --experts MXFP4
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxllm.config import PRESETS, ModelConfig, YarnScaling  # noqa: E402

ARCHS = ("llama", "qwen3moe", "gpt-oss")


class Filler:
    """Tensors of random-looking values of any shape and GGML type, from one block."""

    def __init__(self, seed: int = 0):
        import gguf  # noqa: PLC0415
        self.gguf = gguf
        self.block = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32) * 0.02
        self._raw: dict[str, np.ndarray] = {}

    def matrix(self, shape: tuple[int, ...], kind: str):
        """(array, raw GGML type or None) for a tensor of logical `shape` stored as `kind`."""
        if kind == "F16":
            return np.resize(self.block.astype(np.float16), shape), None
        qtype = self.gguf.GGMLQuantizationType[kind]
        if kind not in self._raw:  # the block's quantized bytes, made once
            self._raw[kind] = self.gguf.quants.quantize(self.block.reshape(-1, 256), qtype).reshape(-1)
        size, nbytes = self.gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % size:
            raise ValueError(f"{kind} needs rows of a multiple of {size} values, got {shape}")
        row_bytes = shape[-1] // size * nbytes
        return np.resize(self._raw[kind], (*shape[:-1], row_bytes)), qtype

    @staticmethod
    def vector(*shape: int, value=None) -> np.ndarray:
        return np.full(shape, 1.0 if value is None else value, np.float32)


def write_random_gguf(path: str, c: ModelConfig, matrices: str = "F16", experts: str | None = None,
                      seed: int = 0) -> None:
    """A GGUF of config c's shape: matrices of type `matrices`, experts of type
    `experts` (default: `matrices`)."""
    import gguf  # noqa: PLC0415
    if c.arch not in ARCHS:
        raise ValueError(f"architecture {c.arch!r}: this writer knows {', '.join(ARCHS)}")
    experts = experts or matrices
    fill = Filler(seed)
    w = gguf.GGUFWriter(path, c.arch)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if matrices == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if c.n_experts:
        w.add_expert_count(c.n_experts)
        w.add_expert_used_count(c.n_active_experts)
        w.add_expert_feed_forward_length(c.expert_d_ff)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    if isinstance(c.rope_scaling, YarnScaling):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope_scaling.factor)
        w.add_rope_scaling_orig_ctx_len(c.rope_scaling.original_max_position)
    _placeholder_vocabulary(w, c.vocab_size)

    def put(name, shape, kind=matrices):
        data, raw = fill.matrix(shape, kind)
        w.add_tensor(name, data, raw_dtype=raw)

    D, V, q, kv = c.d_model, c.vocab_size, c.q_size, c.kv_size
    put("token_embd.weight", (V, D))
    for i in range(c.n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", fill.vector(D))
        for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            put(p + name + ".weight", (rows, D))
            if c.qkv_bias:
                w.add_tensor(p + name + ".bias", fill.vector(rows, value=0.0))
        put(p + "attn_output.weight", (D, q))
        if c.out_bias:
            w.add_tensor(p + "attn_output.bias", fill.vector(D, value=0.0))
        if c.qk_norm:
            w.add_tensor(p + "attn_q_norm.weight", fill.vector(c.head_dim))
            w.add_tensor(p + "attn_k_norm.weight", fill.vector(c.head_dim))
        if c.attn_sinks:
            w.add_tensor(p + "attn_sinks.weight", fill.vector(c.n_heads, value=0.0))
        w.add_tensor(p + ("post_attention_norm" if c.arch == "gpt-oss" else "ffn_norm") + ".weight", fill.vector(D))
        if c.n_experts:
            E, F = c.n_experts, c.expert_d_ff
            w.add_tensor(p + "ffn_gate_inp.weight", np.resize(fill.block, (E, D)))
            if c.router_bias:
                w.add_tensor(p + "ffn_gate_inp.bias", fill.vector(E, value=0.0))
            for name, shape in (("gate", (E, F, D)), ("up", (E, F, D)), ("down", (E, D, F))):
                put(p + f"ffn_{name}_exps.weight", shape, experts)
                if c.mlp_bias:
                    w.add_tensor(p + f"ffn_{name}_exps.bias", fill.vector(E, shape[1], value=0.0))
        else:
            for name, shape in (("gate", (c.d_ff, D)), ("up", (c.d_ff, D)), ("down", (D, c.d_ff))):
                put(p + f"ffn_{name}.weight", shape)
    w.add_tensor("output_norm.weight", fill.vector(D))
    if not c.tie_embeddings:
        put("output.weight", (V, D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _placeholder_vocabulary(w, V: int) -> None:
    import gguf  # noqa: PLC0415
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(V - len(specials) - 256)]
    T = gguf.TokenType
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * V)
    w.add_token_types([T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * (V - 259))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(PRESETS))
    p.add_argument("out")
    p.add_argument("--matrices", default="F16", choices=["F16", "Q8_0"])
    p.add_argument("--experts", choices=["F16", "Q8_0", "MXFP4"], help="default: as --matrices")
    args = p.parse_args(argv)
    write_random_gguf(args.out, PRESETS[args.shape], args.matrices, args.experts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
