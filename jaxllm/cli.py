"""The `jaxllm` command line: generate, score, tokenize, chat, info.

Every user error (bad file, unknown model, bad sampling value, prompt too long,
malformed --ids) prints one line `jaxllm: error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import JaxllmError
from .loading.models import DEFAULT_MODEL, PACKAGED, WEIGHTS
from .sampling import SamplerSettings

EXIT_USAGE = 2


class CliError(Exception):
    pass


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load(args):
    from .loading.models import load  # noqa: PLC0415 - keep `--help` fast
    if args.calibration is not None and args.weights != "int4":
        raise CliError(f"--calibration applies to --weights int4, not {args.weights}")
    calibration = {None: "builtin", "none": None}.get(args.calibration, args.calibration)
    return load(args.model, verbose=True, weights=args.weights, calibration=calibration,
                tensor_parallel=args.tensor_parallel, kv_cache=args.kv_cache)


def _settings(args) -> SamplerSettings:
    if args.temperature == 0:
        return SamplerSettings.greedy(repetition_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
                                      frequency_penalty=args.frequency_penalty)
    return SamplerSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                           presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)


def _stream_completion(model, ids: list[int], **kw) -> list[int]:
    """Print one prompt's completion to stdout as it is generated; return its ids."""
    from .generate import generate_stream  # noqa: PLC0415
    from .harmony import reply_decoder  # noqa: PLC0415

    decoder, out, thought = reply_decoder(model.tokenizer), [], 0
    for chunk in generate_stream(model.params, model.config, [ids], chunk=4, **kw):
        out += chunk[0]
        text = decoder.push(chunk[0])
        if len(decoder.reasoning) > thought:  # a harmony reply's analysis channel: to stderr
            sys.stderr.write(decoder.reasoning[thought:])
            sys.stderr.flush()
            thought = len(decoder.reasoning)
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    return out


def cmd_generate(args) -> None:
    from .generate import generate  # noqa: PLC0415

    settings = _settings(args)  # validate before the slow load
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model = _load(args)
    prompts = [model.tokenizer.encode(p) for p in args.prompt]
    kw = dict(max_new_tokens=args.max_new_tokens, settings=settings, seed=args.seed)
    status(f"generating (batch {len(prompts)}, compiling on first use)...")
    start = time.perf_counter()
    if args.json or len(prompts) > 1:
        result = generate(model.params, model.config, prompts, **kw)
        from .harmony import decode_reply  # noqa: PLC0415
        for text, ids, out in zip(args.prompt, prompts, result.tokens):
            completion, reasoning = decode_reply(model.tokenizer, out)
            if args.json:
                print(json.dumps({"prompt": text, "prompt_ids": ids, "ids": out, "text": completion,
                                  **({"reasoning": reasoning} if reasoning else {})}), flush=True)
            else:
                print(completion + "\n", flush=True)
        n = sum(len(t) for t in result.tokens)
    else:
        n = len(_stream_completion(model, prompts[0], **kw))
    elapsed = time.perf_counter() - start
    status(f"{n} tokens in {elapsed:.1f}s (compilation included)")


def _parse_ids(text: str, vocab: int) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise CliError(f"--ids must be comma-separated integers, got {text!r}") from None
    if len(ids) < 2:
        raise CliError("--ids needs at least two token ids to score")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise CliError(f"--ids: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return ids


def cmd_score(args) -> None:
    if (args.text is None) == (args.ids is None):
        raise CliError("give either TEXT or --ids")
    model = _load(args)
    ids = (_parse_ids(args.ids, model.config.vocab_size) if args.ids is not None
           else model.tokenizer.encode(args.text))
    if len(ids) < 2:
        raise CliError("the text must have at least two tokens to score")
    from .scoring import score_ids  # noqa: PLC0415

    result = score_ids(model.params, model.config, ids)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(ids)} tokens, mean NLL {sum(result['nll']) / len(result['nll']):.4f}, "
              f"perplexity {result['ppl']:.4f}")


def cmd_tokenize(args) -> None:
    model = _load(args)
    ids = model.tokenizer.encode(args.text, add_bos=False if args.no_bos else None,
                                 parse_special=not args.no_bos)
    if args.json:
        print(json.dumps({"ids": ids, "pieces": [model.tokenizer.id_to_piece(i) for i in ids]}))
    else:
        print(" ".join(map(str, ids)))


