"""Teacher-forced scoring: how likely a model finds a token sequence."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .decoding import token_entries, token_scores
from .errors import ContextLengthError
from .generate import bucket_length
from .model import forward
from .params import Params


def _logits(params: Params, config: ModelConfig, ids: list[int]) -> jax.Array:
    """The logits [len(ids), V] at every position of ids: one forward pass over ids
    padded to a power of two (few compilations)."""
    if len(ids) > config.max_seq_len:
        raise ContextLengthError(f"text of {len(ids)} tokens exceeds the context of "
                                 f"{config.max_seq_len} tokens")
    T = min(bucket_length(len(ids)), config.max_seq_len)
    padded = np.zeros((1, T), np.int32)
    padded[0, :len(ids)] = ids
    return forward(params, config, jnp.asarray(padded))[0, :len(ids)]


def prompt_logprobs(params: Params, config: ModelConfig, ids: Sequence[int], k: int = 0):
    """Per token of ids after the first: (its log-probability, [(id, log-probability)]
    of the k most likely tokens at its position), scored as the decode loop scores
    generated tokens (decoding.token_scores)."""
    ids = [int(i) for i in ids]
    scores = token_scores(_logits(params, config, ids)[:-1], jnp.asarray(ids[1:], jnp.int32), k)
    return token_entries(*(np.asarray(a) for a in scores))


def score_ids(params: Params, config: ModelConfig, ids: Sequence[int]) -> dict:
    """The NLL of each of ids[1:] given the tokens before it, the model's argmax at
    every position, and the perplexity: {"ids", "nll", "argmax", "ppl"}. One forward
    pass over ids padded to a power-of-two length (few compilations)."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise ValueError("scoring needs at least two tokens")
    logits = _logits(params, config, ids)
    nll = [-float(x) for x in np.asarray(token_scores(logits[:-1], jnp.asarray(ids[1:], jnp.int32), 0).logprob)]
    return {"ids": ids, "nll": nll, "argmax": [int(x) for x in np.asarray(jnp.argmax(logits, -1))],
            "ppl": math.exp(sum(nll) / len(nll))}
