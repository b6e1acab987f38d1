"""tg128 decode of one compiled model under several settings of the library's tiling
switches, in one process, so that variants are compared on the same device.

    python benchmarks/decode_variants.py --runs llama8b:bf16:base,defer smol135m:int4:base \\
        llama1b:bf16+rows:default [--profile] [--out results.json]

A variant is a name from VARIANTS: changes to the kernel policy (jaxllm/policy.py)
of the run's config. The policy is part of the jit key, so each variant compiles its
own program. Weights "W" take the library's layout for the policy
(jaxllm.layout.for_policy), "W+rows" store every dense projection by output row,
"W+kn" none. Each run reports tok/s (median of --reps, as
scripts/bench.py's tg128), the fast path's relative error against the XLA path,
and with --profile the kernels per step from benchmarks/profile_decode.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import jaxllm  # noqa: E402
from jaxllm import PRESETS, KernelPolicy  # noqa: E402
from jaxllm.layout import for_policy, transpose_projections  # noqa: E402
from jaxllm.policy import QMATVEC_TILINGS, MatvecTiling, QMatvecTiling, RowTiling  # noqa: E402
from bench import fast_path_error, measure_decode, measure_prefill  # noqa: E402
from profile_decode import profile  # noqa: E402

# Policy fields per variant (KernelPolicy.replace). Variants 14 and 16 (capped gate-up
# splits so that every down projection takes the gate, and capped o/down splits so
# that add_norm adds them) were measured with experiments/gated-splits-and-fit.patch
# applied and are not kept (benchmarks/NOTES.md).
VARIANTS = {
    "default": {},  # the library's settings
    "base": {"deferred_norm": False},
    "defer": {"deferred_norm": True},
    # the quantized matrix-vector kernel's float path and integer dot products
    "floatx": {"int8_activations": False},
    "int8x": {"int8_activations": True},
    # decode attention loading its cache blocks in program order (before variant 23)
    "attn-noprefetch": {"attention_prefetch": False},
    # ... and loading ahead also after split-K partial sums and a deferred norm (before variant 28)
    "attn-prefetch-always": {"attention_prefetch": True},
    # a tied head on XLA's gemm after a separate final norm (before variant 25)
    "head-xla": {"row_major_head": False},
}
# tilings of the quantized batch-1 kernel (4-bit weights) around its earlier default
# (block_n 32; now 16: NOTES variant 17c)
_INT4 = QMatvecTiling(block_n=32, block_k=512, num_stages=3, num_warps=4, target_programs=1056)
for _name, _change in {"bk1024": dict(block_k=1024, num_stages=2), "bk256": dict(block_k=256, num_stages=4),
                       "bn64": dict(block_n=64), "bn16": dict(block_n=16), "bn32": {}, "warps8": dict(num_warps=8),
                       "progs2112": dict(target_programs=2112), "stages4": dict(num_stages=4),
                       "bn16-progs2112": dict(block_n=16, target_programs=2112),
                       "bn16-bk256": dict(block_n=16, block_k=256, num_stages=4),
                       "bk256-progs2112": dict(block_k=256, num_stages=4, target_programs=2112),
                       "bn16-progs4224": dict(block_n=16, target_programs=4224)}.items():
    VARIANTS["int4-" + _name] = {"qmatvec": (dict(QMATVEC_TILINGS)[8], 4, dataclasses.replace(_INT4, **_change))}

# tilings of the bf16 batch-1 kernel around its default (block_n 256, block_k 32, 1056
# programs, 4 warps, 3 stages)
for _name, _change in {"bn128": dict(block_n=128), "bn512": dict(block_n=512), "bk16": dict(block_k=16),
                       "bk64": dict(block_k=64), "progs528": dict(target_programs=528),
                       "progs2112": dict(target_programs=2112), "stages2": dict(num_stages=2),
                       "stages4": dict(num_stages=4), "warps8": dict(num_warps=8),
                       "bn512-bk16": dict(block_n=512, block_k=16)}.items():
    VARIANTS["bf16-" + _name] = {"matvec": dataclasses.replace(MatvecTiling(), **_change)}


# the row-major kernel (weights "+rows"): on every weight, or only where one side is
# <= 2048 (XLA's dot on llama8b); tilings around its default (4096 weights per step,
# 8192 for short rows, >= 264 programs, 4 warps, 3 stages, loads one step ahead)
VARIANTS["rows-xla-large"] = {"rowmatvec_max_small_side": 2048}
VARIANTS["moe-xla"] = {"moe_kernel_max_pairs": 0}  # the routed experts gathered by XLA, not read in place
VARIANTS["moe-kernel16"] = {"moe_kernel_max_pairs": 16}  # in place to 16 pairs, grouped past them
VARIANTS["moe-grouped-xla"] = {"moe_grouped_kernel_max_pairs": 0}  # past 64 pairs, XLA's dequantize + ragged_dot
VARIANTS["attn-xla"] = {"attention_kernel": False}  # XLA's attention at decode, not the fused kernel
# decode attention over long caches: more programs (splits), larger blocks of slots
for _programs in (256, 512, 1024, 2048):
    VARIANTS[f"attn-progs{_programs}"] = {"attention_programs": _programs, "attention_programs_fp8": _programs}
VARIANTS["attn-bs32"] = {"attention_block_slots": 32}
VARIANTS["attn-bs128"] = {"attention_block_slots": 128}
VARIANTS["attn-progs1024-bs128"] = {"attention_programs": 1024, "attention_programs_fp8": 1024,
                                    "attention_block_slots": 128}


def _short(**change):  # the short rows' settings, changed
    return dict(short=tuple({**dict(RowTiling().short), **change}.items()))


for _name, _change in {"bk256": dict(block_k=256), "bk1024": dict(block_k=1024), "bk2048-rowacc": dict(
                           block_k=2048, tile_acc=False), "step4096": dict(step_elements=4096),
                       "step16384": dict(step_elements=16384), "progs256": dict(min_programs=256, **_short(min_programs=256)),
                       "progs128": dict(min_programs=128, **_short(min_programs=128)), "progs528": dict(min_programs=528, **_short(min_programs=528)),
                       "progs1056": dict(min_programs=1056, **_short(min_programs=1056)), "stages1": dict(num_stages=1),
                       "short-off": _short(min_programs=264),
                       "stages2": dict(num_stages=2), "stages4": dict(num_stages=4),
                       "warps8": dict(num_warps=8), "step16384-warps8": dict(step_elements=16384, num_warps=8),
                       "rowacc": dict(tile_acc=False), "step16384-rowacc": dict(step_elements=16384, tile_acc=False),
                       "noprefetch": dict(prefetch=0), "evict-first": dict(eviction="evict_first"),
                       "step8192": dict(step_elements=8192), "step8192-noprefetch": dict(step_elements=8192, prefetch=0),
                       "prefetch2": dict(prefetch=2), "step2048-prefetch2": dict(step_elements=2048, prefetch=2),
                       "step2048-prefetch3": dict(step_elements=2048, prefetch=3),
                       "step4096-progs528": dict(step_elements=4096, min_programs=528),
                       "progs528-all": dict(min_programs=528, **_short(min_programs=1056)),
                       "prefetch2-evict-first": dict(prefetch=2, eviction="evict_first"),
                       }.items():
    VARIANTS["rows-" + _name] = {"rowmatvec": dataclasses.replace(RowTiling(), **_change)}

# tilings of the tied head on the row-major kernel (weights of >= wide_rows rows, variant
# 26): the short-row rule's 16 rows and 512 inputs a step, one step ahead, 4 warps, was
# the default before it; 4 whole rows a step after
for _name, _wide in {"bn16-bk512": dict(block_n=16, block_k=512), "bn16-bk256": dict(block_n=16, block_k=256),
                     "bn32-bk256": dict(block_n=32, block_k=256), "bn8-bk1024": dict(block_n=8, block_k=1024),
                     "bn4-bk2048": dict(block_n=4, block_k=2048), "bn2-bk2048": dict(block_n=2, block_k=2048),
                     "bn64-bk128": dict(block_n=64, block_k=128),
                     "bn16-bk512-w8": dict(block_n=16, block_k=512, num_warps=8),
                     "bn32-bk512-w8": dict(block_n=32, block_k=512, num_warps=8),
                     "bn4-bk2048-w2": dict(block_n=4, block_k=2048, num_warps=2),
                     "bn4-bk2048-w8": dict(block_n=4, block_k=2048, num_warps=8),
                     "bn8-bk2048-w8": dict(block_n=8, block_k=2048, num_warps=8),
                     "bn16-bk512-pf2": dict(block_n=16, block_k=512, prefetch=2),
                     "bn16-bk256-pf2": dict(block_n=16, block_k=256, prefetch=2)}.items():
    VARIANTS["head-" + _name] = {"rowmatvec": RowTiling(wide=tuple(_wide.items()))}


def policy_of(variant: str) -> KernelPolicy:
    """The default policy for this backend with the variant's changes."""
    changes = dict(VARIANTS[variant])
    if "qmatvec" in changes:  # (int8 tiling, bits, tiling): one width's tiling replaced
        int8, bits, tiling = changes["qmatvec"]
        changes["qmatvec"] = ((8, int8), (bits, tiling))
    return KernelPolicy.for_backend("auto", **changes)


