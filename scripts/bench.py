#!/usr/bin/env python
"""jaxllm's milestone benchmark suite.

    python scripts/bench.py [--suite cpu|gpu|all] [--shapes smol135m,llama1b,llama8b]
                            [--weights bf16] [--only M1,...] [--quick] [--out FILE.json]

Measures compiled throughput on whatever backend JAX has (random non-zero weights
of the named shapes; the real SmolLM2 GGUF for M1), prints a table last, writes
JSON. tg128: 128 tokens decoded one by one from an empty context; pp512: one
prefill of 512 tokens (llama-bench's definitions). Compilation and warm-up are
excluded (compile time has its own row); each figure is the median of >= 5 runs
after block_until_ready.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxllm  # noqa: E402
from jaxllm import PRESETS, ModelConfig, SamplerSettings, ops  # noqa: E402
from jaxllm.cache import init_cache  # noqa: E402
from jaxllm.generate import start  # noqa: E402
from jaxllm.layout import TransposedWeight, for_policy  # noqa: E402
from jaxllm.model import decode_step, extend  # noqa: E402
from jaxllm.quant import weight_bytes  # noqa: E402
from jaxllm.sharding import layer_shardings, make_mesh, place_cache, shard  # noqa: E402
from jaxllm.weights import Experts  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ANCHORS = os.path.join(ROOT, "..", "shared", "anchors", "h100-2026-11-23.json")
# Peer figures per GPU, by a part of its name: the shared H100 file, and llama.cpp measured
# on an H200 by benchmarks/llamacpp_peer.py. Anything else (the CPU too) uses ANCHORS.
PEER_FILES = {"H200": os.path.join(ROOT, "benchmarks", "results", "NVIDIA-H200-2026-11-29-llamacpp.json")}
# Datasheet memory bandwidth, TB/s, where the peer-figures file does not give one.
DATASHEET_TBPS = {"H100": 3.35, "H200": 4.8}
GREEDY = SamplerSettings.greedy()
TINY = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                   max_seq_len=1024)
LLAMA_CPP_FORMAT = {"bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, reps: int) -> tuple[float, list[float]]:
    """Median seconds of fn() over reps runs (fn blocks until its result is ready)."""
    times = []
    for _ in range(reps):
        times.append(fn())
    return statistics.median(times), times


def block(tree):
    jax.block_until_ready(tree)
    return tree


def spread_ms(times):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times)}


def weight_bytes_per_token(params, config: ModelConfig) -> int:
    """Bytes of weights one decode step of one token reads: every layer (of a
    mixture-of-experts layer, the experts one token is routed to), the final norm and
    the output projection (the tied embedding is read whole for the logits; an untied
    embedding only one row)."""
    share = lambda x: config.n_active_experts / config.n_experts if isinstance(x, Experts) else 1
    layers = int(sum(leaf.nbytes * share(node) for node in jax.tree_util.tree_leaves(
        params.layers, is_leaf=lambda x: isinstance(x, Experts)) for leaf in jax.tree_util.tree_leaves(node)))
    head = params.embed if params.lm_head is None else params.lm_head
    return layers + params.final_norm.scale.nbytes + sum(x.nbytes for x in jax.tree_util.tree_leaves(head))


# --- measurements ---------------------------------------------------------------------

def measure_copy_bandwidth(reps: int) -> float:
    """Bytes read + written per second by an elementwise pass over a large array."""
    n = (256 << 20) if jax.default_backend() == "gpu" else (32 << 20)
    passes = 10  # dispatched back to back, so host overhead hides behind device work
    x = block(jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16))
    f = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    block(f(x))

    def once():
        t = time.perf_counter()
        ys = [f(x) for _ in range(passes)]
        block(ys)
        return time.perf_counter() - t
    sec, _ = timed(once, max(reps, 10))
    return passes * 2 * x.nbytes / sec


def time_chain(project, m: int, k: int, n: int, chain: int, reps: int, lay=lambda w: w):
    """Seconds per call (and the calls' times) of [project(x, w) for w in ws]: x [m, k]
    and `chain` distinct weights [k, n] in bf16 (laid out by `lay`), so that caches do
    not serve them; plus the first weight as laid out."""
    keys = jax.random.split(jax.random.PRNGKey(1), chain + 1)
    x = block(jax.random.normal(keys[0], (m, k), jnp.bfloat16))
    ws = block([lay(jax.random.normal(kk, (k, n), jnp.bfloat16)) for kk in keys[1:]])
    f = jax.jit(lambda x, ws: [project(x, w) for w in ws])
    block(f(x, ws))

    def once():
        t = time.perf_counter()
        block(f(x, ws))
        return time.perf_counter() - t
    return (*timed(once, max(reps, 10)), ws[0])


def measure_matmul(m: int, k: int, n: int, reps: int, chain: int = 4) -> dict:
    """x [m, k] @ W [k, n] in bf16 on XLA's dot, `chain` distinct weights per call."""
    sec, times, _ = time_chain(lambda x, w: x @ w, m, k, n, chain, reps)
    bytes_moved = chain * (k * n + m * k + m * n) * 2
    return {"tflops": chain * 2 * m * k * n / sec / 1e12, "gbps": bytes_moved / sec / 1e9,
            **spread_ms(times)}


# Every projection one decode step reads, (K, N) as `x @ w`, and whether it is a tied head
# (the embedding table, stored by output row).
DECODE_PROJECTIONS = {
    "llama1b": {"qkv": (2048, 3072, False), "o": (2048, 2048, False), "gate_up": (2048, 16384, False),
                "down": (8192, 2048, False), "head": (2048, 128256, True)},
    "llama8b": {"qkv": (4096, 6144, False), "o": (4096, 4096, False), "gate_up": (4096, 28672, False),
                "down": (14336, 4096, False), "head": (4096, 128256, False)},
}


def measure_projection(k: int, n: int, batch: int, tied: bool, policy, reps: int) -> dict:
    """x [batch, k] @ W [k, n] in bf16 through ops.linear: the kernel the policy picks for
    a weight laid out as the loader lays it out. Each call reads 4-64 distinct weights,
    >= ~512 MB where that takes <= 64, so that the call's launch costs and L2 do not
    decide the figure for small weights."""
    chain = max(4, min(64, (512 << 20) // (2 * k * n)))
    lay = lambda w: TransposedWeight(w.T) if tied or policy.stores_by_row(w.shape) else w
    sec, times, w = time_chain(lambda x, w: ops.linear(x, w, policy), batch, k, n, chain, reps, lay)
    return {"kernel": ops.plan_for(policy, w, batch).kernel,
            "gbps": chain * (k * n + batch * k + batch * n) * 2 / sec / 1e9, **spread_ms(times)}


def measure_decode(params, config, batch: int, n_tokens: int, reps: int, steps_per_sync: int = 16,
                   context: int = 0) -> dict:
    """The library's own generation loop: prefill one token per row, then n_tokens
    decode steps in one compiled while_loop (greedy, no stop tokens). context: the
    rows start that many positions in (their caches' first slots counted as filled,
    with whatever they hold: speed does not depend on the values), so that each step
    reads a long cache without a long prefill per repetition."""
    prompts = [[1]] * batch

    def once():
        run = start(params, config, prompts, max_new_tokens=context + n_tokens + 1, settings=GREEDY,
                    stop_tokens=[], max_context=context + n_tokens + 2 if context else None)
        if context:
            cache = run.state.cache
            run.state = run.state.replace(cache=cache.replace(lengths=cache.lengths + context))
        block(run.state)
        t = time.perf_counter()
        block(run.run(params, config, n_tokens + 1, steps_per_sync=steps_per_sync).tokens)
        elapsed = time.perf_counter() - t
        assert int(run.column) == n_tokens + 1
        return elapsed

    t0 = time.perf_counter()
    first = once()
    sec, times = timed(once, reps)
    return {"tok_s": batch * n_tokens / sec, "compile_s": max(first - sec, 0.0),
            "first_call_s": first, "warm_s": time.perf_counter() - t0, **spread_ms(times)}


def measure_prefill(params, config, batch: int, length: int, reps: int) -> dict:
    tokens = jax.random.randint(jax.random.PRNGKey(2), (batch, length), 0, config.vocab_size)
    lengths = jnp.full((batch,), length, jnp.int32)
    dtype = params.embed.dtype

    def once():
        cache = block(place_cache(init_cache(config, batch, length, dtype), params))
        t = time.perf_counter()
        block(extend(params, config, tokens, lengths, cache))
        return time.perf_counter() - t

    first = once()
    sec, times = timed(once, reps)
    return {"tok_s": batch * length / sec, "compile_s": max(first - sec, 0.0), **spread_ms(times)}


def measure_ttft(params, config, prompt_len: int, reps: int) -> dict:
    """Time from token ids to the first sampled token (prefill + sampling)."""
    prompt = [[1 + (i % (config.vocab_size - 1)) for i in range(prompt_len)]]

    def once():
        t = time.perf_counter()
        run = start(params, config, prompt, max_new_tokens=2, settings=GREEDY, stop_tokens=[])
        int(run.tokens[0, 0])
        return time.perf_counter() - t

    once()
    sec, times = timed(once, reps)
    return {"ttft_ms": sec * 1e3, **spread_ms(times)}


def measure_host_loop(params, config, n_tokens: int, reps: int, donate: bool) -> float:
    """Seconds per token of a Python loop around one compiled step, reading each
    token back to the host (what a naive engine does). donate=False gives XLA a
    fresh output cache every step instead of updating the donated one in place."""
    step = decode_step if donate else jax.jit(decode_step.__wrapped__, static_argnames=("config",))
    dtype = params.embed.dtype

    def once():
        cache = block(init_cache(config, 1, n_tokens + 1, dtype))
        token = jnp.ones((1,), jnp.int32)
        t = time.perf_counter()
        for _ in range(n_tokens):
            logits, cache = step(params, config, token, cache)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            int(token[0])  # the host round trip
        return (time.perf_counter() - t) / n_tokens

    once()
    sec, _ = timed(once, reps)
    return sec


def fast_path_error(params, config) -> float:
    """Relative error of one decode step's logits, fast kernels vs the XLA path."""
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 8), 0, config.vocab_size)
    outs = []
    for c in (config, config.replace(kernels="xla")):
        cache = init_cache(c, 1, 16, params.embed.dtype)
        _, cache = extend(params, c, tokens, jnp.array([8]), cache)
        logits, _ = decode_step(params, c, tokens[:, 0], cache)
        outs.append(np.asarray(logits, np.float64))
    return float(np.linalg.norm(outs[0] - outs[1]) / np.linalg.norm(outs[1]))


def measure_hf_peer(shape: str, config: ModelConfig, reps: int) -> dict | None:
    """Hugging Face transformers generate with a static, compiled cache (torch)."""
    try:
        import torch  # noqa: PLC0415
        import transformers as tf  # noqa: PLC0415
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    hf = tf.LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.d_model,
                        intermediate_size=config.d_ff, num_hidden_layers=config.n_layers,
                        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                        tie_word_embeddings=config.tie_embeddings, rope_theta=config.rope_theta,
                        max_position_embeddings=4096)
    model = tf.AutoModelForCausalLM.from_config(hf, torch_dtype=torch.bfloat16).cuda().eval()
    ids = torch.ones((1, 1), dtype=torch.long, device="cuda")
    kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False,
              cache_implementation="static", pad_token_id=0)

    def once():
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    once()
    once()
    sec, times = timed(once, reps)
    return {"tok_s": 128 / sec, "version": f"transformers {tf.__version__}, torch {torch.__version__}",
            **spread_ms(times)}


