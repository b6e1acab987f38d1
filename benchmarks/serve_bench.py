"""Serving throughput and latency: the serving benchmarks' workloads against jaxllm's
engine, in-process or through its HTTP server.

    python benchmarks/serve_bench.py --shape llama8b --workloads 1024/256x256,128/128x2048 \
        --max-batch 256 --max-context 2048 --drivers engine,http --out X.json

A workload IN/OUTxN is N requests of IN random prompt tokens that each generate
exactly OUT tokens (`ignore_eos`, as vLLM's benchmark asks). Modes: offline (all N
submitted at once: output tokens/s over the whole run) and online (`--concurrency
C` streams, each sending its next request when its last ends, or with `--request-rate
R` requests sent at R per second, Poisson, at most C in flight, as vLLM's benchmark
sends them; IN/OUTxN@C runs that workload online at C streams whatever --modes
says). `--shared-prefix P`
starts every prompt with the same P tokens (a system prompt) and runs the workload
with the prefix cache on and off.

Models: a random-weight model of a preset shape (`--shape`, bf16; speed does not
depend on the values) with a placeholder vocabulary of the shape's size, or a real
file (`--model`). Drivers: `engine` submits `batching.Request`s to an Engine in this
process; `http` starts `jaxllm serve`'s app on loopback and streams
/v1/completions through the official OpenAI client (token ids as the prompt).

Servers in processes of their own: `--engine llama-server` runs the same workloads
through the same HTTP driver against llama.cpp's server on the same GPU (one slot per
--max-batch, each of --max-context, flash attention, every layer on the GPU), built
from the tarball `benchmarks/llamacpp_peer.py pack` writes, on a random-weight F16
GGUF of the shape; `--engine jaxllm-server` starts `jaxllm serve` on that same file,
as a user would. One after the other in the same call (each holds the GPU memory):

    python benchmarks/serve_bench.py --engine llama-server --prepare-only  # build, write the GGUF
    python benchmarks/serve_bench.py --engine jaxllm-server --kv-memory 0.8 ... --out jax.json
    python benchmarks/serve_bench.py --engine llama-server ... --out peer.json

Each row: {"bench": "serve", "engine": "jaxllm" or "llama.cpp", "driver", "shape", "weights",
"workload", "mode", "concurrency", "requests", "output_tok_s", "ttft_ms_p50",
"ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", ...}. TTFT: submission to the first
token. ITL: the gap between two deliveries of a request divided by the tokens the
later one brought (the engine delivers a chunk of tokens at a time), over every
delivery of every request. Each workload runs once unmeasured first (it compiles
the batched prefill's shapes). Progress on stderr, a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from envelope import write_results

import jaxllm
from jaxllm.batching import Engine, Request
from jaxllm.tokenizer import TextTokenizer


# Older checkouts (a before/after run on one device) lack ignore_eos and the
# engine's admission options: without them, a random model's rare stop token ends
# a request early, which the output token counts show.
IGNORE_EOS = {"ignore_eos": True} if "ignore_eos" in Request.__dataclass_fields__ else {}
ENGINE_OPTIONS = set(inspect.signature(Engine).parameters)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def placeholder_tokenizer(vocab_size: int, eos: int) -> TextTokenizer:
    """A vocabulary of `vocab_size` pieces "<i>" (decoding is what the server does with them)."""
    from tokenizers import Tokenizer, decoders  # noqa: PLC0415
    from tokenizers.models import WordLevel  # noqa: PLC0415

    tok = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.decoder = decoders.Fuse()
    return TextTokenizer(tok, None, False, (eos,), frozenset())


def load_model(args) -> jaxllm.Model:
    if args.model:
        return jaxllm.load(args.model)
    config = jaxllm.PRESETS[args.shape]
    log(f"random {args.shape} weights (bf16) ...")
    params = jax.block_until_ready(jaxllm.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
    eos = config.eos_token_ids[0] if config.eos_token_ids else 0
    return jaxllm.Model(config, params, placeholder_tokenizer(config.vocab_size, eos), None, args.shape)


@dataclass
class Trace:
    """One request's deliveries: (seconds since submission, tokens so far)."""

    submitted: float
    events: list[tuple[float, int]] = field(default_factory=list)


