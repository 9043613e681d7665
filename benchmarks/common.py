"""What every benchmark shares: the configs, the FLOP count, the device and version
report, and the one timing loop (alternating blocks, paired ratios).

Method, stated once. Every timed call ends in `block_until_ready`. Compilation is
timed apart from running. Implementations (or config variants) A, B, ... run in
alternating blocks, A B A B ..., after a warm-up, on the same batch, so that the
drift of a shared, noisy machine hits them alike; a ratio is the median over
blocks of median(A) / median(B) within the block.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitx_fn import memory
from minitx_fn.config import ModelConfig

# Tiny Shakespeare in the project's workspace, beside the repository (not part of it).
SHARED_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                           "tinyshakespeare.txt")

# The shapes timed. `micro` exists for the tests and --smoke runs: seconds, not minutes.
CONFIGS = {
    "micro": dict(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_len=16, batch=4),
    "tiny": dict(vocab_size=65, d_model=64, n_layers=2, n_heads=4, max_len=64, batch=16),
    "baby": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, max_len=64, batch=12),
    "medium": dict(vocab_size=65, d_model=384, n_layers=6, n_heads=6, max_len=256, batch=8),
    # GPT-2 124M as `minitx import-gpt2` builds it: its vocabulary, learned positions, tied head.
    "gpt2-small": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_len=1024, batch=8,
                       positions="learned", tie_embeddings=True),
}


def model_config(spec: dict, **options) -> ModelConfig:
    """The ModelConfig of a CONFIGS entry (its sizes, without the batch) with `options` changed.

    Example:
        >>> model_config(CONFIGS["tiny"], remat="none").remat
        'none'
    """
    return ModelConfig(**{**{k: v for k, v in spec.items() if k != "batch"}, **options})


def model_option(text: str) -> tuple[str, object]:
    """'remat=none' -> ('remat', 'none'); numbers and booleans parsed, other values kept as text.

    Example:
        >>> model_option("attention_block=64"), model_option("remat=none")
        (('attention_block', 64), ('remat', 'none'))
    """
    field, sep, value = text.partition("=")
    if not sep or field not in ModelConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE with FIELD one of ModelConfig's fields")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def check_options(parser: argparse.ArgumentParser, names: list[str], options: dict) -> None:
    """Exit through `parser.error` (status 2, one line) if `options` make an invalid config for any of `names`."""
    for name in names:
        try:
            model_config(CONFIGS[name], **options)
        except (TypeError, ValueError) as e:
            parser.error(f"--option for config {name}: {e}")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1.

    Example:
        >>> positive_int("3")
        3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def flops_per_step(config: ModelConfig, batch_size: int) -> float:
    """Model FLOPs of one train step: 6 N B T for the matmuls (forward and backward, N the
    non-embedding parameters) + 12 L B T^2 D for attention's scores and mixing.

    Example:
        >>> c = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=1, max_len=4)
        >>> n = memory.param_count(c) - 5 * 8
        >>> flops_per_step(c, 2) == 6 * n * 2 * 4 + 12 * 1 * 2 * 4**2 * 8
        True
    """
    b, t = batch_size, config.max_len
    n = memory.param_count(config) - config.vocab_size * config.d_model
    return 6.0 * n * b * t + 12.0 * config.n_layers * b * t * t * config.d_model


def xla_flops_per_step(compiled) -> float | None:
    """The FLOPs XLA's cost analysis counts in a compiled program, or None where the
    backend gives none. (A loop's body may be counted once, not once per iteration.)"""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):                     # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


@contextlib.contextmanager
def count_compiles():
    """Yields a list that gains one entry per XLA compilation inside the block (the
    backend_compile events of `jax.monitoring`): a step that never recompiles adds none.

    Example:
        >>> f = jax.jit(lambda x: x + 1)
        >>> _ = f(jnp.ones(2))
        >>> with count_compiles() as compiles:
        ...     _ = f(jnp.ones(2)); _ = f(jnp.ones(2))
        >>> len(compiles)
        0
    """
    compiles, active = [], [True]

    def listen(event: str, duration: float, **kwargs) -> None:
        if active[0] and event.endswith("backend_compile_duration"):
            compiles.append(duration)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        active[0] = False                              # jax.monitoring has no public way to unregister


def sync(x):
    return jax.block_until_ready(x)


def timed(fn: Callable) -> float:
    """Seconds of one call of fn, up to its result being ready."""
    t = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t


def median_ms(fn: Callable, reps: int) -> float:
    return 1e3 * statistics.median(timed(fn) for _ in range(reps))


def alternate(fns: dict[str, Callable], *, blocks: int, per_block: int, warmup: int = 2,
              pause_s: float = 0.0) -> dict[str, list[list[float]]]:
    """Time each fn `per_block` times per block, in turns, `blocks` times, after `warmup`
    calls each. Returns {name: [block 1 times, block 2 times, ...]} in seconds.

    pause_s sleeps before each block: PyTorch's OpenMP threads spin for a while after
    their work and would slow the next implementation's first steps.

    Example:
        >>> out = alternate({"a": lambda: 1, "b": lambda: 2}, blocks=2, per_block=3)
        >>> [len(blocks) for blocks in out["a"]]
        [3, 3]
    """
    for fn in fns.values():
        for _ in range(warmup):
            timed(fn)
    times = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            time.sleep(pause_s)
            times[name].append([timed(fn) for _ in range(per_block)])
    return times


def paired_ratio(a: list[list[float]], b: list[list[float]]) -> float:
    """Median over blocks of median(a's block) / median(b's block).

    Example:
        >>> paired_ratio([[2.0, 2.0], [4.0, 4.0]], [[1.0, 1.0], [2.0, 2.0]])
        2.0
    """
    return statistics.median(statistics.median(x) / statistics.median(y) for x, y in zip(a, b))


def device_info() -> dict:
    d = jax.devices()[0]
    return {"platform": d.platform, "kind": d.device_kind, "count": jax.device_count(),
            "host": platform.processor() or platform.machine()}


def _jaxlib_version() -> str:
    import jaxlib
    return getattr(jaxlib, "__version__", None) or jaxlib.version.__version__


def versions() -> dict:
    import flax
    found = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": _jaxlib_version(),
             "optax": optax.__version__, "flax": flax.__version__, "numpy": np.__version__}
    try:
        import torch
        found["torch"] = torch.__version__
        found["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return found


def matmul_peak_gflops(dtype, n: int, reps: int = 10) -> float:
    """Best of `reps` timings of an n x n matmul, as GFLOP/s (2 n^3 per product)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    sync(f(a, a))
    best = min(timed(lambda: f(a, a)) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def copy_bandwidth_gbs(n_bytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy: bytes read + written per second."""
    x = jnp.zeros((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    sync(f(x))
    return 2 * n_bytes / min(timed(lambda: f(x)) for _ in range(reps)) / 1e9


def read_bandwidth_gbs(n_bytes: int = 1 << 30, reps: int = 10) -> float:
    """Memory read bandwidth: bytes summed per second, best of `reps` sums of an
    n_bytes float32 array (what a decode step at batch 1 does to the weights)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    sync(f(x))
    return n_bytes / min(timed(lambda: f(x)) for _ in range(reps)) / 1e9


def peak_memory_mb() -> float:
    """The device's peak bytes in use (accelerators), else the process's peak resident memory."""
    d = jax.devices()[0]
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux -> MiB


def check_output_path(parser: argparse.ArgumentParser, path: str, flag: str) -> None:
    """Exit through parser.error, naming flag, unless a file can be written at path
    (checked before hours of timing).

    Example:
        >>> check_output_path(argparse.ArgumentParser(), "out.json", "--json")      # the current folder: fine
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{flag} {path!r} is a directory")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        parser.error(f"{flag} {path!r}: folder {folder!r} does not exist or is not writable")
