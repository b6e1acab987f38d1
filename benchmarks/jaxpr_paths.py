"""The decoder's traced programs, one text file per case, to compare two checkouts: every
architecture of tests/conftest.py and the benchmark shapes (2 layers), dense / int8 /
int4 weights, decode at 1, 3 and 8 rows, prefill and forward, under the GPU's and the
CPU's policies. Traced, not compiled: the GPU's programs are read on the CPU.

    (cd CHECKOUT && python /path/to/jaxpr_paths.py /tmp/a); python jaxpr_paths.py /tmp/b
    for f in /tmp/a/*.txt; do cmp -s $f /tmp/b/$(basename $f) || echo $f; done

Checkouts before the kernel policy (f80521f and earlier) read the backend while
tracing: for them the backend query is patched and the compiled functions are
dropped between cases (without that, jit served the first backend's trace to the
second: the stale-cache bug the policy removes; NOTES.md).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.getcwd())  # the checkout compared is the working directory
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import ARCH_CONFIGS  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm import PRESETS, init_params  # noqa: E402
from jaxllm.quant import quantize  # noqa: E402

WITH_POLICY = os.path.exists("jaxllm/policy.py")


def under(platform: str, mode: str, fn):
    """fn(kernels) with the kernels setting for this platform and mode."""
    if WITH_POLICY:
        from jaxllm.policy import KernelPolicy
        return fn(KernelPolicy.for_backend(mode, platform=platform))
    real = jax.default_backend
    jax.default_backend = lambda: platform
    jax.clear_caches()
    try:
        return fn(mode)
    finally:
        jax.default_backend = real


def laid_out(params, kernels):
    from jaxllm import layout
    return layout.for_policy(params, kernels) if WITH_POLICY else layout.for_backend(params)


def program(config, weights: str, platform: str, mode: str, batch: int, T: int, dtype) -> str:
    """T = 1: decode_step; T = 0: forward over 24 tokens; else extend by T tokens."""
    def trace(kernels):
        c = config.replace(kernels=kernels)

        def build():
            p = init_params(c, jax.random.PRNGKey(0), dtype)
            if weights != "dense":
                p = quantize(p, weights, 16 if config.d_model < 512 else 32)
            return laid_out(p, kernels)
        params = jax.eval_shape(build)
        cache = jax.eval_shape(lambda: jaxllm.init_cache(c, batch, 256, dtype))
        ids = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
        if T == 1:
            return jax.make_jaxpr(lambda p, t, kv: jaxllm.decode_step(p, c, t, kv))(params, ids(batch), cache)
        if T == 0:
            return jax.make_jaxpr(lambda p, t: jaxllm.forward(p, c, t))(params, ids(batch, 24))
        return jax.make_jaxpr(lambda p, t, n, kv: jaxllm.extend(p, c, t, n, kv))(
            params, ids(batch, T), ids(batch), cache)
    return str(under(platform, mode, trace))


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    cases = {}
    for shape in ("smol135m", "llama1b", "llama8b"):
        c = PRESETS[shape].replace(n_layers=2)
        for w in ("dense", "int8", "int4"):
            for b in (1, 8):
                cases[f"gpu-{shape}-{w}-b{b}"] = program(c, w, "gpu", "auto", b, 1, jnp.bfloat16)
            cases[f"gpu-{shape}-{w}-pp"] = program(c, w, "gpu", "auto", 1, 64, jnp.bfloat16)
    for arch, c in ARCH_CONFIGS.items():
        for w in ("dense", "int8", "int4"):
            for platform, mode in (("gpu", "auto"), ("cpu", "auto"), ("cpu", "pallas"), ("cpu", "xla")):
                name = f"{platform}-{mode}-{arch}-{w}"
                for b in (1, 3, 8):
                    cases[f"{name}-b{b}"] = program(c, w, platform, mode, b, 1, jnp.float32)
                cases[f"{name}-pp"] = program(c, w, platform, mode, 2, 16, jnp.float32)
                cases[f"{name}-fwd"] = program(c, w, platform, mode, 2, 0, jnp.float32)
    for name, text in cases.items():
        with open(os.path.join(out, name + ".txt"), "w") as f:
            f.write(text)
    print(len(cases), "programs written to", out)


if __name__ == "__main__":
    main(sys.argv[1])