def prompts_of(rng, n: int, length: int, vocab: int, prefix: list[int]) -> list[list[int]]:
    own = length - len(prefix)
    return [prefix + rng.integers(10, vocab - 10, own).tolist() for _ in range(n)]


# -- drivers ---------------------------------------------------------------------------

def arrivals(rng, n: int, rate: float | None) -> list[float]:
    """When each of n requests is sent, in seconds from the start: a Poisson process of
    `rate` requests per second (vLLM's --request-rate), or all at once (None)."""
    return [0.0] * n if not rate else np.cumsum(rng.exponential(1 / rate, n)).tolist()


def drive_engine(engine: Engine, prompts, out_tokens: int, concurrency: int, starts: list[float]) -> list[Trace]:
    """Submit `prompts` (prompt i not before starts[i] seconds, at most `concurrency`
    in flight); every request's trace."""
    traces = [Trace(0.0) for _ in prompts]
    free = threading.Semaphore(concurrency)
    finished = threading.Semaphore(0)

    def update(i):
        def on_update(request, text, reason):
            now = time.perf_counter()
            if request.ids and (not traces[i].events or traces[i].events[-1][1] != len(request.ids)):
                traces[i].events.append((now - traces[i].submitted, len(request.ids)))
            if reason is not None:
                if reason not in ("length", "stop"):
                    log(f"request {i} ended: {reason} {request.error or ''}")
                free.release()
                finished.release()
        return on_update

    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        time.sleep(max(0.0, t0 + starts[i] - time.perf_counter()))
        free.acquire()
        traces[i].submitted = time.perf_counter()
        engine.submit(Request(prompt, out_tokens, on_update=update(i), **IGNORE_EOS))
    for _ in prompts:
        finished.acquire()
    return traces


def drive_http(url: str, prompts, out_tokens: int, concurrency: int, starts: list[float],
               model: str = "m") -> list[Trace]:
    from openai import AsyncOpenAI  # noqa: PLC0415

    async def main():
        client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        gate = asyncio.Semaphore(concurrency)
        traces = [Trace(0.0) for _ in prompts]

        async def one(i, prompt):
            await asyncio.sleep(max(0.0, t0 + starts[i] - time.perf_counter()))
            async with gate:
                trace = traces[i]
                trace.submitted = time.perf_counter()
                stream = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=out_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                pieces = 0
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        pieces += 1
                        trace.events.append((time.perf_counter() - trace.submitted, pieces))
                    if chunk.usage is not None:
                        # the pieces' token counts are not streamed: spread the total evenly
                        total = chunk.usage.completion_tokens
                        trace.events = [(t, round(total * k / max(pieces, 1))) for t, k in trace.events]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        await client.close()
        return traces
    return asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpServer:
    """`jaxllm serve`'s app on a loopback port, on a thread."""

    def __init__(self, model, engine_kw: dict):
        import uvicorn  # noqa: PLC0415

        from jaxllm.server import create_app  # noqa: PLC0415
        self.port = free_port()
        app = create_app(model, "m", **engine_kw)
        self.engine = app.state.engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join()


