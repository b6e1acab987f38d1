"""Teacher-forced scoring: how likely a model finds a token sequence."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .errors import ContextLengthError
from .generate import bucket_length
from .model import forward
from .params import Params


def _logprobs(params: Params, config: ModelConfig, ids: list[int]) -> jax.Array:
    """log p(token | the tokens before it) over the vocabulary at every position of
    ids, [len(ids), V] float32: one forward pass over ids padded to a power of two."""
    if len(ids) > config.max_seq_len:
        raise ContextLengthError(f"text of {len(ids)} tokens exceeds the context of "
                                 f"{config.max_seq_len} tokens")
    T = min(bucket_length(len(ids)), config.max_seq_len)
    padded = np.zeros((1, T), np.int32)
    padded[0, :len(ids)] = ids
    logits = forward(params, config, jnp.asarray(padded))[0, :len(ids)]
    return jax.nn.log_softmax(logits, axis=-1)


def prompt_logprobs(params: Params, config: ModelConfig, ids: Sequence[int], k: int = 0):
    """Per token of ids after the first: (its log-probability, [(id, log-probability)]
    of the k most likely tokens at its position), as the decode loop reports them for
    generated tokens (decoding.Scores)."""
    ids = [int(i) for i in ids]
    logprobs = _logprobs(params, config, ids)[:-1]
    chosen = np.asarray(jnp.take_along_axis(logprobs, jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0])
    top_lp, top_ids = (np.asarray(a) for a in jax.lax.top_k(logprobs, max(k, 1)))
    top_lp, top_ids = top_lp[:, :k], top_ids[:, :k]
    return [(float(chosen[t]), list(zip(top_ids[t].tolist(), top_lp[t].tolist()))) for t in range(len(ids) - 1)]


def score_ids(params: Params, config: ModelConfig, ids: Sequence[int]) -> dict:
    """The NLL of each of ids[1:] given the tokens before it, the model's argmax at
    every position, and the perplexity: {"ids", "nll", "argmax", "ppl"}. One forward
    pass over ids padded to a power-of-two length (few compilations)."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise ValueError("scoring needs at least two tokens")
    logprobs = _logprobs(params, config, ids)
    nll = -np.asarray(jnp.take_along_axis(logprobs[:-1], jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0])
    nll = [float(x) for x in nll]
    return {"ids": ids, "nll": nll, "argmax": [int(x) for x in np.asarray(jnp.argmax(logprobs, -1))],
            "ppl": math.exp(sum(nll) / len(nll))}