def cmd_info(args) -> None:
    from . import quant  # noqa: PLC0415
    model = _load(args)
    c = model.config
    info = {
        "source": model.source, "architecture": c.arch, "parameters": c.param_count(),
        "layers": c.n_layers, "d_model": c.d_model, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "d_ff": c.d_ff, "vocab_size": c.vocab_size,
        "context_length": c.max_seq_len, "rope_theta": c.rope_theta if c.position == "rope" else None,
        "sliding_window": c.sliding_window, "tied_embeddings": c.tie_embeddings,
        "tensor_types": model.tensor_types, "file_bytes": model.file_bytes,
        "weight_bytes": quant.weight_bytes(model.params),
        "chat_template": model.chat_template is not None,
    }
    if c.n_experts:
        info.update(experts=c.n_experts, active_experts=c.n_active_experts, expert_d_ff=c.expert_d_ff)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:16s} {v}")


def cmd_chat(args) -> None:
    from .harmony import decode_reply  # noqa: PLC0415

    settings = _settings(args)
    model = _load(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        status("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits")
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = model.tokenizer.encode(model.apply_chat_template(messages))
        reply = _stream_completion(model, ids, max_new_tokens=args.max_new_tokens,
                                   settings=settings, seed=args.seed)
        messages.append({"role": "assistant", "content": decode_reply(model.tokenizer, reply)[0]})


def cmd_serve(args) -> None:
    try:
        from .server import serve  # noqa: PLC0415
    except ImportError as e:
        raise CliError(f"serving needs FastAPI, uvicorn and prometheus_client ({e.name} is missing): "
                       "pip install 'jaxllm[serve]'") from None
    if args.max_batch < 1:
        raise CliError("--max-batch must be >= 1")
    if args.max_context is not None and args.max_context < 2:
        raise CliError("--max-context must be >= 2")
    if args.max_request_bytes < 1024:
        raise CliError("--max-request-bytes must be >= 1024")
    if args.prefill_tokens < 1 or args.warm_prompts < 0:
        raise CliError("--prefill-tokens must be >= 1 and --warm-prompts >= 0")
    if args.kv_pages is not None and args.kv_memory is not None:
        raise CliError("give --kv-pages or --kv-memory, not both")
    if args.kv_memory is not None and not 0 < args.kv_memory <= 1:
        raise CliError("--kv-memory must be a fraction in (0, 1]")
    if args.page_size < 16 or args.page_size & (args.page_size - 1):
        raise CliError("--page-size must be a power of two >= 16")
    if args.kv_pages is not None and args.kv_pages < 2:
        raise CliError("--kv-pages must be >= 2")
    model = _load(args)
    model_id = os.path.basename(args.model.rstrip(os.sep))
    # Without a paged pool every slot holds a whole context.
    max_context = args.max_context or min(model.config.max_seq_len, 2048)
    kv_pages = args.kv_pages
    if args.kv_memory is not None:
        from .pages import device_pages  # noqa: PLC0415
        try:
            kv_pages = device_pages(model.config, model.params.embed.dtype, args.kv_memory, args.page_size)
        except ValueError as e:
            raise CliError(f"--kv-memory: {e}") from None
    if kv_pages is not None:
        status(f"KV cache: {kv_pages} pages of {args.page_size} positions "
               f"({(kv_pages - 1) * args.page_size:,} positions for all slots together)")
    status(f"compiling the decode loop for {args.max_batch} slots ...")
    serve(model, model_id, host=args.host, port=args.port, max_batch=args.max_batch,
          max_context=max_context, steps_per_chunk=args.steps_per_chunk, prefill_tokens=args.prefill_tokens,
          reuse_prefixes=not args.no_prefix_cache, warm_prompt_tokens=args.warm_prompts, api_key=args.api_key or None,
          metrics_key=args.metrics_key, max_body_bytes=args.max_request_bytes, kv_pages=kv_pages,
          page_size=args.page_size)


def _sampling_args(p) -> None:
    d = SamplerSettings()
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 disables")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1 disables")
    p.add_argument("--min-p", type=float, default=d.min_p, help="0 disables")
    p.add_argument("--repeat-penalty", type=float, default=d.repetition_penalty, help="1 disables")
    p.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                   help="subtracted once from each generated token's logit (OpenAI's; 0 disables)")
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                   help="subtracted per occurrence from each generated token's logit (OpenAI's; 0 disables)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="Run open-weight LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = (f"GGUF file, Hugging Face folder, or packaged name ({', '.join(PACKAGED)}); "
                  f"default {DEFAULT_MODEL}")

    def command(name, fn, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
        p.add_argument("--weights", default="file", choices=WEIGHTS,
                       help="file: keep a GGUF file's quantized tensors quantized (default); "
                            "dense: dequantize; int8/int4/fp8: quantize dense weights")
        p.add_argument("--calibration", metavar="TEXT_FILE",
                       help="int4: text whose activations weigh the rounding error (a bundled "
                            "text by default; 'none' weighs all inputs alike)")
        p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="split the model over N devices (jax.sharding)")
        p.add_argument("--kv-cache", default="auto", choices=["auto", "fp8"],
                       help="what the KV cache stores: the compute dtype (default) or float8 e4m3")
        p.set_defaults(fn=fn)
        return p

    p = command("generate", cmd_generate, "complete one or more prompts (one batch)")
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("prompt", nargs="+")

    p = command("score", cmd_score, "teacher-forced NLL and perplexity")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ids", help="comma-separated token ids instead of TEXT")
    p.add_argument("text", nargs="?")

    p = command("tokenize", cmd_tokenize, "token ids of a text")
    p.add_argument("--no-bos", action="store_true", help="no BOS and special tokens not parsed")
    p.add_argument("--json", action="store_true")
    p.add_argument("text")

    p = command("chat", cmd_chat, "interactive chat with the model's template")
    _sampling_args(p)
    p.add_argument("--system", help="system message")

    p = command("serve", cmd_serve, "OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch", type=int, default=8, help="slots: requests decoded together")
    p.add_argument("--max-context", type=int, help="tokens per slot (default: the model's, at most 2048)")
    p.add_argument("--steps-per-chunk", type=int, default=8,
                   help="decode steps between admitting new requests and streaming")
    p.add_argument("--prefill-tokens", type=int, default=8192,
                   help="prompt tokens (padded) prefilled together between decode chunks; "
                        "a longer prompt is prefilled in pieces of this size")
    p.add_argument("--kv-pages", type=int, metavar="N",
                   help="a paged KV cache: one pool of N pages shared by all slots, each request "
                        "holding the pages its prompt and max_tokens need (default: each slot its own "
                        "--max-context row)")
    p.add_argument("--kv-memory", type=float, metavar="FRACTION",
                   help="a paged KV cache filling FRACTION of the device memory left after the weights "
                        "(e.g. 0.9; GPUs)")
    p.add_argument("--page-size", type=int, default=64, help="positions per KV page (paged cache)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole, even when a slot still holds its beginning")
    p.add_argument("--warm-prompts", type=int, default=0, metavar="TOKENS",
                   help="before serving, compile the batched prefills of prompts up to TOKENS long "
                        "(else each new shape compiles on first use)")
    p.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"),
                   help="every /v1/ request needs 'Authorization: Bearer KEY' (default: $JAXLLM_API_KEY)")
    p.add_argument("--metrics-key", help="/metrics needs 'Authorization: Bearer KEY' (default: open)")
    p.add_argument("--max-request-bytes", type=int, default=8 << 20,
                   help="larger request bodies get 413 (default 8 MiB)")

    p = command("info", cmd_info, "architecture, sizes, tensor types, context length")
    p.add_argument("--json", action="store_true")
    return parser


def _keep_compiled_programs() -> None:
    """XLA's compiled programs persist between runs under ~/.cache/jaxllm/xla: a
    second `jaxllm generate` on the same model skips most of its compilation (README).
    JAX_COMPILATION_CACHE_DIR, when set, chooses the folder instead."""
    import jax  # noqa: PLC0415

    from .paths import cache_root  # noqa: PLC0415
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _keep_compiled_programs()
    try:
        args.fn(args)
    except (JaxllmError, CliError, ValueError) as e:
        # ValueError: invalid sampling values and context overflows, raised at the boundary.
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
