import os

import pytest

# LLVM's optimisation of XLA:CPU programs is switched off for the tests: most tests
# compile many small programs and run each a few times (tests/test_model.py on 2 cores:
# 237 s -> 161 s; with two pytest processes the suite went from 18.0 to 12.9 min).
# Subprocesses (the CLI, notebooks) inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                                   "--xla_backend_optimization_level=0")

from jaxllm import ModelConfig, RopeScaling  # noqa: E402

MAPS_LOG = os.environ.get("JAXLLM_TEST_MAPS_LOG")  # a file: each module's memory-map count


@pytest.fixture(autouse=True, scope="module")
def compiled_programs_leave_with_their_module(request):
    """Every XLA:CPU executable keeps ~3 memory mappings (its JIT-compiled code) while
    a jit cache holds it, and module-level jitted functions hold every variant they
    compiled. One pytest worker of the whole suite reached Linux's default limit of
    65,530 mappings (a core dump held 65,413) and died in the next compile: the JIT's
    allocation failed, and unwinding the C++ exception that reported it segfaulted.
    Clearing jax's caches after each module keeps a worker near a few thousand."""
    yield
    import gc  # noqa: PLC0415

    import jax  # noqa: PLC0415
    jax.clear_caches()
    gc.collect()
    if MAPS_LOG:
        with open("/proc/self/maps") as maps, open(MAPS_LOG, "a") as log:
            log.write(f"{os.getpid()} {request.module.__name__} {sum(1 for _ in maps)}\n")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80,
                max_seq_len=128, eos_token_ids=(0,))
    base.update(kw)
    return ModelConfig(**base)


# One tiny config per architecture family, together covering every config field but
# the mixture-of-experts ones (n_experts, n_active_experts, expert_d_ff,
# router_norm_topk, qk_norm_whole), which tests/test_moe.py covers.
ARCH_CONFIGS = {
    "llama3": tiny(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32),
                   tie_embeddings=False),
    "smollm2": tiny(n_heads=6, n_kv_heads=2, rope_theta=100000.0),
    "mistral": tiny(sliding_window=5, n_layers=3),
    "qwen2": tiny(qkv_bias=True, rope_theta=1e6),
    "gpt2": tiny(norm="layer", norm_bias=True, mlp="gelu", position="learned", qkv_bias=True,
                 out_bias=True, mlp_bias=True, n_kv_heads=4, norm_eps=1e-5),
    "phi2": tiny(norm="layer", norm_bias=True, mlp="gelu", qkv_bias=True, out_bias=True,
                 mlp_bias=True, parallel_block=True, rotary_fraction=0.5, lm_head_bias=True,
                 tie_embeddings=False, n_kv_heads=4),
    "qwen3": tiny(qk_norm=True, head_dim=16, n_heads=4, n_kv_heads=2),
    "gemma": tiny(mlp="geglu", qk_norm=True, sandwich_norm=True, norm_weight_offset=1.0,
                  embed_scale=48 ** 0.5, query_scale=0.3, attn_softcap=20.0,
                  final_softcap=15.0, sliding_window=4, global_layer_period=2,
                  rope_local_theta=10000.0, rope_theta=1e6, head_dim=16, n_layers=4),
}


@pytest.fixture(params=sorted(ARCH_CONFIGS))
def arch_config(request):
    return ARCH_CONFIGS[request.param]


@pytest.fixture
def reference_texts():
    """Token ids of the llama.cpp reference's scored texts, by reference name."""
    import json  # noqa: PLC0415

    def texts(name):
        path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                            f"{name}.llamacpp.json")
        with open(path) as f:
            return [case["ids"] for case in json.load(f)["score"]]
    return texts


def served_model(tmp_path_factory, seed: int, max_seq_len: int):
    """A tiny random model loaded from its GGUF (with a tokenizer): the engine tests'."""
    import jax  # noqa: PLC0415

    import jaxllm  # noqa: PLC0415
    from tiny_gguf import write_gguf  # noqa: PLC0415
    c = tiny(vocab_size=300, max_seq_len=max_seq_len)
    params = jaxllm.init_params(c, jax.random.PRNGKey(seed))
    return jaxllm.load(str(write_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", c, params)))


def greedy_alone(model, prompt, max_tokens):
    """The tokens `generate` gives one prompt alone, greedily."""
    import jaxllm  # noqa: PLC0415
    return jaxllm.generate(model.params, model.config, [prompt], max_new_tokens=max_tokens,
                           settings=jaxllm.SamplerSettings.greedy()).tokens[0]


def serve_together(engine, prompts, max_tokens):
    """Submit one greedy request per prompt while holding the engine's lock, so that its
    next admission call plans them all, in this order; wait until each has ended; the
    requests."""
    import threading  # noqa: PLC0415

    from jaxllm.batching import Request  # noqa: PLC0415
    done = threading.Semaphore(0)
    requests = [Request(list(p), max_tokens, on_update=lambda r, t, reason: reason and done.release())
                for p in prompts]
    with engine._cond:
        for r in requests:
            engine.submit(r)
    for _ in requests:
        assert done.acquire(timeout=120)
    return requests


def serve_all(engine, prompts, max_tokens, start=False):
    """Submit one greedy request per prompt to an Engine (starting it after, with
    start) and wait until every one has ended; the requests."""
    import threading  # noqa: PLC0415

    from jaxllm.batching import Request  # noqa: PLC0415
    done = threading.Semaphore(0)
    requests = [Request(list(p), max_tokens, on_update=lambda r, t, reason: reason and done.release())
                for p in prompts]
    for r in requests:
        engine.submit(r)
    if start:
        engine.start()
    for _ in requests:
        assert done.acquire(timeout=120)
    return requests
