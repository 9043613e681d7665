"""minitx_fn: a mini GPT-style language model written as plain JAX functions.

The names a reader starts from, all importable from here:

    from minitx_fn import ModelConfig, TrainConfig, CharTokenizer, generate, model, train

    cfg = ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, max_len=64)
    params = model.init(key, cfg)                       # a plain dict of arrays
    logits = model.apply(params, tokens, config=cfg)    # (B, T) ids -> (B, T, V)
    state = train.init_state(key, cfg, TrainConfig())
    state, metrics = train.train_step(state, (x, y), model_config=cfg, train_config=tc)
    new_ids = generate.generate(params, [prompt_ids], config=cfg, key=key, max_new_tokens=100)

| name | what it is |
|---|---|
| `ModelConfig`, `TrainConfig` | frozen, hashable, validated configs (`config.py`) |
| `layers` | one init/apply pair per layer (`layers/`) |
| `model` | `init`, `apply`, `loss`, `apply_cached`, `init_cache` |
| `train` | `TrainState`, `init_state`, `train_step`, `batch_at`, `evaluate`, `make_optimizer` |
| `loop` | `fit`: the training loop (logging, checkpoints, signals) |
| `generate`, `Sampler` | `generate.generate`: cached decoding in one compiled loop; `Sampler`: greedy, temperature, top-k, top-p |
| `CharTokenizer`, `ByteTokenizer`, `BPETokenizer` | text <-> ids: one interface, three kinds (`tokenizer.py`) |
| `corpus` | `prepare`: a text file streamed once into cached token ids, read back as a memory map |
| `checkpoint` | `save`, `load` |

Names load on first use (PEP 562), so `import minitx_fn.cli` does not import JAX.
"""

from __future__ import annotations

import importlib

# A submodule, once imported, is also an attribute of the package: so `generate` is
# the module (its function is generate.generate), never sometimes one, sometimes the other.
_MODULES = ("checkpoint", "config", "corpus", "data", "distributed", "generate", "layers", "loop", "memory", "model",
            "runs", "sampling", "tokenizer", "train")
_NAMES = {"ModelConfig": "config", "TrainConfig": "config", "CharTokenizer": "tokenizer", "ByteTokenizer": "tokenizer",
          "BPETokenizer": "tokenizer", "Sampler": "sampling"}

__all__ = sorted(_MODULES + tuple(_NAMES))


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"minitx_fn.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"minitx_fn.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'minitx_fn' has no attribute {name!r}")
