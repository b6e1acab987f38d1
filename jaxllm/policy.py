"""Which kernel runs where: one frozen, hashable `KernelPolicy`, decided once.

The policy is a field of `ModelConfig` (`config.kernels`), which every compiled
function takes as a static argument, so each of its values is part of the jit key:
two policies in one process compile two programs, and a changed tiling never reuses
a stale one. It reads the backend once, when it is built (`for_backend`); the traced
code asks it, never `jax.default_backend()` or a module global.

Two decisions are made from it:
  - at load time, the weight's kind (`layout.for_policy`): which dense projections
    are stored by output row (`stores_by_row`);
  - per projection, once, while tracing: the `Plan` for a weight of that kind and a
    number of rows (`plan`): which kernel, with which tiling.

The tilings' values and the thresholds are measured on the GPU; their history is in
benchmarks/NOTES.md (the variant numbers below point there). Benchmark variants are
policy values (`policy.replace(...)`, benchmarks/decode_variants.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union

import jax

Mode = Literal["auto", "xla", "pallas"]
MAX_ROWS = 4  # the matrix-vector kernels' largest batch
NATIVE_BITS = (4, 5, 6, 8)  # weights the CPU's native kernel reads (kernels/cpu_qmatvec.py)
KERNEL_BITS = (4, 8)  # weights the GPU's quantized kernels read; 5 and 6 bits take XLA


@dataclass(frozen=True)
class MatvecTiling:
    """kernels/matvec.py (split-K over w [K, N]): columns per program, inputs per step,
    K split until about target_programs programs (NOTES variant 21)."""

    block_n: int = 256
    block_k: int = 32
    target_programs: int = 1056
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class QMatvecTiling:
    """kernels/qmatvec.py for one weight width (benchmarks/qmatvec_tune.py; NOTES 17c)."""

    block_n: int
    block_k: int
    num_stages: int
    num_warps: int = 4
    target_programs: int = 1056


Overrides = tuple[tuple[str, object], ...]


@dataclass(frozen=True)
class RowTiling:
    """kernels/rowmatvec.py (weights by output row). block_n, rows per program: the
    largest power of two <= 16 leaving min_programs programs; block_k so that a step
    reads step_elements weights (over both halves of a gated weight), at most K.
    Steps are loaded `prefetch` ahead and evicted from L2 first (NOTES variants 22-23).

    Two classes of weight override these (`resolve`): `short` rows (K * halves <=
    short_row: q/k/v and o, read in one or two steps, where more programs put more
    bytes in flight) and `wide` weights of >= wide_rows rows (tied heads: 4 whole
    rows a program; NOTES variant 26). A wide weight with short rows takes both."""

    step_elements: int = 4096
    min_programs: int = 264
    num_warps: int = 4
    num_stages: int = 3
    tile_acc: bool = True
    prefetch: int = 1
    eviction: str = "evict_first"
    block_n: Optional[int] = None
    block_k: Optional[int] = None
    short_row: int = 2048
    short: Overrides = (("step_elements", 8192), ("min_programs", 528))
    wide_rows: int = 32768
    wide: Overrides = (("block_n", 4), ("block_k", 2048))

    def for_weight(self, K: int, N: int, halves: int) -> "RowTiling":
        """The tiling of a weight of N rows per half and K inputs: its classes applied."""
        changes = {**(dict(self.short) if K * halves <= self.short_row else {}),
                   **(dict(self.wide) if N >= self.wide_rows else {})}
        return dataclasses.replace(self, **changes) if changes else self


@dataclass(frozen=True)
class ExpertTiling:
    """kernels/expert_matvec.py's dense kernel (a column strip of one routed expert a
    program, K split until about target_programs programs over all pairs)."""

    block_n: int = 256
    block_k: int = 32
    target_programs: int = 1056
    num_warps: int = 4
    num_stages: int = 3


QMATVEC_TILINGS = ((8, QMatvecTiling(block_n=32, block_k=256, num_stages=4)),
                   (4, QMatvecTiling(block_n=16, block_k=512, num_stages=3)))


@dataclass(frozen=True)
class QMatmulTiling:
    """kernels/qmatvec.py's qmatmul_pallas (5 rows and more): rows of x, value rows and
    inputs per program; K split until about target_programs programs."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 528


# (most rows, tiling): the first entry whose bound a batch fits (benchmarks/qmatmul_batch.py)
QMATMUL_TILINGS = ((16, QMatmulTiling()),
                   (64, QMatmulTiling(block_m=64, block_n=64, block_k=128)),
                   (1 << 30, QMatmulTiling(block_m=128, block_n=128, block_k=64, num_warps=8)))


def matmul_tiling(rows: int, tilings=QMATMUL_TILINGS) -> QMatmulTiling:
    return next(t for bound, t in tilings if rows <= bound)


