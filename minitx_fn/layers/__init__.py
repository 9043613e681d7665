"""Layers: each module is an `init(key, *, sizes) -> params` and `apply(params, x, ...) -> y` pair.

The contract, stated once:
- `init` returns a pytree (a dict) of arrays only. Sizes and dtypes are keyword
  arguments, never leaves, so `jax.tree.map` over parameters touches arrays and
  nothing else. Layers know their own sizes, never the model's config.
- `apply` is a pure function of its parameters and inputs. It works under `jit`,
  `vmap` and `grad`, and its docstring gives input and output shapes.
- A layer with options takes them as one value, its spec (`config.AttentionSpec`,
  `config.BlockSpec`), rather than a keyword each.
- Dimension letters: B batch, T query positions, S key/value positions, D model
  width, H heads, K head width (D / H), F feed-forward width, V vocabulary.
"""

import jax.numpy as jnp


def at_least_float32(dtype):
    """float64 stays float64; float32 and bfloat16 become float32.

    The dtype for the numerically delicate parts: layer-norm statistics, softmax,
    logits, loss and the residual stream. (Written out because `jnp.promote_types`
    refuses float32/float64 under strict promotion.)

    Example:
        >>> at_least_float32(jnp.bfloat16).__name__, at_least_float32(jnp.float64).__name__
        ('float32', 'float64')
    """
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def compute_dtype(name: str | None):
    """The jnp dtype a layer's spec names for its matmuls ("float32", "bfloat16",
    "float64"), or None to keep the parameters' own.

    Example:
        >>> compute_dtype("bfloat16").name, compute_dtype(None)
        ('bfloat16', None)
    """
    return None if name is None else jnp.dtype(name)


# The layer modules import these helpers from here, so they are defined first.
from minitx_fn.layers import (attention, block, dropout, embedding, feedforward, linear, norm,  # noqa: E402
                              positional, rmsnorm, rotary, swiglu)

__all__ = ["at_least_float32", "attention", "compute_dtype", "block", "dropout", "embedding", "feedforward", "linear", "norm",
           "positional", "rmsnorm", "rotary", "swiglu"]
