"""An independent float64 NumPy decoder, written from the papers' equations rather
than from jaxllm/model.py, used as the reference for `jaxllm.forward`."""

import math

import numpy as np


def to64(tree):
    import jax
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def norm(x, p, c):
    if p is None:
        return x
    if c.norm == "layer":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + c.norm_eps)
    else:
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps)
    y = y * (c.norm_weight_offset + p.scale)
    return y + p.bias if p.bias is not None else y


def gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def inv_freq(c, theta):
    d = c.rotary_dim
    f = np.array([theta ** (-2 * i / d) for i in range(d // 2)])
    s = c.rope_scaling
    if s is None:
        return f
    out = []
    for fi in f:
        wavelen = 2 * math.pi / fi
        if wavelen < s.original_max_position / s.high_freq_factor:
            out.append(fi)
        elif wavelen > s.original_max_position / s.low_freq_factor:
            out.append(fi / s.factor)
        else:
            a = (s.original_max_position / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - a) * fi / s.factor + a * fi)
    return np.array(out)


def rope(x, pos, f):
    # x [T, N, Dh]; pairs (i, i + R/2) of the first R = 2 len(f) dims rotate by pos * f[i]
    half = len(f)
    out = x.copy()
    for t in range(x.shape[0]):
        ang = pos[t] * f
        c, s = np.cos(ang), np.sin(ang)
        a = x[t, :, :half]
        b = x[t, :, half:2 * half]
        out[t, :, :half] = a * c - b * s
        out[t, :, half:2 * half] = b * c + a * s
    return out


def experts(h, L, c):
    """A mixture-of-experts MLP, token by token: softmax over the router's scores, the
    top n_active_experts (ties to the lower index), renormalised if the config says."""
    out = np.zeros_like(h)
    for t, row in enumerate(h):
        scores = row @ L.router
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        chosen = sorted(range(c.n_experts), key=lambda e: (-probs[e], e))[:c.n_active_experts]
        weights = probs[chosen] / (probs[chosen].sum() if c.router_norm_topk else 1.0)
        for e, weight in zip(chosen, weights):
            g, up = np.split(row @ L.w_in.w[e], 2)
            out[t] += weight * ((g / (1 + np.exp(-g)) * up) @ L.w_out.w[e])
    return out


def forward_one(p, c, tokens, tap=lambda layer, projection, x: None):
    """Logits [T, V] for one sequence, float64. tap sees each projection's input."""
    T = len(tokens)
    pos = np.arange(T)
    x = p.embed[tokens]
    if c.embed_scale is not None:
        x = x * c.embed_scale
    if p.pos_embed is not None:
        x = x + p.pos_embed[pos]
    G = c.n_heads // c.n_kv_heads
    for i, L in enumerate(p.layers):
        window = c.layer_window(i)
        h = norm(x, L.attn_norm, c)
        tap(i, "wqkv", h)
        qkv = h @ L.wqkv + (L.bqkv if L.bqkv is not None else 0)
        q, k, v = np.split(qkv, [c.q_size, c.q_size + c.kv_size], axis=-1)
        if c.qk_norm_whole:  # OLMoE: over the whole projections
            q, k = norm(q, L.q_norm, c), norm(k, L.k_norm, c)
        q = q.reshape(T, c.n_heads, c.head_dim)
        k = k.reshape(T, c.n_kv_heads, c.head_dim)
        v = v.reshape(T, c.n_kv_heads, c.head_dim)
        if c.qk_norm and not c.qk_norm_whole:
            q, k = norm(q, L.q_norm, c), norm(k, L.k_norm, c)
        if c.position == "rope":
            f = inv_freq(c, c.layer_rope_theta(i))
            q, k = rope(q, pos, f), rope(k, pos, f)
        scale = c.query_scale if c.query_scale is not None else c.head_dim ** -0.5
        out = np.zeros((T, c.n_heads, c.head_dim))
        for hd in range(c.n_heads):
            kv = hd // G
            s = (q[:, hd] @ k[:, kv].T) * scale
            if c.attn_softcap is not None:
                s = c.attn_softcap * np.tanh(s / c.attn_softcap)
            for t in range(T):
                for u in range(T):
                    if u > t or (window is not None and u <= t - window):
                        s[t, u] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            out[:, hd] = s @ v[:, kv]
        tap(i, "wo", out.reshape(T, -1))
        a = out.reshape(T, -1) @ L.wo + (L.bo if L.bo is not None else 0)
        if c.sandwich_norm:
            a = norm(a, L.post_attn_norm, c)
        x_attn = x + a
        if not c.parallel_block:  # Phi-2's MLP reads the same normed input h
            h = norm(x_attn, L.mlp_norm, c)
        if c.n_experts:
            x = x_attn + experts(h, L, c)
            continue
        tap(i, "w_in", h)
        a = h @ L.w_in + (L.b_in if L.b_in is not None else 0)
        if c.mlp == "swiglu":
            g, up = np.split(a, 2, axis=-1)
            hidden = g / (1 + np.exp(-g)) * up
        elif c.mlp == "geglu":
            g, up = np.split(a, 2, axis=-1)
            hidden = gelu(g, c.gelu_approximate) * up
        else:
            hidden = gelu(a, c.gelu_approximate)
        tap(i, "w_out", hidden)
        m = hidden @ L.w_out + (L.b_out if L.b_out is not None else 0)
        if c.sandwich_norm:
            m = norm(m, L.post_mlp_norm, c)
        x = x_attn + m
    x = norm(x, p.final_norm, c)
    logits = x @ (p.embed.T if p.lm_head is None else p.lm_head)
    if p.lm_head_bias is not None:
        logits = logits + p.lm_head_bias
    if c.final_softcap is not None:
        logits = c.final_softcap * np.tanh(logits / c.final_softcap)
    return logits
