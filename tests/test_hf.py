"""jaxllm against Hugging Face transformers on tiny random models (CPU torch)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import jaxllm
from jaxllm.loading.hf import config_from_hf, load_hf_folder, params_from_hf

torch.manual_seed(0)

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

HF_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=500000.0),
    "llama_tied": lambda: tf.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=6),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "gpt2": lambda: tf.GPT2Config(vocab_size=101, n_embd=64, n_layer=3, n_head=4, n_positions=128),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=24),
    "phi2": lambda: tf.PhiConfig(**{**COMMON, "num_key_value_heads": 4}, partial_rotary_factor=0.5),
    "phi3": lambda: tf.Phi3Config(**COMMON, pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "gemma2": lambda: tf.Gemma2Config(**{**COMMON, "num_hidden_layers": 4}, head_dim=32, sliding_window=5,
                                      query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                      final_logit_softcapping=3.0),
    "gemma3": lambda: tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 6}, head_dim=32,
                                          sliding_window=5, query_pre_attn_scalar=32,
                                          rope_theta=1e6, rope_local_base_freq=10000.0),
    # Mixture of experts: 6 experts of width 40, 2 per token (renormalised or not)
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**COMMON, head_dim=24, num_experts=6, num_experts_per_tok=2,
                                           moe_intermediate_size=40, norm_topk_prob=False),
    "olmoe": lambda: tf.OlmoeConfig(**{**COMMON, "intermediate_size": 40}, num_experts=6, num_experts_per_tok=2,
                                    norm_topk_prob=False),
    "mixtral": lambda: tf.MixtralConfig(**{**COMMON, "intermediate_size": 40}, num_local_experts=6,
                                        num_experts_per_tok=2, sliding_window=None),
    # gpt-oss: sinks, sliding window on alternate layers, YaRN without rounding, biases
    # everywhere; a low clamp so the tiny model's activations meet it (GGUF files hold
    # no clamp: llama.cpp fixes gpt-oss's 7.0, which "gpt_oss_7" keeps)
    "gpt_oss": lambda: gpt_oss(swiglu_limit=0.2),
    "gpt_oss_7": lambda: gpt_oss(),
}


def gpt_oss(**kw):
    return tf.GptOssConfig(**{**COMMON, "intermediate_size": 32, "num_hidden_layers": 4}, head_dim=16,
                           num_local_experts=6, num_experts_per_tok=2, sliding_window=6, rope_parameters={
                               "rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0},
                           **kw)


def build(name):
    # Seeded by name, whatever ran before (xdist's order varies): a mixture-of-experts
    # model's routing must not meet a near tie by chance of the order
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    np.random.seed(seed)
    cfg = HF_CONFIGS[name]()
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # nudge norms away from 1 so the test sees their weights
        for name_, p in model.named_parameters():
            if p.dim() == 1 or name_.endswith("_bias"):  # (gpt-oss's expert biases are [E, N])
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_matches_transformers(name):
    cfg, model = build(name)
    config = config_from_hf(cfg.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(config, state.get, jnp.float32)
    tokens = np.random.randint(0, 101, size=(2, 20))
    ref = hf_logits(model, tokens)
    ours = np.asarray(jaxllm.forward(params, config, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_gpt_oss_checkpoint_s_mxfp4_experts():
    """gpt-oss checkpoints hold their experts as MXFP4 blocks and scales: random ones
    load and match transformers running the same bytes through its own dequantizer."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: PLC0415

    cfg, model = build("gpt_oss")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    for i, layer in enumerate(model.model.layers):
        for name, (rows, cols) in (("gate_up_proj", (2 * F, D)), ("down_proj", (D, F))):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(119, 124, (E, rows, cols // 32), dtype=np.uint8)  # 2^-8 .. 2^-4
            dense = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
            getattr(layer.mlp.experts, name).data.copy_(dense)
            del state[key]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
    config = config_from_hf(cfg.to_dict())
    params = params_from_hf(config, state.get, jnp.float32)
    tokens = np.random.randint(0, 101, size=(2, 20))
    ref = hf_logits(model, tokens)
    ours = np.asarray(jaxllm.forward(params, config, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("name, shard", [("qwen2", None), ("llama", "100KB"), ("qwen3", None),
                                         ("phi2", None), ("phi3", None), ("qwen3_moe", None), ("mixtral", None),
                                         ("olmoe", None), ("gpt_oss", None)])
def test_saved_folder_loads_and_matches(tmp_path, name, shard):
    """save_pretrained folders, one file or sharded with an index, load and match."""
    cfg, model = build(name)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    config, params = load_hf_folder(str(tmp_path), jnp.float32)
    tokens = np.random.randint(0, 101, size=(1, 17))
    ref = hf_logits(model, tokens)
    ours = np.asarray(jaxllm.forward(params, config, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("name, arch", [("qwen3", "qwen3"), ("phi2", "phi2"), ("phi3", "phi3"),
                                        ("llama", "llama"), ("qwen2", "qwen2"), ("qwen3_moe", "qwen3moe"),
                                        ("mixtral", "llama"), ("olmoe", "olmoe"), ("gpt_oss_7", "gpt-oss")])
def test_gguf_written_from_the_same_weights_matches(tmp_path, name, arch):
    """The HF weights written as GGUF (F16 matrices, as llama.cpp's converter lays
    them out) load through the GGUF path and still match transformers."""
    from tiny_gguf import write_gguf  # noqa: PLC0415

    cfg, model = build(name)
    config = config_from_hf(cfg.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(config, state.get, jnp.float32)
    # Mixture-of-experts files in float32: float16's rounding can move a near-tied
    # routing decision, and one token's other expert is no measure of the mapping
    f16 = not config.n_experts
    path = write_gguf(tmp_path / f"{name}.gguf", config, params, arch=arch, f16=f16)
    loaded = jaxllm.load(str(path), dtype=jnp.float32)
    assert loaded.config.arch == arch
    tokens = np.random.randint(0, 101, size=(2, 20))
    ref = hf_logits(model, tokens)
    ours = np.asarray(jaxllm.forward(loaded.params, loaded.config, jnp.asarray(tokens)))
    # float16 storage of the matrices: ~1e-3 relative
    assert np.abs(ours - ref).max() / np.abs(ref).max() < (5e-3 if f16 else 1e-4)
