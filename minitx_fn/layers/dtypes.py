"""The dtypes layers compute in: the one rule for precision, in one place."""

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
