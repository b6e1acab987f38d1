"""Calibration statistics for quantization: how large each projection's inputs are.

An error on a weight row matters in proportion to the input it multiplies, and
inputs differ widely: a few channels of the residual stream carry most of its
energy. llama.cpp's importance matrix (imatrix) records the mean square of every
projection's inputs over some calibration text and weighs the quantization error
with it; `quant.quantize(..., importance=...)` does the same with what
`input_importance` returns.

The statistics are read by running the model's own forward pass with each
projection weight wrapped in an `InputTap` (weights.py), which `ops.linear` recognises:
there is one decoder, and calibration sees exactly the inputs inference will.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .errors import JaxllmError
from .model import embed, layer_forward
from .ops import Residual
from .params import Params
from .quant import PROJECTIONS
from .weights import InputTap, kind_of

# Text written for this project (prose, dialogue, code, tables, a few languages),
# ~2,400 tokens. Wide coverage matters more than size: the statistics are averages.
BUILTIN_TEXT = os.path.join(os.path.dirname(__file__), "data", "calibration.txt")


@partial(jax.jit, static_argnames=("config",))
def _input_squares(params: Params, config: ModelConfig, tokens: jax.Array, valid: jax.Array):
    """Per layer, {projection: sum over the valid tokens of tokens [B, T] of its
    inputs squared [K]}. Padding sits at the ends, so causal attention keeps it out
    of the valid tokens' inputs."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    stream = Residual(embed(params, config, tokens, positions))
    squares = []
    for i, layer in enumerate(params.layers):
        taps = {name: InputTap(getattr(layer, name), valid) for name in PROJECTIONS
                if kind_of(getattr(layer, name)) != "experts"}  # experts: quantized without importance
        stream, _ = layer_forward(layer.replace(**taps), config, i, stream, positions)
        squares.append({name: tap.squares for name, tap in taps.items()})
    return tuple(squares)


def input_importance(params: Params, config: ModelConfig, token_ids: Sequence[Sequence[int]],
                     window: int = 256, progress: Optional[Callable[[int, int], None]] = None):
    """The mean square of every projection's inputs over calibration text.

    token_ids: token sequences (each starting as the model expects, e.g. with BOS),
    cut into windows of at most `window` tokens, each run as its own sequence.
    Returns a tuple with one dict per layer, projection name -> float32 [K], the
    form `quant.quantize(..., importance=...)` takes. progress(done, total) is
    called after each window.
    """
    if any(kind_of(getattr(layer, name)) == "quantized" for layer in params.layers for name in PROJECTIONS):
        raise ValueError("calibrate the dense weights: these params are already quantized")
    windows = [list(ids[i:i + window]) for ids in token_ids for i in range(0, len(ids), window)]
    if not windows:
        raise ValueError("calibration needs at least one token")
    config = config.replace(kernels="xla")  # every projection sees a plain array input
    width = max(len(w) for w in windows)  # one shape: the function compiles once
    total, count = None, 0
    for n, ids in enumerate(windows):
        tokens = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
        valid = jnp.arange(width)[None] < len(ids)
        squares = _input_squares(params, config, tokens, valid)
        total = squares if total is None else jax.tree.map(jnp.add, total, squares)
        count += len(ids)
        if progress is not None:
            progress(n + 1, len(windows))
    return jax.tree.map(lambda s: s / count, total)


def read_calibration_text(source: str) -> str:
    """"builtin" (the bundled text) or the path of a UTF-8 text file."""
    path = BUILTIN_TEXT if source == "builtin" else source
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise JaxllmError(f"calibration text {source!r}: {e}") from None
    if not text.strip():
        raise JaxllmError(f"calibration text {source!r} is empty")
    return text


def text_windows(tokenizer, text: str, window: int = 256) -> list[list[int]]:
    """text's tokens in windows of at most `window`, each beginning as the model
    expects its input to (BOS where it takes one), for `input_importance`."""
    ids = tokenizer.encode(text, add_bos=False, parse_special=False)
    prefix = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    step = window - len(prefix)
    return [prefix + ids[i:i + step] for i in range(0, len(ids), step)]
