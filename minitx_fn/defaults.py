"""Presets, limits and choices: the numbers every other module reads, in one place.

No JAX here (nor in `config.py`, which holds the configs' own defaults), so the
command line builds its `--help` from these values without starting JAX, and never
declares a number of its own.
"""

from __future__ import annotations

import copy

from minitx_fn.errors import ConfigError

INT32_MAX = 2**31 - 1                  # step counters, token ids and batch offsets are int32
SEED_MAX = 2**32 - 1                   # jax.random.key keeps 32 bits of a seed: larger ones repeat smaller ones
FLOAT32_MAX = 3.4028234663852886e38    # a setting the device sees as float32 must stay below this
MAX_LAYERS = 1024                       # ModelConfig.n_layers at most: ten times GPT-3's 96
MAX_NEW_TOKENS = 1_000_000             # hours of decoding on a CPU already; the (B, N) id buffer stays small

# ModelConfig's choices.
DTYPES = ("float32", "bfloat16", "float64")      # compute dtypes; parameters are stored in float32 or float64
PARAM_DTYPES = ("float32", "float64")
ATTENTION_IMPLS = ("einsum", "dot_product_attention")
POSITIONS = ("sinusoidal", "learned", "rotary", "none")
QUANTIZE_KINDS = ("int8", "bfloat16")        # what a run's weights may be quantized to (quantize.py)
ROPE_THETA = 10000.0                   # the rotary base of RoFormer and Llama 1/2 (ModelConfig.rope_theta)
# Scaled rotary positions (config.RopeScaling.kind) -> the fields each kind reads
# besides `factor` (Hugging Face's rope_type of the same name; layers/rotary.py).
ROPE_SCALINGS = {"linear": (), "llama3": ("original_max_len", "low_freq_factor", "high_freq_factor"),
                 "yarn": ("original_max_len", "beta_fast", "beta_slow", "truncate", "attention_factor")}
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
OPTIMIZERS = ("adamw", "muon")               # OptimizerConfig.method (train.make_optimizer)
# Architectures (`minitx train --arch`): consistent groups of ModelConfig fields; a
# single flag overrides one. gpt is ModelConfig's own defaults; gpt2 is GPT-2's shape
# (what export-gpt2 writes); llama is Llama's four changes: rotary positions, RMS
# normalisation, a gated (SwiGLU) feed-forward, no biases, an untied head
# (grouped-query attention is --kv-heads on any of them).
ARCHS = {
    "gpt": {"positions": "sinusoidal", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": False},
    "gpt2": {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": True},
    "llama": {"positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False},
}
# What a block's backward pass keeps from its forward pass (model.REMAT_POLICIES maps
# each name to JAX's policy; config.py says why "matmuls" is the default).
REMAT = ("none", "matmuls", "dots", "full")

# Tokenizers and prepared data.
TOKENIZERS = ("char", "byte", "bpe")
DEFAULT_BPE_VOCAB = 4096
MIN_BPE_VOCAB = 256                    # the 256 bytes, then merges
MAX_BPE_VOCAB = 1 << 20
TRAIN_FRACTION = 0.9                   # the first 90% of a text trains, the rest validates
CACHE_ENV = "MINITX_CACHE_DIR"

# Training.
DEFAULT_EVAL_TOKENS = 1 << 17          # about Tiny Shakespeare's validation split (111,540 characters)
DEVICE_RESIDENT_TOKENS = 1 << 26       # 256 MB of int32 ids on the device; more are memory-mapped
BATCH_SOURCES = ("auto", "device", "memmap")
SAMPLE_TOKENS = 100                    # the sample printed at the end of a run
DRAFT_TOKENS = 4                       # tokens a draft model proposes per round (speculative decoding)
HEARTBEAT_TIMEOUT_S = 60               # a dead peer of a multi-process run is noticed within this
HEARTBEAT_TIMEOUT_MAX = 86400          # seconds: a day
START_TIMEOUT_S = 120                  # how long the processes of a run wait for each other to join

# LoRA (TrainConfig.lora_*): which linear layers of every block get adapters.
# "mlp/gate" exists in a SwiGLU feed-forward only; a GELU model has no such layer to adapt.
LORA_TARGETS = {"attn": ("attn/qkv", "attn/out"), "mlp": ("mlp/gate", "mlp/up", "mlp/down"),
                "all": ("attn/qkv", "attn/out", "mlp/gate", "mlp/up", "mlp/down")}

# Presets: a model (ModelConfig fields but vocab_size, which the tokenizer gives) and
# its training (TrainConfig fields, the optimizer's nested). No preset sets min_lr: it
# is lr / 10 (nanoGPT's 1e-4 at lr 1e-3), so a lower lr brings the end of the cosine down with it.
PRESETS = {
    # The built-in corpus: a small, fast model that learns the three-phrase cycle.
    "hello": {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_len": 32, "dropout": 0.0},
        "train": {"batch_size": 16, "steps": 500, "eval_every": 250, "save_every": 500, "log_every": 100,
                  "optimizer": {"lr": 3e-3, "warmup": 50}},
    },
    # nanoGPT's CPU recipe for Tiny Shakespeare (its README, "baby GPT").
    "shakespeare-baby": {
        "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "max_len": 64, "dropout": 0.0},
        "train": {"batch_size": 12, "steps": 2000, "eval_every": 250, "save_every": 500, "log_every": 100,
                  "optimizer": {"lr": 1e-3, "warmup": 100}},
    },
    # The baby model's sizes trained to nanoGPT's loss in less time: Llama's layers, Muon
    # for the blocks' matrices, a fifth of the steps (benchmarks/quality.py measures it).
    "shakespeare-fast": {
        "model": {"d_model": 128, "n_layers": 4, "n_heads": 4, "max_len": 64, "dropout": 0.0, **ARCHS["llama"]},
        "train": {"batch_size": 12, "steps": 400, "eval_every": 100, "save_every": 400, "log_every": 50,
                  "optimizer": {"method": "muon", "lr": 6e-3, "muon_lr": 0.02, "warmup": 20}},
    },
    # nanoGPT's GPU recipe (config/train_shakespeare_char.py): 10.7M parameters, hours on 2 CPU cores.
    "shakespeare-char": {
        "model": {"d_model": 384, "n_layers": 6, "n_heads": 6, "max_len": 256, "dropout": 0.2},
        "train": {"batch_size": 64, "steps": 5000, "eval_every": 250, "save_every": 1000, "log_every": 100,
                  "optimizer": {"lr": 1e-3, "warmup": 100}},
    },
}
# The preset of a run that names none: hello on the built-in corpus, the baby recipe on a text.
PRESET_BUILTIN, PRESET_TEXT = "hello", "shakespeare-baby"


def preset(name: str | None, *, has_data: bool) -> dict:
    """{"model": {...}, "train": {...}} of a preset (copies), or of the default one.

    Example:
        >>> preset(None, has_data=False)["model"]["d_model"], preset(None, has_data=True)["train"]["steps"]
        (64, 2000)
    """
    name = name or (PRESET_TEXT if has_data else PRESET_BUILTIN)
    if name not in PRESETS:
        raise ConfigError(f"{{preset}} is unknown; choose one of {sorted(PRESETS)}", preset=("preset", name))
    return copy.deepcopy(PRESETS[name])
