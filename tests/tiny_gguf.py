"""Write tiny GGUF files with the `gguf` package's writer, from jaxllm Params,
the way llama.cpp's converter lays them out (Q/K rows permuted for llama)."""

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from tokenizer_bytes import BYTE_TOKENS


def _permute(w, n_heads):
    """HF row order -> llama.cpp's (the converter's permute), rows [out, in]."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, config, params, arch="llama", extra=None, raw_tensor=None):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(config.d_ff)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    tokens = BYTE_TOKENS + [f"<extra_{i}>" for i in range(config.vocab_size - len(BYTE_TOKENS))]
    w.add_token_list(tokens[:config.vocab_size])
    w.add_token_types([1] * config.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
    w.add_tensor("token_embd.weight", f32(params.embed))
    for i, L in enumerate(params.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", f32(L.attn_norm.scale))
        wq, wk, wv = np.split(np.asarray(L.wqkv).T, [config.q_size, config.q_size + config.kv_size])
        w.add_tensor(p + "attn_q.weight", f32(_permute(wq, config.n_heads)))
        w.add_tensor(p + "attn_k.weight", f32(_permute(wk, config.n_kv_heads)))
        if raw_tensor is None or raw_tensor[0] != p + "attn_v.weight":
            w.add_tensor(p + "attn_v.weight", f32(wv))
        w.add_tensor(p + "attn_output.weight", f32(np.asarray(L.wo).T))
        w.add_tensor(p + "ffn_norm.weight", f32(L.mlp_norm.scale))
        gate, up = np.split(np.asarray(L.w_in).T, 2)
        w.add_tensor(p + "ffn_gate.weight", f32(gate))
        w.add_tensor(p + "ffn_up.weight", f32(up))
        w.add_tensor(p + "ffn_down.weight", f32(np.asarray(L.w_out).T))
    w.add_tensor("output_norm.weight", f32(params.final_norm.scale))
    if params.lm_head is not None:
        w.add_tensor("output.weight", f32(np.asarray(params.lm_head).T))
    if raw_tensor is not None:  # (name, uint8 bytes [rows, row_bytes], GGML type) replaces a tensor
        name, data, qtype = raw_tensor
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


__all__ = ["write_llama_gguf", "GGMLQuantizationType"]
