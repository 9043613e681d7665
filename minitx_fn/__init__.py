"""minitx_fn: a mini GPT-style language model written as plain JAX functions.

The names a reader starts from, all importable from here:

    from minitx_fn import job, checkpoint, generate
    result = job.train("input.txt", model={"d_model": 128}, training={"steps": 2000})   # the whole job
    m = checkpoint.load_model(result.run_dir)                                         # params, config, tokenizer
    print(generate.complete(m, "ROMEO:"))                                             # text in, text out

    from minitx_fn import ModelConfig, TrainConfig, model, train                       # the pieces
    cfg = ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, max_len=64)
    params = model.init(key, cfg)                       # a plain dict of arrays
    logits = model.apply(params, tokens, config=cfg)    # (B, T) ids -> (B, T, V)
    tc = TrainConfig(steps=1000)
    state = train.init_state(key, cfg, tc.optimizer)
    state, metrics = train.train_step(state, (x, y), model_config=cfg, optimizer_config=tc.optimizer)

| name | what it is |
|---|---|
| `job` | `train`: the whole job (`minitx train`) as one function of values; `plan`, `run` its halves; `evaluate`: a text's loss under a run (`minitx eval`) |
| `ModelConfig`, `TrainConfig`, `OptimizerConfig`, `RopeScaling` | frozen, hashable, validated configs (`config.py`); `defaults`: presets and limits |
| `layers` | one init/apply pair per layer (`layers/`) |
| `model` | `init`, `apply`, `loss`, `cross_entropy`, `block_args` (a config as a block's arguments), `apply_cached`, `init_cache` |
| `train` | `TrainState`, `init_state`, `new_state`, `make_step` (any loss, any optax), `train_step`, `batch_at`, `evaluate`, `lora_state` |
| `lora`, `LoraConfig` | low-rank adapters as a transform of the parameter tree: `init`, `merge` |
| `gpt2`, `llama` | Hugging Face folders in and out: `gpt2.import_run` / `export_run` (GPT-2, Llama, Qwen2) |
| `loop` | `fit`: the training loop around any step (logging, checkpoints, signals) |
| `generate`, `Sampler` | `generate.complete`: text in, text out; `generate.generate`: ids, cached decoding in one compiled loop |
| `CharTokenizer`, `ByteTokenizer`, `BPETokenizer` | text <-> ids: one interface, three kinds (`tokenizer.py`) |
| `corpus` | `Corpus` (`from_text`, `from_ids`, `builtin`), `prepare`: a text file streamed once into cached ids |
| `data` | batches (`sample_batch`, memory-mapped `host_batch_at`), validation windows (`eval_windows`) |
| `checkpoint` | `save`, `load`, `load_model` (parameters only), `save_params` / `load_params` (any tree) |
| `testing` | the layer-test helpers (`check_layer`, `assert_close_scaled`; needs the test extra) |

Names load on first use (PEP 562), so `import minitx_fn.cli` does not import JAX.
"""

from __future__ import annotations

import importlib

# A submodule, once imported, is also an attribute of the package: so `generate` is
# the module (its function is generate.generate), never sometimes one, sometimes the other.
_MODULES = ("checkpoint", "config", "corpus", "data", "defaults", "distributed", "generate", "gpt2", "job", "layers",
            "llama", "loop", "lora", "memory", "model", "runs", "sampling", "testing", "tokenizer", "train")
_NAMES = {"ModelConfig": "config", "TrainConfig": "config", "OptimizerConfig": "config", "LoraConfig": "config",
          "RopeScaling": "config", "CharTokenizer": "tokenizer",
          "ByteTokenizer": "tokenizer", "BPETokenizer": "tokenizer", "Sampler": "sampling"}

__all__ = sorted(_MODULES + tuple(_NAMES))


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"minitx_fn.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"minitx_fn.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'minitx_fn' has no attribute {name!r}")
