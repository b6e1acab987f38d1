"""Tensor parallelism on two host devices, run by tests/test_sharding.py in processes
of their own (XLA's host device count is fixed before JAX starts), one per group of
checks named on the command line (every group without). Prints "ok NAME" per check;
any failure raises."""

import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import ARCH_CONFIGS, serve_all, tiny  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm import sharding  # noqa: E402
from jaxllm.batching import Engine  # noqa: E402
from jaxllm.cache import init_cache  # noqa: E402
from jaxllm.model import decode_step, forward  # noqa: E402

GREEDY = jaxllm.SamplerSettings.greedy()
mesh = sharding.make_mesh(2)
assert len(jax.devices()) == 2


def close(a, b, tol):
    err = float(jnp.max(jnp.abs(a - b)))
    assert err < tol, err



def archs():
    # Every architecture of the shared fixtures: the sharded model's logits and greedy
    # tokens are the single device's (float32).
    for name, config in sorted(ARCH_CONFIGS.items()):
        config = config.replace(kernels="xla")
        params = jaxllm.init_params(config, jax.random.PRNGKey(3))
        sharded, sharded_config = sharding.shard(params, config, mesh)
        assert sharded_config.tensor_parallel == 2 and sharded_config.shard_layers  # each layer per shard
        tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 13), 0, config.vocab_size)
        close(forward(sharded, sharded_config, tokens), forward(params, config, tokens), 1e-4)
        prompts = [[5, 6, 7], [9, 3, 2, 8, 1]]
        alone = jaxllm.generate(params, config, prompts, max_new_tokens=8, settings=GREEDY).tokens
        assert jaxllm.generate(sharded, sharded_config, prompts, max_new_tokens=8, settings=GREEDY).tokens == alone
        print("ok", name)


def kernels():
    # The other way to run the split: XLA's partitioner over the whole model.
    for name in ("llama3",):
        config = ARCH_CONFIGS[name].replace(kernels="xla")
        params = jaxllm.init_params(config, jax.random.PRNGKey(3))
        sharded, sharded_config = sharding.shard(params, config, mesh, layers="xla")
        assert not sharded_config.shard_layers
        tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 13), 0, config.vocab_size)
        close(forward(sharded, sharded_config, tokens), forward(params, config, tokens), 1e-4)
        print("ok", f"{name}-partitioned")

    # Per shard, the Pallas kernels (interpreted here) run on each device's share: logits
    # and greedy tokens as one device's on the same kernels, and the decode step holds
    # kernels inside the shard_map.
    for name in ("llama3", "gemma", "phi2"):
        config = ARCH_CONFIGS[name].replace(kernels="pallas")
        params = jaxllm.init_params(config, jax.random.PRNGKey(3))
        sharded, sharded_config = sharding.shard(params, config, mesh)
        assert sharded_config.shard_layers and sharded_config.kernels == config.kernels
        if name == "llama3":  # a whole-sequence pass (the others' are checked on the XLA paths above)
            tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 13), 0, config.vocab_size)
            close(forward(sharded, sharded_config, tokens), forward(params, config, tokens), 1e-4)
        prompts = [[5, 6, 7], [9, 3, 2, 8, 1]]
        alone = jaxllm.generate(params, config, prompts, max_new_tokens=6, settings=GREEDY).tokens
        assert jaxllm.generate(sharded, sharded_config, prompts, max_new_tokens=6, settings=GREEDY).tokens == alone
        cache = sharding.place_cache(init_cache(config, 2, 32, jnp.float32), sharded)
        step = str(jax.make_jaxpr(lambda p, t, c: decode_step(p, sharded_config, t, c))(sharded, jnp.array([1, 2]),
                                                                                         cache))
        assert step.count("shard_map") == config.n_layers and "pallas_call" in step
        print("ok", f"{name}-kernels-per-shard")


def quantized():
    # jaxllm.load(..., tensor_parallel=2) reads a GGUF file into host memory and places
    # each device's share: the same logits as the file loaded whole, dense and int8.
    from tiny_gguf import write_gguf

    config = tiny(vocab_size=128, d_model=64, d_ff=128, head_dim=16, n_heads=4, n_kv_heads=2)
    path = write_gguf(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tp-load-{os.getpid()}.gguf"), config,
                      jaxllm.init_params(config, jax.random.PRNGKey(8)))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 13), 0, config.vocab_size)
    for weights in ("dense", "int8"):
        whole = jaxllm.load(str(path), weights=weights, kernels="xla")
        split = jaxllm.load(str(path), weights=weights, kernels="xla", tensor_parallel=2)
        w = split.params.layers[0].w_out
        w = w.values if isinstance(w, jaxllm.QuantizedWeight) else w
        assert split.config.shard_layers and len(w.sharding.device_set) == 2
        assert all(s.data.size == w.size // 2 for s in w.addressable_shards)  # each device holds its half
        close(forward(split.params, split.config, tokens), forward(whole.params, whole.config, tokens), 1e-4)
        print("ok", f"load-{weights}")
    os.remove(path)

    # Quantized weights shard with their scales.
    config = tiny(vocab_size=128, d_model=64, d_ff=128, head_dim=16, n_heads=4, n_kv_heads=2, kernels="xla")
    params = jaxllm.init_params(config, jax.random.PRNGKey(5))
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 9), 0, config.vocab_size)
    for mode in ("int8", "int4", "fp8"):
        q = jaxllm.quantize(params, mode)
        sq, sc = sharding.shard(q, config, mesh)
        assert sc.shard_layers == (mode != "fp8")  # fp8's per-row activation scales: partitioned
        close(forward(sq, sc, tokens), forward(q, config, tokens), 1e-4)
        print("ok", mode)
    # int4 per shard on the kernels: each device's packed rows repacked to hold its outputs
    q = jaxllm.quantize(params, "int4")
    sq, sc = sharding.shard(q, config.replace(kernels="pallas"), mesh)
    close(forward(sq, sc, tokens), forward(q, config.replace(kernels="pallas"), tokens), 1e-4)
    print("ok int4-kernels-per-shard")


