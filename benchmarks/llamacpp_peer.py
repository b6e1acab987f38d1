"""llama.cpp's decode and prefill speed on the GPU at hand, written as a peer-figures
file in the format of ../shared/anchors/*.json, so that scripts/bench.py can judge
jaxllm against llama.cpp on the same device (`--anchors FILE`).

It measures what the shared anchors measured: llama.cpp as vendored in
llama-cpp-python 0.3.36 (commit 0c1e570), built for sm_90 with CUDA, flash attention
on, every layer on the GPU, `llama-bench -p 512 -n 128 -r 3`, on GGUF files of random
weights with the anchors' shapes (speed does not depend on the values). F16 files are
written directly (benchmarks/random_gguf.py); Q8_0, Q4_0 and Q4_1 files come from
llama-quantize's default rules. The mixture-of-experts shapes (`--shapes
qwen3moe30b,gptoss20b`, jaxllm's presets) are written directly in each type measured
(`PRESET_TYPES`; gpt-oss's experts in MXFP4, as its files ship).

    # here, where PyPI can be reached: a trimmed source tree (~9 MB) to carry
    python benchmarks/llamacpp_peer.py pack --out .peer/llama.cpp.tar.gz
    # on the GPU machine: build, write models, measure; the JSON is rewritten after
    # every measurement, so a run cut short keeps what it measured
    python benchmarks/llamacpp_peer.py run --source .peer/llama.cpp.tar.gz \\
        --work .peerwork --out anchors.json --datasheet-tbps 4.8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from random_gguf import write_random_gguf  # noqa: E402

SHARED_ANCHORS = os.path.join(HERE, "..", "..", "shared", "anchors", "h100-2026-11-23.json")
SDIST = "llama-cpp-python==0.3.36"
VERSION = "llama.cpp as vendored in llama-cpp-python 0.3.36 (commit 0c1e570), {build}, llama-bench -p 512 -n 128 -r 3"
GPU_BUILD = "CUDA {cuda}, sm_90, flash attention on, all layers on GPU"
SERVER_VERSION = ("llama-server of llama.cpp as vendored in llama-cpp-python 0.3.36 (commit 0c1e570), "
                  "CUDA {cuda}, sm_90, -fa on -ngl 99, one slot per stream")
# Parts of the tree llama-bench and llama-quantize do not need: vocabularies, docs,
# tests, other backends. What is left packs to ~9 MB (the sdist is 77 MB).
PRUNE = ("models", "docs", "media", "tests", "benches", "examples", ".git", "tools/server/public",
         "ggml/src/ggml-sycl", "ggml/src/ggml-vulkan", "ggml/src/ggml-opencl",
         "ggml/src/ggml-metal", "ggml/src/ggml-hexagon")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_OPENSSL=OFF"]
# llama-server (benchmarks/serve_bench.py's peer) without its web UI: the UI's assets
# come from npm or a download, neither of which the GPU machine reaches; the server
# then embeds an empty asset table and its API is unchanged.
SERVER_FLAGS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
# The quantized types the shared anchors list, per shape (from llama-quantize).
QUANT_TYPES = {"smol135m": ("Q8_0", "Q4_1", "Q4_0"), "llama1b": ("Q8_0", "Q4_0"),
               "llama8b": ("Q8_0", "Q4_0")}
# The mixture-of-experts shapes' files, each written directly (random_gguf.py) and
# removed once measured: qwen3moe30b in F16 is 61 GB of a 64 GB disk.
PRESET_TYPES = {"qwen3moe30b": ("Q8_0", "F16"), "gptoss20b": ("MXFP4", "F16")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pack(out: str) -> None:
    """Download the sdist and write the trimmed llama.cpp tree as a .tar.gz."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", tmp], check=True)
        (sdist,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        with tarfile.open(sdist) as t:
            t.extractall(tmp, filter="data")
        (tree,) = glob.glob(os.path.join(tmp, "llama_cpp_python-*", "vendor", "llama.cpp"))
        pruned = {os.path.join("llama.cpp", p) for p in PRUNE}

        def keep(info: tarfile.TarInfo):
            return None if any(info.name == p or info.name.startswith(p + "/") for p in pruned) else info

        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with tarfile.open(out, "w:gz") as t:
            t.add(tree, arcname="llama.cpp", filter=keep)
    log(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)")


def build(source: str, work: str, jobs: int, cuda: bool = True, server: bool = False) -> str:
    """llama-bench and llama-quantize (and llama-server where asked) built under
    work/build (kept if already there); the folder of the programs."""
    bin_dir = os.path.join(work, "build", "bin")
    targets = ["llama-bench", "llama-quantize"] + (["llama-server"] if server else [])
    if all(os.path.exists(os.path.join(bin_dir, b)) for b in targets):
        return bin_dir
    tree = os.path.join(work, "llama.cpp")
    if not os.path.isdir(tree):
        with tarfile.open(source) as t:
            t.extractall(work, filter="data")
    flags = CMAKE_FLAGS if cuda else [f for f in CMAKE_FLAGS if "CUDA" not in f]
    flags += SERVER_FLAGS if server else ["-DLLAMA_BUILD_SERVER=OFF"]
    log(f"building llama.cpp ({'CUDA' if cuda else 'CPU only'}, {jobs} jobs) ...")
    t0 = time.time()
    subprocess.run(["cmake", "-S", tree, "-B", os.path.join(work, "build"), "-G", "Ninja", *flags],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", os.path.join(work, "build"), "--target", *targets, "-j", str(jobs)],
                   check=True, stdout=subprocess.DEVNULL)
    log(f"built in {time.time() - t0:.0f} s")
    return bin_dir


def shape_config(name: str, anchors: dict):
    """The named shape as a ModelConfig: an anchors file's (Llama architecture), else a
    jaxllm preset (the mixture-of-experts shapes, which the anchors do not have)."""
    from jaxllm.config import PRESETS, ModelConfig  # noqa: PLC0415
    if name not in anchors:
        return PRESETS[name]
    s = anchors[name]
    return ModelConfig(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["layers"], n_heads=s["heads"],
                       n_kv_heads=s["kv_heads"], d_ff=s["d_ff"], rope_theta=s["rope_theta"], max_seq_len=8192,
                       tie_embeddings=bool(s.get("tied_embeddings")), kernels="xla", arch="llama")


def model_path(work: str, name: str, config, kind: str) -> str:
    """work/NAME-KIND.gguf, written first if it is not there: F16, or (a preset's files)
    every matrix in Q8_0, or the experts in MXFP4 and the rest F16 (as gpt-oss ships)."""
    path = os.path.join(work, f"{name}-{kind}.gguf")
    if not os.path.exists(path):
        free, need = shutil.disk_usage(work).free, _file_bytes(config, kind)
        if free < need + (1 << 30):
            raise OSError(f"{need / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free")
        log(f"{name}: writing random {kind} GGUF ({need / 1e9:.1f} GB) ...")
        matrices = "Q8_0" if kind == "Q8_0" else "F16"
        write_random_gguf(path + ".part", config, matrices, "MXFP4" if kind == "MXFP4" else matrices)
        os.replace(path + ".part", path)
    return path


def _file_bytes(config, kind: str) -> float:
    """About the size of model_path's file: its parameters at the type's bytes each."""
    per_weight = {"F16": 2.0, "Q8_0": 34 / 32, "MXFP4": 17 / 32}[kind]
    experts = 3 * config.n_layers * config.n_experts * config.d_model * config.expert_d_ff if config.n_experts else 0
    rest = config.param_count() - experts
    return experts * per_weight + rest * (34 / 32 if kind == "Q8_0" else 2.0)


def llama_bench(bin_dir: str, model: str, gpu: bool, extra: list[str]) -> dict:
    """tg128 and pp512 tok/s (mean of -r 3) from llama-bench's JSON output."""
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", model, "-p", "512", "-n", "128", "-r", "3",
           "-o", "json", *(["-fa", "1", "-ngl", "99"] if gpu else []), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    figures = {}
    for rec in json.loads(out):
        key = "tg128" if rec["n_gen"] else "pp512"
        figures[key] = rec["avg_ts"]
        figures[key + "_stddev"] = rec["stddev_ts"]
        figures["gpu_info"] = rec.get("gpu_info")
    return figures


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[0]
        name, driver = (s.strip() for s in out.split(","))
        return f"{name} (driver {driver})"
    except (OSError, subprocess.CalledProcessError):
        return "CPU"


def cuda_version() -> str:
    try:
        out = subprocess.run(["nvcc", "--version"], check=True, capture_output=True, text=True).stdout
        return out.split("release ")[1].split(",")[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "none"


def run(args) -> dict:
    t_end = time.time() + args.deadline_s
    anchors = json.load(open(args.shapes_from))["shapes"]
    configs = {s: shape_config(s, anchors) for s in args.shapes.split(",")}
    shapes = {s: anchors.get(s, {"preset": s, "arch": c.arch, "layers": c.n_layers, "d_model": c.d_model,
                                 "experts": c.n_experts, "active_experts": c.n_active_experts,
                                 "expert_d_ff": c.expert_d_ff, "vocab": c.vocab_size})
              for s, c in configs.items()}
    os.makedirs(args.work, exist_ok=True)
    gpu = not args.cpu
    # The anchor shapes' F16 files are written while llama.cpp compiles (numpy and the
    # disk, not the cores).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        building = pool.submit(build, args.source, args.work, args.jobs, gpu)
        for shape in shapes:
            if shape in anchors:
                model_path(args.work, shape, configs[shape], "F16")
        bin_dir = building.result()
    device = device_name()
    report = {
        "what": (f"Decode (tg128) and prefill (pp512) tokens/s of llama.cpp on one {device}, "
                 "batch 1, random weights of real architecture shapes; written by "
                 "benchmarks/llamacpp_peer.py"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "command": " ".join(["python", "benchmarks/llamacpp_peer.py", *sys.argv[1:]]),
        "ceilings_measured": {"datasheet_hbm_TBps": args.datasheet_tbps},
        "shapes": shapes,
        "llama_cpp": {"version": VERSION.format(build=GPU_BUILD.format(cuda=cuda_version()) if gpu
                                                else "CPU build"),
                      "tg128": {}, "pp512": {}, "stddev": {}},
    }
    jobs = [(s, "F16") for s in shapes if s in anchors]
    jobs += [(s, q) for s in shapes for q in QUANT_TYPES.get(s, ()) if q in args.types.split(",")]
    preset_types = args.preset_types.split(",") if args.preset_types else None
    jobs += [(s, q) for s in shapes if s not in anchors for q in PRESET_TYPES.get(s, ("F16",))
             if preset_types is None or q in preset_types]
    for shape, qtype in jobs:
        if time.time() > t_end:
            log(f"deadline reached: {shape} {qtype} not measured")
            continue
        try:
            model = model_path(args.work, shape, configs[shape], qtype if shape not in anchors else "F16")
        except OSError as e:  # a full disk (qwen3moe30b F16 is 61 GB) must not cost the others
            log(f"{shape} {qtype}: the model file could not be written: {e}")
            continue
        if shape in anchors and qtype != "F16":  # llama-quantize's file from the F16 one
            f16, model = model, os.path.join(args.work, f"{shape}-{qtype}.gguf")
            if not os.path.exists(model):
                log(f"{shape}: llama-quantize {qtype} ...")
                subprocess.run([os.path.join(bin_dir, "llama-quantize"), f16, model + ".part", qtype,
                                str(args.jobs)], check=True, capture_output=True)
                os.replace(model + ".part", model)
        log(f"{shape} {qtype}: llama-bench ...")
        try:
            fig = llama_bench(bin_dir, model, gpu, args.bench_args.split() if args.bench_args else [])
        except subprocess.CalledProcessError as e:  # one failed model must not cost the others
            log(f"{shape} {qtype}: llama-bench failed ({e.returncode}): {(e.stderr or '')[-800:]}")
            continue
        finally:
            if shape not in anchors and not args.keep_models:
                os.remove(model)
        lc = report["llama_cpp"]
        lc["tg128"].setdefault(shape, {})[qtype] = round(fig["tg128"], 1)
        lc["pp512"].setdefault(shape, {})[qtype] = round(fig["pp512"], 1)
        lc["stddev"].setdefault(shape, {})[qtype] = {"tg128": round(fig["tg128_stddev"], 2),
                                                     "pp512": round(fig["pp512_stddev"], 1)}
        lc["gpu_info"] = fig.get("gpu_info")
        log(f"{shape} {qtype}: tg128 {fig['tg128']:.1f}  pp512 {fig['pp512']:.0f} tok/s")
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="download llama.cpp's source and write a trimmed tarball")
    pk.add_argument("--out", default=".peer/llama.cpp.tar.gz")
    r = sub.add_parser("run", help="build llama.cpp, write random models, run llama-bench")
    r.add_argument("--source", default=".peer/llama.cpp.tar.gz")
    r.add_argument("--work", default=".peerwork", help="build and model files (kept for a re-run)")
    r.add_argument("--out", required=True, help="peer-figures JSON to write")
    r.add_argument("--shapes", default="smol135m,llama1b,llama8b")
    r.add_argument("--shapes-from", default=SHARED_ANCHORS, help="anchors JSON whose 'shapes' to use")
    r.add_argument("--types", default="Q8_0,Q4_0,Q4_1", help="quantized types besides F16")
    r.add_argument("--datasheet-tbps", type=float, required=True,
                   help="the card's datasheet memory bandwidth (H100 SXM 3.35, H200 4.8)")
    r.add_argument("--jobs", type=int, default=os.cpu_count())
    r.add_argument("--deadline-s", type=float, default=1e9, help="stop starting measurements after this")
    r.add_argument("--cpu", action="store_true", help="CPU-only build and run (a check of this script)")
    r.add_argument("--bench-args", default="", help="extra llama-bench arguments, e.g. '-t 2'")
    r.add_argument("--preset-types", default=None,
                   help=f"of the mixture-of-experts shapes' types ({PRESET_TYPES}), only these, e.g. MXFP4,F16")
    r.add_argument("--keep-models", action="store_true",
                   help="keep the mixture-of-experts shapes' files once measured (they are large)")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.out)
        return 0
    measured = run(args)["llama_cpp"]["tg128"]
    if not measured:
        log("nothing was measured")
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
