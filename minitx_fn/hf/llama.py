"""Llama and Qwen2 in our own layers: the mapping between their config.json and tensors and ours.

Llama is this model with `defaults.ARCHS["llama"]`: rotary positions, RMSNorm, a
SwiGLU feed-forward, no biases, usually an untied head, and grouped-query attention
(`num_key_value_heads`). Qwen2 is the same with biases on q, k and v (`qkv_bias`).
Hugging Face's `nn.Linear` stores a weight (out, in), ours (in, out): every matrix
is transposed, and q, k and v, three tensors there, are fused here into [Q | K | V]
(their rows h K .. h K + K - 1 are head h, as our columns are). Block i's tensors
become row i of our stacked (L, ...) leaves:

    Hugging Face name (prefix "model." but lm_head)      our tree path          theirs
    embed_tokens.weight                                   embed/table            (V, D)
    layers.{i}.input_layernorm.weight                     blocks/ln1/scale       (D,)
    layers.{i}.self_attn.{q,k,v}_proj.weight (, .bias)    blocks/attn/qkv/w (, b) (H K | G K | G K, D)
    layers.{i}.self_attn.o_proj.weight                    blocks/attn/out/w      (D, H K)
    layers.{i}.post_attention_layernorm.weight            blocks/ln2/scale       (D,)
    layers.{i}.mlp.{gate,up}_proj.weight                  blocks/mlp/{gate,up}/w (F, D)
    layers.{i}.mlp.down_proj.weight                       blocks/mlp/down/w      (D, F)
    norm.weight                                           ln_f/scale             (D,)
    lm_head.weight (untied only)                          head/w                 (V, D)

Rotary positions need no permutation: Hugging Face's Llama turns the pairs (i,
i + K/2) of each head ("rotate_half") at the frequencies theta^(-2i/K), as
`layers/rotary.py` does. A config.json whose maths this model does not have (a
`rope_scaling` other than the default, biases on the output or MLP projections,
sliding-window attention, another activation, a head width other than D / H) is
refused with one line naming the key. The folder's files are read and written by
`hf/folder.py`, for every family.
"""

from __future__ import annotations

import math

import numpy as np

from minitx_fn import defaults
from minitx_fn.config import ModelConfig, RopeScaling
from minitx_fn.errors import Error, HFError
from minitx_fn.hf.tensors import checked_tensors

MODEL_TYPES = ("llama", "qwen2")
PREFIX = "model."
# Per block: Hugging Face's name -> our path under blocks/ (transposed), but q, k, v (fused).
BLOCK_MATRICES = {"self_attn.o_proj.weight": "attn/out", "mlp.gate_proj.weight": "mlp/gate",
                  "mlp.up_proj.weight": "mlp/up", "mlp.down_proj.weight": "mlp/down"}
BLOCK_NORMS = {"input_layernorm.weight": "ln1", "post_attention_layernorm.weight": "ln2"}
QKV = ("q_proj", "k_proj", "v_proj")
# Our ModelConfig's fields as config.json names them, for messages.
HF_FIELDS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "n_layers": "num_hidden_layers", "d_ff": "intermediate_size",
             "max_len": "max_position_embeddings", "ln_eps": "rms_norm_eps", "rope_theta": "rope_theta",
             "init_std": "initializer_range", "embed_std": "initializer_range",
             "tie_embeddings": "tie_word_embeddings"}


# ----------------------------------------------------------------------------- configs


def _rope(hf: dict) -> tuple[str, dict | None]:
    """(key, settings) of the rotary positions: transformers 5 writes "rope_parameters"
    {"rope_type", "rope_theta", ...}, earlier versions "rope_scaling" (null for the
    default) beside a top-level "rope_theta". As transformers 5.24 reads them, a
    "rope_scaling" that is set (not null or empty) wins over "rope_parameters"."""
    if hf.get("rope_scaling") or "rope_parameters" not in hf:
        return "rope_scaling", hf.get("rope_scaling")
    return "rope_parameters", hf["rope_parameters"]


def rope_theta(hf: dict) -> float:
    """The rotary base of a config.json: its rotary settings' (`_rope`), else the
    top-level "rope_theta", else 10000.

    Example:
        >>> rope_theta({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}), rope_theta({"rope_theta": 5.0})
        (500.0, 5.0)
    """
    _, settings = _rope(hf)
    if isinstance(settings, dict) and "rope_theta" in settings:
        return settings["rope_theta"]
    return hf.get("rope_theta", defaults.ROPE_THETA)


