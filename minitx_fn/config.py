"""Values: frozen, hashable, validated on construction.

A model is a value: its config (the dataclass fields) and its pure functions (the
methods), `LanguageModel`'s contract. The built-in GPT / Llama family is one such
value, `ModelConfig`; a model of one's own is another, a subclass that overrides a
block (`tests/variants.py` holds two) or a `LanguageModel` written from scratch.
Everything that consumes a model (the train step, evaluation, the job, checkpoints,
generation, speculative decoding, LoRA, memory estimates) takes the value and calls
its methods, never a function of the built-in by name.

    LanguageModel     the contract every model value keeps
    ModelConfig       the built-in model: sizes and choices, and its functions (`model.py`)
    AttentionSpec, BlockSpec, RopeScaling   the layers' options (`specs.py`; re-exported here)
    OptimizerConfig   what the train step reads: AdamW, its schedule, clipping
    LoraConfig        low-rank adapters
    TrainConfig       a run's steps, batch, seed and cadence, with its optimizer and LoRA nested
    Job               a training run as one value: its Data, model, TrainConfig, Start,
                      Devices and Sample (`job.py` makes, plans and runs it)

They hash by value, so they pass as static arguments to `jax.jit`: two equal
configs reuse one compiled function. Sizes and flags live here, never as leaves of
the parameter pytree. No JAX is imported by this module (nor by `defaults.py`): the
command line reads these defaults for its help without starting JAX; the methods
that compute import it when called, and the
checks each value runs on itself are `checks.py`'s. `job_dict` is the job as a run's meta.json holds it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

from minitx_fn import defaults
from minitx_fn.defaults import FLOAT32_MAX, INT32_MAX, POSITIONS, SEED_MAX  # noqa: F401  (re-exported)
from minitx_fn.checks import (key_value_heads, number, plain_numbers, positive_int, replace_fields, require, whole,
                              x64_enabled)
from minitx_fn.errors import ConfigError, DataError, RunDirError
from minitx_fn.specs import AttentionSpec, BlockSpec, RopeScaling  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from minitx_fn.corpus import Corpus


def default_d_ff(d_model: int, mlp: str) -> int:
    """F when the config gives none: 4 D for GELU; for SwiGLU, whose three matrices
    would hold 1.5 times the parameters at 4 D, two thirds of that (Llama's choice),
    rounded up to a multiple of 8.

    Example:
        >>> default_d_ff(64, "gelu"), default_d_ff(64, "swiglu")
        (256, 176)
    """
    if mlp != "swiglu":
        return 4 * d_model
    two_thirds = -(-8 * d_model // 3)                               # ceil(2/3 of 4 D)
    return -(-two_thirds // 8) * 8



class LanguageModel:
    """The contract every model value keeps; the machinery (training, evaluation, runs,
    resume, cached and speculative decoding, LoRA, `testing.check_model`) asks nothing else.

    A model is a frozen, hashable dataclass (its fields are its config, so it is a
    static argument of `jax.jit`, and a run stores it as JSON) with these fields and methods:

        vocab_size: int | None    V; None until a tokenizer gives it (`job` fills it in with `replace`)
        max_len: int              S, the context: the longest sequence it reads
        init(key) -> params       a pytree of arrays
        apply(params, tokens, *, positions=None, mask=None, key=None) -> logits
            tokens (B, T) int -> (B, T, V) next-token logits; positions (B|1, T), default
            0 .. T - 1; mask broadcastable to (B, 1, T, T), True where query t may read key
            s, default causal; key: dropout (training), None for none
        init_cache(batch, slots) -> cache       an empty cache of `slots` positions per row,
            any pytree whose every leaf has the batch axis first (decoding keeps or
            replaces one row's cache on its own), the built-in's one KVCache per layer
        apply_cached(params, tokens, cache, *, index) -> (logits, cache)
            tokens (B, T) of row b at slots index[b] .. index[b] + T - 1 (index (B,) int),
            each reading the row's slots up to its own; it must equal `apply` on the row's
            whole sequence (`testing.check_model` holds a model to it)

    The methods below have defaults a model may override. A run records the model's
    class as `module:qualname` (`code`) and its fields; loading imports that class only
    with the caller's consent (`checkpoint.load(..., trust_code=True)`).
    """

    has_attention_maps = False      # whether `model.attention_maps` can draw it (the built-in block's)

    def decode_params(self, params):
        """params in the form `apply_cached` reads fastest inside a decode loop, made once
        per generation (the built-in unstacks its blocks); default: as they are."""
        return params

    def with_context(self, params, max_len: int):
        """The parameters of the same model for a context of at most `max_len` (what a
        fine-tuning run with a shorter max_len starts from); default: as they are."""
        return params

    def lora_paths(self, targets: str) -> tuple[str, ...]:
        """Tree paths ("blocks/attn/qkv") of the linear layers ({"w": (..., D_in, D_out)})
        that LoRA may adapt under `targets` (a key of defaults.LORA_TARGETS); default: none."""
        return ()

    @property
    def code(self) -> str:
        """Where the model's class is defined, as `module:qualname` (what a run records)."""
        return f"{type(self).__module__}:{type(self).__qualname__}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return replace_fields(self, changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(LanguageModel):
    """The built-in model: GPT-2 and Llama are two configurations of it (`defaults.ARCHS`).
    Its fields are its sizes and choices (dimension letters V, D, H, F, L, S); its
    methods are `model.py`'s functions, and its blocks are three methods a subclass may
    override (`init_block`, `apply_block`, `apply_block_cached`, with `init_block_cache`
    for a cache of its own), so a block of one's own gets every other part of the model
    and all of the machinery (`tests/variants.py`: ALiBi, a parallel block).

    Example:
        >>> cfg = ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, max_len=64)
        >>> cfg.d_ff, cfg.head_dim
        (512, 32)
    """

    # V: rows of the embedding, the tokenizer's ids (an imported table may have more);
    # None until a tokenizer gives it (a job's model is built before its data is prepared).
    vocab_size: int | None = None
    d_model: int = 64               # D: width of the residual stream
    n_heads: int = 4                # H: attention heads; D must be a multiple of H
    n_layers: int = 2               # L: residual blocks
    d_ff: int | None = None         # F: feed-forward width; None means default_d_ff (4 D for GELU)
    max_len: int = 64               # S: context window, the longest sequence the model sees
    ln_eps: float = 1e-5            # layer-norm epsilon, added to the variance
    dtype: str = "float32"          # compute dtype of matmuls: float32, bfloat16 or float64
    param_dtype: str = "float32"    # storage dtype of parameters: float32 or float64
    attention: str = "einsum"       # "einsum" (the maths written out) or "dot_product_attention"
    # Causal self-attention runs in blocks of this many query rows, skipping the key
    # blocks above the diagonal (attention.causal_blockwise); 0 computes the whole
    # (T, T) score matrix at once. Measured in benchmarks/NOTES.md.
    attention_block: int = 128
    # What a block's backward pass keeps from its forward pass rather than recomputes:
    # "matmuls" (outputs of the weight matmuls), "dots" (also attention's), "full"
    # (nothing), "none" (everything). Keeping only the outputs of the weight
    # matmuls recomputes layer norms, GELU and attention in the backward pass, and on
    # a CPU is much faster than keeping everything: every kept (B, T, ...) tensor is
    # written into an (L, ...) stack by the layer scan and read back, and that traffic
    # costs more than the arithmetic saved (benchmarks/NOTES.md; model.REMAT_POLICIES).
    remat: str = "matmuls"
    init_std: float = 0.02          # std of the normal initialisation of weight matrices
    # std of the token-embedding initialisation. The sinusoidal positions added to the
    # embeddings have entries of size ~1, so 0.02 (GPT-2's choice for learned tables)
    # drowns the tokens; on Tiny Shakespeare (baby recipe, 2000 steps) 0.1, 0.3, 0.5
    # and 1.0 gave validation losses (seed 0) 2.07 (at step 1000, stopped), 1.873, 1.863, 1.903.
    embed_std: float = 0.5
    # Dropout rate in training (embeddings, attention weights, both residual branches);
    # evaluation and generation never drop. 0 is bit for bit the model without it.
    dropout: float = 0.0
    # How the model knows word order: "sinusoidal" adds the fixed table of
    # layers/positional.py (no parameters); "learned" adds a trained (S, D) table, one
    # row per position, initialised at init_std (GPT-2's choice); "rotary" turns q and
    # k by position in every attention layer; "none" adds nothing (causal masking
    # alone tells order apart, or a block of one's own adds it, as ALiBi does).
    positions: str = "sinusoidal"
    # True: the output head is the token embedding read backwards, logits = x E^T, with
    # no head parameters and no bias (GPT-2's choice); False: a (D, V) matrix and bias.
    tie_embeddings: bool = False
    # The four changes from GPT-2 to Llama (defaults.ARCHS groups them): "rotary"
    # positions above, "rmsnorm" for LayerNorm, the gated "swiglu" feed-forward for
    # GELU's, and n_kv_heads < n_heads (grouped-query attention; 1 is multi-query).
    norm: str = "layernorm"         # "layernorm" (scale and bias) or "rmsnorm" (scale only)
    mlp: str = "gelu"               # "gelu": GELU(x W1) W2; "swiglu": (SiLU(x Wg) * x Wu) Wd
    n_kv_heads: int | None = None   # G: key/value heads, dividing H; None means H (multi-head)
    rope_theta: float = defaults.ROPE_THETA   # rotary base: pair i of a head turns at theta^(-2i/K) per position
    # Rotary frequencies stretched for a longer context (RopeScaling; a dict of its
    # fields is taken too, as meta.json holds it); None turns pair i at theta^(-2i/K).
    rope_scaling: RopeScaling | None = None
    bias: bool = True               # biases in the linear layers (and an untied head); Llama has none
    qkv_bias: bool | None = None    # biases of the q, k, v projections alone; None follows `bias` (Qwen2: True)

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.vocab_size is not None:
            positive_int("vocab_size", self.vocab_size)
        for name in ("d_model", "n_heads", "n_layers", "max_len"):
            positive_int(name, getattr(self, name))
        # A decode cache and the unstacked decode parameters hold one entry per layer (a
        # Python tuple): a count past any model's (GPT-3: 96) would build them for hours.
        require(self.n_layers <= defaults.MAX_LAYERS, "n_layers", self.n_layers,
                f"it must be at most {defaults.MAX_LAYERS}")
        require(self.mlp in defaults.MLPS, "mlp", self.mlp, f"choose one of {list(defaults.MLPS)}")
        if self.d_ff is None:
            require(default_d_ff(self.d_model, self.mlp) <= INT32_MAX, "d_model", self.d_model,
                    f"its feed-forward width (d_ff, {default_d_ff(self.d_model, self.mlp):,} by default) must be at "
                    f"most {INT32_MAX:,}")
            object.__setattr__(self, "d_ff", default_d_ff(self.d_model, self.mlp))
        positive_int("d_ff", self.d_ff)
        require(
            self.d_model % self.n_heads == 0, "d_model", self.d_model,
            "it must be divisible by {heads}; try {suggestion}", heads=("n_heads", self.n_heads),
            suggestion=("d_model", self.n_heads * max(1, round(self.d_model / self.n_heads))),
        )
        key_value_heads(self)
        require(self.norm in defaults.NORMS, "norm", self.norm, f"choose one of {list(defaults.NORMS)}")
        for name in ("bias", "tie_embeddings"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "it must be True or False")
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.bias)
        require(isinstance(self.qkv_bias, bool), "qkv_bias", self.qkv_bias, "it must be True or False")
        require(number(self.rope_theta) and self.rope_theta > 1, "rope_theta", self.rope_theta,
                 "it must be a number in (1, 3.4e38]")
        require(self.positions == "rotary" or self.rope_theta == defaults.ROPE_THETA, "rope_theta", self.rope_theta,
                 "it is the base of rotary positions; it needs {positions}", positions=("positions", "rotary"))
        if isinstance(self.rope_scaling, dict):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError:             # a key RopeScaling lacks, or none of kind and factor
                fields = [f.name for f in dataclasses.fields(RopeScaling)]
                require(False, "rope_scaling", self.rope_scaling, f"it takes the keys {fields}, kind and factor "
                         f"among them")
        require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
                 self.rope_scaling, "it must be None or a RopeScaling")
        require(self.positions == "rotary" or self.rope_scaling is None, "rope_scaling", self.rope_scaling,
                 "it stretches rotary positions; it needs {positions}", positions=("positions", "rotary"))
        require(self.positions != "rotary" or self.head_dim % 2 == 0, "d_model", self.d_model,
                 "rotary positions turn pairs of features, so the head width {k} must be even",
                 k=("d_model / n_heads", self.head_dim))
        require(
            whole(self.attention_block) and 0 <= self.attention_block <= INT32_MAX, "attention_block",
            self.attention_block, "it must be a whole number >= 0 (0: no blocks)",
        )
        require(self.remat in defaults.REMAT, "remat", self.remat, f"choose one of {list(defaults.REMAT)}")
        for name in ("ln_eps", "init_std", "embed_std"):
            require(number(getattr(self, name)) and getattr(self, name) > 0, name, getattr(self, name),
                     "it must be a number in (0, 3.4e38]")
        require(self.dtype in defaults.DTYPES, "dtype", self.dtype, f"choose one of {sorted(defaults.DTYPES)}")
        require(
            self.param_dtype in defaults.PARAM_DTYPES, "param_dtype", self.param_dtype,
            "choose float32 or float64",
        )
        require(
            self.attention in defaults.ATTENTION_IMPLS, "attention", self.attention,
            f"choose one of {list(defaults.ATTENTION_IMPLS)}",
        )
        require(self.positions in POSITIONS, "positions", self.positions, f"choose one of {list(POSITIONS)}")
        require(number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "it must lie in [0, 1)")
        require(
            self.dropout == 0 or self.attention == "einsum", "dropout", self.dropout,
            "attention dropout needs {attention}; jax.nn.dot_product_attention has none",
            attention=("attention", "einsum"),
        )
        for name in ("dtype", "param_dtype"):
            require(
                getattr(self, name) != "float64" or x64_enabled(), name, getattr(self, name),
                "float64 needs 64-bit JAX, which is off: call jax.config.update('jax_enable_x64', True) "
                "at start-up (or set JAX_ENABLE_X64=1), or build the config inside `with jax.enable_x64(True):`",
            )

    @property
    def head_dim(self) -> int:
        """K = D / H, the width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        """The jnp dtype named by the field `dtype`: what the matmuls compute in."""
        import jax.numpy as jnp
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        """The jnp dtype named by the field `param_dtype`: what parameters are stored in."""
        import jax.numpy as jnp
        return jnp.dtype(self.param_dtype)

    @property
    def residual_dtype(self):
        """dtype of the residual stream, layer norms and logits: at least float32
        (float64 with float64 parameters)."""
        import jax.numpy as jnp
        return jnp.dtype("float64" if self.param_dtype == "float64" else "float32")

    @property
    def attention_spec(self) -> AttentionSpec:
        """The options every attention layer of this model takes."""
        return AttentionSpec(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                             rope_theta=self.rope_theta if self.positions == "rotary" else None,
                             rope_scaling=self.rope_scaling, impl=self.attention, query_block=self.attention_block,
                             dropout=self.dropout, dtype=self.dtype, bias=self.bias, qkv_bias=self.qkv_bias)

    @property
    def block_spec(self) -> BlockSpec:
        """The options every block of this model takes.

        Example:
            >>> ModelConfig(vocab_size=5, n_heads=2, norm="rmsnorm").block_spec.attention.n_heads
            2
        """
        return BlockSpec(attention=self.attention_spec, norm=self.norm, mlp=self.mlp, eps=self.ln_eps,
                         dropout=self.dropout, dtype=self.dtype, bias=self.bias)

    # -- the model's functions (`model.py` holds them; help(minitx_fn.model) says what each does)

    def init(self, key):
        """Fresh parameters: `model.init`."""
        from minitx_fn import model
        return model.init(key, self)

    def apply(self, params, tokens, *, positions=None, mask=None, key=None):
        """tokens (B, T) -> logits (B, T, V): `model.apply`."""
        from minitx_fn import model
        return model.apply(params, tokens, config=self, positions=positions, mask=mask, key=key)

    def init_cache(self, batch: int, slots: int | None = None):
        """An empty cache of L layers' keys and values: `model.init_cache`."""
        from minitx_fn import model
        return model.init_cache(self, batch, slots)

    def apply_cached(self, params, tokens, cache, *, index):
        """tokens (B, T) at slots index[b] ..: `model.apply_cached`."""
        from minitx_fn import model
        return model.apply_cached(params, tokens, cache, config=self, index=index)

    def decode_params(self, params):
        """The blocks unstacked, one tree per layer (`model.unstack_blocks`): a stacked
        layer's slice, read inside the decode loop, is copied every token on XLA:CPU."""
        from minitx_fn import model
        return model.unstack_blocks(params)

    def with_context(self, params, max_len: int):
        """Learned positions keep their first max_len rows (`model.with_context`)."""
        from minitx_fn import model
        return model.with_context(params, max_len)

    def lora_paths(self, targets: str) -> tuple[str, ...]:
        """The blocks' linear layers of defaults.LORA_TARGETS[targets] that this model has
        (a GELU MLP has no gate).

        Example:
            >>> ModelConfig(vocab_size=5).lora_paths("all")
            ('blocks/attn/qkv', 'blocks/attn/out', 'blocks/mlp/up', 'blocks/mlp/down')
        """
        return tuple("blocks/" + p for p in defaults.LORA_TARGETS[targets] if p != "mlp/gate" or self.mlp == "swiglu")

    # -- one block: what a model of one's own overrides (the defaults are `layers/block.py`'s pre-norm block)

    @property
    def has_attention_maps(self) -> bool:
        """The built-in block's attention can be drawn (`model.attention_maps`); a subclass's own block's cannot."""
        return type(self).apply_block is ModelConfig.apply_block

    def init_block(self, key):
        """One block's parameters (`model.init` makes L of them, stacked on a leading axis).
        The projections that write into the residual stream start smaller, by
        1/sqrt(2 L) (GPT-2), so the stream's variance does not grow with depth."""
        from minitx_fn.layers import block
        return block.init(key, self.block_spec, d_model=self.d_model, d_ff=self.d_ff, std=self.init_std,
                          out_std=self.init_std / math.sqrt(2 * self.n_layers), dtype=self.storage_dtype)

    def apply_block(self, params, x, *, positions, mask=None, key=None):
        """x (B, T, D) -> (B, T, D) through one block; positions (B|1, T), mask as in
        `apply` (None: causal), key: dropout."""
        from minitx_fn.layers import block
        return block.apply(params, x, self.block_spec, positions=positions, mask=mask, key=key)

    def apply_block_cached(self, params, x, cache, *, index, positions, mask):
        """x (B, T, D) of row b at slots index[b] .. index[b] + T - 1 of this layer's
        cache -> (y (B, T, D), cache). positions (B, T) = index[b] + t; mask (B, 1, T, S),
        True where query t may read slot s."""
        from minitx_fn.layers import block
        return block.apply_cached(params, x, cache, self.block_spec, index=index, mask=mask)

    def init_block_cache(self, batch: int, slots: int):
        """One layer's empty cache: keys and values (B, S, G, K) in the compute dtype."""
        from minitx_fn.layers import attention
        return attention.init_cache(self.attention_spec, batch, slots, head_dim=self.head_dim,
                                    dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """What the train step reads: AdamW (or Muon for the blocks' matrices) with linear
    warm-up, cosine decay and clipping (`train.make_optimizer`,
    `train.learning_rate_schedule`).

    Example:
        >>> OptimizerConfig(decay_steps=100).min_lr
        0.0001
    """

    decay_steps: int                # length of the schedule: the cosine ends at min_lr here
    lr: float = 1e-3                # peak learning rate, reached after warm-up
    min_lr: float | None = None     # final learning rate of the cosine decay; None means lr / 10
    warmup: int = 50                # linear warm-up steps from 0 to lr
    b1: float = 0.9                 # Adam first-moment decay
    b2: float = 0.99                # Adam second-moment decay
    weight_decay: float = 0.1       # decoupled weight decay, on weight matrices and the embedding only
    grad_clip: float = 1.0          # clip the global gradient norm to this value
    # "adamw"; or "muon": each weight matrix of the blocks (each layer's alone) steps along
    # its orthogonalised momentum, the rest (embeddings, head, norms, biases, LoRA's
    # adapters) by Adam at lr without weight decay (train.make_optimizer).
    method: str = "adamw"
    muon_lr: float = 0.02           # with muon: the matrices' peak learning rate (the schedule's shape is lr's)
    momentum: float = 0.95          # with muon: its (Nesterov) momentum

    def __post_init__(self) -> None:
        plain_numbers(self)
        require(self.method in defaults.OPTIMIZERS, "method", self.method,
                f"choose one of {list(defaults.OPTIMIZERS)}")
        require(number(self.muon_lr) and self.muon_lr > 0, "muon_lr", self.muon_lr,
                "it must be a number in (0, 3.4e38]")
        require(number(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "it must lie in [0, 1)")
        require(number(self.lr) and self.lr > 0, "lr", self.lr, "it must be a number in (0, 3.4e38]")
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        positive_int("decay_steps", self.decay_steps)
        require(
            whole(self.warmup) and 0 <= self.warmup < self.decay_steps, "warmup", self.warmup,
            "it must be a whole number in [0, {decay}): the warm-up ends before the schedule does",
            decay=("decay_steps", self.decay_steps),
        )
        require(number(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", self.min_lr,
                 "it must lie in [0, {lr}]", lr=("lr", self.lr))
        require(number(self.b1) and 0 <= self.b1 < 1, "b1", self.b1, "it must lie in [0, 1)")
        require(number(self.b2) and 0 <= self.b2 < 1, "b2", self.b2, "it must lie in [0, 1)")
        require(number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                 "it must be a number in [0, 3.4e38]")
        require(number(self.grad_clip) and self.grad_clip > 0, "grad_clip", self.grad_clip,
                 "it must be a number in (0, 3.4e38]")

    def replace(self, **changes) -> "OptimizerConfig":
        return replace_fields(self, changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters (`lora.py`): every targeted weight W (D_in, D_out) of every
    block becomes W + (alpha / rank) A B, with A (D_in, rank) and B (rank, D_out)
    trained and W frozen.

    Example:
        >>> c = LoraConfig(rank=8, alpha=16.0)
        >>> c.scale, c.targets
        (2.0, 'attn')
    """

    MESSAGE_NAMES = {"rank": "lora.rank", "alpha": "lora.alpha", "targets": "lora.targets"}   # how errors name them

    rank: int                       # R: the adapters' inner width
    alpha: float | None = None      # the update is scaled by alpha / rank; None means alpha = rank (a scale of 1)
    targets: str = "attn"           # which linear layers: a key of defaults.LORA_TARGETS (the model's lora_paths)

    def __post_init__(self) -> None:
        plain_numbers(self)
        names = self.MESSAGE_NAMES
        positive_int(names["rank"], self.rank)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        require(number(self.alpha) and self.alpha > 0, names["alpha"], self.alpha,
                 "it must be a number in (0, 3.4e38]")
        require(self.targets in defaults.LORA_TARGETS, names["targets"], self.targets,
                 f"choose one of {list(defaults.LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _nested(cls, value: Any, name: str, fill: dict | None = None):
    """A nested config from itself, or from a dict of its fields (meta.json's form, a
    job's settings) with `fill` for what the dict leaves out; ConfigError for anything else."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise ConfigError(f"{{{name}}} must be {article} {cls.__name__} or a dict of its fields, not {type(value).__name__}",
                          **{name: (name, value)})
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{name} has no settings {unknown}; {cls.__name__}'s fields are {fields}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and
                f.name not in value and f.name not in (fill or {})]
    if required:                        # named as the class's own messages name them (LoraConfig: lora.rank)
        names = getattr(cls, "MESSAGE_NAMES", {})
        raise ConfigError(f"{name} needs " + " and ".join("{%s}" % f for f in required),
                          **{f: (names.get(f, f"{name}.{f}"), "N") for f in required})
    return cls(**{**(fill or {}), **value})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run: its length, batch, seed and cadence, with the optimiser (the part
    the train step reads) and LoRA nested, each a config of its own.

    Example:
        >>> tc = TrainConfig(steps=100)
        >>> tc.optimizer.decay_steps, tc.optimizer.warmup, tc.lora
        (100, 10, None)
        >>> TrainConfig(steps=100, optimizer={"lr": 3e-3}, lora={"rank": 4}).lora.alpha
        4.0
    """

    steps: int = 500                # train steps to run in total
    batch_size: int = 16            # B: sequences per step
    seed: int = 0                   # seeds initialisation, batch sampling and dropout
    eval_every: int = 250           # validation every N steps (and at the end)
    save_every: int = 500           # checkpoint every N steps (and at the end)
    log_every: int = 100            # print and record the loss every N steps
    # Validate on a fixed sample of about N tokens (the whole split when it holds fewer); None (or "all"): the whole split.
    eval_tokens: int | None = defaults.DEFAULT_EVAL_TOKENS
    # Gradient accumulation: the batch of B sequences runs as this many micro-batches of
    # B / grad_accum, their gradients averaged before one update (the same update, in
    # less memory; dropout masks are drawn per micro-batch).
    grad_accum: int = 1
    # The optimiser: an OptimizerConfig, or a dict of its fields, where decay_steps
    # defaults to `steps` and warmup to OptimizerConfig's, but at most a tenth of decay_steps.
    optimizer: OptimizerConfig | None = None
    # LoRA: a LoraConfig (or a dict of its fields) trains low-rank adapters on a frozen
    # copy of the parameters of the run it starts from; None trains every parameter.
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name in ("steps", "batch_size", "eval_every", "save_every", "log_every"):
            positive_int(name, getattr(self, name))
        if self.eval_tokens == "all":                       # as the command line says it
            object.__setattr__(self, "eval_tokens", None)
        if self.eval_tokens is not None:
            positive_int("eval_tokens", self.eval_tokens)
        positive_int("grad_accum", self.grad_accum)
        require(self.batch_size % self.grad_accum == 0, "grad_accum", self.grad_accum,
                 "it must divide {batch}: each micro-batch has batch_size / grad_accum sequences",
                 batch=("batch_size", self.batch_size))
        require(whole(self.seed) and 0 <= self.seed <= SEED_MAX, "seed", self.seed,
                 f"it must be a whole number in [0, {SEED_MAX}]")
        given = {} if self.optimizer is None else self.optimizer
        decay = given.get("decay_steps", self.steps) if isinstance(given, dict) else None
        fill = {"decay_steps": decay, "warmup": min(OptimizerConfig.warmup, decay // 10) if whole(decay) else 0}
        object.__setattr__(self, "optimizer", _nested(OptimizerConfig, given, "optimizer", fill))
        object.__setattr__(self, "lora", _nested(LoraConfig, self.lora, "lora"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return replace_fields(self, changes)


# ----------------------------------------------------------------------------- the job


def job_dict(model: LanguageModel, train_config: TrainConfig, data) -> dict:
    """The job as a run's meta.json stores it (`checkpoint.py` says what each part means).

    Example:
        >>> job_dict(ModelConfig(vocab_size=3), TrainConfig(), {"builtin": True})["model"]["code"]
        'minitx_fn.config:ModelConfig'
    """
    return {"model": {"code": model.code, "config": model.to_dict()}, "training": train_config.to_dict(),
            "data": getattr(data, "source", data)}


def _path(value: Any, name: str, error=ConfigError) -> str | None:
    """A path setting as a str (None stays None); one error naming it for anything else."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise error("{%s} is empty or not a path; give a folder or file" % name, **{name: (name, "''")})
    return os.fspath(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Data:
    """What a run trains on, and how its text becomes ids: one of `path` (a UTF-8 text
    file, prepared once into the cache, `corpus.prepare`), `text` (a string) or `corpus`
    (a `corpus.Corpus`, ids of one's own), or none of them for the built-in corpus. A
    text's first 90% trains, the rest validates (the built-in corpus holds none back).

    Example:
        >>> Data(path="input.txt", tokenizer="byte").held_out, Data().held_out
        (True, False)
    """

    path: str | None = None
    text: str | None = dataclasses.field(default=None, repr=False)
    corpus: Corpus | None = dataclasses.field(default=None, repr=False, compare=False)
    tokenizer: str | None = None       # "char" (the default), "byte" or "bpe"; None for a run's own
    vocab_size: int | None = None      # bpe only: ids in the vocabulary
    cache_dir: str | None = None       # where prepared data is kept (`corpus.default_cache_dir`)
    batches: str = "auto"              # "device" (the ids held there), "memmap" (gathered on the host), or auto

    def __post_init__(self) -> None:
        from minitx_fn import corpus
        if isinstance(self.path, corpus.Corpus):           # job.train(Corpus): the ids of one's own
            object.__setattr__(self, "corpus", self.path)
            object.__setattr__(self, "path", None)
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise DataError(f"the data must be a path (a str) or a corpus.Corpus, not {type(self.path).__name__}")
        object.__setattr__(self, "path", _path(self.path, "data_path", DataError))
        object.__setattr__(self, "cache_dir", _path(self.cache_dir, "cache_dir"))
        if sum(x is not None for x in (self.path, self.text, self.corpus)) > 1:
            raise DataError("give the data as a path or a Corpus, or as text=, not both")
        if self.text is not None:
            corpus.check_text(self.text)
        if self.batches not in defaults.BATCH_SOURCES:
            raise ConfigError(f"{{batches}} is invalid: choose one of {list(defaults.BATCH_SOURCES)}",
                              batches=("batches", self.batches))
        if self.tokenizer is not None or self.vocab_size is not None:
            if self.corpus is not None:
                raise ConfigError("a Corpus brings its own tokenizer; drop {t}", t=("tokenizer", self.tokenizer))
            corpus.check_choice(self.tokenizer or "char", self.vocab_size)

    @property
    def held_out(self) -> bool:
        """Whether the data holds a validation split (every text does; the built-in corpus not)."""
        if self.corpus is not None:
            return self.corpus.source != {"builtin": True}
        return self.path is not None or self.text is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Start:
    """Where a run starts: a new run (in `run_dir`, default runs/<corpus>-NNN, never one
    that holds a run), `resume` a saved run in its own directory, or `init_from` a new
    run from another run's parameters and tokenizer (fine-tuning; with LoRA, adapters
    on them). `trust_code`: a run whose model is code of its own is loaded only with it
    (`checkpoint.load`).

    Example:
        >>> Start(resume="runs/a", init_from="runs/b")
        Traceback (most recent call last):
        minitx_fn.errors.ConfigError: resume='runs/a' continues a run and init_from='runs/b' starts a new one from another's parameters; give one of them
    """

    run_dir: str | None = None
    resume: str | None = None
    init_from: str | None = None
    trust_code: bool = False

    def __post_init__(self) -> None:
        for name in ("resume", "init_from"):
            object.__setattr__(self, name, _path(getattr(self, name), name))
        object.__setattr__(self, "run_dir", _path(self.run_dir, "run_dir", RunDirError))
        if self.resume is not None and self.init_from is not None:
            raise ConfigError("{resume} continues a run and {init_from} starts a new one from another's parameters; "
                              "give one of them", resume=("resume", self.resume), init_from=("init_from", self.init_from))
        if self.resume is not None and self.run_dir is not None:
            raise RunDirError("{resume} continues a run in its own directory; drop {out} (to branch a run, copy its "
                              "directory first)", resume=("resume", self.resume), out=("run_dir", self.run_dir))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Devices:
    """The devices a run uses: data-parallel over the first `count` (None: all JAX sees),
    parameters and optimiser state split over them with `fsdp` (`distributed.py`)."""

    count: int | None = None
    fsdp: bool = False

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.count is not None and not whole(self.count):
            raise ConfigError("{devices} must be a whole number (how many devices)", devices=("devices", self.count))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """The text generated at the end of a run: `tokens` tokens after `prompt` (default:
    "hello" if the text's start holds it, else its first character); 0 for none."""

    prompt: str | None = None
    tokens: int = defaults.SAMPLE_TOKENS

    def __post_init__(self) -> None:
        plain_numbers(self)
        if not (whole(self.tokens) and 0 <= self.tokens <= defaults.MAX_NEW_TOKENS):
            raise ConfigError(f"{{n}} must be a whole number in [0, {defaults.MAX_NEW_TOKENS:,}]",
                              n=("sample_tokens", self.tokens))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """A training run as one value: its data, model, training, start, devices and final
    sample (the parts above). `model.vocab_size` may be None: the tokenizer gives it
    (`plan`). `to_dict` is what a run's meta.json stores of it, and what the processes
    of a multi-process run compare."""

    data: Data = Data()
    model: LanguageModel
    training: TrainConfig
    start: Start = Start()
    devices: Devices = Devices()
    sample: Sample = Sample()

    def __post_init__(self) -> None:
        if not isinstance(self.model, LanguageModel):
            raise ConfigError(f"{{model}} must be a model value (ModelConfig, or a LanguageModel of one's own), not "
                              f"{type(self.model).__name__}", model=("model", self.model))
        if not isinstance(self.training, TrainConfig):
            raise ConfigError(f"{{training}} must be a TrainConfig, not {type(self.training).__name__}",
                              training=("training", self.training))
        tc = self.training
        if tc.lora is not None:
            if self.start.init_from is None and self.start.resume is None:
                raise ConfigError("{rank} trains adapters on the frozen parameters of another run; give that run with "
                                  "{init_from}", rank=("lora.rank", tc.lora.rank), init_from=("init_from", "RUN"))
            width = getattr(self.model, "d_model", None)
            if width is not None and tc.lora.rank > width:
                raise ConfigError("{rank} exceeds the model's width {d}: a low-rank adapter's rank is at most the "
                                  "width", rank=("lora.rank", tc.lora.rank), d=("d_model", width))

    def to_dict(self) -> dict:
        """What meta.json stores of the job (`job_dict`): model, training, data (a
        Corpus's source; a path or text is recorded by the plan that reads it)."""
        return job_dict(self.model, self.training, None if self.data.corpus is None else self.data.corpus.source)

    def replace(self, **changes) -> "Job":
        return replace_fields(self, changes)
