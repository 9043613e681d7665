"""minitx_fn: a mini GPT-style character language model written as plain JAX functions."""
