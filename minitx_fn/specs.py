"""The layers' options as values: each layer with options takes one spec whole.

    RopeScaling     stretched rotary frequencies (`layers/rotary.py`)
    AttentionSpec   one attention layer's heads, rotary settings and implementation (`layers/attention.py`)
    BlockSpec       one block's: its attention's, its norm's and its MLP's (`layers/block.py`)

A spec checks itself when built and hashes by value, so a layer's options pass to
`jax.jit` as one static argument. A new option of a layer is a field of its spec,
read by that layer alone. No JAX is imported here: the configs that hold these
(`config.py`) are read by the command line before JAX starts.
"""

from __future__ import annotations

import dataclasses
import math

from minitx_fn import defaults
from minitx_fn.checks import key_value_heads, number, plain_numbers, positive_int, require


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
        plain_numbers(self)
        kinds = defaults.ROPE_SCALINGS
        require(self.kind in kinds, "rope_scaling.kind", self.kind, f"choose one of {list(kinds)}")
        require(number(self.factor) and self.factor >= 1, "rope_scaling.factor", self.factor,
                 "it must be a number in [1, 3.4e38]")
        if self.kind == "yarn" and self.attention_factor is None:
            object.__setattr__(self, "attention_factor", 0.1 * math.log(self.factor) + 1.0)
        unread = {f.name: f.default for f in dataclasses.fields(self)
                  if f.name not in ("kind", "factor", *kinds[self.kind])}
        for name, default in unread.items():
            require(getattr(self, name) == default, f"rope_scaling.{name}", getattr(self, name),
                     "{kind} does not read it; leave it out", kind=("rope_scaling.kind", self.kind))
        if self.kind == "linear":
            return
        positive_int("rope_scaling.original_max_len", self.original_max_len)
        for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
            if name in kinds[self.kind]:
                require(number(getattr(self, name)) and getattr(self, name) > 0, f"rope_scaling.{name}",
                         getattr(self, name), "it must be a number in (0, 3.4e38]")
        pairs = {"llama3": ("low_freq_factor", "high_freq_factor"), "yarn": ("beta_slow", "beta_fast")}[self.kind]
        require(getattr(self, pairs[0]) < getattr(self, pairs[1]), f"rope_scaling.{pairs[0]}",
                 getattr(self, pairs[0]), "it must be below {other}",
                 other=(f"rope_scaling.{pairs[1]}", getattr(self, pairs[1])))
        if self.kind == "yarn":
            require(isinstance(self.truncate, bool), "rope_scaling.truncate", self.truncate,
                     "it must be True or False")




@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """One attention layer's options (`layers/attention.py` takes it whole) rather than
    a keyword each through every signature.

    Example:
        >>> AttentionSpec(n_heads=4, n_kv_heads=2).groups
        2
    """

    n_heads: int                         # H: query heads
    n_kv_heads: int | None = None        # G: key/value heads, dividing H; None means H
    rope_theta: float | None = None      # rotary base; None: no rotary positions (q and k are not turned)
    rope_scaling: RopeScaling | None = None   # stretched rotary frequencies (rotary only)
    impl: str = "einsum"                 # "einsum" (the maths written out) or "dot_product_attention"
    query_block: int = 0                 # causal self-attention in blocks of this many query rows; 0: one block
    dropout: float = 0.0                 # on the attention weights, in training (with a key)
    dtype: str | None = None             # compute dtype of the matmuls; None keeps the parameters'
    bias: bool = True                    # a bias on the output projection
    qkv_bias: bool | None = None         # a bias on the fused q, k, v projection; None follows `bias`

    def __post_init__(self) -> None:
        plain_numbers(self)
        positive_int("n_heads", self.n_heads)
        key_value_heads(self)
        require(self.impl in defaults.ATTENTION_IMPLS, "attention", self.impl,
                 f"choose one of {list(defaults.ATTENTION_IMPLS)}")
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.bias)

    @property
    def groups(self) -> int:
        """R = H / G, the query heads that share one key/value head."""
        return self.n_heads // self.n_kv_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSpec:
    """One pre-norm block's options (`layers/block.py` takes it whole).

    Example:
        >>> BlockSpec(attention=AttentionSpec(n_heads=2), norm="rmsnorm").mlp
        'gelu'
    """

    attention: AttentionSpec
    norm: str = "layernorm"      # "layernorm" or "rmsnorm" (both norms of the block)
    mlp: str = "gelu"            # "gelu" or "swiglu"
    eps: float = 1e-5            # the norms' epsilon
    dropout: float = 0.0         # on both residual branches, in training (with a key)
    dtype: str | None = None     # compute dtype of the MLP's matmuls; None keeps the parameters'
    bias: bool = True            # biases in the MLP

    def __post_init__(self) -> None:
        require(self.norm in defaults.NORMS, "norm", self.norm, f"choose one of {list(defaults.NORMS)}")
        require(self.mlp in defaults.MLPS, "mlp", self.mlp, f"choose one of {list(defaults.MLPS)}")
