"""How closely an implementation reproduces the llama.cpp reference outputs in
../shared/reference/*.llamacpp.json, by the measures of issues 3 and 4: per text,
the share of tokens whose teacher-forced NLL is within 0.1 nat, the relative
difference of the mean NLL, the largest difference of the top-10 logits; per
prompt, whether the first 16 greedy tokens are identical.

    python benchmarks/llamacpp_agreement.py jaxllm [--weights file|dense]
    python benchmarks/llamacpp_agreement.py llama_cpp --label avx2 --gguf smollm2-135m-instruct=PATH ...
        (in a venv with llama-cpp-python; `jaxllm info --model NAME` prints each file's path)

The second form measures llama.cpp itself (llama-cpp-python built with other
CMAKE_ARGS) against the same reference: benchmarks/NOTES.md, "Agreement with llama.cpp".
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
REFERENCE_DIR = os.path.join(HERE, "..", "..", "shared", "reference")
MODELS = {"smollm2-135m-instruct": "smollm2-135m-instruct-q4_1", "gemma-3-270m": "gemma-3-270m-q4_k_m"}


def jaxllm_runner(name, weights):
    import jax.numpy as jnp  # noqa: PLC0415

    import jaxllm  # noqa: PLC0415
    from jaxllm.model import forward  # noqa: PLC0415

    model = jaxllm.load(name, dtype=jnp.float32, weights=weights)

    def logits(ids):
        return np.asarray(forward(model.params, model.config, jnp.asarray([ids]))[0], np.float64)

    def greedy(prompt_ids, n):
        return jaxllm.generate(model.params, model.config, [prompt_ids], max_new_tokens=n,
                               settings=jaxllm.SamplerSettings.greedy()).tokens[0]
    return logits, greedy


def llama_cpp_runner(path):
    from llama_cpp import Llama  # noqa: PLC0415

    llm = Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=2, verbose=False)

    def logits(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], np.float64)

    def greedy(prompt_ids, n):
        out = []
        for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            if llm.token_eos() == tok or len(out) == n:
                break
            out.append(tok)
        return out
    return logits, greedy


def agreement(logits_fn, greedy_fn, reference) -> dict:
    texts = []
    for case in reference["score"]:
        ids = case["ids"]
        lg = logits_fn(ids)
        top = lg.max(-1, keepdims=True)
        lse = np.log(np.exp(lg - top).sum(-1)) + top[:, 0]
        nll = lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]
        ref = np.array(case["nll"])
        top10 = max(np.abs(lg[p, case["top10_ids"][p]] - case["top10_logits"][p]).max() for p in range(len(ids)))
        texts.append({"within_0.1_nat": float(np.mean(np.abs(nll - ref) < 0.1)),
                      "mean_nll_rel_diff": float((nll.mean() - ref.mean()) / ref.mean()),
                      "max_top10_logit_diff": float(top10)})
    greedy = []
    for case in reference["greedy"]:
        out = greedy_fn(case["prompt_ids"], 16)
        ref = case["ids"][:16]
        greedy.append(next((i for i in range(16) if i >= len(out) or out[i] != ref[i]), 16))
    return {"texts": texts, "greedy_tokens_identical_of_16": greedy}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("implementation", choices=("jaxllm", "llama_cpp"))
    ap.add_argument("--weights", default="file", help="jaxllm: file (quantized on device) or dense")
    ap.add_argument("--label", default="", help="a name for this build or setting")
    ap.add_argument("--gguf", nargs="*", default=[], help="llama_cpp: NAME=PATH of each model file")
    args = ap.parse_args()
    paths = dict(item.split("=", 1) for item in args.gguf)
    for name, ref_name in MODELS.items():
        if args.implementation == "llama_cpp" and name not in paths:
            continue
        with open(os.path.join(REFERENCE_DIR, f"{ref_name}.llamacpp.json")) as f:
            reference = json.load(f)
        fns = jaxllm_runner(name, args.weights) if args.implementation == "jaxllm" else llama_cpp_runner(paths[name])
        result = {"implementation": args.implementation, "label": args.label or args.weights, "model": name,
                  **agreement(*fns, reference)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