# --- suites ---------------------------------------------------------------------------

def smollm_cpu_decode(reps: int, n_tokens: int, weights: str = "file") -> dict:
    """M1: the real SmolLM2-135M Q4_1 GGUF, greedy decode on this machine, with
    the file's quantized weights on the device ("file") or dequantized ("dense")."""
    model = jaxllm.load("smollm2-135m-instruct", dtype=jnp.float32, verbose=True, weights=weights)
    ids = model.tokenizer.encode("The capital of France is")
    params, config = model.params, model.config

    def once():
        run = start(params, config, [ids], max_new_tokens=n_tokens + 1, settings=GREEDY, stop_tokens=[])
        block(run.state)
        t = time.perf_counter()
        block(run.run(params, config, n_tokens + 1).tokens)
        return time.perf_counter() - t

    first = once()
    sec, times = timed(once, reps)
    return {"bench": "decode", "shape": "smollm2-135m", "weights": "Q4_1", "batch": 1,
            "tok_s": n_tokens / sec, "tokens": n_tokens, "compile_s": max(first - sec, 0.0),
            "on_device": "Q4_1 (quantized, float32 activations)" if weights == "file"
            else "float32 (dequantized)", "weight_bytes": weight_bytes(params), **spread_ms(times)}


def run(args) -> dict:
    backend = jax.default_backend()
    suite = args.suite or ("gpu" if backend == "gpu" else "cpu")
    device_kind = jax.devices()[0].device_kind
    if args.anchors is None:
        args.anchors = next((f for k, f in PEER_FILES.items() if k in device_kind), ANCHORS)
    anchors = json.load(open(args.anchors)) if os.path.exists(args.anchors) else {}
    if not anchors:
        log(f"warning: no peer figures at {args.anchors}; milestones M1, M3-M5 are not judged")
    elif backend == "gpu" and device_kind not in anchors.get("device", ""):
        log(f"warning: the peer figures in {args.anchors} were measured on {anchors.get('device')}, "
            f"not on this {device_kind}: the ratios compare two devices")
    llama_cpp = anchors.get("llama_cpp", {})
    anchors_name = os.path.basename(args.anchors)
    datasheet_tbps = anchors.get("ceilings_measured", {}).get("datasheet_hbm_TBps") or next(
        (v for k, v in DATASHEET_TBPS.items() if k in device_kind), None)
    only = set(args.only.split(",")) if args.only else None
    want = lambda m: only is None or m in only
    reps = 5
    results, milestones = [], []
    dtype = jnp.bfloat16 if backend == "gpu" else jnp.float32
    dense_name = "bf16" if dtype == jnp.bfloat16 else "f32"
    weight_modes = args.weights.split(",")
    for w in weight_modes:
        if w not in ("bf16", "int8", "int4", "fp8"):
            raise SystemExit(f"bench: error: --weights takes bf16, int8, int4 and fp8, not {w!r}")

    def milestone(name, description, measured, target, peer, peer_source, ratio, passed):
        milestones.append({"name": name, "description": description, "measured": measured,
                           "target": target, "peer": {"value": peer, "source": peer_source},
                           "ratio": ratio, "passed": bool(passed)})

    log(f"device: {device_kind} ({backend}), jax {jax.__version__}, suite {suite}")
    copy_bw = None
    if suite in ("gpu", "all") or args.quick:
        log("measuring copy bandwidth ...")
        copy_bw = measure_copy_bandwidth(reps)
        results.append({"bench": "copy_bandwidth", "shape": "-", "weights": "bf16", "batch": 1,
                        "tok_s": None, "gbps": copy_bw / 1e9})

    # M1: real GGUF on the CPU
    if (suite in ("cpu", "all")) and want("M1") and not args.quick:
        log("M1: SmolLM2-135M Q4_1 decode on the CPU ...")
        row = smollm_cpu_decode(reps, 64)
        results.append(row)
        results.append(smollm_cpu_decode(reps, 64, weights="dense"))
        cpu_ref = anchors.get("cpu_reference", {}).get("tg_tok_s", {}).get(
            "SmolLM2-135M-Instruct.Q4_1", [78.4])[0]
        ratio = row["tok_s"] / cpu_ref
        milestone("M1", "CPU parity: SmolLM2-135M Q4_1 decode tok/s vs llama.cpp on the 2-core CPU",
                  row["tok_s"], 0.5 * cpu_ref, cpu_ref,
                  "../shared/anchors cpu_reference (llama.cpp 2 threads)", ratio, ratio >= 0.5)

    # M2: kernel ceilings (GPU)
    if (suite in ("gpu", "all")) and want("M2") and backend == "gpu" and not args.only_decode:
        log("M2: matmul and matrix-vector ceilings ...")
        big = measure_matmul(8192, 8192, 8192, reps, chain=2)
        results.append({"bench": "matmul_8192", "shape": "-", "weights": "bf16", "batch": 8192,
                        "tok_s": None, **big})
        policy = jaxllm.KernelPolicy.for_backend(args.kernels)
        for shape, projections in DECODE_PROJECTIONS.items():
            for name, (k, n, tied) in projections.items():
                for b in (1, 8):
                    r = measure_projection(k, n, b, tied, policy, reps)
                    results.append({"bench": f"gemv_{name}_K{k}_N{n}", "shape": shape, "weights": "bf16",
                                    "batch": b, "tok_s": None, **r, "fraction_of_copy": r["gbps"] * 1e9 / copy_bw})
                    log(f"M2: {shape} {name} batch {b}: {r['kernel']}, {r['gbps']:.0f} GB/s")
        gemv = [r for r in results if r["bench"].startswith("gemv") and r["batch"] == 1]
        worst = min(r["fraction_of_copy"] for r in gemv)
        pp = measure_matmul(512, 4096, 14336, reps)
        milestone("M2", "GPU kernels: batch-1 GB/s of the projection kernels the policy picks on the "
                  "llama1b and llama8b decode shapes (worst) as a fraction of the copy bandwidth measured "
                  "in this run; target 0.8", worst, 0.8, copy_bw / 1e9,
                  "copy bandwidth, this run (GB/s)", worst, worst >= 0.8)
        results.append({"bench": "matmul_512x4096x14336", "shape": "-", "weights": "bf16",
                        "batch": 512, "tok_s": None, **pp, "fraction_of_8192": pp["tflops"] / big["tflops"]})

    shapes = ["tiny"] if args.quick else args.shapes.split(",")
    if suite == "cpu" and not args.quick and args.shapes_given is False:
        shapes = ["smol135m"]
    tg_ratios, quant_ratios, peers = {}, {}, []
    for shape, mode in [(s, m) for s in shapes for m in weight_modes]:
        config = (TINY if shape == "tiny" else PRESETS[shape]).replace(kernels=args.kernels, kv_cache=args.kv_cache)
        log(f"{shape}: initialising random {dense_name} weights" + (
            f", quantizing to {mode} ..." if mode != "bf16" else " ..."))
        # Each layer is quantized, and spread over the devices, as it is made: the dense
        # model never has to fit one device (llama70b's 141 GB).
        mesh = make_mesh(args.tensor_parallel) if args.tensor_parallel > 1 else None

        def each(layer, mode=mode, mesh=mesh, config=config):
            layer = layer if mode == "bf16" else jaxllm.quantize_layer(layer, mode)
            return layer if mesh is None else jax.device_put(layer, layer_shardings(layer, config, mesh))
        t0 = time.perf_counter()
        params = block(jaxllm.init_params(config, jax.random.PRNGKey(0), dtype, each_layer=each))
        weights_name = dense_name
        if mode != "bf16":
            params = block(jaxllm.quantize(params, mode, group_size=32))  # the embedding and head
            weights_name = mode
        if mesh is not None:  # split over devices (jaxllm/sharding.py): layers per shard
            params, config = shard(params, config, mesh)
        else:
            params = block(for_policy(params, config.kernels))  # on the GPU, projections stored by output row
        log(f"{shape}: {mode} weights made in {time.perf_counter() - t0:.1f} s")
        wbytes = weight_bytes_per_token(params, config)
        by_row = sum(isinstance(w, TransposedWeight) for w in jax.tree_util.tree_leaves(
            params, is_leaf=lambda w: isinstance(w, TransposedWeight)))
        # llama.cpp has no FP8 file type; --peer-format names other pairings (gpt-oss's MXFP4)
        peer_format = args.peer_format.get((shape, mode), LLAMA_CPP_FORMAT.get(mode))
        peer_tg = llama_cpp.get("tg128", {}).get(shape, {}).get(peer_format)
        peer_pp = llama_cpp.get("pp512", {}).get(shape, {}).get(peer_format)
        if args.kernels != "xla" and args.tensor_parallel == 1:
            err = fast_path_error(params, config)
            results.append({"bench": "fast_path_check", "shape": shape, "weights": weights_name,
                            "batch": 1, "tok_s": None, "rel_err_vs_xla": err, "kernels": args.kernels})
            log(f"{shape}: fast path vs XLA path, relative error of decode logits {err:.2e}")
        batches = [1] if args.quick else [int(x) for x in args.batches.split(",")]
        for b in batches:
            log(f"{shape}: tg128 batch {b} ...")
            r = measure_decode(params, config, b, 32 if args.quick else 128, 3 if args.quick else reps,
                               args.steps_per_sync, args.context)
            row = {"bench": "tg128" if b == 1 else "decode", "shape": shape, "weights": weights_name,
                   "batch": b, **r, "weight_bytes_per_step": wbytes, "row_major_weights": by_row,
                   "steps_per_sync": args.steps_per_sync, "kernels": args.kernels,
                   "devices": args.tensor_parallel, "context": args.context, "kv_cache": args.kv_cache}
            if copy_bw:
                row["mbu_vs_copy"] = wbytes * r["tok_s"] / b / copy_bw
            if backend == "gpu" and datasheet_tbps:
                row["mbu_vs_datasheet"] = wbytes * r["tok_s"] / b / (datasheet_tbps * 1e12)
                row["datasheet_TBps"] = datasheet_tbps
            if b == 1 and peer_tg:
                row[f"llama_cpp_{peer_format}_tok_s"] = peer_tg
                row["ratio_vs_llama_cpp"] = r["tok_s"] / peer_tg
                if mode == "bf16":
                    tg_ratios[shape] = (r["tok_s"], peer_tg, row.get("mbu_vs_datasheet"))
                else:
                    quant_ratios[f"{shape} {mode}"] = (r["tok_s"], peer_tg)
            results.append(row)
            log(f"{shape}: {weights_name} batch {b}" + (f", context {args.context}, {args.kv_cache} cache"
                                                         if args.context else "") + f": {r['tok_s']:,.1f} tok/s")
        if backend == "gpu" and shape in ("smol135m", "llama1b") and mode == "bf16" and not args.no_peers:
            peers.append((shape, config))
        if args.only_decode:
            del params  # before the next shape's weights are made (two 61 GB models do not fit)
            continue
        log(f"{shape}: pp512 ...")
        length = 64 if args.quick else 512
        r = measure_prefill(params, config, 1, length, 3 if args.quick else reps)
        row = {"bench": "pp512" if length == 512 else f"pp{length}", "shape": shape,
               "weights": weights_name, "batch": 1, **r}
        if peer_pp and length == 512:
            row[f"llama_cpp_{peer_format}_tok_s"] = peer_pp
            row["ratio_vs_llama_cpp"] = r["tok_s"] / peer_pp
        results.append(row)
        if backend == "gpu":
            stats = jax.devices()[0].memory_stats() or {}
            results[-1]["peak_device_bytes"] = stats.get("peak_bytes_in_use")
        log(f"{shape}: time to first token, host loop, buffer reuse ...")
        ttft = measure_ttft(params, config, 16 if args.quick else 128, 3 if args.quick else reps)
        results.append({"bench": "ttft_prompt128", "shape": shape, "weights": weights_name, "batch": 1,
                        "tok_s": None, **ttft})
        n = 16 if args.quick else 64
        donated = measure_host_loop(params, config, n, 3, donate=True)
        fresh = measure_host_loop(params, config, n, 3, donate=False)
        compiled = [x for x in results if x["shape"] == shape and x["bench"] == "tg128"][0]
        results.append({"bench": "async_overhead", "shape": shape, "weights": weights_name, "batch": 1,
                        "tok_s": 1 / donated, "ratio": donated * compiled["tok_s"],
                        "note": "host-driven per-token loop s/token over the compiled loop's"})
        results.append({"bench": "buffer_reuse", "shape": shape, "weights": weights_name, "batch": 1,
                        "tok_s": 1 / fresh, "ratio": fresh / donated,
                        "note": "fresh cache per step over donated cache, s/token (host loop both)"})
        del params

    # The torch peer runs last: run before them, it slowed the JAX measurements that
    # followed it in the same process (llama1b 666 vs 718-722 tok/s, benchmarks/NOTES.md).
    for shape, config in peers:
        log(f"{shape}: Hugging Face transformers static-cache peer ...")
        try:
            hf = measure_hf_peer(shape, config, 3)
        except Exception as e:  # noqa: BLE001 - a peer failing must not end the run
            hf = {"error": f"{type(e).__name__}: {e}"[:300]}
        if hf:
            results.append({"bench": "tg128_hf_transformers", "shape": shape, "weights": "bf16",
                            "batch": 1, "tok_s": hf.get("tok_s"), **hf})

    if backend == "gpu" and tg_ratios:
        for name, factor, desc in (("M3", 0.5, ">= 50%"), ("M4", 0.9, ">= 90%"), ("M5", 1.0, ">= 100%")):
            if not want(name):
                continue
            worst = min(v[0] / v[1] for v in tg_ratios.values())
            passed = worst >= factor
            if name == "M5" and "llama8b" in tg_ratios:
                passed = passed and (tg_ratios["llama8b"][2] or 0) >= 0.8
            milestone(name, f"tg128 batch 1 {desc} of llama.cpp F16 at every shape run "
                      f"({', '.join(tg_ratios)})" + ("; and >= 80% MBU at llama8b" if name == "M5" else ""),
                      worst, factor, {k: v[1] for k, v in tg_ratios.items()},
                      f"{anchors_name} llama_cpp.tg128 F16", worst, passed)

    if backend == "gpu" and quant_ratios and want("Q"):
        worst = min(v[0] / v[1] for v in quant_ratios.values())
        milestone("Q", "quantized tg128 batch 1 (int8 vs llama.cpp Q8_0, int4 vs Q4_0) >= 100% at every "
                  f"shape run ({', '.join(quant_ratios)})", worst, 1.0,
                  {k: v[1] for k, v in quant_ratios.items()},
                  f"{anchors_name} llama_cpp.tg128 Q8_0 / Q4_0", worst, worst >= 1.0)

    return {"device": device_kind, "backend": backend, "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
            "anchors": os.path.relpath(args.anchors, ROOT), "anchors_device": anchors.get("device"),
            "suite": suite, "results": results, "milestones": milestones}


