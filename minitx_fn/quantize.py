"""Quantized weights: fewer bytes for every matrix a decode step reads.

Decoding at batch 1 reads every weight once per token, so its speed is the memory
bandwidth over the bytes of the weights. `quantize` turns each linear layer's
{"w": (..., D_in, D_out)} into

    int8      {"wq": (..., D_out, D_in) int8, "scale": (..., D_out) float32}:
              scale_j = max_i |W_ij| / 127 (1 for an all-zero column), wq = round(W / scale),
              so every weight lies within half a step of scale_j wq_ji
    bfloat16  {"wq": (..., D_out, D_in) bfloat16, "scale": ones}: W rounded to bfloat16

and `layers/linear.apply` computes y = (x wq^T) scale in float32. The token table
(`embed`, {"table": (V, D)}) becomes {"tableq": (V, D), "scale": (V,)} the same way, a
scale per row: a tied head (GPT-2's) reads the whole table at every step, backwards, and
is the largest matrix of a small model (38.6M of GPT-2 small's 124M weights); a
looked-up row is dequantized alone. Biases, norms and a learned positions table stay as
they are (a row per position is read; `with_context` slices it). The result is a
parameter tree like any other, for any model whose matrices are `linear` layers and
whose token table is an `embedding` (the built-in, or a model of one's own built from
them): `generate.complete` and `generate.generate` take it as they take float32
parameters (`quantized(run, to)` quantizes a loaded run).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import checkpoint
from minitx_fn.defaults import QUANTIZE_KINDS
from minitx_fn.errors import ConfigError

KINDS = QUANTIZE_KINDS
INT8_MAX = 127


def check_kind(to, name: str = "to") -> None:
    """ConfigError naming the field `name` unless `to` is one of KINDS.

    Example:
        >>> check_kind("int4", "quantize")
        Traceback (most recent call last):
        minitx_fn.errors.ConfigError: quantize='int4' is not a kind of quantization; choose one of ['int8', 'bfloat16']
    """
    if to not in KINDS:
        raise ConfigError(f"{{to}} is not a kind of quantization; choose one of {list(KINDS)}", to=(name, to))


def quantize_matrix(w, to: str = "int8") -> dict:
    """W (..., D_in, D_out) -> {"wq": (..., D_out, D_in), "scale": (..., D_out) float32}
    (module docstring).

    Example:
        >>> q = quantize_matrix(jnp.array([[1.0, 0.0], [-2.0, 0.0]]))
        >>> q["wq"].tolist(), q["scale"].tolist()
        ([[64, -127], [0, 0]], [0.015748031437397003, 1.0])
    """
    check_kind(to)
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


def is_table(node) -> bool:
    """Whether a node is a float `embedding` table {"table": (V, D)}.

    Example:
        >>> is_table({"table": jnp.ones((5, 3))}), is_table({"w": jnp.ones((3, 4))})
        (True, False)
    """
    return isinstance(node, dict) and set(node) == {"table"} and len(getattr(node["table"], "shape", ())) == 2


def quantize(params, to: str = "int8"):
    """Every float `linear` layer of a parameter tree quantized (`quantize_matrix`), and
    the token table (`embed`) a row per id; everything else as it was.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=2)
        >>> q = quantize(cfg.init(jax.random.key(0)))
        >>> q["blocks"]["attn"]["qkv"]["wq"].dtype, q["blocks"]["attn"]["qkv"]["wq"].shape, q["embed"]["tableq"].shape
        (dtype('int8'), (2, 24, 8), (5, 8))
    """
    if is_linear(params):
        return {**{k: v for k, v in params.items() if k != "w"}, **quantize_matrix(params["w"], to)}
    if isinstance(params, dict):
        return {k: _quantize_table(v, to) if k == "embed" and is_table(v) else quantize(v, to)
                for k, v in params.items()}
    return params


def _quantize_table(node: dict, to: str) -> dict:
    """{"table": (V, D)} -> {"tableq": (V, D), "scale": (V,)}: the table is the head's
    (D, V) matrix read backwards, so a scale per output is a scale per row."""
    q = quantize_matrix(jnp.swapaxes(node["table"], -1, -2), to)
    return {"tableq": q["wq"], "scale": q["scale"]}


def dequantize(params):
    """The float32 tree a quantized one stands for (`dequantize_matrix` per layer and table).

    Example:
        >>> p = {"head": {"w": jnp.eye(2), "b": jnp.zeros(2)}, "embed": {"table": jnp.eye(2)}}
        >>> jax.tree.map(lambda a, b: bool((a == b).all()), dequantize(quantize(p)), p)
        {'embed': {'table': True}, 'head': {'b': True, 'w': True}}
    """
    if isinstance(params, dict) and "wq" in params:
        return {**{k: v for k, v in params.items() if k not in ("wq", "scale")}, "w": dequantize_matrix(params)}
    if isinstance(params, dict) and "tableq" in params:
        return {"table": jnp.swapaxes(dequantize_matrix({"wq": params["tableq"], "scale": params["scale"]}), -1, -2)}
    if isinstance(params, dict):
        return {k: dequantize(v) for k, v in params.items()}
    return params


def is_quantized(params) -> bool:
    """Whether a parameter tree holds quantized layers or tables.

    Example:
        >>> is_quantized({"l": {"w": jnp.ones((2, 2))}}), is_quantized(quantize({"l": {"w": jnp.ones((2, 2))}}))
        (False, True)
    """
    if isinstance(params, dict):
        return "wq" in params or "tableq" in params or any(is_quantized(v) for v in params.values())
    return False


def quantized(run, to: str = "int8", *, trust_code: bool = False):
    """A run (its directory, loaded with `trust_code` as `checkpoint.load_model` would,
    or `load_model`'s Model, `job.train`'s result: anything with .params) with its
    parameters quantized: what `generate.complete` and `job.evaluate` take as they
    take the run itself. ConfigError for a run already quantized.

    Example:
        >>> from minitx_fn import ModelConfig, checkpoint
        >>> from minitx_fn.tokenizer import CharTokenizer
        >>> cfg = ModelConfig(vocab_size=3, d_model=8, n_heads=2, max_len=8)
        >>> m = quantized(checkpoint.Model(cfg.init(jax.random.key(0)), cfg, CharTokenizer("abc"), {}))
        >>> m.params["embed"]["tableq"].dtype
        dtype('int8')
    """
    if isinstance(run, (str, os.PathLike)):
        run = checkpoint.load_model(run, trust_code=trust_code)
    if is_quantized(run.params):
        raise ConfigError("the run's weights are quantized already; quantize its float weights (its directory, or "
                          "checkpoint.load_model(run))")
    return checkpoint.Model(quantize(run.params, to), run.model, run.tokenizer, getattr(run, "meta", {}))


def weight_bytes(params) -> int:
    """Bytes of every array of a tree: what a decode step reads at batch 1.

    Example:
        >>> weight_bytes({"w": np.zeros((4, 4), np.float32)}), weight_bytes(quantize({"l": {"w": np.zeros((4, 4))}}))
        (64, 32)
    """
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


__all__ = ["INT8_MAX", "KINDS", "check_kind", "dequantize", "dequantize_matrix", "is_linear", "is_quantized",
           "is_table", "quantize", "quantize_matrix", "quantized", "weight_bytes"]
