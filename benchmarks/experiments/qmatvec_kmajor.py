"""Experiment: quantized matvec with values stored K-major ([K, Nv], like the dense
[in, out] weight), so threads own output columns and reduce over k in registers,
as the bf16 kernel does. 4-bit: byte [k, j] holds columns j (low) and j + N/2 (high)."""
import functools
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxllm.kernels.matvec import _plan, _pow2
from jaxllm.kernels.qmatvec import _unpack


def _kernel(x_ref, v_ref, s_ref, *rest, M, Nv, n_groups, G, bits, has_mins, block_n, gps, steps):
    m_ref = rest[0] if has_mins else None
    o_ref = rest[-1]
    j, split = pl.program_id(0), pl.program_id(1)
    cols = j * block_n + jnp.arange(block_n)
    col_ok = cols < Nv
    halves = (0,) if bits == 8 else (0, Nv)

    def body(i, accs):
        g0 = (split * steps + i) * gps
        g_ok = g0 + jnp.arange(gps) < n_groups
        v = plgpu.load(v_ref.at[pl.ds(g0, gps), :, pl.ds(j * block_n, block_n)],
                       mask=g_ok[:, None, None] & col_ok[None, None, :], other=0)  # [gps, G, bn]
        x = plgpu.load(x_ref.at[pl.ds(g0, gps), :, :], mask=g_ok[:, None, None],
                       other=0.0).astype(jnp.float32)  # [gps, G, Mp]
        new = list(accs)
        for h, col0 in enumerate(halves):
            q = _unpack(v, h, bits, has_mins)
            sl = pl.ds(col0 + j * block_n, block_n)
            mask = g_ok[:, None] & col_ok[None, :]
            s = plgpu.load(s_ref.at[pl.ds(g0, gps), sl], mask=mask, other=0.0).astype(jnp.float32)
            if has_mins:
                mn = plgpu.load(m_ref.at[pl.ds(g0, gps), sl], mask=mask, other=0.0).astype(jnp.float32)
            for r in range(M):
                xr = x[:, :, r:r + 1]  # [gps, G, 1]
                per_group = jnp.sum(q * xr, axis=1)  # [gps, bn]
                out = jnp.sum(per_group * s, axis=0)
                if has_mins:
                    out = out + jnp.sum(mn * jnp.sum(xr, axis=1), axis=0)
                new[h * M + r] = new[h * M + r] + out
        return tuple(new)

    zeros = tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(len(halves) * M))
    accs = jax.lax.fori_loop(0, steps, body, zeros)
    for h, col0 in enumerate(halves):
        for r in range(M):
            plgpu.store(o_ref.at[split, pl.ds(r, 1), pl.ds(col0 + j * block_n, block_n)],
                        accs[h * M + r][None, :], mask=col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("bits", "out_dtype", "block_n", "gps", "target_programs",
                                             "num_warps", "num_stages", "interpret"))
def qmatvec_kmajor(x, values, scales, mins, bits, out_dtype=None, *, block_n=256, gps=1,
                   target_programs=1056, num_warps=4, num_stages=3, interpret=False):
    M, K = x.shape
    n_groups = scales.shape[0]
    G = K // n_groups
    Nv = values.shape[1]
    N = scales.shape[1]
    Mp = _pow2(M)
    xt = jnp.pad(x, ((0, Mp - M), (0, 0))).T.reshape(n_groups, G, Mp)
    v3 = values.reshape(n_groups, G, Nv)
    row_blocks, splits, steps = _plan(M, n_groups, Nv, block_n, gps, target_programs)
    has_mins = mins is not None
    kernel = functools.partial(_kernel, M=M, Nv=Nv, n_groups=n_groups, G=G, bits=bits,
                               has_mins=has_mins, block_n=block_n, gps=gps, steps=steps)
    ops = (xt, v3, scales) + ((mins,) if has_mins else ())
    cp = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    partial_sums = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, M, N), jnp.float32),
                                  grid=(row_blocks, splits), interpret=interpret, compiler_params=cp)(*ops)
    return partial_sums.sum(0).astype(out_dtype or x.dtype)


def to_kmajor(w):
    """QuantizedWeight (row layout) -> (values [K, Nv], scales, mins) K-major."""
    return w.values.T, w.scales, w.mins
