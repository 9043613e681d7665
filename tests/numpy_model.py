"""The whole model in plain NumPy, float64, written from the formulas.

It imports nothing from minitx_fn: it reads a parameter tree (nested dicts of
arrays, block leaves stacked on a leading L axis, as `model.init` makes them or a
checkpoint's params.npz holds them) and computes the logits of one sequence. The
tests hold `model.apply` and `generate` to it; it is also the shortest complete
statement of the model.
"""

from __future__ import annotations

import numpy as np


def layer_norm(x, p, eps):
    """(T, D) -> (T, D): (x - mean) / sqrt(var + eps) * scale + bias, over D; without a
    bias in p, RMSNorm: x / sqrt(mean(x^2) + eps) * scale."""
    if "bias" not in p:
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
    """The tanh approximation used by GPT-2."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def rotate(x, theta):
    """(T, K) -> (T, K): row m's pair (x_i, x_{i + K/2}) turned by m theta^(-2i/K), one
    pair at a time with a 2x2 rotation matrix."""
    t, k = x.shape
    out = np.empty_like(x)
    for m in range(t):
        for i in range(k // 2):
            a = m * theta ** (-2 * i / k)
            turn = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            out[m, [i, i + k // 2]] = turn @ x[m, [i, i + k // 2]]
    return out


def positions(t, d):
    """(T, D): PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D))."""
    p = np.arange(t)[:, None]
    i = np.arange(d)[None, :] // 2
    angle = p / 10000.0 ** (2 * i / d)
    return np.where(np.arange(d)[None, :] % 2 == 0, np.sin(angle), np.cos(angle))


def linear(x, p, adapter=None, scale=0.0):
    """x W + b, plus a LoRA adapter's scale (x A) B when one is given: unmerged, the
    weight itself never changed."""
    y = x @ p["w"] + p.get("b", 0.0)
    if adapter is not None:
        y = y + scale * ((x @ adapter["a"]) @ adapter["b"])
    return y


def attention(x, p, n_heads, adapters=None, scale=0.0, n_kv_heads=None, rope_theta=None):
    """(T, D) -> (T, D): causal self-attention with fused [Q | K | V] weights; query head
    h reads key/value head h // (H / G); rotary q and k with rope_theta."""
    t, d = x.shape
    k = d // n_heads
    g = n_kv_heads or n_heads
    adapters = adapters or {}
    q_, k_, v_ = np.split(linear(x, p["qkv"], adapters.get("qkv"), scale), [n_heads * k, (n_heads + g) * k], axis=-1)
    heads = []
    for h in range(n_heads):
        cols, kv = slice(h * k, (h + 1) * k), slice((h // (n_heads // g)) * k, (h // (n_heads // g) + 1) * k)
        q_h, k_h = q_[:, cols], k_[:, kv]
        if rope_theta is not None:
            q_h, k_h = rotate(q_h, rope_theta), rotate(k_h, rope_theta)
        scores = q_h @ k_h.T / np.sqrt(k)                                         # (T, T)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)        # query i sees keys 0 .. i
        w = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v_[:, kv])                  # (T, K)
    return linear(np.concatenate(heads, axis=-1), p["out"], adapters.get("out"), scale)


def logits(params, ids, *, n_heads, eps=1e-5, adapters=None, scale=0.0, n_kv_heads=None, rope_theta=None):
    """ids (T,) -> logits (T, V), float64. A "pos" table is a learned position per row
    (GPT-2), else with rope_theta rotary positions in attention (Llama), else the
    sinusoids; without "head" the embedding is the head, no bias. The tree says the
    rest: norms without a bias are RMSNorms, an MLP with a "gate" is SwiGLU, a layer
    without "b" has no bias; n_kv_heads key/value heads (default n_heads).
    adapters: LoRA's {"blocks": {"attn": {"qkv": {"a", "b"}, ...}, "mlp": ...}} (stacked
    on L), each added unmerged as scale (x A) B to its linear layer's output."""
    params = to_float64(params)
    blocks_adapters = to_float64(adapters)["blocks"] if adapters else {}
    table = params["embed"]["table"]                                               # (V, D)
    if "pos" in params:
        pe = params["pos"]["table"][:len(ids)]
    else:
        pe = 0.0 if rope_theta is not None else positions(len(ids), table.shape[1])
    x = table[np.asarray(ids)] + pe
    n_layers = params["blocks"]["ln1"]["scale"].shape[0]
    for layer in range(n_layers):
        p, ad = _index(params["blocks"], layer), _index(blocks_adapters, layer)
        x = x + attention(layer_norm(x, p["ln1"], eps), p["attn"], n_heads, ad.get("attn"), scale, n_kv_heads,
                          rope_theta)
        mlp, h = ad.get("mlp", {}), layer_norm(x, p["ln2"], eps)
        if "gate" in p["mlp"]:                                                     # SwiGLU: silu(x Wg) * (x Wu)
            gate = linear(h, p["mlp"]["gate"], mlp.get("gate"), scale)
            h = gate / (1 + np.exp(-gate)) * linear(h, p["mlp"]["up"], mlp.get("up"), scale)
        else:
            h = gelu(linear(h, p["mlp"]["up"], mlp.get("up"), scale))
        x = x + linear(h, p["mlp"]["down"], mlp.get("down"), scale)
    x = layer_norm(x, params["ln_f"], eps)
    if "head" not in params:
        return x @ table.T
    return linear(x, params["head"])


def greedy(params, prompt, n_new, *, n_heads, max_len, eps=1e-5, **options):
    """Greedy continuation recomputing the whole context per token. Beyond the window:
    whenever the context would exceed max_len tokens, keep its last max_len // 2 + 1."""
    context, out = list(prompt)[-max_len:], []
    for _ in range(n_new):
        token = int(np.argmax(logits(params, context, n_heads=n_heads, eps=eps, **options)[-1]))
        out.append(token)
        context.append(token)
        if len(context) > max_len:
            context = context[-(max_len // 2 + 1):]
    return out


def to_float64(tree):
    if isinstance(tree, dict):
        return {k: to_float64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def _index(tree, i):
    return {k: _index(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]


def unflatten(flat: dict) -> dict:
    """{"blocks/attn/qkv/w": array, ...} (a params.npz) -> the nested tree."""
    tree: dict = {}
    for path, array in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = array
    return tree


def config_args(config) -> dict:
    """What `logits` and `greedy` cannot read from the parameter tree, from a model's
    config (anything with n_kv_heads, positions and rope_theta, as ModelConfig has)."""
    return {"n_kv_heads": config.n_kv_heads,
            "rope_theta": config.rope_theta if config.positions == "rotary" else None}
