"""Benchmarks of minitx_fn against the Flax reference: `python -m benchmarks`."""
