"""GPT-2 in our own layers: the mapping between its config.json and tensors and ours.

GPT-2 is this model with `positions="learned"` and `tie_embeddings=True`: pre-norm
blocks, tanh GELU, layer-norm epsilon 1e-5, one fused QKV matrix stored (in, out)
(Hugging Face's `Conv1D`), so every tensor maps onto one leaf of our tree without a
transpose. Block i's tensors become row i of our stacked (L, ...) leaves:

    Hugging Face name                our tree path           shape
    wte.weight                       embed/table             (V, D)
    wpe.weight                       pos/table               (S, D)
    h.{i}.ln_1.weight, .bias         blocks/ln1/scale, bias  (D,)      -> (L, D)
    h.{i}.attn.c_attn.weight, .bias  blocks/attn/qkv/w, b    (D, 3D), (3D,)
    h.{i}.attn.c_proj.weight, .bias  blocks/attn/out/w, b    (D, D), (D,)
    h.{i}.ln_2.weight, .bias         blocks/ln2/scale, bias  (D,)
    h.{i}.mlp.c_fc.weight, .bias     blocks/mlp/up/w, b      (D, F), (F,)
    h.{i}.mlp.c_proj.weight, .bias   blocks/mlp/down/w, b    (F, D), (D,)
    ln_f.weight, .bias               ln_f/scale, bias        (D,)
    lm_head.weight (untied only)     head/w (transposed)     (V, D) -> (D, V); head/b = 0

The columns of c_attn are [Q | K | V], and head h owns columns h*K .. h*K + K - 1 of
each: the same layout as `layers.attention`. Names may carry the prefix
"transformer." (what `save_pretrained` writes) or not (the original checkpoints);
the causal-mask buffers `attn.bias` and `attn.masked_bias` of old files are not
weights and are skipped.

The folder's files are read and written by `hf/folder.py`.
"""

from __future__ import annotations

import collections
import re

import numpy as np

from minitx_fn import defaults
from minitx_fn.config import ModelConfig
from minitx_fn.errors import Error, HFError
from minitx_fn.hf.tensors import checked_tensors, few, get_path, set_path

PREFIX = "transformer."
# GPT-2's activation is the tanh approximation of GELU, which Hugging Face calls by
# these names; the exact "gelu" differs in the fourth digit and is not this model.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
MODEL_TYPES = ("gpt2",)
# Per block: Hugging Face's name -> (our path under blocks/, transpose?)
BLOCK_TENSORS = {
    "ln_1.weight": "ln1/scale", "ln_1.bias": "ln1/bias",
    "attn.c_attn.weight": "attn/qkv/w", "attn.c_attn.bias": "attn/qkv/b",
    "attn.c_proj.weight": "attn/out/w", "attn.c_proj.bias": "attn/out/b",
    "ln_2.weight": "ln2/scale", "ln_2.bias": "ln2/bias",
    "mlp.c_fc.weight": "mlp/up/w", "mlp.c_fc.bias": "mlp/up/b",
    "mlp.c_proj.weight": "mlp/down/w", "mlp.c_proj.bias": "mlp/down/b",
}
TOP_TENSORS = {"wte.weight": "embed/table", "wpe.weight": "pos/table", "ln_f.weight": "ln_f/scale",
               "ln_f.bias": "ln_f/bias"}
# Our ModelConfig's fields as config.json names them, for messages.
HF_FIELDS = {"vocab_size": "vocab_size", "d_model": "n_embd", "n_heads": "n_head", "n_layers": "n_layer",
             "max_len": "n_positions", "d_ff": "n_inner", "ln_eps": "layer_norm_epsilon",
             "init_std": "initializer_range", "embed_std": "initializer_range",
             "tie_embeddings": "tie_word_embeddings"}
BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")   # causal masks saved by old versions, not weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name (without prefix) -> shape, for every weight of a GPT-2 of this config.

    Example:
        >>> cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, max_len=4, positions="learned",
        ...                   tie_embeddings=True)
        >>> expected_shapes(cfg)["h.0.attn.c_attn.weight"], expected_shapes(cfg)["wpe.weight"]
        ((8, 24), (4, 8))
    """
    import jax

    from minitx_fn import model
    tree = jax.eval_shape(model.init, jax.random.key(0), config)          # our shapes, nothing computed
    shapes = {hf_name: get_path(tree, path).shape for hf_name, path in TOP_TENSORS.items()}
    for hf_name, path in BLOCK_TENSORS.items():                            # row i of an (L, ...) leaf
        shapes.update({f"h.{i}.{hf_name}": get_path(tree, "blocks/" + path).shape[1:] for i in range(config.n_layers)})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = tree["head"]["w"].shape[::-1]           # Hugging Face's (V, D)
    return shapes


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Hugging Face's tensors (names with or without "transformer.") -> our parameter
    tree of NumPy arrays in config.param_dtype. HFError names every missing,
    unexpected or misshapen tensor.

    Example:
        >>> cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=3, max_len=4, positions="learned",
        ...                   tie_embeddings=True)
        >>> tensors = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}
        >>> params_from_hf(tensors, cfg)["blocks"]["attn"]["qkv"]["w"].shape      # (L, D, 3D)
        (3, 8, 24)
        >>> del tensors["h.2.ln_1.bias"]
        >>> params_from_hf(tensors, cfg)
        Traceback (most recent call last):
        minitx_fn.errors.HFError: the weights do not match config.json: missing h.2.ln_1.bias
    """
    counts = collections.Counter(name.removeprefix(PREFIX) for name in tensors)
    twice = sorted(name for name, n in counts.items() if n > 1)
    if twice:           # "wte.weight" beside "transformer.wte.weight": which one transformers uses is its business
        raise HFError(f"tensors {few(twice)} appear both with and without the prefix {PREFIX!r}; keep one of each")
    tensors = {name.removeprefix(PREFIX): array for name, array in tensors.items()}
    tensors = {name: array for name, array in tensors.items() if not BUFFERS.fullmatch(name)}
    dtype = np.dtype(config.param_dtype)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        # Some files store the tied head anyway: a copy of wte is the same model.
        if "wte.weight" in tensors and np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
            del tensors["lm_head.weight"]
        else:
            raise HFError("lm_head.weight differs from wte.weight, but config.json says tie_word_embeddings is "
                            "true; set it to false to import the head as it is")
    tensors = checked_tensors(tensors, expected_shapes(config), config.param_dtype)
    tree: dict = {}
    for hf_name, path in TOP_TENSORS.items():
        set_path(tree, path, tensors[hf_name])
    for hf_name, path in BLOCK_TENSORS.items():          # stack block i's tensor as row i: (L, ...)
        set_path(tree, "blocks/" + path, np.stack([tensors[f"h.{i}.{hf_name}"] for i in range(config.n_layers)]))
    if not config.tie_embeddings:                        # GPT-2's head has no bias: ours is zero
        tree["head"] = {"w": np.ascontiguousarray(tensors["lm_head.weight"].T), "b": np.zeros(config.vocab_size, dtype)}
    return tree


