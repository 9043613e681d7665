"""Test configuration: strict promotion, a fresh key per test, hypothesis profiles.

- Strict dtype promotion and rank promotion "raise": an implicit float32/float64
  mix or an implicit broadcast of a lower-rank array is a bug in the library.
- `key`: a PRNG key derived from the test's own name, so no two tests share one;
  `rng`: a NumPy generator seeded the same way, for input data.
- Hypothesis: profile "quick" (CI, default) or "thorough", chosen by the
  environment variable MINITX_HYPOTHESIS_PROFILE. "quick" draws the same 4 examples
  every run (derandomized), so a red run is a change in the code, never a new draw;
  "thorough" draws 200 fresh ones. Deadlines are off: the first example of a jitted
  property pays for compilation.
"""

from __future__ import annotations

import gc
import os
import tempfile
import zlib

# One persistent compilation cache for the whole session, this process and the
# subprocesses the tests start (they inherit the environment): a program compiled
# once, by any test or process, is read back instead of compiled again. Set before
# JAX is imported, which reads these variables at start-up.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="minitx-test-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Prepared data (minitx_fn.corpus) goes to a folder of the session's, not ~/.cache.
os.environ.setdefault("MINITX_CACHE_DIR", tempfile.mkdtemp(prefix="minitx-test-data-"))
# Compiling, not running, is what the suite spends its time on: the fast-compile XLA
# flags (`minitx_fn.testing.fast_compile`, which says why) halve it. Every comparison
# here is within a tolerance or between two runs under the same flags.
from minitx_fn.testing import fast_compile  # noqa: E402  (imports no JAX)

os.environ.setdefault("MINITX_TEST_ADDED_XLA_FLAGS", " ".join(fast_compile()))    # tests.helpers.user_env removes them

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile("quick", max_examples=4, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
settings.load_profile(os.environ.get("MINITX_HYPOTHESIS_PROFILE", "quick"))


def pytest_collection_modifyitems(config, items):
    """Tests marked heavy (10 to 40 s each) first, the rest in their order: the two
    workers then finish on short tests together, instead of one waiting out a long
    test that came last."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


PARITY_REASON = "the parity tests need torch and transformers: pip install -e \".[test,parity]\""


@pytest.fixture(scope="session")
def hf():
    """(torch, transformers) for the parity tests against Hugging Face's own models, or a
    skip that says how to install them (the `parity` extra)."""
    torch = pytest.importorskip("torch", reason=PARITY_REASON)
    transformers = pytest.importorskip("transformers", reason=PARITY_REASON)
    transformers.logging.set_verbosity_error()
    return torch, transformers


@pytest.fixture
def key(request) -> jax.Array:
    """A PRNG key unique to this test (seeded by a hash of its node id)."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A NumPy generator unique to this test, for input data: drawing it costs no
    JAX compilation (every new shape of a jax.random draw compiles on its own)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _memory_maps() -> tuple[int, int]:
    """(this process's memory maps, the kernel's limit on them), or (0, 0) off Linux."""
    try:
        with open("/proc/self/maps", "rb") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return maps.read().count(b"\n"), int(limit.read())
    except OSError:
        return 0, 0


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
    """Drop JAX's compiled programs once this worker holds half the memory maps the
    kernel allows. Each program compiled for the CPU keeps 3 to 6 maps of its code, a
    worker of this suite compiles some 15,000 programs, and at vm.max_map_count (65,530
    by default) the next compilation fails to map its code and the process dies with a
    segmentation fault. Dropped programs come back from the persistent cache."""
    yield
    held, limit = _memory_maps()
    if held > limit // 2:
        jax.clear_caches()
        gc.collect()
