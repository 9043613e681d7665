"""minitx_fn: a mini GPT-style language model written as plain JAX functions.

The names a reader starts from, all importable from here:

    from minitx_fn import job, checkpoint, generate
    result = job.train("input.txt", model={"d_model": 128}, training={"steps": 2000})   # the whole job
    m = checkpoint.load_model(result.run_dir)                                         # params, model, tokenizer
    print(generate.complete(m, "ROMEO:"))                                             # text in, text out

    from minitx_fn import ModelConfig, TrainConfig, train                              # the pieces
    cfg = ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, max_len=64)   # a model is a value
    params = cfg.init(key)                              # a plain dict of arrays
    logits = cfg.apply(params, tokens)                  # (B, T) ids -> (B, T, V)
    tc = TrainConfig(steps=1000)
    state = train.init_state(key, cfg, tc.optimizer)
    state, metrics = train.train_step(state, (x, y), model=cfg, optimizer_config=tc.optimizer)

| name | what it is |
|---|---|
| `job` | `Job` (data, model, training, start, devices, sample: one value), `make` (settings -> a Job), `plan`, `run`, `train` (`minitx train`); `evaluate`: a text's loss under a run (`minitx eval`) |
| `ModelConfig`, `LanguageModel` | the built-in model as a value (its fields, and init/apply/init_cache/apply_cached), and the contract a model of one's own keeps (`config.py`) |
| `TrainConfig`, `OptimizerConfig`, `LoraConfig` | frozen, hashable, validated values (`config.py`; `checks.py` their checks); `defaults`: presets and limits |
| `RopeScaling`, `AttentionSpec`, `BlockSpec` | the layers' options, one value per layer (`specs.py`) |
| `layers` | one init/apply pair per layer (`layers/`), options as one spec value per layer |
| `model` | the built-in model's functions: `init`, `apply`, `apply_cached`, `init_cache`, `attention_maps` |
| `train` | `TrainState`, `init_state`, `new_state`, `make_step` (any loss, any optax), `train_step`, `batch_at`, `evaluate`, `lora_state`, `cross_entropy` |
| `lora`, `LoraConfig` | low-rank adapters as a transform of the parameter tree: `init`, `merge` |
| `hf` | Hugging Face folders in and out: `hf.import_run` / `export_run` (GPT-2, Llama, Qwen2; `hf/`, a module per family) |
| `loop` | `fit`: the training loop around any step (logging, checkpoints, signals) |
| `generate`, `decode`, `speculative`, `Sampler` | `generate.complete`: text in, text out; `generate.generate`: ids, cached decoding in one compiled loop (`decode`: its shared pieces; `speculative`: with a draft) |
| `CharTokenizer`, `ByteTokenizer`, `BPETokenizer` | text <-> ids: one interface, three kinds (`tokenizer.py`) |
| `corpus` | `Corpus` (`from_text`, `from_ids`, `builtin`), `prepare`: a text file streamed once into cached ids |
| `data` | batches (`sample_batch`, memory-mapped `host_batch_at`), validation windows (`eval_windows`) |
| `checkpoint` | `save`, `load`, `load_model` (parameters only), `upgrade`, `save_params` / `load_params` (any tree) |
| `testing` | `check_model` (a model's laws), `check_layer`, strategies, `fast_compile` (needs the test extra) |

Names load on first use (PEP 562), so `import minitx_fn.cli` does not import JAX.
"""

from __future__ import annotations

import importlib

# A submodule, once imported, is also an attribute of the package: so `generate` is
# the module (its function is generate.generate), never sometimes one, sometimes the other.
_MODULES = ("checkpoint", "checks", "config", "corpus", "data", "decode", "defaults", "distributed", "generate", "hf",
            "job", "layers", "loop", "lora", "memory", "model", "runs", "sampling", "specs", "speculative", "testing",
            "tokenizer", "train")
_NAMES = {"ModelConfig": "config", "LanguageModel": "config", "TrainConfig": "config", "OptimizerConfig": "config",
          "LoraConfig": "config", "RopeScaling": "specs", "AttentionSpec": "specs", "BlockSpec": "specs",
          "CharTokenizer": "tokenizer",
          "ByteTokenizer": "tokenizer", "BPETokenizer": "tokenizer", "Sampler": "sampling"}

__all__ = sorted(_MODULES + tuple(_NAMES))


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"minitx_fn.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"minitx_fn.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'minitx_fn' has no attribute {name!r}")