def _jsonable(settings: dict) -> dict:
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else repr(v) if isinstance(v, tuple) else v
            for k, v in settings.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="shape:weights:variant,variant,...")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--prefill", action="store_true", help="also pp512 (batch 1)")
    ap.add_argument("--batch", type=int, default=1, help="decode rows (tg128 per row)")
    ap.add_argument("--context", type=int, default=0, help="rows start this many positions in (bench.py --context)")
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
              "command": "python " + " ".join(sys.argv), "runs": []}
    rows = []
    for spec in args.runs:
        shape, weights, names = spec.split(":")
        config = PRESETS[shape].replace(kv_cache=args.kv_cache)
        params = jax.block_until_ready(jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
        dtype, _, layout = weights.partition("+")
        if dtype != "bf16":
            params = jax.block_until_ready(jaxllm.quantize(params, dtype, group_size=32))
        if layout == "rows":
            params = jax.block_until_ready(transpose_projections(params))
        elif layout != "kn":  # the library's layout for the default policy
            params = jax.block_until_ready(for_policy(params, config.kernels))
        for name in names.split(","):
            config = config.replace(kernels=policy_of(name))
            print(f"{shape} {weights} {name} ...", file=sys.stderr, flush=True)
            r = {"shape": shape, "weights": weights, "variant": name, "settings": _jsonable(VARIANTS[name]),
                 "batch": args.batch, "context": args.context, "kv_cache": args.kv_cache,
                 **measure_decode(params, config, args.batch, 128, args.reps, context=args.context),
                 "rel_err_vs_xla": fast_path_error(params, config)}
            if args.prefill:
                r["pp512_tok_s"] = measure_prefill(params, config, 1, 512, args.reps)["tok_s"]
            if args.profile:
                p = profile(params, config, 32)
                r["profile"] = {k: v for k, v in p.items() if k != "kernels"}
                r["profile"]["top_kernels"] = p["kernels"][:30]
            report["runs"].append(r)
            rows.append(r)
            print(f"  {r['tok_s']:.1f} tok/s, rel err {r['rel_err_vs_xla']:.1e}", file=sys.stderr, flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
        del params
    print("\nshape     weights variant     tok/s   rel err   kernels/step   pp512 tok/s")
    for r in rows:
        k = r.get("profile", {}).get("kernels_per_step", float("nan"))
        print(f"{r['shape']:9} {r['weights']:7} {r['variant']:10} {r['tok_s']:8.1f} {r['rel_err_vs_xla']:9.1e} "
              f"{k:8.1f} {r.get('pp512_tok_s', float('nan')):12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
