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
    """(T, D) -> (T, D): (x - mean) / sqrt(var + eps) * scale + bias, over D."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
    """The tanh approximation used by GPT-2."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def positions(t, d):
    """(T, D): PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D))."""
    p = np.arange(t)[:, None]
    i = np.arange(d)[None, :] // 2
    angle = p / 10000.0 ** (2 * i / d)
    return np.where(np.arange(d)[None, :] % 2 == 0, np.sin(angle), np.cos(angle))


def linear(x, p, adapter=None, scale=0.0):
    """x W + b, plus a LoRA adapter's scale (x A) B when one is given: unmerged, the
    weight itself never changed."""
    y = x @ p["w"] + p["b"]
    if adapter is not None:
        y = y + scale * ((x @ adapter["a"]) @ adapter["b"])
    return y


def attention(x, p, n_heads, adapters=None, scale=0.0):
    """(T, D) -> (T, D): causal multi-head self-attention with fused [Q | K | V] weights."""
    t, d = x.shape
    k = d // n_heads
    adapters = adapters or {}
    q_, k_, v_ = np.split(linear(x, p["qkv"], adapters.get("qkv"), scale), 3, axis=-1)     # 3 x (T, D)
    heads = []
    for h in range(n_heads):
        cols = slice(h * k, (h + 1) * k)
        scores = q_[:, cols] @ k_[:, cols].T / np.sqrt(k)                         # (T, T)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)        # query i sees keys 0 .. i
        w = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v_[:, cols])                # (T, K)
    return linear(np.concatenate(heads, axis=-1), p["out"], adapters.get("out"), scale)


def logits(params, ids, *, n_heads, eps=1e-5, adapters=None, scale=0.0):
    """ids (T,) -> logits (T, V), float64. A "pos" table is a learned position per row
    (GPT-2), else the sinusoids; without "head" the embedding is the head, no bias.
    adapters: LoRA's {"blocks": {"attn": {"qkv": {"a", "b"}, ...}, "mlp": ...}} (stacked
    on L), each added unmerged as scale (x A) B to its linear layer's output."""
    params = to_float64(params)
    blocks_adapters = to_float64(adapters)["blocks"] if adapters else {}
    table = params["embed"]["table"]                                               # (V, D)
    pe = params["pos"]["table"][:len(ids)] if "pos" in params else positions(len(ids), table.shape[1])
    x = table[np.asarray(ids)] + pe
    n_layers = params["blocks"]["ln1"]["scale"].shape[0]
    for layer in range(n_layers):
        p, ad = _index(params["blocks"], layer), _index(blocks_adapters, layer)
        x = x + attention(layer_norm(x, p["ln1"], eps), p["attn"], n_heads, ad.get("attn"), scale)
        mlp = ad.get("mlp", {})
        h = gelu(linear(layer_norm(x, p["ln2"], eps), p["mlp"]["up"], mlp.get("up"), scale))
        x = x + linear(h, p["mlp"]["down"], mlp.get("down"), scale)
    x = layer_norm(x, params["ln_f"], eps)
    if "head" not in params:
        return x @ table.T
    return x @ params["head"]["w"] + params["head"]["b"]


def greedy(params, prompt, n_new, *, n_heads, max_len, eps=1e-5):
    """Greedy continuation recomputing the whole context per token. Beyond the window:
    whenever the context would exceed max_len tokens, keep its last max_len // 2 + 1."""
    context, out = list(prompt)[-max_len:], []
    for _ in range(n_new):
        token = int(np.argmax(logits(params, context, n_heads=n_heads, eps=eps)[-1]))
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
