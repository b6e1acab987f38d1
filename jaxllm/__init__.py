"""jaxllm: open-weight LLMs as pure JAX functions.

    import jaxllm
    config = jaxllm.PRESETS["smol135m"]
    params = jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
    logits = jaxllm.forward(params, config, tokens)            # [B, T, V]
    out = jaxllm.generate(params, config, [[1, 2, 3]], max_new_tokens=16,
                          settings=jaxllm.SamplerSettings.greedy())
"""

from .cache import KVCache, init_cache
from .calibration import input_importance
from .config import PRESETS, ModelConfig, RopeScaling
from .decoding import DecodeState
from .errors import ContextLengthError
from .generate import GenerationResult, generate, generate_stream
from .grammar import Grammar, Grammars
from .model import decode_step, extend, forward
from .params import Layer, Norm, Params, init_params
from .policy import KernelPolicy
from .quant import dequantize_params, quantize, quantize_layer
from .sampling import RowSampling, SamplerSettings, filter_logits, sample
from .scoring import score_ids
from .weights import Fp8Weight, QuantizedWeight, TransposedWeight

__version__ = "0.1.0"

__all__ = [
    "ContextLengthError", "DecodeState", "GenerationResult", "Grammar", "Grammars", "KVCache", "KernelPolicy",
    "Fp8Weight", "Layer", "ModelConfig", "Norm", "PRESETS", "Params", "QuantizedWeight", "RopeScaling", "RowSampling",
    "SamplerSettings", "TransposedWeight", "decode_step", "dequantize_params", "extend", "filter_logits",
    "forward", "generate", "generate_stream", "init_cache", "init_params", "input_importance", "quantize",
    "quantize_layer", "sample", "score_ids",
]

from .chat import render_chat  # noqa: E402
from .errors import (JaxllmError, ModelFileError, UnknownModelError,  # noqa: E402
                     UnsupportedArchitectureError, UnsupportedTensorTypeError)
from .loading.models import Model, load  # noqa: E402
from .tokenizer import StreamDecoder, TextTokenizer  # noqa: E402

__all__ += ["JaxllmError", "Model", "ModelFileError", "StreamDecoder", "TextTokenizer",
            "UnknownModelError", "UnsupportedArchitectureError", "UnsupportedTensorTypeError",
            "load", "render_chat"]

from . import train  # noqa: E402, F401  (jaxllm.train: loss, optax step, LoRA, save/load)