@dataclass(frozen=True)
class Plan:
    """How one projection runs: `kernel` names an entry of ops.KERNELS; `fuses`: the
    kernel takes the norm before it, a gate and the residual add (row-major kernel)."""

    kernel: Literal["rowmatvec", "matvec", "qmatvec", "qmatmul", "native", "xla"]
    tiling: Union[None, MatvecTiling, QMatvecTiling, QMatmulTiling, RowTiling] = None

    @property
    def fuses(self) -> bool:
        return self.kernel == "rowmatvec"

    @property
    def split_k(self) -> bool:
        """Its output may be left as split-K partial sums for the kernel after it."""
        return self.kernel in ("matvec", "qmatvec")


@dataclass(frozen=True)
class KernelPolicy:
    """mode "auto" uses the Pallas kernels where they were measured faster (the GPU,
    small batches), "xla" never, "pallas" for every small-batch projection
    (interpreted on the CPU: for tests). platform: the backend the programs run on."""

    mode: Mode = "auto"
    platform: str = "cpu"
    # An RMSNorm before a projection left to the kernels around it (ops.DeferredNorm; NOTES 15)
    # where that was measured to pay; "always": before every projection (the tests run
    # the deferred paths on the CPU so).
    deferred_norm: Union[bool, Literal["always"]] = True
    # A tied head through the row-major kernel with the final norm inside (NOTES 25).
    row_major_head: bool = True
    # The quantized matrix-vector kernel rounds x to int8 per group and uses dp4a.
    int8_activations: bool = True
    # Decode attention loads cache blocks ahead: "lean" only where q/k/v arrive as one
    # array with no norm factor to compute (NOTES 23, 28); True always; False never.
    attention_prefetch: Union[bool, Literal["lean"]] = "lean"
    # The fused decode-attention kernel where it applies (False: XLA's attention; for A/B runs).
    attention_kernel: bool = True
    # Its programs over a long cache (splits = programs / (rows x kv heads)), for a cache
    # in the model's dtype and a float8 one (NOTES "Decode at 8k context"), and the
    # slots each program reads a step.
    attention_programs: int = 256
    attention_programs_fp8: int = 1024
    attention_block_slots: int = 64
    # The split-K dense kernel under "auto" for weights whose smaller side is at most
    # this; None: never. On the GPU every such layer projection is stored by output
    # row, so only an untied head of <= 2048 columns would reach it (docs/architecture.md).
    matvec_max_small_side: Optional[int] = 2048
    # Dense projections stored by output row under "auto" on the GPU when their smaller
    # side is at most this (None: all). llama8b's (all >= 4096) decode slower by row than
    # on XLA's dots (NOTES variant 22).
    rowmatvec_max_small_side: Optional[int] = 2048
    # The down projection's kernel forms its input from at most this many gate-up
    # partial sums (GatedInput): each costs its programs two more loads a step, which
    # paid for the quantized kernels' 1-4 splits, not the bf16 ones' 16-18 (NOTES).
    max_gated_splits: int = 4
    # Mixture-of-experts MLPs: up to this many (token, expert) pairs, each pair's expert
    # weights are gathered (decode: only the routed experts are read); beyond, tokens
    # are sorted by expert for a grouped matrix multiply (ragged_dot).
    moe_gather_max_pairs: int = 64
    # Up to this many pairs, where kernels are wanted, each pair's expert is read in
    # place by kernels/expert_matvec.py instead of gathered by XLA.
    moe_kernel_max_pairs: int = 64
    # Beyond, up to this many, quantized experts take the grouped kernel
    # (expert_matmul_pallas) instead of XLA's dequantize-everything-then-ragged_dot.
    moe_grouped_kernel_max_pairs: int = 8192
    experts: ExpertTiling = ExpertTiling()
    # add_norm's kernel adds at most this many partial-sum values in one program (NOTES).
    add_norm_max_partial_values: int = 16384
    add_norm_max_width: int = 16384
    matvec: MatvecTiling = MatvecTiling()
    rowmatvec: RowTiling = RowTiling()
    qmatvec: tuple[tuple[int, QMatvecTiling], ...] = QMATVEC_TILINGS
    qmatmul: tuple[tuple[int, QMatmulTiling], ...] = QMATMUL_TILINGS
    # Quantized projections of more rows than this (prefill) dequantize in XLA and
    # multiply with its matrix multiply.
    qmatmul_max_rows: int = 256

    @classmethod
    def for_backend(cls, mode: Mode = "auto", platform: Optional[str] = None, **changes) -> "KernelPolicy":
        """The policy for `platform` (default: JAX's default backend, read here once)."""
        if mode not in ("auto", "xla", "pallas"):
            raise ValueError(f"kernels must be 'auto', 'xla' or 'pallas', got {mode!r}")
        return cls(mode=mode, platform=platform or jax.default_backend(), **changes)

    def replace(self, **changes) -> "KernelPolicy":
        return dataclasses.replace(self, **changes)

    @property
    def interpret(self) -> bool:
        """Pallas kernels run in interpret mode off the GPU."""
        return self.platform != "gpu"

    @property
    def fast(self) -> bool:
        """Kernels are wanted: "pallas", or "auto" on the GPU."""
        return self.mode == "pallas" or (self.mode == "auto" and self.platform == "gpu")

    # -- load time ----------------------------------------------------------------------

    def stores_by_row(self, shape: tuple[int, int]) -> bool:
        """Whether a dense layer projection of this [K, N] shape is stored by output row
        (layout.for_policy): on the GPU, those the row-major kernel reads."""
        return self.mode == "auto" and self.platform == "gpu" and _small(shape, self.rowmatvec_max_small_side)

    # -- while tracing ------------------------------------------------------------------

    def plan(self, kind: str, rows: int, shape: tuple[int, int], bits: int = 16) -> Plan:
        """The kernel for a weight of `kind` ("dense", "by_row", "quantized", "fp8") and
        [K, N] `shape`, multiplying `rows` rows of activations. FP8 weights: at decode
        the row-major kernel (float8 rows, activations as they are) where dense weights
        take it (llama8b's shapes: 232 tok/s there against XLA's 309), else XLA's FP8
        matrix multiply (cuBLASLt on Hopper)."""
        if self.mode == "xla":
            return Plan("xla")
        small_batch, pallas = rows <= MAX_ROWS, self.mode == "pallas"
        if kind in ("by_row", "fp8"):
            if small_batch and (pallas or (self.platform == "gpu" and self.mode == "auto"
                                           and _small(shape, self.rowmatvec_max_small_side))):
                return Plan("rowmatvec", self.rowmatvec)
            return Plan("xla")
        if kind == "quantized":
            if bits in KERNEL_BITS and small_batch and self.fast:
                return Plan("qmatvec", self.qmatvec_tiling(bits))
            if self.mode == "auto" and self.platform == "cpu" and small_batch and bits in NATIVE_BITS:
                return Plan("native")
            if bits in KERNEL_BITS and MAX_ROWS < rows <= self.qmatmul_max_rows and self.fast:
                return Plan("qmatmul", matmul_tiling(rows, self.qmatmul))
            return Plan("xla")
        if small_batch and (pallas or (self.platform == "gpu" and self.mode == "auto"
                                       and _small(shape, self.matvec_max_small_side))):
            return Plan("matvec", self.matvec)
        return Plan("xla")

    def qmatvec_tiling(self, bits: int) -> QMatvecTiling:
        return dict(self.qmatvec).get(bits, dict(self.qmatvec)[8])

    def moe_route(self, pairs: int, kind: str = "dense", bits: int = 16) -> str:
        """How a mixture-of-experts MLP runs `pairs` (token, routed expert) pairs through
        experts of `kind` ("dense", "quantized" of `bits`, "fp8"): "kernel" (each pair
        reads its expert in place, kernels/expert_matvec.py), "gather" (XLA gathers each
        pair's expert weights), "grouped" (tokens sorted by expert, one grouped matrix
        multiply, ragged_dot) or "grouped_kernel" (the same for quantized experts in a
        kernel that dequantizes tiles in registers)."""
        quantized = kind == "quantized" and bits in KERNEL_BITS
        if self.fast and (kind == "dense" or quantized) and pairs <= self.moe_kernel_max_pairs:
            return "kernel"
        if pairs <= self.moe_gather_max_pairs:
            return "gather"
        if self.fast and quantized and pairs <= self.moe_grouped_kernel_max_pairs:
            return "grouped_kernel"
        return "grouped"

    def expert_matmul_tiling(self, pairs: int, n_experts: int) -> QMatmulTiling:
        """qmatmul's tiling for the rows an expert gets on average, its blocks no taller
        than those rows need (at least 16, the tensor cores' least)."""
        rows = -(-pairs // min(pairs, n_experts))
        tiling = matmul_tiling(rows, self.qmatmul)
        return dataclasses.replace(tiling, block_m=min(tiling.block_m, max(16, 1 << (rows - 1).bit_length())))

    def add_norm_kernel(self, splits: int, width: int) -> bool:
        """Whether kernels/add_norm.py adds `splits` partial sums of a row of `width` and
        the norm after them (for a plain delta XLA's fusions were as fast, llama8b)."""
        return (self.fast and width <= self.add_norm_max_width
                and splits * width <= self.add_norm_max_partial_values)

    def decode_attention(self, config) -> bool:
        """The fused decode-attention kernel for one new token per row. Partial rotary
        (Phi-2) and LayerNorm'd query/key heads take the XLA path."""
        if not (self.fast and self.attention_kernel):
            return False
        if config.position == "rope" and config.rotary_dim != config.head_dim:
            return False
        return not config.qk_norm or (config.norm == "rms" and not config.qk_norm_whole)

    def defers_norm_before_xla(self) -> bool:
        """Whether an RMSNorm before XLA's matrix multiply (a dense projection on the
        GPU) is deferred: XLA then forms its product and sum of squares in one kernel."""
        return self.deferred_norm and self.mode == "auto" and self.platform == "gpu"


def _small(shape, limit: Optional[int]) -> bool:
    return limit is None or min(shape) <= limit