def params_to_hf(params: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our tree (learned positions) -> Hugging Face's tensors, named as `save_pretrained`
    names them ("transformer." prefix), C-contiguous NumPy arrays. An untied head
    becomes lm_head.weight (its bias is dropped: `export_files` checks it is zero).

    Example:
        >>> import jax
        >>> from minitx_fn import model
        >>> cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=3, max_len=4, positions="learned",
        ...                   tie_embeddings=True)
        >>> tensors = params_to_hf(jax.device_get(model.init(jax.random.key(0), cfg)), cfg)
        >>> tensors["transformer.h.2.mlp.c_fc.weight"].shape, len(tensors)      # (D, F); 4 + 12 per block
        ((8, 32), 40)
    """
    tensors = {hf_name: np.asarray(get_path(params, path)) for hf_name, path in TOP_TENSORS.items()}
    for hf_name, path in BLOCK_TENSORS.items():
        stacked = np.asarray(get_path(params, "blocks/" + path))                     # (L, ...)
        tensors.update({f"h.{i}.{hf_name}": stacked[i] for i in range(config.n_layers)})
    named = {PREFIX + name: np.ascontiguousarray(array) for name, array in tensors.items()}
    if not config.tie_embeddings:
        named["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["head"]["w"]).T)
    return named


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> ModelConfig:
    """Hugging Face's GPT-2 config.json (a dict) -> our ModelConfig; HFError for a
    model that is not GPT-2 or uses an option this model does not have.

    Example:
        >>> cfg = config_from_hf({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
        ...                       "n_layer": 12, "n_head": 12})
        >>> cfg.d_ff, cfg.positions, cfg.tie_embeddings
        (3072, 'learned', True)
    """
    if not isinstance(hf, dict):
        raise HFError("config.json must hold a JSON object")
    if hf.get("model_type") != "gpt2":
        raise HFError(f"config.json says model_type {hf.get('model_type')!r}; only \"gpt2\" models can be imported")
    unsupported = {"activation_function": (hf.get("activation_function", "gelu_new") in TANH_GELU,
                                           f"must be one of {list(TANH_GELU)}"),
                   "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "must be true"),
                   "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is False,
                                                       "must be false"),
                   "add_cross_attention": (hf.get("add_cross_attention", False) is False, "must be false")}
    for name, (ok, need) in unsupported.items():
        if not ok:
            raise HFError(f"config.json: {name} = {hf.get(name)!r} {need} for this model")
    sizes = {}
    for hf_name, ours in (("vocab_size", "vocab_size"), ("n_embd", "d_model"), ("n_head", "n_heads"),
                          ("n_layer", "n_layers"), ("n_positions", "max_len")):
        value = hf.get(hf_name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise HFError(f"config.json: {hf_name} = {value!r} must be a positive whole number")
        sizes[ours] = value
    inner = hf.get("n_inner")
    std = hf.get("initializer_range", 0.02)
    try:
        return ModelConfig(**sizes, d_ff=inner, ln_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
                           tie_embeddings=hf.get("tie_word_embeddings", True), init_std=std, embed_std=std,
                           dtype=param_dtype, param_dtype=param_dtype)
    except Error as e:                   # named as config.json names them
        message = e.render(lambda field, value: f"{HF_FIELDS.get(field, field)} = {value!r}")
        raise HFError(f"config.json does not make a valid model: {message}") from None


def config_to_hf(config: ModelConfig) -> dict:
    """Our ModelConfig (learned positions) -> a config.json that
    `transformers.GPT2Config` reads. Dropout rates are the training dropout.

    Example:
        >>> hf = config_to_hf(ModelConfig(vocab_size=10, d_model=8, n_heads=2, positions="learned",
        ...                               tie_embeddings=True))
        >>> hf["n_embd"], hf["n_inner"], hf["activation_function"]
        (8, 32, 'gelu_new')
    """
    c = config
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.max_len, "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads,
            "n_inner": c.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": c.ln_eps,
            "initializer_range": c.init_std, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout, "scale_attn_weights": True, "tie_word_embeddings": c.tie_embeddings,
            "dtype": c.param_dtype}


def check_exportable(params: dict, config: ModelConfig) -> None:
    """HFError naming the fields that keep a model (not of Llama's shape) from being
    written: those that differ from GPT-2's, or from Llama's when it is nearer to that.

    Example:
        >>> cfg = ModelConfig(vocab_size=10, d_model=8, n_heads=2, positions="learned")
        >>> check_exportable({"head": {"b": np.ones(10)}}, cfg)
        Traceback (most recent call last):
        minitx_fn.errors.HFError: GPT-2 has tie_embeddings=True (an untied head only with a zero bias, as in an imported GPT-2); this model has tie_embeddings=False: train one with arch='gpt2'
    """
    head_bias = np.asarray(params["head"].get("b", 0.0)) if "head" in params else None
    untied_ok = head_bias is not None and not head_bias.any()        # an imported untied GPT-2: a zero head bias
    shapes = {"GPT-2 has": ({**defaults.ARCHS["gpt2"], "n_kv_heads": config.n_heads, "qkv_bias": True},
                            " (an untied head only with a zero bias, as in an imported GPT-2)", "gpt2"),
              "Llama and Qwen2 have": ({f: v for f, v in defaults.ARCHS["llama"].items() if f != "tie_embeddings"},
                                       "", "llama")}
    differ = {name: {field: getattr(config, field) for field, value in fields.items()
                     if getattr(config, field) != value and not (field == "tie_embeddings" and untied_ok)}
              for name, (fields, _, _) in shapes.items()}
    name = min(differ, key=lambda n: len(differ[n]))                  # the shape this model is nearer to
    other = differ[name]
    if other:
        fields, note, arch = shapes[name]
        raise HFError(f"{name} " + ", ".join("{want_%s}" % f for f in other)
                      + f"{note}; this model has " + ", ".join("{%s}" % f for f in other)
                      + ": train one with {arch}", **{f: (f, value) for f, value in other.items()},
                      **{f"want_{f}": (f, fields[f]) for f in other}, arch=("arch", arch))

__all__ = ["BLOCK_TENSORS", "MODEL_TYPES", "TOP_TENSORS", "check_exportable", "config_from_hf", "config_to_hf",
           "expected_shapes", "params_from_hf", "params_to_hf"]