def table(report: dict) -> str:
    lines = [f"{report['device']} | jax {report['jax_version']} | {report['date']}",
             f"{'bench':24s} {'shape':10s} {'weights':8s} {'batch':>5s} {'tok/s':>10s} {'median ms':>10s}  extra"]
    for r in report["results"]:
        extra = []
        for k in ("ratio_vs_llama_cpp", "mbu_vs_datasheet", "mbu_vs_copy", "gbps", "tflops", "ratio", "rel_err_vs_xla",
                  "ttft_ms", "compile_s"):
            if r.get(k) is not None:
                extra.append(f"{k}={r[k]:.3g}")
        tok = f"{r['tok_s']:.1f}" if r.get("tok_s") else "-"
        med = f"{r['median_ms']:.2f}" if r.get("median_ms") is not None else "-"
        lines.append(f"{r['bench']:24s} {r['shape']:10s} {r['weights']:8s} {r['batch']:>5} {tok:>10s} "
                     f"{med:>10s}  {' '.join(extra)}")
    for m in report["milestones"]:
        lines.append(f"{m['name']}: {'PASS' if m['passed'] else 'FAIL'} measured {m['measured']:.4g} "
                     f"target {m['target']} ratio {m['ratio']:.3f} -- {m['description']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["cpu", "gpu", "all"])
    p.add_argument("--shapes", default=None)
    p.add_argument("--weights", default="bf16",
                   help="comma-separated: bf16 (f32 on the CPU), int8, int4 (random weights "
                        "quantized with jaxllm.quantize, groups of 32), fp8 (e4m3, a scale per output)")
    p.add_argument("--only", help="comma-separated milestones, e.g. M1,M3")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (CI)")
    p.add_argument("--no-peers", action="store_true", help="skip the transformers peer")
    p.add_argument("--anchors", default=None,
                   help="peer figures (JSON); default: the file for this GPU in PEER_FILES, else "
                        "../shared/anchors/h100-2026-11-23.json")
    p.add_argument("--kernels", default="auto", choices=["auto", "xla", "pallas"], help="fast-path switch")
    p.add_argument("--peer-format", action="append", default=[], metavar="SHAPE:WEIGHTS=TYPE",
                   help="the llama.cpp file type to compare SHAPE's WEIGHTS with, e.g. gptoss20b:int8=MXFP4 "
                        f"(default {LLAMA_CPP_FORMAT})")
    p.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    p.add_argument("--context", type=int, default=0, metavar="N",
                   help="decode with every row N positions in (a cache of N slots read each step)")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "fp8"],
                   help="what the KV cache stores: the compute dtype, or float8 e4m3")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split each model over N devices (rows say so in 'devices')")
    p.add_argument("--steps-per-sync", type=int, default=16,
                   help="decode steps between host checks of the stop condition")
    p.add_argument("--only-decode", action="store_true", help="skip M2, pp512, TTFT, host loops")
    p.add_argument("--out", help="JSON file (default benchmarks/results/<device>-<date>.json on GPU)")
    args = p.parse_args(argv)
    try:
        args.peer_format = {(shape, mode): kind for (shape, mode), kind in (
            (pair.split(":"), kind) for pair, kind in (x.split("=") for x in args.peer_format))}
    except ValueError:
        p.error("--peer-format takes SHAPE:WEIGHTS=TYPE, e.g. gptoss20b:int8=MXFP4")
    args.shapes_given = args.shapes is not None
    args.shapes = args.shapes or "smol135m,llama1b,llama8b"
    for s in args.shapes.split(","):
        if s not in PRESETS and s != "tiny":
            p.error(f"unknown shape {s!r} (known: {', '.join(PRESETS)})")
    report = run(args)
    out = args.out
    if out is None and report["backend"] == "gpu":
        name = report["device"].replace(" ", "-")
        out = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                           f"{name}-{report['date'][:10]}.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {out}")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
