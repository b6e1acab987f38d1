"""Quantized matrix-vector products on the CPU through XLA's FFI (native/qmatvec_cpu.cc).

XLA:CPU has no dot that reads blockwise-quantized weights: it dequantizes them into
a float32 buffer first, and inside a decode loop it hoists that dequantization out
of the loop, so the whole model is held in float32 while it decodes. The native
kernel reads each weight byte once and keeps the quantized model quantized.

The library is compiled at first use with the machine's C++ compiler (-O3
-march=native: it runs where it is built) into a cache folder keyed by the source
and the JAX version; without a compiler the XLA path is used, with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..paths import cache_root
from ..policy import MAX_ROWS, NATIVE_BITS
from ..weights import QuantizedWeight, linear_reference

SOURCE = Path(__file__).resolve().parent.parent / "native" / "qmatvec_cpu.cc"
TARGET = "jaxllm_qmatvec_cpu"


def cache_dir() -> Path:
    return cache_root() / "native"


def _compile(out: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [compiler, "-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared",
               "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(target, out)  # atomic: a concurrent build never sees half a file


@functools.cache
def available() -> bool:
    """Builds (once per source and JAX version) and registers the kernel; False, with a
    warning, where that fails."""
    key = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
    path = cache_dir() / f"qmatvec_cpu-{key}.so"
    try:
        if not path.exists():
            print(f"jaxllm: compiling the CPU quantized kernel into {path} ...", file=sys.stderr)
            _compile(path)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxllmQMatvec), platform="cpu")
    except (OSError, RuntimeError) as error:
        warnings.warn(f"jaxllm: the native CPU quantized kernel is unavailable, using XLA: {error}")
        return False
    return True


def qmatvec_cpu(x: jax.Array, w: QuantizedWeight, out_dtype=None) -> jax.Array:
    """x [M, K] @ W [K, N] for M <= 4, float32 arithmetic, in out_dtype (default x's)."""
    M, K = x.shape
    if M > MAX_ROWS:
        raise ValueError(f"qmatvec_cpu handles at most {MAX_ROWS} rows, got {M}")
    if w.bits not in NATIVE_BITS:
        raise ValueError(f"qmatvec_cpu handles {NATIVE_BITS}-bit weights, not {w.bits}-bit")
    if not available():
        return linear_reference(x, w, out_dtype)
    empty = jnp.zeros((1,), jnp.uint8)  # stands for an absent plane
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, w.shape[1]), jnp.float32))
    y = call(x.astype(jnp.float32), w.values, empty if w.high is None else w.high, w.scales,
             empty if w.mins is None else w.mins, bits=np.int32(w.bits),
             has_high=w.high is not None, has_mins=w.has_mins)
    return y.astype(out_dtype or x.dtype)

