"""Will it fit? Lower bounds on the memory a run needs, checked before any work.

A model of absurd size, a huge batch or context, or a generation of 10^12 tokens
would otherwise end in an allocation failure deep inside XLA (often an abort, not
a Python exception). The estimates below count only the large buffers that must
exist at once, so they are lower bounds: a request refused here could never have
run, and one accepted may still be tight.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from minitx_fn import lora as lora_lib
from minitx_fn.config import LanguageModel, LoraConfig, ModelConfig
from minitx_fn.errors import MemoryBudgetError


def param_count(model: LanguageModel) -> int:
    """Parameters of the model, from the model value alone: the shapes its `init` would
    make (`jax.eval_shape`: traced, no arrays built, whatever the size).

    Example:
        >>> param_count(ModelConfig(vocab_size=13, d_model=64, n_heads=4, n_layers=2))   # the README's tree
        101773
    """
    return _count(_shapes(model))


def _shapes(model: LanguageModel):
    return jax.eval_shape(model.init, jax.random.key(0))


def _count(shapes) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))


def _bytes(shapes) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes))


def training_bytes(model: LanguageModel, batch_size: int, lora: LoraConfig | None = None, accumulate: int = 1) -> int:
    """Parameters, gradients and two Adam moments, the batch's ids (inputs and targets),
    plus the logits of a micro-batch (batch_size / accumulate rows,
    `TrainConfig.grad_accum`) and, for the built-in model, one layer's activations:
    what one train step must hold at once (for a model of one's own, without its
    activations: still a lower bound).

    With `lora`, the weights part is the frozen base once, the gradient of every adapted
    weight (merging in front of the model forms it, `lora.py`) and the adapters with
    their gradient and two moments.

    Example:
        >>> cfg = ModelConfig(vocab_size=13, d_model=64, n_heads=4, max_len=32)
        >>> training_bytes(cfg, 16) > 4 * 101773 * 4
        True
        >>> training_bytes(cfg, 16, LoraConfig(rank=4)) < training_bytes(cfg, 16)
        True
    """
    shapes = _shapes(model)
    if lora is None:
        weights = 4 * _bytes(shapes)
    else:
        paths = lora_lib.targets(model, shapes, lora)
        adapters = jax.eval_shape(lambda k: lora_lib.init(k, shapes, paths, lora.rank), jax.random.key(0))
        adapted = sum(_bytes(lora_lib.weight(shapes, path)) for path in paths)
        weights = _bytes(shapes) + adapted + 4 * _bytes(adapters)
    b, t = batch_size // accumulate, model.max_len
    activations = 2 * b * t * model.vocab_size                           # the logits and their gradient
    if isinstance(model, ModelConfig):
        c = model
        scores = b * c.n_heads * t * min(t, c.attention_block or t)       # one block of attention scores
        activations += b * t * (6 * c.d_model + c.d_ff) + scores
    return weights + activations * 4 + 2 * batch_size * t * 4


def generation_bytes(model: LanguageModel, batch: int, max_new_tokens: int) -> int:
    """Parameters (and the built-in model's blocks again: `decode_params` unstacks them
    for the loop), the cache of max_len slots per row, and the generated ids.

    Example:
        >>> generation_bytes(ModelConfig(vocab_size=13, max_len=10**9), 1, 10) > 10**12
        True
    """
    shapes = _shapes(model)
    cache = jax.eval_shape(lambda: model.init_cache(batch, model.max_len))
    copies = _bytes(shapes["blocks"]) if isinstance(model, ModelConfig) else 0
    return _bytes(shapes) + copies + _bytes(cache) + batch * max_new_tokens * 4


EVAL_BATCH = 64            # windows an evaluation batch holds at most


LOGIT_COPIES = 3           # (B, T, V) float32 arrays an evaluation holds: logits, log-softmax, temporaries
COMPARISON_COPIES = 9      # ... `train.compare`: two models' logits and log-softmax, probabilities, the KL's terms


def evaluation_bytes(model: LanguageModel, batch: int, positions: int, copies: int = LOGIT_COPIES) -> int:
    """Parameters, a batch of windows, and `copies` of its (batch, positions, V) float32
    logits (LOGIT_COPIES for a loss: the logits, their log-softmax, and the
    gradient-free temporaries XLA may keep beside them): what one evaluation batch holds
    at once.

    Example:
        >>> evaluation_bytes(ModelConfig(vocab_size=50257, max_len=1024, d_model=8, n_heads=2), 1, 1024) > 6e8
        True
    """
    return _bytes(_shapes(model)) + batch * (positions + 1) * 4 + copies * batch * positions * model.vocab_size * 4


def evaluation_batch(model: LanguageModel, positions: int, copies: int = LOGIT_COPIES) -> int:
    """The windows of `positions` tokens an evaluation batch takes: the largest power of
    two up to EVAL_BATCH whose batch (`evaluation_bytes`) fits in half the memory
    available (the rest for what the estimate leaves out); MemoryBudgetError when not
    even one window fits. GPT-2 small (V = 50,257) over 1,024 positions: 617 MB of
    logits a window, so 16 a batch on a machine with 24 GB free.

    Example:
        >>> evaluation_batch(ModelConfig(vocab_size=5, d_model=8, n_heads=2), 64)
        64
    """
    available = available_bytes()
    batch = EVAL_BATCH
    while available is not None and batch > 1 and evaluation_bytes(model, batch, positions, copies) > available / 2:
        batch //= 2
    check(evaluation_bytes(model, batch, positions, copies), "evaluating this model",
          "evaluate a model with a smaller {c} or {v}", c=("max_len", positions),
          v=("vocab_size", model.vocab_size))
    return batch


def available_bytes() -> int | None:
    """Memory free for a new run: the first local device's free memory on an accelerator,
    MemAvailable from /proc/meminfo on a CPU (Linux), else None (unknown).

    Example:
        >>> available_bytes() is None or available_bytes() > 0
        True
    """
    device = jax.local_devices()[0]                        # in a multi-process run, one of this process's
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check(needed: int, what: str, fix: str, **mentions) -> None:
    """MemoryBudgetError if `needed` bytes exceed what is available; `fix` may mention fields.

    Example:
        >>> check(10**20, "this model", "make it smaller")
        Traceback (most recent call last):
        minitx_fn.errors.MemoryBudgetError: this model needs at least 100,000,000,000.0 GB of memory, ...; make it smaller
    """
    available = available_bytes()
    if available is not None and needed > available:
        raise MemoryBudgetError(f"{what} needs at least {_gb(needed)} of memory, {_gb(available)} are available; "
                                + fix, **mentions)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if math.isfinite(n / 1e9) else "more than any machine has"
