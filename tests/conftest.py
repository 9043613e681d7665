"""Test configuration: strict promotion, a fresh key per test, hypothesis profiles.

- Strict dtype promotion and rank promotion "raise": an implicit float32/float64
  mix or an implicit broadcast of a lower-rank array is a bug in the library.
- `key`: a PRNG key derived from the test's own name, so no two tests share one;
  `rng`: a NumPy generator seeded the same way, for input data.
- Hypothesis: profile "ci" (the default) or "thorough", chosen by the environment
  variable MINITX_HYPOTHESIS_PROFILE (`MINITX_HYPOTHESIS_PROFILE=thorough pytest` for a
  long local run). "ci" draws a few fresh examples every run, so over many runs the
  properties see many inputs, and a failure prints the `@reproduce_failure` line that
  replays it; "thorough" draws 200. Deadlines are off: the first example of a jitted
  property pays for compilation.
- The fast-compile XLA flags (`minitx_fn.testing.fast_compile`), set before JAX starts,
  as a user's own conftest.py would.
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
from hypothesis import HealthCheck, settings  # noqa: E402

from minitx_fn.testing import standard_promotion  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

QUIET = [HealthCheck.too_slow, HealthCheck.differing_executors]
settings.register_profile("ci", max_examples=4, deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=QUIET)
settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True, suppress_health_check=QUIET)
settings.load_profile(os.environ.get("MINITX_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Tests marked heavy (10 to 40 s each) first, the rest in their order: the two
    workers then finish on short tests together, instead of one waiting out a long
    test that came last."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def saved_runs(tmp_path_factory):
    """Two runs trained once for the session (of each worker), never changed: `builtin`
    (the built-in corpus) and `text` (on text.txt, with validation), each saved at step
    20 (tests.helpers.RUN). Tests that change them take a copy (`work`)."""
    from minitx_fn import cli
    from tests.helpers import RUN
    root = tmp_path_factory.mktemp("saved")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rng = np.random.default_rng(0)
        open("text.txt", "w").write(" ".join(rng.choice(["to", "be", "or", "not", "that", "is"], 600)))
        with standard_promotion():
            assert cli.main(["train", *RUN, "--steps", "20", "--out", "builtin"]) == 0
            assert cli.main(["train", *RUN, "--steps", "20", "--data", "text.txt", "--out", "text"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def work(saved_runs, tmp_path, monkeypatch):
    """A fresh copy of the saved runs in tmp_path, which becomes the working directory."""
    import json
    import shutil
    for name in ("builtin", "text"):
        shutil.copytree(saved_runs / name, tmp_path / name)
    shutil.copy(saved_runs / "text.txt", tmp_path / "text.txt")
    monkeypatch.chdir(tmp_path)
    meta_path = tmp_path / "text" / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["job"]["data"]["path"] = str(tmp_path / "text.txt")                  # the copy trains on its copy
    meta_path.write_text(json.dumps(meta))
    return tmp_path


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