# Hugging Face's rope_type -> what else its settings may hold besides rope_type (or
# the older "type"), rope_theta, factor and partial_rotary_factor (which must be 1).
# RopeScaling's fields keep Hugging Face's names, but one (ROPE_NAMES).
ROPE_NAMES = {"original_max_len": "original_max_position_embeddings"}
ROPE_KEYS = {"default": (), "linear": (),
             "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("original_max_position_embeddings", "attention_factor", "mscale", "mscale_all_dim",
                      "beta_fast", "beta_slow", "truncate")}


def rope_scaling(hf: dict) -> RopeScaling | None:
    """The scaled rotary positions of a config.json (`_rope`'s settings) as our
    RopeScaling, None for the default; HFError naming the key for a rope_type
    minitx does not convert (`ROPE_KEYS`: dynamic and longrope change with the
    sequence length), a setting that type does not know, a missing factor, or a bad
    value. What may be missing is filled as transformers fills it: a "rope_scaling"
    that is set wins over "rope_parameters"; original_max_position_embeddings comes
    from the top level first, else the settings, else max_position_embeddings; a null
    YaRN factor is max_position_embeddings over that, and YaRN's attention_factor
    comes from factor, mscale and mscale_all_dim.

    Example:
        >>> s = rope_scaling({"max_position_embeddings": 64, "rope_parameters": {"rope_type": "yarn", "factor": 8.0,
        ...                   "mscale": 1.0, "mscale_all_dim": 0.5}})
        >>> s.kind, s.original_max_len, round(s.attention_factor, 4)     # (0.1 ln 8 + 1) / (0.05 ln 8 + 1)
        ('yarn', 64, 1.0942)
    """
    key, rope = _rope(hf)
    if not rope:                                   # null or {}: the default
        return None
    if not isinstance(rope, dict):
        raise HFError(f"config.json: {key} = {rope!r} must be null or an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(kind, str) or kind not in ROPE_KEYS:
        raise HFError(f"config.json: {key} has rope_type {kind!r}, which minitx does not convert (it converts "
                        f"{list(ROPE_KEYS)})")
    unknown = sorted(set(rope) - {"rope_type", "type", "rope_theta", "factor", "partial_rotary_factor",
                                  *ROPE_KEYS[kind]})
    if unknown:
        raise HFError(f"config.json: {key} holds {unknown}, which rope_type {kind!r} does not read here; minitx "
                        f"knows {sorted(ROPE_KEYS[kind])} for it")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"config.json: {key}.partial_rotary_factor = {rope['partial_rotary_factor']!r} must be 1 "
                        f"for this model")
    if kind == "default":
        return None
    needed = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"], "yarn": ["factor"]}
    # transformers refuses these too; but YaRN's factor may be null: then max_position_embeddings / original.
    missing = [name for name in needed[kind] if name not in rope or (rope[name] is None and kind != "yarn")]
    if missing:
        raise HFError(f"config.json: {key} of rope_type {kind!r} lacks {missing}")
    fields = {name: rope[name] for name in ROPE_KEYS[kind] if name in rope and name not in
              ("original_max_position_embeddings", "mscale", "mscale_all_dim")}
    names = {f"rope_scaling.{name}": f"{key}.{name}" for name in ("kind", "factor", *ROPE_KEYS[kind])}
    if kind in ("llama3", "yarn"):           # the top-level key first, as transformers reads it
        original = "original_max_position_embeddings"
        places = [(original, hf, original), (f"{key}.{original}", rope, original),
                  ("max_position_embeddings", hf, "max_position_embeddings")]
        where, there, name = next((place for place in places if place[2] in place[1]), places[-1])
        fields["original_max_len"] = there.get(name)
        names["rope_scaling.original_max_len"] = where
    factor = rope["factor"]
    if kind == "yarn":
        longest, original = hf.get("max_position_embeddings"), fields["original_max_len"]
        if factor is None and _number(longest) and _number(original) and original > 0:
            factor = longest / original
        for name in ("mscale", "mscale_all_dim"):
            if rope.get(name) is not None and not _number(rope[name]):
                raise HFError(f"config.json: {key}.{name} = {rope[name]!r} must be a number")
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if fields.get("attention_factor") is None and mscale and mscale_all_dim and _number(factor):
            def m(scale):
                return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0
            attention = m(mscale) / m(mscale_all_dim) if m(mscale_all_dim) else math.inf
            if not (_number(attention) and attention > 0):
                raise HFError(f"config.json: {key}.mscale = {mscale!r} and {key}.mscale_all_dim = "
                                f"{mscale_all_dim!r} give the attention factor {attention!r}; it must be a positive "
                                f"number")
            fields["attention_factor"] = attention
        for name in ("beta_fast", "beta_slow"):          # read with `or` there: 0 and null are the defaults
            if not fields.get(name, True):
                del fields[name]
    try:
        return RopeScaling(kind=kind, factor=factor, **fields)
    except Error as e:
        message = e.render(lambda field, value: f"{names.get(field, field)} = {value!r}")
        raise HFError(f"config.json: {message}") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _refused(hf: dict) -> tuple[str, str] | None:
    """(key, what it would need) for the first config.json key whose maths this model
    lacks (rotary scaling: `rope_scaling`)."""
    model_type = hf.get("model_type")
    checks = [
        ("hidden_act", hf.get("hidden_act", "silu") == "silu", "must be \"silu\""),
        ("attention_bias", model_type == "qwen2" or hf.get("attention_bias", False) is False, "must be false"),
        ("mlp_bias", hf.get("mlp_bias", False) is False, "must be false"),
        ("use_sliding_window", hf.get("use_sliding_window", False) is False, "must be false"),
        ("pretraining_tp", hf.get("pretraining_tp", 1) == 1, "must be 1"),
        ("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0) == 1.0, "must be 1"),
        ("layer_types", all(t == "full_attention" for t in hf.get("layer_types") or []),
         "may hold only \"full_attention\""),
    ]
    heads, width = hf.get("num_attention_heads"), hf.get("hidden_size")
    if hf.get("head_dim") is not None and isinstance(heads, int) and isinstance(width, int) and heads > 0:
        checks.append(("head_dim", hf["head_dim"] == width // heads, "must be hidden_size / num_attention_heads"))
    return next(((key, need) for key, ok, need in checks if not ok), None)


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> ModelConfig:
    """Hugging Face's Llama or Qwen2 config.json (a dict) -> our ModelConfig; HFError
    for another model or an option whose maths this model does not have.

    Example:
        >>> cfg = config_from_hf({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
        ...                       "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2,
        ...                       "num_hidden_layers": 2, "max_position_embeddings": 128})
        >>> cfg.positions, cfg.norm, cfg.mlp, cfg.n_kv_heads, cfg.bias, cfg.qkv_bias
        ('rotary', 'rmsnorm', 'swiglu', 2, False, True)
    """
    if not isinstance(hf, dict):
        raise HFError("config.json must hold a JSON object")
    if hf.get("model_type") not in MODEL_TYPES:
        raise HFError(f"config.json says model_type {hf.get('model_type')!r}; this reader takes {list(MODEL_TYPES)}")
    refused = _refused(hf)
    if refused:
        key, need = refused
        raise HFError(f"config.json: {key} = {hf.get(key)!r} {need} for this model")
    sizes = {}
    hf = {**hf, "num_key_value_heads": hf.get("num_key_value_heads", hf.get("num_attention_heads"))}
    if hf["num_key_value_heads"] is None:                   # written as null: as many as the query heads
        hf["num_key_value_heads"] = hf.get("num_attention_heads")
    for hf_name, ours in (("vocab_size", "vocab_size"), ("hidden_size", "d_model"),
                          ("num_attention_heads", "n_heads"), ("num_key_value_heads", "n_kv_heads"),
                          ("num_hidden_layers", "n_layers"), ("intermediate_size", "d_ff"),
                          ("max_position_embeddings", "max_len")):
        value = hf.get(hf_name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise HFError(f"config.json: {hf_name} = {value!r} must be a positive whole number")
        sizes[ours] = value
    std = hf.get("initializer_range", 0.02)
    scaling = rope_scaling(hf)
    try:
        return ModelConfig(**sizes, **defaults.ARCHS["llama"] | {"tie_embeddings": hf.get("tie_word_embeddings", False)},
                           qkv_bias=hf["model_type"] == "qwen2", ln_eps=hf.get("rms_norm_eps", 1e-6),
                           rope_theta=rope_theta(hf), rope_scaling=scaling, init_std=std, embed_std=std,
                           dtype=param_dtype, param_dtype=param_dtype)
    except Error as e:                   # named as config.json names them
        message = e.render(lambda field, value: f"{HF_FIELDS.get(field, field)} = {value!r}")
        raise HFError(f"config.json does not make a valid model: {message}") from None


def family(config: ModelConfig) -> str | None:
    """"llama" or "qwen2" for a model of that family's shape, else None.

    Example:
        >>> family(ModelConfig(vocab_size=5, **defaults.ARCHS["llama"])), family(ModelConfig(vocab_size=5))
        ('llama', None)
    """
    llama = defaults.ARCHS["llama"]
    if any(getattr(config, field) != value for field, value in llama.items() if field != "tie_embeddings"):
        return None
    return "qwen2" if config.qkv_bias else "llama"


def check_exportable(params: dict, config: ModelConfig) -> None:
    """Nothing to refuse: a model of Llama's shape (`family`) is written as it is.

    Example:
        >>> check_exportable({}, ModelConfig(vocab_size=5, **defaults.ARCHS["llama"]))
    """


def config_to_hf(config: ModelConfig) -> dict:
    """Our ModelConfig (Llama's shape) -> a config.json that transformers' LlamaConfig or
    Qwen2Config reads.

    Example:
        >>> hf = config_to_hf(ModelConfig(vocab_size=10, d_model=8, n_heads=2, **defaults.ARCHS["llama"]))
        >>> hf["model_type"], hf["intermediate_size"], hf["num_key_value_heads"]
        ('llama', 24, 2)
    """
    c = config
    kind = family(c)
    return {"architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"], "model_type": kind,
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "num_hidden_layers": c.n_layers,
            "max_position_embeddings": c.max_len, "rms_norm_eps": c.ln_eps,
            "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
            "attention_dropout": c.dropout, "rope_parameters": rope_parameters(c),
            "dtype": c.param_dtype,
            **({"attention_bias": False, "mlp_bias": False} if kind == "llama" else {"use_sliding_window": False})}


def rope_parameters(config: ModelConfig) -> dict:
    """config.json's "rope_parameters" of our rotary positions: the inverse of
    `rope_theta` and `rope_scaling`.

    Example:
        >>> rope_parameters(ModelConfig(vocab_size=5, positions="rotary",
        ...                             rope_scaling={"kind": "llama3", "factor": 8.0, "original_max_len": 16}))
        ... # doctest: +NORMALIZE_WHITESPACE
        {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0, 'original_max_position_embeddings': 16,
         'low_freq_factor': 1.0, 'high_freq_factor': 4.0}
    """
    s = config.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {"rope_type": s.kind, "rope_theta": config.rope_theta, "factor": s.factor,
            **{ROPE_NAMES.get(name, name): getattr(s, name) for name in defaults.ROPE_SCALINGS[s.kind]}}


# ----------------------------------------------------------------------------- tensors


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape, for every weight of a Llama or Qwen2 of this config.

    Example:
        >>> cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=4, n_kv_heads=2, n_layers=1, **defaults.ARCHS["llama"])
        >>> shapes = expected_shapes(cfg)
        >>> shapes["model.layers.0.self_attn.k_proj.weight"], shapes["lm_head.weight"]
        ((4, 8), (10, 8))
    """
    c = config
    k = c.head_dim
    shapes = {PREFIX + "embed_tokens.weight": (c.vocab_size, c.d_model), PREFIX + "norm.weight": (c.d_model,)}
    for i in range(c.n_layers):
        layer = f"{PREFIX}layers.{i}."
        for name, heads in zip(QKV, (c.n_heads, c.n_kv_heads, c.n_kv_heads)):
            shapes[f"{layer}self_attn.{name}.weight"] = (heads * k, c.d_model)
            if c.qkv_bias:
                shapes[f"{layer}self_attn.{name}.bias"] = (heads * k,)
        shapes.update({layer + "self_attn.o_proj.weight": (c.d_model, c.d_model),
                       layer + "mlp.gate_proj.weight": (c.d_ff, c.d_model),
                       layer + "mlp.up_proj.weight": (c.d_ff, c.d_model),
                       layer + "mlp.down_proj.weight": (c.d_model, c.d_ff)})
        shapes.update({layer + name: (c.d_model,) for name in BLOCK_NORMS})
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.d_model)
    return shapes


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Hugging Face's tensors -> our parameter tree of NumPy arrays in config.param_dtype;
    HFError names every missing, unexpected, misshapen or non-finite tensor.

    Example:
        >>> cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=4, n_kv_heads=2, n_layers=3, **defaults.ARCHS["llama"])
        >>> tensors = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
        >>> params_from_hf(tensors, cfg)["blocks"]["attn"]["qkv"]["w"].shape      # (L, D, (H + 2G) K)
        (3, 8, 16)
    """
    c = config
    if c.tie_embeddings and "lm_head.weight" in tensors:
        # Some files store the tied head anyway: a copy of the embedding is the same model.
        embed = tensors.get(PREFIX + "embed_tokens.weight")
        if embed is None or not np.array_equal(tensors["lm_head.weight"], embed):
            raise HFError("lm_head.weight differs from model.embed_tokens.weight, but config.json says "
                            "tie_word_embeddings is true; set it to false to import the head as it is")
        tensors = {name: array for name, array in tensors.items() if name != "lm_head.weight"}
    tensors = checked_tensors(tensors, expected_shapes(c), c.param_dtype)

    def stacked(name: str) -> np.ndarray:                # block i's tensor as row i: (L, ...)
        return np.stack([tensors[f"{PREFIX}layers.{i}.{name}"] for i in range(c.n_layers)])

    blocks: dict = {name: {"scale": stacked(hf_name)} for hf_name, name in BLOCK_NORMS.items()}
    qkv = {"w": np.concatenate([stacked(f"self_attn.{name}.weight").transpose(0, 2, 1) for name in QKV], axis=2)}
    if c.qkv_bias:
        qkv["b"] = np.concatenate([stacked(f"self_attn.{name}.bias") for name in QKV], axis=1)
    blocks["attn"] = {"qkv": qkv}
    for hf_name, path in BLOCK_MATRICES.items():
        part, layer = path.split("/")
        blocks.setdefault(part, {})[layer] = {"w": np.ascontiguousarray(stacked(hf_name).transpose(0, 2, 1))}
    tree = {"embed": {"table": tensors[PREFIX + "embed_tokens.weight"]}, "blocks": blocks,
            "ln_f": {"scale": tensors[PREFIX + "norm.weight"]}}
    if not c.tie_embeddings:
        tree["head"] = {"w": np.ascontiguousarray(tensors["lm_head.weight"].T)}
    return tree


def params_to_hf(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our tree (Llama's shape) -> Hugging Face's tensors, named as `save_pretrained`
    names them, C-contiguous NumPy arrays: the inverse of `params_from_hf`.

    Example:
        >>> import jax
        >>> from minitx_fn import model
        >>> cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=3, **defaults.ARCHS["llama"])
        >>> tensors = params_to_hf(jax.device_get(model.init(jax.random.key(0), cfg)), cfg)
        >>> tensors["model.layers.2.mlp.gate_proj.weight"].shape, len(tensors)      # (F, D); 3 + 9 per block
        ((24, 8), 30)
    """
    c = config
    blocks = params["blocks"]
    tensors = {PREFIX + "embed_tokens.weight": np.asarray(params["embed"]["table"]),
               PREFIX + "norm.weight": np.asarray(params["ln_f"]["scale"])}
    k = c.head_dim
    cuts = np.cumsum([c.n_heads * k, c.n_kv_heads * k])
    qkv_w = np.split(np.asarray(blocks["attn"]["qkv"]["w"]), cuts, axis=2)           # 3 x (L, D, n K)
    qkv_b = np.split(np.asarray(blocks["attn"]["qkv"]["b"]), cuts, axis=1) if c.qkv_bias else None
    for i in range(c.n_layers):
        layer = f"{PREFIX}layers.{i}."
        for j, name in enumerate(QKV):
            tensors[f"{layer}self_attn.{name}.weight"] = qkv_w[j][i].T
            if qkv_b is not None:
                tensors[f"{layer}self_attn.{name}.bias"] = qkv_b[j][i]
        for hf_name, path in BLOCK_MATRICES.items():
            part, name = path.split("/")
            tensors[layer + hf_name] = np.asarray(blocks[part][name]["w"][i]).T
        for hf_name, name in BLOCK_NORMS.items():
            tensors[layer + hf_name] = np.asarray(blocks[name]["scale"][i])
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["head"]["w"]).T
    return {name: np.ascontiguousarray(array) for name, array in tensors.items()}


__all__ = ["MODEL_TYPES", "ROPE_KEYS", "ROPE_NAMES", "check_exportable", "config_from_hf", "config_to_hf",
           "expected_shapes", "family",
           "params_from_hf", "params_to_hf", "rope_parameters", "rope_scaling", "rope_theta"]