def llama_server_files(args) -> tuple[str, str]:
    """llama-server built (kept in --llamacpp-work once built) and the shape's random F16
    GGUF written there: (the program, the model file)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import llamacpp_peer  # noqa: PLC0415
    os.makedirs(args.llamacpp_work, exist_ok=True)
    bin_dir = llamacpp_peer.build(args.llamacpp_source, args.llamacpp_work, os.cpu_count(), server=True)
    model = llamacpp_peer.model_path(args.llamacpp_work, args.shape, jaxllm.PRESETS[args.shape], "F16")
    return os.path.join(bin_dir, "llama-server"), model


class ServerProcess:
    """A server program on a loopback port, its output in `log_path`; ready once its
    /health answers 200."""

    def __init__(self, cmd: list[str], port: int, log_path: str, timeout_s: float = 1200):
        self.port, self.log_path = port, log_path
        log(" ".join(cmd))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({self.proc.returncode}): {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"{cmd[0]} not ready in {timeout_s:.0f} s: {self.tail()}")
            time.sleep(0.5)

    def tail(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-2000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def llama_server(program: str, model: str, args) -> ServerProcess:
    """llama.cpp's server: --max-batch slots of --max-context each, flash attention,
    every layer on the GPU."""
    port = free_port()
    return ServerProcess([program, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-ngl", "99",
                          "-fa", "on", "-np", str(args.max_batch), "-c", str(args.max_batch * args.max_context),
                          "--no-webui"], port, model + ".llama-server.log")


def jaxllm_server(model: str, args) -> ServerProcess:
    """`jaxllm serve` as its users start it, in a process of its own."""
    port = free_port()
    pool = ([] if args.kv_memory is None and args.kv_pages is None else
            ["--kv-memory", str(args.kv_memory)] if args.kv_memory else ["--kv-pages", str(args.kv_pages)])
    cmd = [sys.executable, "-m", "jaxllm", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-context", str(args.max_context),
           "--steps-per-chunk", str(args.steps_per_chunk), "--prefill-tokens", str(args.prefill_tokens),
           *pool, *(["--page-size", str(args.page_size)] if pool else [])]
    return ServerProcess(cmd, port, model + ".jaxllm-serve.log")


# -- figures ---------------------------------------------------------------------------

def summarize(traces: list[Trace], seconds: float) -> dict:
    tokens = sum(t.events[-1][1] for t in traces if t.events)
    ttft = [t.events[0][0] * 1e3 for t in traces if t.events]
    itl = []
    for t in traces:
        for (t0, n0), (t1, n1) in zip(t.events, t.events[1:]):
            if n1 > n0:
                itl += [(t1 - t0) * 1e3 / (n1 - n0)] * (n1 - n0)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
    return {"output_tokens": tokens, "seconds": seconds, "output_tok_s": tokens / seconds,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99)}


def measure(run, spec: str, modes: str, streams: list[int], vocab: int, rng, prefix, warm_passes: int,
            row_of, on_row, warm_wave: int | None = None, rate: float | None = None) -> list[dict]:
    """Each mode (and each stream count online) of one workload: warm-up passes (one
    wave of at most `warm_wave` requests where given, else the workload's), then one
    measured pass; a row each, handed to on_row as soon as measured. A workload written
    IN/OUTxN@C runs online at C streams whatever the modes say. Online, requests are
    sent at `rate` per second (Poisson) where given, else as fast as the streams allow."""
    spec, _, at = spec.partition("@")
    lengths, n = spec.split("x")
    n_in, n_out = map(int, lengths.split("/"))
    runs = [("online", int(at))] if at else \
        [(mode, c) for mode in modes.split(",") for c in ([int(n)] if mode == "offline" else streams)]
    rows = []
    for mode, concurrency in runs:
        for _ in range(warm_passes):
            log(f"  {spec} {mode} {concurrency}: warm-up pass ...")
            warm_n = min(int(n), warm_wave) if warm_wave else int(n)
            run(prompts_of(rng, warm_n, n_in, vocab, prefix), n_out, concurrency,
                arrivals(rng, warm_n, rate if mode == "online" else None))
        log(f"  {spec} {mode} {concurrency}: measuring ...")
        prompts = prompts_of(rng, int(n), n_in, vocab, prefix)
        t0 = time.perf_counter()
        traces = run(prompts, n_out, concurrency, arrivals(rng, int(n), rate if mode == "online" else None))
        row = {"bench": "serve", **row_of(), "workload": f"{n_in}/{n_out}", "mode": mode,
               "concurrency": concurrency, "request_rate": rate if mode == "online" else None,
               "requests": int(n), **summarize(traces, time.perf_counter() - t0)}
        rows.append(row)
        on_row(row)
        log(f"  {row['output_tok_s']:,.0f} tok/s, TTFT p50 {row['ttft_ms_p50']:.0f} ms")
    return rows


def bench_jaxllm(args, rng) -> list[dict]:
    model = load_model(args)
    kv_pages = args.kv_pages
    if args.kv_memory:
        from jaxllm.pages import device_pages  # noqa: PLC0415
        kv_pages = device_pages(model.config, model.params.embed.dtype, args.kv_memory, args.page_size)
    paged = {} if kv_pages is None else {"kv_pages": kv_pages, "page_size": args.page_size}
    label = args.shape if not args.model else args.model
    rows = []
    for spec in args.workloads.split(","):
        prefix = rng.integers(10, model.config.vocab_size - 10, args.shared_prefix).tolist()
        for driver in args.drivers.split(","):
            for reuse in [True, False] if args.shared_prefix else [True]:
                engine_kw = dict(max_batch=args.max_batch, max_context=args.max_context,
                                 steps_per_chunk=args.steps_per_chunk, prefill_tokens=args.prefill_tokens,
                                 reuse_prefixes=reuse, **paged)
                log(f"{driver}: starting the engine ({args.max_batch} slots x {args.max_context}"
                    + (f", {kv_pages} pages of {args.page_size}) ..." if paged else ") ..."))
                t0 = time.perf_counter()
                if driver == "http":
                    server = HttpServer(model, engine_kw)
                    run = lambda ps, n_out, c, starts: drive_http(f"http://127.0.0.1:{server.port}/v1", ps, n_out, c,
                                                                  starts)
                else:
                    engine_kw["n_slots"] = engine_kw.pop("max_batch")
                    engine_kw = {k: v for k, v in engine_kw.items() if k in ENGINE_OPTIONS}
                    engine = Engine(model.params, model.config, model.tokenizer, **engine_kw).start()
                    run = lambda ps, n_out, c, starts: drive_engine(engine, ps, n_out, c, starts)
                log(f"  ready in {time.perf_counter() - t0:.1f} s")
                row_of = lambda: {"engine": "jaxllm", "driver": driver, "shape": label,
                                  "weights": "bf16" if not args.model else "file", "max_batch": args.max_batch,
                                  "max_context": args.max_context, "prefill_tokens": args.prefill_tokens,
                                  "shared_prefix": args.shared_prefix, "prefix_cache": reuse,
                                  "kv_pages": kv_pages, "page_size": args.page_size if paged else None}
                # Each pass compiles the batched prefill's shapes it meets; a shared prefix
                # meets the cache from the second pass on, whose admissions compile there.
                warm = 0 if args.no_warm_pass else 2 if args.shared_prefix and reuse else 1
                try:
                    rows += measure(run, spec, args.modes, args.streams, model.config.vocab_size, rng, prefix,
                                    warm, row_of, args.on_row, warm_wave=args.warm_requests, rate=args.request_rate)
                finally:
                    if driver == "http":
                        server.stop()
                    else:
                        engine.shutdown()
    return rows


def vocab_of(model: str) -> int:
    """A model file's or folder's vocabulary size, from its metadata alone."""
    if os.path.isdir(model):
        import json  # noqa: PLC0415
        with open(os.path.join(model, "config.json")) as f:
            return json.load(f)["vocab_size"]
    from jaxllm.loading.gguf import GGUFFile, config_from_gguf  # noqa: PLC0415
    return config_from_gguf(GGUFFile(model)).vocab_size


def bench_server(args, rng) -> list[dict]:
    """The workloads against a server in a process of its own: llama.cpp's (on the
    shape's random F16 GGUF) or `jaxllm serve` (on the same file, or --model)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llamacpp_peer import SERVER_VERSION, cuda_version  # noqa: PLC0415
    program, gguf = llama_server_files(args) if args.engine == "llama-server" or not args.model else (None, None)
    model = args.model or gguf
    t0 = time.perf_counter()
    if args.engine == "llama-server":
        server = llama_server(program, model, args)
        about = {"engine": "llama.cpp", "version": SERVER_VERSION.format(cuda=cuda_version()),
                 "weights": "F16", "prefix_cache": "cache_prompt (llama-server's default)"}
    else:
        server = jaxllm_server(model, args)
        about = {"engine": "jaxllm", "weights": "F16 file, bf16", "prefill_tokens": args.prefill_tokens,
                 "steps_per_chunk": args.steps_per_chunk, "kv_memory": args.kv_memory, "kv_pages": args.kv_pages,
                 "page_size": args.page_size, "prefix_cache": True}
    log(f"{args.engine} ready in {time.perf_counter() - t0:.1f} s")
    vocab = vocab_of(model) if args.model else jaxllm.PRESETS[args.shape].vocab_size
    served_as = os.path.basename(model.rstrip(os.sep))  # jaxllm serve's model id (llama-server takes any)
    run = lambda ps, n_out, c, starts: drive_http(f"http://127.0.0.1:{server.port}/v1", ps, n_out, c, starts,
                                                  served_as)
    row_of = lambda: {**about, "driver": "http (own process)", "shape": args.shape, "model": model,
                      "max_batch": args.max_batch, "max_context": args.max_context,
                      "shared_prefix": args.shared_prefix}
    rows = []
    try:
        for spec in args.workloads.split(","):
            prefix = rng.integers(10, vocab - 10, args.shared_prefix).tolist()
            # llama-server compiles nothing on first use: a short pass warms it (with a
            # shared prefix its slots then hold the prefix, as jaxllm's cache does).
            # jaxllm's passes compile the batched prefill's shapes they meet.
            warm = 0 if args.no_warm_pass else 2 if args.shared_prefix and args.engine != "llama-server" else 1
            rows += measure(run, spec, args.modes, args.streams, vocab, rng, prefix, warm, row_of, args.on_row,
                            warm_wave=args.warm_requests or (args.max_batch if args.engine == "llama-server" else None),
                            rate=args.request_rate)
    finally:
        server.stop()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="jaxllm", choices=["jaxllm", "jaxllm-server", "llama-server"],
                   help="jaxllm: in this process (--drivers); jaxllm-server: `jaxllm serve` in a process "
                        "of its own on the shape's F16 GGUF (or --model); llama-server: llama.cpp's, on that file")
    p.add_argument("--shape", default="llama8b", help="a preset shape of random weights")
    p.add_argument("--model", help="a model file or folder instead of --shape (jaxllm)")
    p.add_argument("--workloads", default="1024/256x256",
                   help="IN/OUTxREQUESTS (or IN/OUTxREQUESTS@STREAMS: online), comma-separated")
    p.add_argument("--modes", default="offline", help="offline and/or online")
    p.add_argument("--concurrency", default="32", help="streams in online mode, comma-separated")
    p.add_argument("--request-rate", type=float,
                   help="online: requests sent at this rate per second (Poisson arrivals, at most --concurrency "
                        "in flight) instead of each stream's next as soon as its last ends")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    p.add_argument("--drivers", default="engine", help="engine and/or http (jaxllm)")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--steps-per-chunk", type=int, default=8)
    p.add_argument("--prefill-tokens", type=int, default=8192)
    p.add_argument("--kv-pages", type=int, help="a paged KV cache of this many pages (jaxllm serve --kv-pages)")
    p.add_argument("--kv-memory", type=float, help="a paged KV cache in this fraction of the free device memory")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--no-warm-pass", action="store_true", help="measure the first pass (compiles included)")
    p.add_argument("--warm-requests", type=int,
                   help="requests in a warm-up pass (default: the workload's; llama-server's: --max-batch): "
                        "a long workload's shapes are met by its first waves")
    p.add_argument("--llamacpp-source", default=".peer/llama.cpp.tar.gz",
                   help="llama.cpp's trimmed tree (benchmarks/llamacpp_peer.py pack)")
    p.add_argument("--llamacpp-work", default=".peerwork", help="llama-server's build and the model file")
    p.add_argument("--prepare-only", action="store_true",
                   help="--engine llama-server: build the server and write the model file, then stop")
    p.add_argument("--out", help="results JSON")
    args = p.parse_args(argv)
    args.streams = [int(c) for c in args.concurrency.split(",")]
    if args.prepare_only:
        program, model = llama_server_files(args)
        log(f"ready: {program} {model}")
        return 0
    rng = np.random.default_rng(0)
    measured = []
    # The results file is rewritten after every row: a run cut short keeps what it measured.
    args.on_row = lambda row: (measured.append(row), write_results("serve_bench.py", argv, measured, args.out))
    rows = (bench_jaxllm if args.engine == "jaxllm" else bench_server)(args, rng)
    print(f"{'engine':9} {'driver':6} {'workload':10} {'mode':8} {'conc':>5} {'cache':>5} {'tok/s':>9} {'TTFT p50':>9} "
          f"{'p99':>8} {'ITL p50':>8} {'p99':>7}")
    for r in rows:
        print(f"{r['engine']:9} {r['driver']:6} {r['workload']:10} {r['mode']:8} {r['concurrency']:5d} "
              f"{str(r['prefix_cache'])[:5]:>5} {r['output_tok_s']:9,.0f} {r['ttft_ms_p50']:9.1f} "
              f"{r['ttft_ms_p99']:8.1f} {r['itl_ms_p50']:8.2f} {r['itl_ms_p99']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
