"""Layers: each module is an `init(key, *, sizes) -> params` and `apply(params, x, ...) -> y` pair.

The contract, stated once:
- `init` returns a pytree (a dict) of arrays only. Sizes and dtypes are keyword
  arguments, never leaves, so `jax.tree.map` over parameters touches arrays and
  nothing else. Layers know their own sizes, never the model's config.
- `apply` is a pure function of its parameters and inputs. It works under `jit`,
  `vmap` and `grad`, and its docstring gives input and output shapes.
- A layer with options takes them as one value, its spec (`specs.AttentionSpec`,
  `specs.BlockSpec`), rather than a keyword each.
- Dimension letters: B batch, T query positions, S key/value positions, D model
  width, H heads, K head width (D / H), F feed-forward width, V vocabulary.
"""

from minitx_fn.layers import (attention, block, dropout, dtypes, embedding, feedforward, linear, norm, positional,
                              rmsnorm, rotary, swiglu)
from minitx_fn.layers.dtypes import at_least_float32, compute_dtype

__all__ = ["at_least_float32", "attention", "compute_dtype", "block", "dropout", "dtypes", "embedding", "feedforward",
           "linear", "norm", "positional", "rmsnorm", "rotary", "swiglu"]
