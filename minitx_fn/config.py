"""Model and training configuration: frozen, hashable, validated on construction.

The configs are frozen dataclasses, so they hash by value and can be passed as
static arguments to `jax.jit`: two equal configs reuse one compiled function.
Sizes and flags live here, never as leaves of the parameter pytree.

    ModelConfig       the model's sizes and choices
    OptimizerConfig   what the train step reads: AdamW, its schedule, clipping
    TrainConfig       a run: its steps, batch, seed and cadence, and its OptimizerConfig's fields

No JAX is imported here (nor in `defaults.py`): the command line reads these
defaults for its help without starting JAX.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from minitx_fn import defaults
from minitx_fn.defaults import FLOAT32_MAX, INT32_MAX, POSITIONS, SEED_MAX  # noqa: F401  (re-exported)
from minitx_fn.errors import ConfigError


def x64_enabled() -> bool:
    """Whether JAX makes 64-bit arrays now (`jax_enable_x64`, globally or in a `jax.enable_x64` block).

    Example:
        >>> x64_enabled()
        False
    """
    import jax
    import jax.numpy as jnp
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def _plain_numbers(config) -> None:
    """NumPy scalars (np.int64(5), np.float32(1e-3)) as the Python numbers they stand
    for: a config is hashed, compared and written to JSON, which numpy scalars spoil."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
            object.__setattr__(config, field.name, int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
            object.__setattr__(config, field.name, float(value))


def _require(ok: bool, field: str, value: Any, fix: str, **mentions: tuple[str, Any]) -> None:
    """ConfigError "{field}={value} is invalid: {fix}" unless ok; `fix` may mention other fields."""
    if not ok:
        raise ConfigError("{field} is invalid: " + fix, field=(field, value), **mentions)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """A finite int or float that float32 can hold: these settings reach the device as float32."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= FLOAT32_MAX)


def _positive_int(field: str, value: Any, limit: int = INT32_MAX) -> None:
    _require(_whole(value) and 1 <= value <= limit, field, value, f"it must be a whole number in [1, {limit:,}]")


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary frequencies stretched for a context `factor` times the one a model was
    pre-trained on (`layers/rotary.frequencies` holds the maths; Hugging Face's
    rope_type of the same name):

        linear   every frequency divided by factor (position interpolation);
        llama3   Llama 3.1's: frequencies whose wavelength is below
                 original_max_len / high_freq_factor kept, those above
                 original_max_len / low_freq_factor divided by factor, and a
                 smooth blend between;
        yarn     YaRN (Peng et al., 2023): a ramp between kept and divided
                 frequencies over the pairs that turn between beta_slow and
                 beta_fast times in original_max_len positions, and queries and
                 keys scaled by attention_factor (None: 0.1 ln(factor) + 1).

    A field a kind does not read (`defaults.ROPE_SCALINGS`) must keep its default.

    Example:
        >>> RopeScaling(kind="yarn", factor=4.0, original_max_len=32).attention_factor
        1.138629436111989
    """

    kind: str                         # a key of defaults.ROPE_SCALINGS
    factor: float                     # how many times longer the context is, >= 1
    original_max_len: int | None = None   # the pre-training context (llama3, yarn)
    low_freq_factor: float = 1.0      # llama3: wavelengths above original_max_len / this are divided
    high_freq_factor: float = 4.0     # llama3: wavelengths below original_max_len / this are kept
    beta_fast: float = 32.0           # yarn: pairs turning more than this often in original_max_len are kept
    beta_slow: float = 1.0            # yarn: pairs turning less than this often are divided
    truncate: bool = True             # yarn: round the ramp's ends to whole pairs
    attention_factor: float | None = None   # yarn: the scale of rotated queries and keys

    def __post_init__(self) -> None:
        _plain_numbers(self)
        kinds = defaults.ROPE_SCALINGS
        _require(self.kind in kinds, "rope_scaling.kind", self.kind, f"choose one of {list(kinds)}")
        _require(_number(self.factor) and self.factor >= 1, "rope_scaling.factor", self.factor,
                 "it must be a number in [1, 3.4e38]")
        if self.kind == "yarn" and self.attention_factor is None:
            object.__setattr__(self, "attention_factor", 0.1 * math.log(self.factor) + 1.0)
        unread = {f.name: f.default for f in dataclasses.fields(self)
                  if f.name not in ("kind", "factor", *kinds[self.kind])}
        for name, default in unread.items():
            _require(getattr(self, name) == default, f"rope_scaling.{name}", getattr(self, name),
                     "{kind} does not read it; leave it out", kind=("rope_scaling.kind", self.kind))
        if self.kind == "linear":
            return
        _positive_int("rope_scaling.original_max_len", self.original_max_len)
        for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
            if name in kinds[self.kind]:
                _require(_number(getattr(self, name)) and getattr(self, name) > 0, f"rope_scaling.{name}",
                         getattr(self, name), "it must be a number in (0, 3.4e38]")
        pairs = {"llama3": ("low_freq_factor", "high_freq_factor"), "yarn": ("beta_slow", "beta_fast")}[self.kind]
        _require(getattr(self, pairs[0]) < getattr(self, pairs[1]), f"rope_scaling.{pairs[0]}",
                 getattr(self, pairs[0]), "it must be below {other}",
                 other=(f"rope_scaling.{pairs[1]}", getattr(self, pairs[1])))
        if self.kind == "yarn":
            _require(isinstance(self.truncate, bool), "rope_scaling.truncate", self.truncate,
                     "it must be True or False")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Sizes of the language model. Dimension letters: V, D, H, F, L, S.

    Example:
        >>> cfg = ModelConfig(vocab_size=65, d_model=128, n_heads=4, n_layers=4, max_len=64)
        >>> cfg.d_ff, cfg.head_dim
        (512, 32)
    """

    vocab_size: int                 # V: rows of the embedding, the tokenizer's ids (an imported table may have more)
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
    # row per position, initialised at init_std (GPT-2's choice).
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
        _plain_numbers(self)
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_len"):
            _positive_int(name, getattr(self, name))
        _require(self.mlp in defaults.MLPS, "mlp", self.mlp, f"choose one of {list(defaults.MLPS)}")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", default_d_ff(self.d_model, self.mlp))
        _positive_int("d_ff", self.d_ff)
        _require(
            self.d_model % self.n_heads == 0, "d_model", self.d_model,
            "it must be divisible by {heads}; try {suggestion}", heads=("n_heads", self.n_heads),
            suggestion=("d_model", self.n_heads * max(1, round(self.d_model / self.n_heads))),
        )
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _positive_int("n_kv_heads", self.n_kv_heads)
        _require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
                 "it must divide {heads} (each key/value head serves a group of query heads)",
                 heads=("n_heads", self.n_heads))
        _require(self.norm in defaults.NORMS, "norm", self.norm, f"choose one of {list(defaults.NORMS)}")
        for name in ("bias", "tie_embeddings"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "it must be True or False")
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.bias)
        _require(isinstance(self.qkv_bias, bool), "qkv_bias", self.qkv_bias, "it must be True or False")
        _require(_number(self.rope_theta) and self.rope_theta > 1, "rope_theta", self.rope_theta,
                 "it must be a number in (1, 3.4e38]")
        _require(self.positions == "rotary" or self.rope_theta == defaults.ROPE_THETA, "rope_theta", self.rope_theta,
                 "it is the base of rotary positions; it needs {positions}", positions=("positions", "rotary"))
        if isinstance(self.rope_scaling, dict):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError:             # a key RopeScaling lacks, or none of kind and factor
                fields = [f.name for f in dataclasses.fields(RopeScaling)]
                _require(False, "rope_scaling", self.rope_scaling, f"it takes the keys {fields}, kind and factor "
                         f"among them")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
                 self.rope_scaling, "it must be None or a RopeScaling")
        _require(self.positions == "rotary" or self.rope_scaling is None, "rope_scaling", self.rope_scaling,
                 "it stretches rotary positions; it needs {positions}", positions=("positions", "rotary"))
        _require(self.positions != "rotary" or self.head_dim % 2 == 0, "d_model", self.d_model,
                 "rotary positions turn pairs of features, so the head width {k} must be even",
                 k=("d_model / n_heads", self.head_dim))
        _require(
            _whole(self.attention_block) and 0 <= self.attention_block <= INT32_MAX, "attention_block",
            self.attention_block, "it must be a whole number >= 0 (0: no blocks)",
        )
        _require(self.remat in defaults.REMAT, "remat", self.remat, f"choose one of {list(defaults.REMAT)}")
        for name in ("ln_eps", "init_std", "embed_std"):
            _require(_number(getattr(self, name)) and getattr(self, name) > 0, name, getattr(self, name),
                     "it must be a number in (0, 3.4e38]")
        _require(self.dtype in defaults.DTYPES, "dtype", self.dtype, f"choose one of {sorted(defaults.DTYPES)}")
        _require(
            self.param_dtype in defaults.PARAM_DTYPES, "param_dtype", self.param_dtype,
            "choose float32 or float64",
        )
        _require(
            self.attention in defaults.ATTENTION_IMPLS, "attention", self.attention,
            f"choose one of {list(defaults.ATTENTION_IMPLS)}",
        )
        _require(self.positions in POSITIONS, "positions", self.positions, f"choose one of {list(POSITIONS)}")
        _require(_number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "it must lie in [0, 1)")
        _require(
            self.dropout == 0 or self.attention == "einsum", "dropout", self.dropout,
            "attention dropout needs {attention}; jax.nn.dot_product_attention has none",
            attention=("attention", "einsum"),
        )
        for name in ("dtype", "param_dtype"):
            _require(
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
        return getattr(jnp, self.dtype)

    @property
    def storage_dtype(self):
        """The jnp dtype named by the field `param_dtype`: what parameters are stored in."""
        import jax.numpy as jnp
        return getattr(jnp, self.param_dtype)

    @property
    def residual_dtype(self):
        """dtype of the residual stream, layer norms and logits: at least float32."""
        from minitx_fn.layers import at_least_float32
        return at_least_float32(self.storage_dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """What the train step reads: AdamW with linear warm-up, cosine decay and clipping
    (`train.make_optimizer`, `train.learning_rate_schedule`).

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

    def __post_init__(self) -> None:
        _plain_numbers(self)
        _require(_number(self.lr) and self.lr > 0, "lr", self.lr, "it must be a number in (0, 3.4e38]")
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        _positive_int("decay_steps", self.decay_steps)
        _require(
            _whole(self.warmup) and 0 <= self.warmup < self.decay_steps, "warmup", self.warmup,
            "it must be a whole number in [0, {decay})", decay=("decay_steps", self.decay_steps),
        )
        _require(_number(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", self.min_lr,
                 "it must lie in [0, {lr}]", lr=("lr", self.lr))
        _require(_number(self.b1) and 0 <= self.b1 < 1, "b1", self.b1, "it must lie in [0, 1)")
        _require(_number(self.b2) and 0 <= self.b2 < 1, "b2", self.b2, "it must lie in [0, 1)")
        _require(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                 "it must be a number in [0, 3.4e38]")
        _require(_number(self.grad_clip) and self.grad_clip > 0, "grad_clip", self.grad_clip,
                 "it must be a number in (0, 3.4e38]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTIMIZER_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters (`lora.py`): every targeted weight W (D_in, D_out) of every
    block becomes W + (alpha / rank) A B, with A (D_in, rank) and B (rank, D_out)
    trained and W frozen.

    Example:
        >>> c = LoraConfig(rank=8, alpha=16.0)
        >>> c.scale, c.paths
        (2.0, ('attn/qkv', 'attn/out'))
    """

    rank: int                       # R: the adapters' inner width
    alpha: float | None = None      # the update is scaled by alpha / rank; None means alpha = rank (a scale of 1)
    targets: str = "attn"           # which linear layers: a key of defaults.LORA_TARGETS

    def __post_init__(self) -> None:
        _plain_numbers(self)
        _positive_int("lora_rank", self.rank)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        _require(_number(self.alpha) and self.alpha > 0, "lora_alpha", self.alpha, "it must be a number in (0, 3.4e38]")
        _require(self.targets in defaults.LORA_TARGETS, "lora_targets", self.targets,
                 f"choose one of {list(defaults.LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def paths(self) -> tuple[str, ...]:
        """The targeted linear layers, as paths inside one block's parameter tree (those a
        model has: `lora.targets`)."""
        return defaults.LORA_TARGETS[self.targets]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run: its length, batch, seed and cadence, and the optimiser's settings
    (`.optimizer`, the part the train step reads; the defaults are OptimizerConfig's).

    Example:
        >>> tc = TrainConfig(steps=100)
        >>> tc.decay_steps, tc.warmup, tc.optimizer == TrainConfig(steps=100, log_every=5).optimizer
        (100, 10, True)
    """

    steps: int = 500                # train steps to run in total
    batch_size: int = 16            # B: sequences per step
    seed: int = 0                   # seeds initialisation, batch sampling and dropout
    eval_every: int = 250           # validation every N steps (and at the end)
    save_every: int = 500           # checkpoint every N steps (and at the end)
    log_every: int = 100            # print and record the loss every N steps
    eval_tokens: int | None = None  # validate on a fixed sample of about N tokens; None: the whole split
    # Gradient accumulation: the batch of B sequences runs as this many micro-batches of
    # B / grad_accum, their gradients averaged before one update (the same update, in
    # less memory; dropout masks are drawn per micro-batch).
    grad_accum: int = 1
    # LoRA: lora_rank > 0 trains low-rank adapters on a frozen copy of the parameters of the
    # run it starts from (LoraConfig says what each field means); 0 trains every parameter.
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: str = "attn"
    # The optimiser (OptimizerConfig's fields and defaults; decay_steps None means `steps`,
    # warmup None OptimizerConfig's, but at most a tenth of decay_steps).
    lr: float = OptimizerConfig.lr
    min_lr: float | None = None
    warmup: int | None = None
    decay_steps: int | None = None
    b1: float = OptimizerConfig.b1
    b2: float = OptimizerConfig.b2
    weight_decay: float = OptimizerConfig.weight_decay
    grad_clip: float = OptimizerConfig.grad_clip

    def __post_init__(self) -> None:
        _plain_numbers(self)
        for name in ("steps", "batch_size", "eval_every", "save_every", "log_every"):
            _positive_int(name, getattr(self, name))
        if self.eval_tokens is not None:
            _positive_int("eval_tokens", self.eval_tokens)
        _positive_int("grad_accum", self.grad_accum)
        _require(_whole(self.lora_rank) and 0 <= self.lora_rank <= INT32_MAX, "lora_rank", self.lora_rank,
                 "it must be a whole number: 0 for none, or the adapters' rank")
        self.lora                                                          # validates the LoRA fields
        _require(self.batch_size % self.grad_accum == 0, "grad_accum", self.grad_accum,
                 "it must divide {batch}: each micro-batch has batch_size / grad_accum sequences",
                 batch=("batch_size", self.batch_size))
        _require(_whole(self.seed) and 0 <= self.seed <= SEED_MAX, "seed", self.seed,
                 f"it must be a whole number in [0, {SEED_MAX}]")
        if self.decay_steps is None:
            object.__setattr__(self, "decay_steps", self.steps)
        if self.warmup is None and _whole(self.decay_steps):
            object.__setattr__(self, "warmup", min(OptimizerConfig.warmup, self.decay_steps // 10))
        object.__setattr__(self, "min_lr", self.optimizer.min_lr)        # validates the optimiser's fields

    @property
    def optimizer(self) -> OptimizerConfig:
        """The settings the train step reads: runs that differ only in their cadence
        (steps, batch_size, eval/save/log_every, eval_tokens) share one compiled step."""
        return OptimizerConfig(**{name: getattr(self, name) for name in OPTIMIZER_FIELDS})

    @property
    def lora(self) -> LoraConfig | None:
        """The adapters this run trains, or None when it trains every parameter."""
        if self.lora_rank == 0:
            _require(self.lora_alpha is None and self.lora_targets == "attn", "lora_alpha" if self.lora_alpha
                     is not None else "lora_targets", self.lora_alpha if self.lora_alpha is not None
                     else self.lora_targets, "it needs {rank}", rank=("lora_rank", "R"))
            return None
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
