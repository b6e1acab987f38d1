"""Mixture-of-experts layers (ops.moe_mlp): both ways of running the experts against a
float64 NumPy reference, routing edge cases, and a MoE decoder's incremental decode
against its own forward pass. Loading Qwen3-MoE and Mixtral checkpoints against
transformers is tests/test_hf.py's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

import jaxllm
from jaxllm.config import YarnScaling
from jaxllm.ops import moe_mlp
from jaxllm.weights import Experts

E, K, D, F = 5, 2, 16, 12


def numpy_moe(x, router, w_in, w_out, k, renormalise):
    """float64, one token and one expert at a time."""
    x, router, w_in, w_out = (np.asarray(a, np.float64) for a in (x, router, w_in, w_out))
    out = np.zeros_like(x)
    for n, row in enumerate(x):
        logits = row @ router
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = sorted(range(len(probs)), key=lambda e: (-probs[e], e))[:k]  # ties: the lower index
        weights = probs[chosen] / (probs[chosen].sum() if renormalise else 1.0)
        for e, weight in zip(chosen, weights):
            gate, up = np.split(row @ w_in[e], 2)
            out[n] += weight * ((gate / (1 + np.exp(-gate)) * up) @ w_out[e])
    return out


def layer(seed, router_scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(D, E)).astype(np.float32) * router_scale,
            rng.normal(size=(E, D, 2 * F)).astype(np.float32) / 4, rng.normal(size=(E, F, D)).astype(np.float32) / 4)


def routed(config, route: str):
    """config whose MoE layers run every batch on `route`: "gather", "grouped", or
    "kernel" (kernels/expert_matvec.py, interpreted: the other projections then take
    their kernels too; activations unrounded, so that quantized weights compare
    exactly: the int8 activations are tests/test_expert_matvec.py's)."""
    kernels = config.kernels.replace(moe_gather_max_pairs=10 ** 9 if route == "gather" else 0)
    if route in ("kernel", "grouped_kernel"):
        kernels = kernels.replace(mode="pallas", moe_kernel_max_pairs=10 ** 9 if route == "kernel" else 0,
                                  int8_activations=False)
    return config.replace(kernels=kernels)


ROUTES = ["gather", "grouped", "kernel"]
QUANTIZED_ROUTES = ROUTES + ["grouped_kernel"]  # the grouped kernel reads quantized experts only


def run(x, router, w_in, w_out, renormalise, route):
    config = routed(tiny(d_model=D, n_experts=E, n_active_experts=K, expert_d_ff=F, router_norm_topk=renormalise),
                    route)
    assert config.kernels.moe_route(x.shape[0] * K) == route
    return np.asarray(moe_mlp(jnp.asarray(x), jnp.asarray(router), Experts(jnp.asarray(w_in)),
                              Experts(jnp.asarray(w_out)), config))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("renormalise", [True, False])
def test_both_routes_match_numpy(route, renormalise):
    router, w_in, w_out = layer(0)
    x = np.random.default_rng(1).normal(size=(23, D)).astype(np.float32)
    ref = numpy_moe(x, router, w_in, w_out, K, renormalise)
    assert np.abs(run(x, router, w_in, w_out, renormalise, route) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("route", ROUTES)
def test_gpt_oss_experts_match_numpy(route):
    """gpt-oss's expert MLP in float64, written from its definition: router bias, a
    softmax over the chosen logits, expert biases, gate clamped above and up on both
    sides at the limit, gate * sigmoid(alpha * gate) * (up + 1)."""
    router, w_in, w_out = layer(4)
    rng = np.random.default_rng(5)
    r_bias, b_in, b_out = rng.normal(size=E), rng.normal(size=(E, 2 * F)), rng.normal(size=(E, D))
    x = rng.normal(size=(23, D))
    limit, alpha = 0.8, 1.702
    ref = np.zeros_like(x)
    for n, row in enumerate(x):
        logits = row @ router + r_bias
        chosen = sorted(range(E), key=lambda e: (-logits[e], e))[:K]
        weights = np.exp(logits[chosen] - logits[chosen].max())
        for e, weight in zip(chosen, weights / weights.sum()):
            gate, up = np.split(row @ w_in[e] + b_in[e], 2)
            gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
            ref[n] += weight * ((gate / (1 + np.exp(-alpha * gate)) * (up + 1)) @ w_out[e] + b_out[e])
    config = tiny(d_model=D, n_experts=E, n_active_experts=K, expert_d_ff=F, mlp="swiglu_oai", mlp_bias=True,
                  router_bias=True, swiglu_limit=limit)
    config = routed(config, route)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    ours = moe_mlp(f32(x), f32(router), Experts(f32(w_in)), Experts(f32(w_out)), config, router_bias=f32(r_bias),
                   b_in=f32(b_in), b_out=f32(b_out))
    assert np.abs(np.asarray(ours) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("route", ROUTES)
def test_routing_edge_cases(route):
    """Tied router scores (a zero router: every expert equally likely) go to the lowest
    indices; a router that sends every token to the same two experts leaves the
    others with empty groups; no token is dropped in either."""
    _, w_in, w_out = layer(2)
    x = np.random.default_rng(3).normal(size=(40, D)).astype(np.float32)
    tied = np.zeros((D, E), np.float32)
    assert np.abs(run(x, tied, w_in, w_out, True, route)
                  - numpy_moe(x, tied, w_in, w_out, K, True)).max() < 1e-4
    one_way = np.zeros((D, E), np.float32)
    one_way[:, 3], one_way[:, 1] = 50.0, 40.0  # experts 3 then 1 for every token with x summing > 0
    x = np.abs(x)
    ref = numpy_moe(x, one_way, w_in, w_out, K, True)
    assert np.abs(run(x, one_way, w_in, w_out, True, route) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("route", ROUTES)
def test_a_moe_decoder_matches_the_numpy_reference(route):
    """jaxllm.forward of OLMoE- and Qwen3-MoE-like decoders (norms over whole q/k
    projections or per head; top-k renormalised or not) against tests/reference_numpy.py."""
    from reference_numpy import forward_one, to64

    for c in (tiny(n_experts=5, n_active_experts=2, expert_d_ff=24, qk_norm=True, qk_norm_whole=True,
                   router_norm_topk=False),
              tiny(n_experts=4, n_active_experts=3, expert_d_ff=16, qk_norm=True, head_dim=16)):
        c = routed(c, route)
        params = jaxllm.init_params(c, jax.random.PRNGKey(11))
        tokens = np.random.default_rng(4).integers(0, c.vocab_size, (2, 13))
        ours = np.asarray(jaxllm.forward(params, c, jnp.asarray(tokens)))
        ref = np.stack([forward_one(to64(params), c, row) for row in tokens])
        assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()


def gpt_oss(**kw):
    """A tiny gpt-oss: sinks, biases, the clamped SwiGLU (a low clamp, so it acts),
    YaRN, a sliding window on alternate layers."""
    return tiny(**{**dict(d_model=64, n_experts=4, n_active_experts=2, expert_d_ff=32, mlp="swiglu_oai",
                          swiglu_limit=0.5, mlp_bias=True, router_bias=True, attn_sinks=True, qkv_bias=True,
                          out_bias=True, sliding_window=4, global_layer_period=2, n_layers=4,
                          rope_scaling=YarnScaling(4.0, 16, truncate=False), arch="gpt-oss"), **kw})


@pytest.mark.parametrize("family", ["qwen3moe", "gpt-oss"])
def test_a_moe_decoder_decodes_as_its_forward_pass(family):
    """Greedy generation (prefill on the grouped route, decode steps on the gathered
    one) equals the argmax chain of the full forward pass, for batched prompts."""
    if family == "gpt-oss":
        c = gpt_oss(n_experts=6, expert_d_ff=24, eos_token_ids=())
    else:
        c = tiny(n_experts=6, n_active_experts=2, expert_d_ff=24, qk_norm=True, eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(5))
    prompts = [[3, 9, 27, 81 % 97, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                26, 27, 28, 29, 30, 31, 32, 33], [4, 8, 15, 16, 23, 42]]
    assert c.kernels.moe_route(2 * c.n_active_experts) == "gather"
    assert c.kernels.moe_route(len(prompts[0]) * 2 * c.n_active_experts) == "grouped"
    out = jaxllm.generate(params, c, prompts, max_new_tokens=6, settings=jaxllm.SamplerSettings.greedy()).tokens
    for prompt, row in zip(prompts, out):
        # causal: the whole sequence's forward pass gives each prefix's next-token logits
        logits = jaxllm.forward(params, c, jnp.asarray([prompt + row]))[0]
        assert row == [int(jnp.argmax(logits[len(prompt) - 1 + t])) for t in range(6)]
    assert c.param_count() == sum(x.size for x in jax.tree.leaves(params))


def test_quantized_experts_match_their_dequantized_twin_and_lora_skips_them():
    """quantize() quantizes each expert (stacked QuantizedWeights, or Fp8Weights): logits
    equal those of the same weights dequantized, on both routes (fp8: near them, as its
    dense projections round their activations to e4m3 too), and int8's stay near the
    dense model's; dequantize_params undoes it; LoRA adapts the attention projections only."""
    c = tiny(d_model=64, n_experts=4, n_active_experts=2, expert_d_ff=32, eos_token_ids=())
    params = jaxllm.init_params(c, jax.random.PRNGKey(6))
    tokens = jnp.asarray([[1, 5, 9, 13, 2, 7, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
    dense = jaxllm.forward(params, c, tokens)
    for mode in ("int8", "int4", "fp8"):
        q = jaxllm.quantize(params, mode)
        layer = q.layers[0]
        kind = jaxllm.Fp8Weight if mode == "fp8" else jaxllm.QuantizedWeight
        assert isinstance(layer.wqkv, kind) and isinstance(layer.w_in.w, kind)
        assert layer.w_in.shape == params.layers[0].w_in.shape
        twin = jaxllm.dequantize_params(q)
        assert isinstance(twin.layers[0].w_in, Experts) and twin.layers[0].w_in.w.shape == (4, 64, 64)
        for route in QUANTIZED_ROUTES if mode != "fp8" else ROUTES:
            cr = routed(c, route)
            if mode != "fp8":  # (fp8 experts take XLA's routes, their attention the fp8 kernel)
                assert cr.kernels.moe_route(tokens.size * 2, layer.w_in.kind, layer.w_in.bits) == route
            ours, ref = jaxllm.forward(q, cr, tokens), jaxllm.forward(twin, cr, tokens)
            if mode == "fp8":
                assert float(jnp.linalg.norm(ours - ref)) < 0.15 * float(jnp.linalg.norm(ref))
            else:
                assert float(jnp.abs(ours - ref).max()) < 1e-4 * float(jnp.abs(ref).max())
        if mode == "int8":  # (int4's rounding moves routing decisions of a random model: no bound)
            assert float(jnp.abs(dense - ours).max()) < 0.05 * float(jnp.abs(dense).max())
    adapters = jaxllm.train.init_lora(params, 2, jax.random.PRNGKey(0))
    assert sorted(adapters[0]) == ["wo", "wqkv"]


def test_a_gguf_file_s_quantized_experts_stay_packed(tmp_path):
    """Q8_0, Q4_0 and MXFP4 experts (llama.cpp's merged tensors) load as stacked
    QuantizedWeights whose model gives the logits of the same file dequantized."""
    from tiny_gguf import GGMLQuantizationType, write_gguf

    c = tiny(vocab_size=300, d_model=64, n_experts=4, n_active_experts=2, expert_d_ff=64, qk_norm=True,
             arch="qwen3moe")
    params = jaxllm.init_params(c, jax.random.PRNGKey(12))
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8]])
    for kind in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.MXFP4):
        path = str(write_gguf(tmp_path / f"{kind.name}.gguf", c, params, arch="qwen3moe", expert_type=kind))
        packed, dense = jaxllm.load(path, dtype=jnp.float32), jaxllm.load(path, dtype=jnp.float32, weights="dense")
        assert isinstance(packed.params.layers[0].w_in.w, jaxllm.QuantizedWeight)
        assert isinstance(dense.params.layers[0].w_in.w, jax.Array)
        ref = np.asarray(jaxllm.forward(dense.params, dense.config, tokens))
        for route in QUANTIZED_ROUTES:
            ours = np.asarray(jaxllm.forward(packed.params, routed(packed.config, route), tokens))
            assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max(), route


@pytest.mark.parametrize("arch", ["qwen3moe", "llama", "gpt-oss"])
def test_jaxllm_generate_runs_a_moe_gguf(tmp_path, arch):
    """`jaxllm generate` on GGUF files of each family (Qwen3-MoE; Mixtral is llama with
    experts; gpt-oss, its experts in MXFP4 as its files hold them) written from a tiny
    model: the library's greedy tokens, exit 0."""
    import json
    import subprocess
    import sys

    from tiny_gguf import GGMLQuantizationType, write_gguf

    if arch == "gpt-oss":
        c = gpt_oss(vocab_size=300)
    else:
        c = tiny(vocab_size=300, n_experts=4, n_active_experts=2, expert_d_ff=32, qk_norm=arch == "qwen3moe",
                 arch=arch)
    params = jaxllm.init_params(c, jax.random.PRNGKey(9))
    path = str(write_gguf(tmp_path / f"{arch}.gguf", c, params, arch=arch,
                          expert_type=GGMLQuantizationType.MXFP4 if arch == "gpt-oss" else None))
    r = subprocess.run([sys.executable, "-m", "jaxllm", "generate", "--model", path, "--json", "--temperature", "0",
                        "--max-new-tokens", "6", "abc"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    model = jaxllm.load(path, dtype=jnp.float32)
    assert model.config.n_experts == 4 and model.config.arch == arch
    expected = jaxllm.generate(model.params, model.config, [row["prompt_ids"]], max_new_tokens=6,
                               settings=jaxllm.SamplerSettings.greedy()).tokens[0]
    assert row["ids"] == expected


@pytest.mark.parametrize("family", ["qwen3moe", "gpt-oss"])
def test_a_moe_decoder_on_the_kernels_matches_the_xla_path(family):
    """Prefill and decode steps with every kernel (interpreted): the routed experts read
    in place, and for gpt-oss the decode-attention kernel with its sinks and sliding
    window, against the XLA path's logits and cache."""
    from test_kernels import assert_same_run, prefill_and_steps

    c = gpt_oss() if family == "gpt-oss" else tiny(n_experts=6, n_active_experts=2, expert_d_ff=24, qk_norm=True)
    params = jaxllm.init_params(c, jax.random.PRNGKey(8))
    if family == "gpt-oss":  # sinks of the scores' size, so that they take a real share
        params = params.replace(layers=tuple(
            layer.replace(sinks=jax.random.normal(jax.random.PRNGKey(i), layer.sinks.shape) * 2)
            for i, layer in enumerate(params.layers)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, c.vocab_size, (2, 9)))
    pallas = c.replace(kernels=jaxllm.KernelPolicy.for_backend("pallas"))
    assert pallas.kernels.decode_attention(pallas) and pallas.kernels.moe_route(2 * c.n_active_experts) == "kernel"
    with jax.default_matmul_precision("highest"):
        assert_same_run(prefill_and_steps(params, pallas, tokens), prefill_and_steps(params, c.replace(kernels="xla"), tokens))