MOE = tiny(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, n_active_experts=2,
           expert_d_ff=64, qk_norm=True, kernels="xla")  # 64: each device's share holds whole groups of 32
OSS = MOE.replace(qk_norm=False, mlp="swiglu_oai", swiglu_limit=0.5, mlp_bias=True, router_bias=True,
                  attn_sinks=True, qkv_bias=True, out_bias=True, sliding_window=4, global_layer_period=2,
                  rope_scaling=jaxllm.config.YarnScaling(4.0, 16, truncate=False))


def moe():
    # Mixture-of-experts layers (Qwen3-MoE's, gpt-oss's with sinks, biases and YaRN):
    # every expert split as a dense MLP, dense or quantized; prefill on the grouped route,
    # decode steps on the gathered one.
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 9), 0, MOE.vocab_size)
    for name, config in (("qwen3moe", MOE), ("gpt-oss", OSS)):
        params = jaxllm.init_params(config, jax.random.PRNGKey(7))
        for mode in ("dense", "int8", "int4", "fp8") if name == "qwen3moe" else ("dense", "int8", "fp8"):
            p = params if mode == "dense" else jaxllm.quantize(params, mode)
            sp, sc = sharding.shard(p, config, mesh)
            close(forward(sp, sc, tokens), forward(p, config, tokens), 1e-4)
            prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [9, 3, 2]]
            alone = jaxllm.generate(p, config, prompts, max_new_tokens=6, settings=GREEDY).tokens
            assert jaxllm.generate(sp, sc, prompts, max_new_tokens=6, settings=GREEDY).tokens == alone
            print("ok", f"{name}-{mode}")


def serving():
    # The split is Megatron's: a dense decode step all-reduces twice per layer (after
    # attention, after the MLP) and once for the vocabulary-split embedding, nothing else.
    config = OSS
    params = jaxllm.init_params(config, jax.random.PRNGKey(7))
    sp, sc = sharding.shard(params, config, mesh)
    cache = sharding.place_cache(init_cache(config, 2, 32, jnp.float32), sp)
    assert cache.k[0].sharding.spec[2] == "model"
    hlo = decode_step.lower(sp, sc, jnp.array([1, 2]), cache).compile().as_text()
    count = lambda op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
    assert count("all-reduce") == 2 * config.n_layers + 1, count("all-reduce")
    assert count("all-gather") == count("all-to-all") == count("collective-permute") == 0
    print("ok collectives")

    # The serving engine over the mesh answers as one device does.
    class Letters:
        class tok:  # a vocabulary without harmony's markers (harmony.is_harmony)
            @staticmethod
            def token_to_id(token):
                return None

        def decode(self, ids, skip_special=True):
            return "".join(chr(97 + i % 26) for i in ids)

    prompts = [[5, 6, 7], [9, 3, 2, 8, 1], [4, 4], [5, 6, 7] * 7 + [1]]
    # rows; a paged pool, split by kv head
    for layout in (dict(n_slots=2), dict(n_slots=3, kv_pages=7, page_size=16)):
        engine = Engine(sp, sc, Letters(), max_context=64, steps_per_chunk=4, **layout).start()
        try:
            requests = serve_all(engine, prompts, 10)
        finally:
            engine.shutdown()
        for p, r in zip(prompts, requests):
            assert r.ids == jaxllm.generate(params, config, [p], max_new_tokens=10, settings=GREEDY).tokens[0], r.error
    print("ok engine")

    # What cannot split says so.
    for bad, words in ((config.replace(n_kv_heads=1, n_heads=4), "n_kv_heads"),
                       (tiny(n_experts=4, n_active_experts=2, expert_d_ff=5), "expert_d_ff")):
        try:
            sharding.check(bad, 2)
        except ValueError as e:
            assert words in str(e), e
        else:
            raise AssertionError(f"{words}: no error")
    print("ok errors")


GROUPS = {"archs": archs, "kernels": kernels, "quantized": quantized, "moe": moe, "serving": serving}
for group in sys.argv[1:] or GROUPS:
    GROUPS[group]()
