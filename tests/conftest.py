"""Test configuration: strict promotion, a fresh key per test, hypothesis profiles.

- Strict dtype promotion and rank promotion "raise": an implicit float32/float64
  mix or an implicit broadcast of a lower-rank array is a bug in the library.
- `key`: a PRNG key derived from the test's own name, so no two tests share one.
- Hypothesis: profile "quick" (CI, default) or "thorough", chosen by the
  environment variable MINITX_HYPOTHESIS_PROFILE. Deadlines are off: the first
  example of a jitted property pays for compilation.
"""

from __future__ import annotations

import os
import zlib

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile("quick", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.load_profile(os.environ.get("MINITX_HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture
def key(request) -> jax.Array:
    """A PRNG key unique to this test (seeded by a hash of its node id)."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))
