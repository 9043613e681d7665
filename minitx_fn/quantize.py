"""Quantized weights: fewer bytes for every matrix a decode step reads.

Decoding at batch 1 reads every weight once per token, so its speed is the memory
bandwidth over the bytes of the weights. `quantize` turns each linear layer's
{"w": (..., D_in, D_out)} into

    int8      {"wq": (..., D_out, D_in) int8, "scale": (..., D_out) float32}:
              scale_j = max_i |W_ij| / 127 (1 for an all-zero column), wq = round(W / scale),
              so every weight lies within half a step of scale_j wq_ji
    bfloat16  {"wq": (..., D_out, D_in) bfloat16, "scale": ones}: W rounded to bfloat16

and `layers/linear.apply` computes y = (x wq^T) scale in float32. Biases, norms and
embedding tables stay as they are (a table is looked up, a row per token, never read
whole), and so does a tied head: it is the embedding table read backwards. The result is
a parameter tree like any other, for any model whose matrices are `linear` layers (the
built-in, or a model of one's own built from them): `generate.complete` and
`generate.generate` take it as they take float32 parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn.errors import ConfigError

KINDS = ("int8", "bfloat16")
INT8_MAX = 127


def quantize_matrix(w, to: str = "int8") -> dict:
    """W (..., D_in, D_out) -> {"wq": (..., D_out, D_in), "scale": (..., D_out) float32}
    (module docstring).

    Example:
        >>> q = quantize_matrix(jnp.array([[1.0, 0.0], [-2.0, 0.0]]))
        >>> q["wq"].tolist(), q["scale"].tolist()
        ([[64, -127], [0, 0]], [0.015748031437397003, 1.0])
    """
    if to not in KINDS:
        raise ConfigError(f"{{to}} is not a kind of quantization; choose one of {list(KINDS)}", to=("to", to))
    w = jnp.swapaxes(jnp.asarray(w, jnp.float32), -1, -2)                        # (..., D_out, D_in)
    if to == "bfloat16":
        return {"wq": w.astype(jnp.bfloat16), "scale": jnp.ones(w.shape[:-1], jnp.float32)}
    absmax = jnp.max(jnp.abs(w), axis=-1)                                         # (..., D_out)
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(jnp.float32)
    wq = jnp.clip(jnp.round(w / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return {"wq": wq, "scale": scale}


def dequantize_matrix(q: dict) -> jax.Array:
    """The float32 W (..., D_in, D_out) a quantized matrix stands for: (wq * scale)^T.

    Example:
        >>> dequantize_matrix(quantize_matrix(jnp.array([[1.0, 0.0], [-2.0, 0.0]]))).tolist()
        [[1.0078740119934082, 0.0], [-2.0, 0.0]]
    """
    return jnp.swapaxes(q["wq"].astype(jnp.float32) * q["scale"][..., None], -1, -2)


def is_linear(node) -> bool:
    """Whether a node of a parameter tree is a float `linear` layer: {"w": (..., D_in,
    D_out)} with at most a bias beside it.

    Example:
        >>> is_linear({"w": jnp.ones((3, 4)), "b": jnp.ones(4)}), is_linear({"table": jnp.ones((5, 3))})
        (True, False)
    """
    return (isinstance(node, dict) and "w" in node and set(node) <= {"w", "b"}
            and len(getattr(node["w"], "shape", ())) >= 2)


def quantize(params, to: str = "int8"):
    """Every float `linear` layer of a parameter tree quantized (`quantize_matrix`),
    everything else as it was.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=2)
        >>> q = quantize(cfg.init(jax.random.key(0)))
        >>> q["blocks"]["attn"]["qkv"]["wq"].dtype, q["blocks"]["attn"]["qkv"]["wq"].shape, q["embed"]["table"].dtype
        (dtype('int8'), (2, 24, 8), dtype('float32'))
    """
    if is_linear(params):
        return {**{k: v for k, v in params.items() if k != "w"}, **quantize_matrix(params["w"], to)}
    if isinstance(params, dict):
        return {k: quantize(v, to) for k, v in params.items()}
    return params


def dequantize(params):
    """The float32 tree a quantized one stands for (`dequantize_matrix` per layer).

    Example:
        >>> p = {"head": {"w": jnp.eye(2), "b": jnp.zeros(2)}}
        >>> jax.tree.map(lambda a, b: bool((a == b).all()), dequantize(quantize(p)), p)
        {'head': {'b': True, 'w': True}}
    """
    if isinstance(params, dict) and "wq" in params:
        return {**{k: v for k, v in params.items() if k not in ("wq", "scale")}, "w": dequantize_matrix(params)}
    if isinstance(params, dict):
        return {k: dequantize(v) for k, v in params.items()}
    return params


def weight_bytes(params) -> int:
    """Bytes of every array of a tree: what a decode step reads at batch 1.

    Example:
        >>> weight_bytes({"w": np.zeros((4, 4), np.float32)}), weight_bytes(quantize({"l": {"w": np.zeros((4, 4))}}))
        (64, 32)
    """
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


__all__ = ["INT8_MAX", "KINDS", "dequantize", "dequantize_matrix", "is_linear", "quantize", "quantize_matrix",
           "weight_bytes"]
