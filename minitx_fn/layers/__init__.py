"""Layers: each module is an `init(key, *, sizes) -> params` and `apply(params, x, ...) -> y` pair.

The contract, stated once:
- `init` returns a pytree (a dict) of arrays only. Sizes and flags are arguments,
  never leaves, so `jax.tree.map` over parameters touches arrays and nothing else.
- `apply` is a pure function of its parameters and inputs. It works under `jit`,
  `vmap` and `grad`, and its docstring gives input and output shapes.
- Dimension letters: B batch, T query positions, S key/value positions, D model
  width, H heads, K head width (D / H), F feed-forward width, V vocabulary.
"""

from minitx_fn.layers import attention, block, embedding, feedforward, linear, norm, positional

__all__ = ["attention", "block", "embedding", "feedforward", "linear", "norm", "positional"]
