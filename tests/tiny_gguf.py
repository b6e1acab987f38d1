"""Write GGUF files with the `gguf` package's writer from jaxllm Params, laid out
the way llama.cpp's converter writes each architecture (llama's Q/K rows permuted,
Phi-3's q/k/v and gate/up fused, Phi-2's biases and parallel block, gpt-oss's
sinks, expert biases and YaRN metadata)."""

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType, quants
from tokenizer_bytes import BYTE_TOKENS

from jaxllm.config import YarnScaling


def _permute(w, n_heads):
    """HF row order -> llama.cpp's (the converter's permute), rows [out, in]."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, config, params, arch="llama", extra=None, raw_tensor=None, f16=False, expert_type=None,
               control=()):
    """raw_tensor: (name, uint8 bytes [rows, row_bytes], GGML type) replacing a tensor;
    expert_type: a GGML block type the experts are quantized to (gguf's quantizer);
    control: names of control tokens, the vocabulary's last ids."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(config.d_ff)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_rope_freq_base(config.rope_theta)
    if config.norm == "layer":
        w.add_layer_norm_eps(config.norm_eps)
    else:
        w.add_layer_norm_rms_eps(config.norm_eps)
    if config.sliding_window:
        w.add_sliding_window(config.sliding_window)
    if config.n_experts:
        w.add_expert_count(config.n_experts)
        w.add_expert_used_count(config.n_active_experts)
        w.add_expert_feed_forward_length(config.expert_d_ff)
        if not config.router_norm_topk:
            w.add_expert_weights_norm(False)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    tokens = BYTE_TOKENS + [f"<extra_{i}>" for i in range(max(0, config.vocab_size - len(BYTE_TOKENS)))]
    tokens = tokens[:config.vocab_size - len(control)] + list(control)
    w.add_token_list(tokens)
    w.add_token_types([1] * (config.vocab_size - len(control)) + [3] * len(control))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    for k, v in (extra or {}).items():
        w.add_string(k, v)

    def put(name, array, matrix=False):
        if raw_tensor is not None and raw_tensor[0] == name:
            return
        a = np.ascontiguousarray(np.asarray(array, np.float32))
        w.add_tensor(name, a.astype(np.float16) if f16 and matrix else a)

    def put_norm(name, norm):
        put(name + ".weight", norm.scale)
        if norm.bias is not None:
            put(name + ".bias", norm.bias)

    put("token_embd.weight", params.embed, matrix=True)
    if isinstance(config.rope_scaling, YarnScaling):  # gpt-oss's converter: metadata
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(config.rope_scaling.factor)
        w.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_position)
    elif config.rope_scaling is not None:  # llama.cpp's converter: scaling as rope_freqs factors
        from jaxllm.ops import rope_inv_freq  # noqa: PLC0415
        plain = rope_inv_freq(config.replace(rope_scaling=None), config.rope_theta)
        put("rope_freqs.weight", plain / rope_inv_freq(config, config.rope_theta))
    split_qkv = [config.q_size, config.q_size + config.kv_size]
    for i, L in enumerate(params.layers):
        p = f"blk.{i}."
        put_norm(p + "attn_norm", L.attn_norm)
        qkv = np.asarray(L.wqkv).T
        if arch == "phi3":
            put(p + "attn_qkv.weight", qkv, True)
        else:
            q, k, v = np.split(qkv, split_qkv)
            if arch == "llama":
                q, k = _permute(q, config.n_heads), _permute(k, config.n_kv_heads)
            for name, m in zip("qkv", (q, k, v)):
                put(p + f"attn_{name}.weight", m, True)
            if L.bqkv is not None:
                for name, b in zip("qkv", np.split(np.asarray(L.bqkv), split_qkv)):
                    put(p + f"attn_{name}.bias", b)
        if L.q_norm is not None:
            put(p + "attn_q_norm.weight", L.q_norm.scale)
            put(p + "attn_k_norm.weight", L.k_norm.scale)
        put(p + "attn_output.weight", np.asarray(L.wo).T, True)
        if L.bo is not None:
            put(p + "attn_output.bias", L.bo)
        if L.sinks is not None:
            put(p + "attn_sinks.weight", L.sinks)
        if L.mlp_norm is not None:  # gpt-oss's converter names it as Gemma's norm after attention
            put_norm(p + ("post_attention_norm" if arch == "gpt-oss" else "ffn_norm"), L.mlp_norm)
        if config.n_experts:  # llama.cpp's merged expert tensors, [E, out, in] rows
            put(p + "ffn_gate_inp.weight", np.asarray(L.router).T)  # float32, as llama.cpp's converter
            if L.router_bias is not None:
                put(p + "ffn_gate_inp.bias", L.router_bias)
            if L.b_in is not None:
                for name, b in zip(("gate", "up"), np.split(np.asarray(L.b_in), 2, axis=-1)):
                    put(p + f"ffn_{name}_exps.bias", b)
                put(p + "ffn_down_exps.bias", L.b_out)
            gate, up = np.split(np.asarray(L.w_in.w, np.float32).transpose(0, 2, 1), 2, axis=1)
            down = np.asarray(L.w_out.w, np.float32).transpose(0, 2, 1)
            for name, m in (("gate", gate), ("up", up), ("down", down)):
                if expert_type is None:
                    put(p + f"ffn_{name}_exps.weight", m, True)
                else:
                    w.add_tensor(p + f"ffn_{name}_exps.weight", quants.quantize(np.ascontiguousarray(m), expert_type),
                                 raw_dtype=expert_type)
            continue
        w_in = np.asarray(L.w_in).T
        if config.mlp == "gelu" or arch == "phi3":  # phi3: gate and up fused in ffn_up
            put(p + "ffn_up.weight", w_in, True)
        else:
            gate, up = np.split(w_in, 2)
            put(p + "ffn_gate.weight", gate, True)
            put(p + "ffn_up.weight", up, True)
        if L.b_in is not None:
            put(p + "ffn_up.bias", L.b_in)
        put(p + "ffn_down.weight", np.asarray(L.w_out).T, True)
        if L.b_out is not None:
            put(p + "ffn_down.bias", L.b_out)
    put_norm("output_norm", params.final_norm)
    if params.lm_head is not None:
        put("output.weight", np.asarray(params.lm_head).T, True)
    if params.lm_head_bias is not None:
        put("output.bias", params.lm_head_bias)
    if raw_tensor is not None:
        name, data, qtype = raw_tensor
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


__all__ = ["write_gguf", "GGMLQuantizationType"]
