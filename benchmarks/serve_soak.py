"""A bounded soak of `jaxllm serve` over loopback HTTP: for a set time, client streams
send a mix of completions and chat calls (streamed and not, random lengths, greedy
and seeded sampling, a fifth cancelled mid-stream, a tenth bad) to a server whose
paged KV pool is small enough that requests wait for pages and running ones are
preempted. Then it checks what a deployer would:

- every request ended within its deadline: a complete answer (finish_reason length
  or stop, `length` answers exactly max_tokens long), an intended cancellation, or,
  for the bad ones, a 4xx with an OpenAI error body; nothing else, nothing hung;
- no page leaks: once idle, /metrics says no page is held by a running request and
  no request runs or waits (`jaxllm_kv_pages`, `jaxllm_running_requests`,
  `jaxllm_queue_length`), and the pool's own bookkeeping check passes;
- memory flat: the device's bytes in use, idle after a warm-up round and idle at the
  end, differ by less than --memory-slack (where the device reports it; the CPU
  does not);
- answers as alone: every greedy answer that was not cancelled is sent again alone
  afterwards and must come back the same (exact on the CPU in float32; on a GPU in
  bf16 a batch's rounding differs from one row's, so there the script counts the
  mismatches and --alone-check strict is for the CPU).

    python benchmarks/serve_soak.py --shape llama1b --seconds 180 --streams 48 \\
        --max-batch 32 --max-context 1024 --kv-pages 160 --out soak.json

Progress on stderr; a JSON summary (counts, preemptions, memory, failures) to --out.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from envelope import write_results  # noqa: E402
from serve_bench import HttpServer, load_model, log  # noqa: E402


@dataclass
class Outcome:
    """One request: what was asked and how it ended."""

    kind: str  # "completion", "chat", "bad"
    body: dict
    stream: bool
    cancel_after: int | None = None  # chunks read before closing the stream
    status: int = 200
    finish_reason: str | None = None
    text: str = ""
    completion_tokens: int | None = None
    error: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def bad_body(rng: random.Random, context: int) -> dict:
    """A request the server must refuse with a 4xx: past the context, or a bad field."""
    return rng.choice([
        {"model": "m", "prompt": [11] * (context + 8), "max_tokens": 4},
        {"model": "m", "prompt": "hi", "max_tokens": context * 4},
        {"model": "m", "prompt": "hi", "n": 9},
        {"model": "m", "prompt": "hi", "logprobs": 21},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
        {"model": "m", "messages": []},
    ])


def good_body(rng: random.Random, vocab: int, max_prompt: int, max_tokens: int, systems) -> tuple[str, dict]:
    """A completion on token ids (some starting with a shared system prompt) or a chat
    call; greedy (60%) or seeded sampling; random lengths."""
    tokens = rng.randint(1, max_tokens)
    sampling = ({"temperature": 0} if rng.random() < 0.6 else
                {"temperature": 0.9, "top_p": 0.95, "seed": rng.randint(0, 10**6)})
    if rng.random() < 0.7:
        own = [rng.randint(10, vocab - 10) for _ in range(rng.randint(1, max_prompt))]
        prefix = rng.choice(systems) if rng.random() < 0.5 else []
        prompt = (prefix + own)[:max_prompt]
        return "completion", {"model": "m", "prompt": prompt, "max_tokens": tokens, **sampling}
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "soak", "test"])
                     for _ in range(rng.randint(1, max_prompt // 4 + 1)))
    return "chat", {"model": "m", "messages": [{"role": "user", "content": words}],
                    "max_tokens": tokens, **sampling}


async def send(client, o: Outcome, timeout_s: float) -> None:
    """Make the call `o` describes; fill in how it ended."""
    import openai  # noqa: PLC0415
    t0 = time.perf_counter()
    chat = "messages" in o.body
    create = client.chat.completions.create if chat else client.completions.create
    extra = {k: v for k, v in o.body.items() if k not in ("model", "prompt", "messages", "max_tokens")}
    args = {"model": "m", "max_tokens": o.body.get("max_tokens"),
            **({"messages": o.body["messages"]} if chat else {"prompt": o.body.get("prompt")})}
    try:
        async with asyncio.timeout(timeout_s):
            if not o.stream:
                out = await create(**args, extra_body=extra)
                choice = out.choices[0]
                o.finish_reason = choice.finish_reason
                o.text = choice.message.content if chat else choice.text
                o.completion_tokens = out.usage.completion_tokens
            else:
                stream = await create(**args, extra_body=extra, stream=True, stream_options={"include_usage": True})
                chunks = 0
                async for chunk in stream:
                    if chunk.choices:
                        c = chunk.choices[0]
                        o.text += (c.delta.content or "") if chat else (c.text or "")
                        o.finish_reason = c.finish_reason or o.finish_reason
                        chunks += 1
                    if chunk.usage is not None:
                        o.completion_tokens = chunk.usage.completion_tokens
                    if o.cancel_after is not None and chunks >= o.cancel_after:
                        await stream.close()
                        o.finish_reason = "cancelled"
                        break
    except openai.APIStatusError as e:
        o.status = e.status_code
        o.error = str(e.body)[:300]
    except TimeoutError:
        o.status, o.error = 0, f"no answer in {timeout_s:.0f} s"
    except Exception as e:  # noqa: BLE001 - any other failure is a soak failure, named
        o.status, o.error = 0, f"{type(e).__name__}: {e}"[:300]
    o.seconds = time.perf_counter() - t0


def judge(o: Outcome) -> str | None:
    """What is wrong with how `o` ended, or None."""
    if o.kind == "bad":
        if not 400 <= o.status < 500:
            return f"a bad request got {o.status}: {o.error}"
        if "message" not in (o.error or ""):
            return f"a 4xx without an OpenAI error body: {o.error}"
        return None
    if o.status != 200:
        return f"{o.kind} failed ({o.status}): {o.error}"
    if o.finish_reason == "cancelled":
        return None
    if o.finish_reason not in ("length", "stop"):
        return f"{o.kind} ended with finish_reason {o.finish_reason!r}"
    if o.finish_reason == "length" and o.completion_tokens != o.body["max_tokens"]:
        return f"{o.kind} ended for length after {o.completion_tokens} of {o.body['max_tokens']} tokens"
    return None


async def soak_round(url: str, seconds: float, streams: int, seed: int, vocab: int, context: int,
                     max_prompt: int, max_tokens: int, timeout_s: float) -> list[Outcome]:
    """`streams` clients each sending one request after another for `seconds`."""
    from openai import AsyncOpenAI  # noqa: PLC0415
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout_s)
    sys_rng = random.Random(seed)
    systems = [[sys_rng.randint(10, vocab - 10) for _ in range(n)] for n in (max_prompt // 2, max_prompt // 3)]
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + seconds

    async def stream_of(i: int):
        rng = random.Random(seed * 1000 + i)
        first = True
        while time.perf_counter() < deadline:
            # Each stream's first request is bad (every fifth stream) or cancelled (the
            # next), so that a short soak has both; after that, chance decides.
            draw = (0.0 if i % 5 == 0 else 0.15 if i % 5 == 1 else 0.5) if first else rng.random()
            cancel_draw = 0.0 if first and i % 5 == 1 else rng.random()
            first = False
            if draw < 0.1:
                body = bad_body(rng, context)
                o = Outcome("bad", body, stream=rng.random() < 0.5)
            else:
                kind, body = good_body(rng, vocab, max_prompt, max_tokens, systems)
                cancel = cancel_draw < 0.2
                o = Outcome(kind, body, stream=cancel or rng.random() < 0.5,
                            cancel_after=rng.randint(1, 4) if cancel else None)
            outcomes.append(o)
            await send(client, o, timeout_s)
    await asyncio.gather(*(stream_of(i) for i in range(streams)))
    await client.close()
    return outcomes


def metric_values(url_root: str) -> dict:
    import urllib.request  # noqa: PLC0415

    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415
    with urllib.request.urlopen(url_root + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def idle_state(url_root: str, engine, wait_s: float = 60) -> dict:
    """/metrics once the server is idle (waits for the last cancellations to land)."""
    deadline = time.time() + wait_s
    while True:
        m = metric_values(url_root)
        pages = {dict(k[1]).get("use"): v for k, v in m.items() if k[0] == "jaxllm_kv_pages"}
        state = {"running_requests": m.get(("jaxllm_running_requests", ()), 0.0),
                 "queue_length": m.get(("jaxllm_queue_length", ()), 0.0),
                 "pages": pages, "preemptions": m.get(("jaxllm_preemptions_total", ()), 0.0)}
        if (state["running_requests"] == 0 and state["queue_length"] == 0 and pages.get("running", 0) == 0) \
                or time.time() > deadline:
            if engine.pool is not None:
                engine.pool.check()
            return state
        time.sleep(0.2)


def device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


async def alone(url: str, outcomes: list[Outcome], limit: int, timeout_s: float) -> list[tuple[Outcome, str]]:
    """The greedy, completed answers sent again one at a time: (outcome, text now)."""
    from openai import AsyncOpenAI  # noqa: PLC0415
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout_s)
    picked = [o for o in outcomes if o.kind != "bad" and o.status == 200 and o.finish_reason in ("length", "stop")
              and o.body.get("temperature") == 0][:limit]
    again = []
    for o in picked:
        redo = Outcome(o.kind, o.body, stream=False)
        await send(client, redo, timeout_s)
        again.append((o, redo.text))
    await client.close()
    return again


def soak(model, engine_kw: dict, seconds: float, streams: int, max_prompt: int, max_tokens: int,
         warm_seconds: float, alone_limit: int, memory_slack: int = 64 << 20, timeout_s: float = 300,
         seed: int = 0) -> dict:
    """Run the soak against `model` served with `engine_kw` (create_app's options); the
    summary, with "failures" listing every failed check."""
    server = HttpServer(model, engine_kw)
    url_root = f"http://127.0.0.1:{server.port}"
    context = engine_kw["max_context"]
    vocab = model.config.vocab_size
    summary: dict = {"seconds": seconds, "streams": streams, "engine": {k: v for k, v in engine_kw.items()}}
    failures: list[str] = []
    try:
        run = lambda secs, s: asyncio.run(soak_round(url_root + "/v1", secs, streams, s, vocab, context,
                                                     max_prompt, max_tokens, timeout_s))
        log(f"warm-up round ({warm_seconds:.0f} s) ...")
        run(warm_seconds, seed + 1)
        before = idle_state(url_root, server.engine)
        bytes_before = device_bytes()
        log(f"soak ({seconds:.0f} s, {streams} streams) ...")
        t0 = time.perf_counter()
        outcomes = run(seconds, seed)
        summary["wall_s"] = time.perf_counter() - t0
        after = idle_state(url_root, server.engine)
        bytes_after = device_bytes()
        for o in outcomes:
            if (wrong := judge(o)) is not None:
                failures.append(wrong)
        if after["running_requests"] or after["queue_length"] or after["pages"].get("running", 0):
            failures.append(f"not idle after the soak: {after}")
        if bytes_before is not None and abs(bytes_after - bytes_before) > memory_slack:
            failures.append(f"device memory moved {bytes_before} -> {bytes_after} bytes")
        log(f"alone check ({alone_limit} greedy answers) ...")
        again = asyncio.run(alone(url_root + "/v1", outcomes, alone_limit, timeout_s))
        mismatched = [o for o, text in again if text != o.text]
        ends = {}
        for o in outcomes:
            key = o.kind if o.kind == "bad" else o.finish_reason if o.status == 200 else f"error {o.status}"
            ends[key] = ends.get(key, 0) + 1
        summary.update({
            "requests": len(outcomes), "ends": ends,
            "streamed": sum(o.stream for o in outcomes),
            "output_tokens": sum(o.completion_tokens or 0 for o in outcomes),
            "preemptions": after["preemptions"] - before["preemptions"],
            "idle_before": before, "idle_after": after,
            "device_bytes_before": bytes_before, "device_bytes_after": bytes_after,
            "alone_checked": len(again), "alone_mismatched": len(mismatched),
            "alone_mismatch_examples": [{"body": o.body, "served": o.text, "alone": t}
                                        for o, t in again if t != o.text][:3],
            "slowest_request_s": max((o.seconds for o in outcomes), default=0.0)})
        summary["failures"] = failures
    finally:
        server.stop()
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama1b", help="a preset shape of random weights")
    p.add_argument("--model", help="a model file or folder instead of --shape")
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--warm-seconds", type=float, default=30, help="a first round, not judged for memory")
    p.add_argument("--streams", type=int, default=48, help="clients sending at once")
    p.add_argument("--max-prompt", type=int, default=600, help="longest prompt (tokens)")
    p.add_argument("--max-tokens", type=int, default=300, help="largest max_tokens asked")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--steps-per-chunk", type=int, default=8)
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--kv-pages", type=int, default=160, help="small enough that requests wait and are preempted")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--memory-slack", type=int, default=64 << 20, help="bytes the idle device memory may move")
    p.add_argument("--alone-limit", type=int, default=64, help="greedy answers sent again alone")
    p.add_argument("--alone-check", choices=["strict", "count"], default="count",
                   help="strict: a greedy answer unlike its alone one fails (float32 on the CPU)")
    p.add_argument("--out", help="summary JSON")
    args = p.parse_args(argv)
    model = load_model(args)
    engine_kw = dict(max_batch=args.max_batch, max_context=args.max_context, steps_per_chunk=args.steps_per_chunk,
                     prefill_tokens=args.prefill_tokens, kv_pages=args.kv_pages, page_size=args.page_size)
    summary = soak(model, engine_kw, args.seconds, args.streams, args.max_prompt, args.max_tokens,
                   args.warm_seconds, args.alone_limit, args.memory_slack)
    if args.alone_check == "strict" and summary["alone_mismatched"]:
        summary["failures"].append(f"{summary['alone_mismatched']} greedy answers differ from their alone ones")
    write_results("serve_soak.py", argv, [summary], args.out)
    log(json.dumps({k: v for k, v in summary.items() if k != "alone_mismatch_examples"}, indent=1, default=str))
    for f in summary["failures"][:20]:
        log(f"FAILED: {f}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
