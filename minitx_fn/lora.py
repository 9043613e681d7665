"""Low-rank adapters (LoRA) as a transform of the parameter tree.

    W' = W + (alpha / R) A B        A (D_in, R), B (R, D_out); W (D_in, D_out) frozen

Adapters are a pytree of their own that mirrors the targeted linear layers, the
model's `lora_paths` (in the built-in model, those of the blocks, stacked on the
leading L axis like the blocks themselves):

    {"blocks": {"attn": {"qkv": {"a": (L, D, R), "b": (L, R, 3D)},
                         "out": {"a": (L, D, R), "b": (L, R, D)}}}}      targets "attn"

`merge(params, adapters, scale=)` returns an ordinary parameter tree, so the model
and its layers never learn that LoRA exists: training differentiates
`loss(merge(base, adapters))` with respect to the adapters alone, so the base gets no
gradient and no optimiser state, and a trained run's adapters fold into the weights
once for generation, evaluation and export. B starts at zero, so a fresh adapter
leaves the model exactly as it was.

The cost of merging in front of the model instead of inside each layer: the backward
pass forms the gradient of every targeted W' (the size of those weights, once) before
it reduces it to the gradients of A and B. Adapted layers computing x W + s (x A) B
would avoid it, at the price of every layer knowing about LoRA. The base's optimiser
state and full gradient, the larger part, are saved either way;
`python -m benchmarks.finetune` measures both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitx_fn.config import LoraConfig
from minitx_fn.errors import ConfigError


def _node(tree, path: str):
    """The subtree at a path "a/b/c", or None where the tree has no such path."""
    for key in path.split("/"):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def weight(params: dict, path: str):
    """The weight W (..., D_in, D_out) of the linear layer at `path` (one of a model's
    `lora_paths`, e.g. "blocks/attn/qkv": stacked (L, D, 3D) in the built-in model).

    Example:
        >>> weight({"blocks": {"attn": {"qkv": {"w": jnp.ones((2, 8, 24))}}}}, "blocks/attn/qkv").shape
        (2, 8, 24)
    """
    return _node(params, path)["w"]


def targets(model, params: dict, config: LoraConfig) -> tuple[str, ...]:
    """The paths of the linear layers `config` adapts: model.lora_paths(config.targets),
    each the path of a {"w": (..., D_in, D_out), ...} in `params`. ConfigError naming
    the model when there are none (a model of one's own that names no matrices), or
    when a path is not such a layer of its parameters.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> params = {"blocks": {"mlp": {"up": {"w": jnp.ones((1, 2, 8))}, "down": {"w": jnp.ones((1, 8, 2))}}}}
        >>> targets(ModelConfig(vocab_size=5), params, LoraConfig(rank=1, targets="mlp"))
        ('blocks/mlp/up', 'blocks/mlp/down')
    """
    paths = model.lora_paths(config.targets)
    if not (isinstance(paths, (tuple, list)) and all(isinstance(p, str) for p in paths)):
        raise ConfigError(f"{model.code}'s lora_paths gave {paths!r}, not a tuple of paths ('blocks/attn/qkv')")
    if not paths:
        raise ConfigError(f"{{targets}} finds no matrices LoRA may adapt in {model.code} (its lora_paths names "
                          f"none); choose other targets, or give the model a lora_paths method",
                          targets=("lora.targets", config.targets))
    wrong = [p for p in paths if not (isinstance(_node(params, p), dict) and "w" in _node(params, p)
                                      and len(getattr(_node(params, p)["w"], "shape", ())) >= 2)]
    if wrong:
        raise ConfigError(f"{model.code}'s lora_paths names {wrong}, which its parameters do not hold as linear "
                          f"layers {{'w': (..., D_in, D_out)}}")
    return tuple(paths)


def init(key: jax.Array, params: dict, paths: tuple[str, ...], rank: int) -> dict:
    """Fresh adapters of this rank for the linear layers at `paths` of `params` (a
    model's tree, or its jax.eval_shape): for each, A ~ Normal(0, 1 / D_in) and B = 0,
    in the weight's dtype, with the weight's leading axes (the L stacked blocks). One
    subkey per layer.

    Example:
        >>> params = {"blocks": {"attn": {"qkv": {"w": jnp.ones((2, 8, 24))}, "out": {"w": jnp.ones((2, 8, 8))}}}}
        >>> ad = init(jax.random.key(0), params, ("blocks/attn/qkv", "blocks/attn/out"), 4)
        >>> ad["blocks"]["attn"]["qkv"]["a"].shape, ad["blocks"]["attn"]["qkv"]["b"].shape
        ((2, 8, 4), (2, 4, 24))
    """
    adapters: dict = {}
    for path, k in zip(paths, jax.random.split(key, len(paths))):
        w = weight(params, path)                                              # (..., D_in, D_out)
        *lead, d_in, d_out = w.shape
        a = jax.random.normal(k, (*lead, d_in, rank), w.dtype) / jnp.sqrt(jnp.asarray(d_in, w.dtype))
        node = adapters
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(a=a, b=jnp.zeros((*lead, rank, d_out), w.dtype))
    return adapters


def merge(params: dict, adapters: dict, *, scale: float) -> dict:
    """The parameter tree with every adapted weight W replaced by W + scale A B (in W's
    dtype); every other leaf is the same array. Shapes: W (..., D_in, D_out), A (..., D_in, R),
    B (..., R, D_out); the leading axes (the L blocks) are batched.

    Example:
        >>> params = {"blocks": {"attn": {"out": {"w": jnp.zeros((1, 2, 2)), "b": jnp.ones((1, 2))}}}}
        >>> ad = {"blocks": {"attn": {"out": {"a": jnp.ones((1, 2, 1)), "b": jnp.full((1, 1, 2), 3.0)}}}}
        >>> merge(params, ad, scale=0.5)["blocks"]["attn"]["out"]["w"].tolist()     # 0 + 0.5 * 1 * 3
        [[[1.5, 1.5], [1.5, 1.5]]]
    """
    def walk(p, a):
        if "a" in a and "b" in a:                                             # an adapted linear layer
            w = p["w"]
            delta = jnp.einsum("...ir,...ro->...io", a["a"], a["b"], preferred_element_type=w.dtype)
            return {**p, "w": w + jnp.asarray(scale, w.dtype) * delta.astype(w.dtype)}
        return {**p, **{k: walk(p[k], v) for k, v in a.items()}}
    return walk(params, adapters)


__all__ = ["init", "merge", "targets", "weight"]
