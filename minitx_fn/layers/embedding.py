"""Token embedding: a lookup of one row of a (V, D) table per token id.

Params: {"table": (V, D)}. Quantized (`quantize.py`): {"tableq": (V, D) int8 or
bfloat16, "scale": (V,) float32}, row v = tableq[v] * scale[v]: a scale per row is a
scale per output of the tied head, which reads the whole table at every step.

The same layer holds learned positions (a table with one row per position, looked
up by position instead of by token id, GPT-2's `wpe`), and `attend` reads the table
backwards as a tied output head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(key: jax.Array, *, vocab_size: int, d_model: int, std: float = 0.5, dtype=jnp.float32) -> dict:
    """table ~ Normal(0, std^2). The sinusoidal positions added to the embeddings have
    entries of magnitude about 1, so a std of GPT-2's 0.02 would drown the tokens; 0.5
    trained best of 0.1 to 1.0 on Tiny Shakespeare (`ModelConfig.embed_std` has the
    figures).

    Example:
        >>> init(jax.random.key(0), vocab_size=10, d_model=4)["table"].shape
        (10, 4)
    """
    return {"table": std * jax.random.normal(key, (vocab_size, d_model), dtype)}


def apply(params: dict, ids: jax.Array) -> jax.Array:
    """(B, T) int -> (B, T, D): row ids[b, t] of the table.

    Mathematically one_hot(ids, V) @ table; the gather avoids the (B, T, V) one-hot.
    `jnp.take` fills the rows of out-of-range ids with NaN instead of failing, so
    callers check ids (`minitx_fn.model.check_tokens` does) before they reach here.

    Example:
        >>> p = init(jax.random.key(0), vocab_size=10, d_model=4)
        >>> apply(p, jnp.array([[1, 2, 3]])).shape
        (1, 3, 4)
    """
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if "tableq" in params:                                # quantized: each row times its scale
        rows = jnp.take(params["tableq"], ids, axis=0).astype(params["scale"].dtype)
        return rows * jnp.take(params["scale"], ids, axis=0)[..., None]
    return jnp.take(params["table"], ids, axis=0)


def attend(params: dict, x: jax.Array, *, dtype=None) -> jax.Array:
    """(..., D) -> (..., V): x E^T, the score of every table row against x.

    The output head of a model with tied embeddings (GPT-2): the table that turns an
    id into a vector also turns a vector back into one score per id, so logit v is
    the dot product of x with token v's embedding. `dtype` is the compute dtype, as
    in `linear.apply`; None keeps the table's.

    Example:
        >>> p = init(jax.random.key(0), vocab_size=10, d_model=4)
        >>> attend(p, jnp.ones((2, 3, 4))).shape
        (2, 3, 10)
    """
    if "tableq" in params:                                # quantized: (x tableq^T) * scale, per id
        dtype = dtype or params["scale"].dtype
        scores = x.astype(dtype) @ params["tableq"].astype(dtype).T       # the form XLA:CPU converts in place
        return scores * jnp.expand_dims(params["scale"].astype(dtype), tuple(range(scores.ndim - 1)))
    dtype = dtype or params["table"].dtype
    return jnp.einsum("...d,vd->...v", x.astype(dtype), params["table"].astype(dtype))
