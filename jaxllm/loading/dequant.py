"""Dequantization of GGML block formats to float32, vectorised over blocks.

Each format stores a row as consecutive blocks of `block_size` values; a block is
a fixed number of bytes holding float16 scales (and minimums) and packed integer
quants. `blocks(raw, type_name)` splits raw bytes [rows, row_bytes] into integer
values and per-group scales (and minimums), kept quantized for the device;
`dequantize(raw, type_name)` returns float32 [rows, row_bytes / type_bytes * block_size].
Layouts follow ggml-common.h (block_q4_0, ..., block_q6_K, block_mxfp4).
"""

from __future__ import annotations

import numpy as np

from ..quant import HostBlocks

QK_K = 256  # values per K-quant super-block


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 from the last axis (2 bytes) -> float32 [..., 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _split(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    return np.split(blocks, np.cumsum(sizes), axis=-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles of all bytes, then high nibbles: [n, b] -> [n, 2b] uint8."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Bit j of little-endian bytes [n, count/8] -> [n, count] uint8."""
    return np.unpackbits(packed, axis=-1, bitorder="little")[:, :count]


# Each format returns (q int [n, block], scale float32 [n, block / G],
# min float32 [n, block / G] or None): the block is scale * q + min per group of G.

def q4_0(b):
    d, qs = _split(b, 2)
    return _nibbles(qs).astype(np.int8) - 8, _f16(d), None


def q4_1(b):
    d, m, qs = _split(b, 2, 2)
    return _nibbles(qs).astype(np.int8), _f16(d), _f16(m)


def q5_0(b):
    d, qh, qs = _split(b, 2, 4)
    q = _nibbles(qs) | (_bits(qh, 32) << 4)
    return q.astype(np.int8) - 16, _f16(d), None


def q5_1(b):
    d, m, qh, qs = _split(b, 2, 2, 4)
    q = _nibbles(qs) | (_bits(qh, 32) << 4)
    return q.astype(np.int8), _f16(d), _f16(m)


def q8_0(b):
    d, qs = _split(b, 2)
    return qs.view(np.int8), _f16(d), None


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minimums."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _pairs_of_32(qs: np.ndarray) -> np.ndarray:
    """K-quant 4-bit order: each 32-byte chunk gives 32 low nibbles then 32 high."""
    n = qs.shape[0]
    chunks = qs.reshape(n, -1, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(n, -1)


def q4_k(b):
    d, dmin, s, qs = _split(b, 2, 2, 12)
    sc, mn = _k_scales(s)
    return _pairs_of_32(qs).astype(np.int8), _f16(d) * sc, -(_f16(dmin) * mn)


def q5_k(b):
    n = b.shape[0]
    d, dmin, s, qh, qs = _split(b, 2, 2, 12, 32)
    sc, mn = _k_scales(s)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    q = _pairs_of_32(qs).reshape(n, 8, 32) | (high << 4)
    return q.reshape(n, QK_K).astype(np.int8), _f16(d) * sc, -(_f16(dmin) * mn)


def q6_k(b):
    n = b.shape[0]
    ql, qh, s, d = _split(b, 128, 64, 16)
    # Two halves of 128 values; in each, ql's 64 bytes give low nibbles for values
    # 0-63 and high nibbles for 64-127, qh's 32 bytes give 2 bits for 4 groups of 32.
    low = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(n, 2, 4, 32)
    high = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (low | ((high & 3) << 4)).astype(np.int8).reshape(n, QK_K) - 32
    return q, _f16(d) * s.view(np.int8).astype(np.float32), None


def q2_k(b):
    n = b.shape[0]
    s, qs, d, dmin = _split(b, 16, 64, 2)
    q = qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (q & 3).astype(np.int8).reshape(n, QK_K)
    return q, _f16(d) * (s & 15).astype(np.float32), -(_f16(dmin) * (s >> 4).astype(np.float32))


def q3_k(b):
    n = b.shape[0]
    hmask, qs, s, d = _split(b, 32, 64, 12)
    # 16 six-bit scales: low 4 bits from bytes 0-7 (low then high nibbles),
    # high 2 bits from bytes 8-11 (2 bits at a time).
    low = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=-1)
    high = (s[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3
    scales = (low | (high.reshape(n, 16) << 4)).astype(np.float32) - 32
    q = qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (q & 3).reshape(n, 8, 32).astype(np.int8)
    hbit = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    q = (q - 4 * (1 - hbit.astype(np.int8))).reshape(n, QK_K)
    return q, _f16(d) * scales, None


# e2m1 (4-bit float) values doubled, so that they are integers: code c -> E2M1_X2[c] / 2
E2M1_X2 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """An e8m0 scale byte e (2^(e - 127)) halved, as float32 (ggml_e8m0_to_fp32_half):
    with the doubled e2m1 values the product is exact. e < 2 are float32 subnormals."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def mxfp4(b):
    """ggml's block_mxfp4: one e8m0 scale byte, then 16 bytes whose low nibbles are
    values 0-15 and high nibbles 16-31. The doubled e2m1 values are kept as int8 (an
    8-bit QuantizedWeight holds them exactly)."""
    e, qs = _split(b, 1)
    return E2M1_X2[_nibbles(qs)], e8m0_half(e), None


def mxfp4_openai(blocks_: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI's checkpoint MXFP4 (gpt-oss safetensors): blocks uint8 [..., G, 16] with
    value 2j in the low nibble of byte j and 2j + 1 in the high one, scales uint8
    [..., G] (2^(s - 127) per 32 values) -> float32 [..., G * 32]."""
    q = np.stack([blocks_ & 0x0F, blocks_ >> 4], axis=-1).reshape(*blocks_.shape[:-1], -1)
    values = E2M1_X2[q].astype(np.float32) * e8m0_half(scales)[..., None]
    return values.reshape(*blocks_.shape[:-2], -1)


# name: (values per block, bytes per block, function, bits the values fit in)
FORMATS = {
    "Q4_0": (32, 18, q4_0, 4), "Q4_1": (32, 20, q4_1, 4), "Q5_0": (32, 22, q5_0, 5),
    "Q5_1": (32, 24, q5_1, 5), "Q8_0": (32, 34, q8_0, 8), "Q2_K": (QK_K, 84, q2_k, 4),
    "Q3_K": (QK_K, 110, q3_k, 4), "Q4_K": (QK_K, 144, q4_k, 4), "Q5_K": (QK_K, 176, q5_k, 5),
    "Q6_K": (QK_K, 210, q6_k, 6), "MXFP4": (32, 17, mxfp4, 8),
}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
SUPPORTED_TYPES = ("F32", "F16", "BF16", *FORMATS)


def blocks(raw: np.ndarray, type_name: str) -> HostBlocks:
    """raw bytes [rows, row_bytes] of a block format -> HostBlocks [rows, cols], kept
    quantized: integer values with per-group float32 scales (and minimums)."""
    size, nbytes, fn, bits = FORMATS[type_name]
    raw = np.asarray(raw).view(np.uint8)
    raw = raw.reshape(-1, raw.shape[-1])
    n = raw.shape[0]
    q, scale, minimum = fn(raw.reshape(-1, nbytes))
    rows = lambda a: None if a is None else np.ascontiguousarray(a.reshape(n, -1))
    return HostBlocks(rows(q), rows(scale), rows(minimum), bits)


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """raw bytes [rows, row_bytes] (or typed floats) -> float32 [rows, cols]."""
    if type_name in FLOAT_TYPES:
        return np.asarray(raw).view(FLOAT_TYPES[type_name]).astype(np.float32)
    if type_name == "BF16":
        bits = np.asarray(raw).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    raw = np.asarray(raw).view(np.uint8)
    return blocks(raw, type_name).dequantize().reshape(*raw.shape[:-1], -1)
