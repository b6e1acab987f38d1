"""Our GGML dequantizers against the gguf package's reference implementation."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from jaxllm.loading.dequant import FORMATS, dequantize


def random_blocks(type_name, n_blocks, rng):
    """Random bytes with well-behaved float16 scales (no inf/nan)."""
    size, nbytes, _, _ = FORMATS[type_name]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    # Scale fields sit at fixed offsets per format; overwrite every 2-byte field that
    # holds a float16 with a modest random value.
    halves = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "MXFP4": []}
    for off in halves[type_name]:
        raw[:, off:off + 2] = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if type_name == "MXFP4":  # its e8m0 scale byte: 2^-127 (0, a float32 subnormal) .. 2^12
        raw[:, 0] = rng.integers(0, 140, n_blocks)
    return raw


@pytest.mark.parametrize("type_name", sorted(FORMATS))
def test_random_blocks_match_gguf_reference(type_name):
    rng = np.random.default_rng()
    raw = random_blocks(type_name, 96, rng).reshape(4, -1)  # 4 rows of 24 blocks
    ours = dequantize(raw, type_name)
    ref = quants.dequantize(raw, GGMLQuantizationType[type_name])
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


def test_float_types():
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(x.astype(np.float16).view(np.uint8), "F16"),
                                  x.astype(np.float16).astype(np.float32))
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    ref = quants.dequantize(bf16.view(np.uint8), GGMLQuantizationType.BF16)
    np.testing.assert_array_equal(dequantize(bf16.view(np.uint8), "BF16"), ref)


def test_openai_mxfp4_matches_transformers():
    """gpt-oss checkpoints' own MXFP4 (blocks and scales, two values a byte) against
    transformers' dequantizer."""
    import torch  # noqa: PLC0415
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: PLC0415

    from jaxllm.loading.dequant import mxfp4_openai  # noqa: PLC0415
    rng = np.random.default_rng()
    blocks_ = rng.integers(0, 256, (3, 8, 2, 16), dtype=np.uint8)  # [E, out, in / 32, 16]
    scales = rng.integers(100, 140, (3, 8, 2), dtype=np.uint8)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks_), torch.from_numpy(scales), dtype=torch.float32)
    ours = mxfp4_openai(blocks_, scales)  # [E, out, in]; transformers gives [E, in, out]
    np.testing.assert_array_equal(ours.transpose(0, 2, 1), ref.numpy())
