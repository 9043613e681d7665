"""GPT-2 in our own layers: import a Hugging Face GPT-2 directory, export a run as one.

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

Files are read and written with `safetensors` (its NumPy backend: no torch) and the
tokenizer with Hugging Face's `tokenizers`: the optional extra `gpt2`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from minitx_fn import defaults, runs, signals
from minitx_fn.config import ModelConfig
from minitx_fn.errors import Error
from minitx_fn.tokenizer import SPECIAL_TOKENS, BPETokenizer, ByteTokenizer, Tokenizer, require_tokenizers

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PREFIX = "transformer."
# GPT-2's activation is the tanh approximation of GELU, which Hugging Face calls by
# these names; the exact "gelu" differs in the fourth digit and is not this model.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
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


class GPT2Error(Error):
    """A directory is not a GPT-2 minitx can import, or a run cannot be exported as one."""


def require_safetensors():
    """The `safetensors.numpy` module, or GPT2Error saying how to install it."""
    try:
        import safetensors.numpy
    except ImportError:
        raise GPT2Error("reading and writing GPT-2 files needs the safetensors library: "
                        "pip install -e \".[gpt2]\"") from None
    return safetensors.numpy


# ----------------------------------------------------------------------------- names and shapes


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
    shapes = {hf_name: _get(tree, path).shape for hf_name, path in TOP_TENSORS.items()}
    for hf_name, path in BLOCK_TENSORS.items():                            # row i of an (L, ...) leaf
        shapes.update({f"h.{i}.{hf_name}": _get(tree, "blocks/" + path).shape[1:] for i in range(config.n_layers)})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = tree["head"]["w"].shape[::-1]           # Hugging Face's (V, D)
    return shapes


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Hugging Face's tensors (names with or without "transformer.") -> our parameter
    tree of NumPy arrays in config.param_dtype. GPT2Error names every missing,
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
        minitx_fn.gpt2.GPT2Error: the weights do not match config.json: missing h.2.ln_1.bias
    """
    counts = collections.Counter(name.removeprefix(PREFIX) for name in tensors)
    twice = sorted(name for name, n in counts.items() if n > 1)
    if twice:           # "wte.weight" beside "transformer.wte.weight": which one transformers uses is its business
        raise GPT2Error(f"tensors {_few(twice)} appear both with and without the prefix {PREFIX!r}; keep one of each")
    tensors = {name.removeprefix(PREFIX): array for name, array in tensors.items()}
    tensors = {name: array for name, array in tensors.items() if not BUFFERS.fullmatch(name)}
    dtype = np.dtype(config.param_dtype)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        # Some files store the tied head anyway: a copy of wte is the same model.
        if "wte.weight" in tensors and np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
            del tensors["lm_head.weight"]
        else:
            raise GPT2Error("lm_head.weight differs from wte.weight, but config.json says tie_word_embeddings is "
                            "true; set it to false to import the head as it is")
    tensors = checked_tensors(tensors, expected_shapes(config), config.param_dtype)
    tree: dict = {}
    for hf_name, path in TOP_TENSORS.items():
        _set(tree, path, tensors[hf_name])
    for hf_name, path in BLOCK_TENSORS.items():          # stack block i's tensor as row i: (L, ...)
        _set(tree, "blocks/" + path, np.stack([tensors[f"h.{i}.{hf_name}"] for i in range(config.n_layers)]))
    if not config.tie_embeddings:                        # GPT-2's head has no bias: ours is zero
        tree["head"] = {"w": np.ascontiguousarray(tensors["lm_head.weight"].T), "b": np.zeros(config.vocab_size, dtype)}
    return tree


def checked_tensors(tensors: dict[str, np.ndarray], want: dict[str, tuple[int, ...]], dtype: str
                    ) -> dict[str, np.ndarray]:
    """The tensors cast to `dtype`, after checking they are exactly the names and shapes
    `want` lists and all finite; GPT2Error names every missing, unexpected, misshapen
    or non-finite tensor at once.

    Example:
        >>> checked_tensors({"a": np.ones(2)}, {"a": (2,), "b": (1,)}, "float32")
        Traceback (most recent call last):
        minitx_fn.gpt2.GPT2Error: the weights do not match config.json: missing b
    """
    missing, unexpected = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
    wrong = [f"{name} {tuple(tensors[name].shape)} (needs {want[name]})" for name in sorted(want.keys() & tensors.keys())
             if tuple(tensors[name].shape) != want[name]]
    if missing or unexpected or wrong:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(unexpected)}" if unexpected else "",
                 f"wrong shapes: {_few(wrong)}" if wrong else ""]
        raise GPT2Error("the weights do not match config.json: " + "; ".join(p for p in parts if p))
    with np.errstate(over="ignore"):    # a float64 value beyond float32's range becomes inf: caught below
        tensors = {name: array.astype(np.dtype(dtype), copy=False) for name, array in tensors.items()}
    bad = [name for name in sorted(tensors) if not np.isfinite(tensors[name]).all()]
    if bad:
        raise GPT2Error(f"tensors {_few(bad)} hold NaN or infinite values in {dtype}; this model cannot be used")
    return tensors


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
    tensors = {hf_name: np.asarray(_get(params, path)) for hf_name, path in TOP_TENSORS.items()}
    for hf_name, path in BLOCK_TENSORS.items():
        stacked = np.asarray(_get(params, "blocks/" + path))                     # (L, ...)
        tensors.update({f"h.{i}.{hf_name}": stacked[i] for i in range(config.n_layers)})
    named = {PREFIX + name: np.ascontiguousarray(array) for name, array in tensors.items()}
    if not config.tie_embeddings:
        named["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["head"]["w"]).T)
    return named


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> ModelConfig:
    """Hugging Face's GPT-2 config.json (a dict) -> our ModelConfig; GPT2Error for a
    model that is not GPT-2 or uses an option this model does not have.

    Example:
        >>> cfg = config_from_hf({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
        ...                       "n_layer": 12, "n_head": 12})
        >>> cfg.d_ff, cfg.positions, cfg.tie_embeddings
        (3072, 'learned', True)
    """
    if not isinstance(hf, dict):
        raise GPT2Error("config.json must hold a JSON object")
    if hf.get("model_type") != "gpt2":
        raise GPT2Error(f"config.json says model_type {hf.get('model_type')!r}; only \"gpt2\" models can be imported")
    unsupported = {"activation_function": (hf.get("activation_function", "gelu_new") in TANH_GELU,
                                           f"must be one of {list(TANH_GELU)}"),
                   "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "must be true"),
                   "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is False,
                                                       "must be false"),
                   "add_cross_attention": (hf.get("add_cross_attention", False) is False, "must be false")}
    for name, (ok, need) in unsupported.items():
        if not ok:
            raise GPT2Error(f"config.json: {name} = {hf.get(name)!r} {need} for this model")
    sizes = {}
    for hf_name, ours in (("vocab_size", "vocab_size"), ("n_embd", "d_model"), ("n_head", "n_heads"),
                          ("n_layer", "n_layers"), ("n_positions", "max_len")):
        value = hf.get(hf_name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise GPT2Error(f"config.json: {hf_name} = {value!r} must be a positive whole number")
        sizes[ours] = value
    inner = hf.get("n_inner")
    std = hf.get("initializer_range", 0.02)
    try:
        return ModelConfig(**sizes, d_ff=inner, ln_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
                           tie_embeddings=hf.get("tie_word_embeddings", True), init_std=std, embed_std=std,
                           dtype=param_dtype, param_dtype=param_dtype)
    except Error as e:                   # named as config.json names them
        message = e.render(lambda field, value: f"{HF_FIELDS.get(field, field)} = {value!r}")
        raise GPT2Error(f"config.json does not make a valid model: {message}") from None


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


# ----------------------------------------------------------------------------- files


def _read_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise GPT2Error(f"{path!r} is missing; {what}") from None
    except OSError as e:
        raise GPT2Error(f"cannot read {path!r}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise GPT2Error(f"{path!r} is not valid JSON ({type(e).__name__})") from None


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    st = require_safetensors()
    index_path = os.path.join(hf_dir, WEIGHTS_INDEX)
    if os.path.exists(os.path.join(hf_dir, WEIGHTS)):
        files = [WEIGHTS]
    elif os.path.exists(index_path):
        index = _read_json(index_path, "")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise GPT2Error(f"{index_path!r} has no weight_map of file names")
        files = sorted(set(weight_map.values()))
        outside = [name for name in files if os.path.basename(name) != name or name in ("", ".", "..")]
        if outside:                      # shards lie beside the index, as Hugging Face writes them
            raise GPT2Error(f"{index_path!r} names shard files outside its folder: {_few(outside)}")
    else:
        other = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                 if os.path.exists(os.path.join(hf_dir, n))]
        hint = (f" (it has {', '.join(other)}: download the repository's model.safetensors, or convert with "
                f"transformers' save_pretrained)") if other else ""
        raise GPT2Error(f"{hf_dir!r} has no {WEIGHTS}{hint}")
    tensors: dict[str, np.ndarray] = {}
    sharded = files != [WEIGHTS]
    for name in files:
        signals.check()                                  # a stop signal: between two files, nothing written
        path = os.path.join(hf_dir, name)
        if os.path.isdir(path):
            raise GPT2Error(f"{path!r} is a directory, not a safetensors file; download the model's file again")
        try:
            shard = st.load_file(path)
        except FileNotFoundError:
            raise GPT2Error(f"{path!r} is missing") from None
        except OSError as e:
            raise GPT2Error(f"cannot read {path!r}: {e.strerror or e}") from None
        except Exception as e:           # safetensors raises its own error for a damaged file
            raise GPT2Error(f"{path!r} is not a safetensors file that can be read ({str(e)[:120]}); download it "
                            f"again") from None
        if sharded:                      # the index and the shards must tell the same story
            listed = {t for t, f in weight_map.items() if f == name}
            missing, unlisted = sorted(listed - set(shard)), sorted(set(shard) - listed)
            if missing or unlisted:
                raise GPT2Error(f"{path!r} disagrees with {WEIGHTS_INDEX}: " + "; ".join(
                    ([f"it lacks {_few(missing)}, which the index puts there"] if missing else [])
                    + ([f"it holds {_few(unlisted)}, which the index puts elsewhere or nowhere"] if unlisted else []))
                    + "; download the model again")
        tensors.update(shard)
    # bfloat16 arrives as ml_dtypes' bfloat16, which NumPy does not count as floating point.
    bad = sorted(n for n, a in tensors.items() if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"))
    if bad:
        raise GPT2Error(f"tensors {_few(bad)} are not floating point ({tensors[bad[0]].dtype}); a GPT-2's weights are")
    return tensors


def read_tokenizer(hf_dir: str) -> BPETokenizer:
    """tokenizer.json, or else vocab.json + merges.txt (GPT-2's byte-level BPE)."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                return BPETokenizer.from_json(f.read())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise GPT2Error(f"cannot use {path!r}: {e}") from None
    vocab, merges = (os.path.join(hf_dir, n) for n in ("vocab.json", "merges.txt"))
    if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise GPT2Error(f"{hf_dir!r} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt")
    try:
        return BPETokenizer.from_vocab_and_merges(vocab, merges)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GPT2Error(f"cannot use {vocab!r} and {merges!r}: {e}") from None


def _reader(model_type):
    """The module that reads and writes this model_type: this one for "gpt2" (and a
    config.json without one, which config_from_hf then names), `llama` for "llama"
    and "qwen2"; GPT2Error naming any other."""
    from minitx_fn import llama
    if model_type in llama.MODEL_TYPES:
        return llama
    if model_type == "gpt2":
        return sys.modules[__name__]
    said = "has no model_type" if model_type is None else f"says model_type {model_type!r}"
    raise GPT2Error(f"config.json {said}; minitx imports {['gpt2', *llama.MODEL_TYPES]}")


def read_config(hf_dir: str, *, param_dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a Hugging Face directory's config.json (GPT-2, Llama or Qwen2)."""
    if not os.path.isdir(hf_dir):
        raise GPT2Error(f"{hf_dir!r} is not a directory; give the folder that holds config.json and "
                        f"model.safetensors")
    hf = _read_json(os.path.join(hf_dir, "config.json"), "a Hugging Face model folder needs one")
    if not isinstance(hf, dict):
        raise GPT2Error("config.json must hold a JSON object")
    return _reader(hf.get("model_type")).config_from_hf(hf, param_dtype=param_dtype)


def import_dir(hf_dir: str, *, param_dtype: str = "float32") -> tuple[ModelConfig, dict, BPETokenizer]:
    """A Hugging Face GPT-2, Llama or Qwen2 directory -> (config, parameter tree of
    NumPy arrays, tokenizer with the special ids config.json names)."""
    from minitx_fn import llama
    config = read_config(hf_dir, param_dtype=param_dtype)
    hf = _read_json(os.path.join(hf_dir, "config.json"), "a Hugging Face model folder needs one")
    try:                          # the ids config.json names bos, eos and pad, kept for export-hf
        tokenizer = read_tokenizer(hf_dir).with_special({name: hf.get(name) for name in SPECIAL_TOKENS})
    except ValueError as e:
        raise GPT2Error(f"config.json: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:        # fewer is a padded table (Qwen2's): those rows go unused
        raise GPT2Error(f"the tokenizer has {tokenizer.vocab_size:,} ids but config.json says vocab_size "
                        f"{config.vocab_size:,}: the model has no embedding for the ids past it")
    return config, _reader(llama.family(config) or "gpt2").params_from_hf(read_tensors(hf_dir), config), tokenizer


def byte_tokenizer_json() -> str:
    """Our byte tokenizer as a `tokenizers` JSON: byte-level BPE with no merges, where
    byte b (written as GPT-2's printable stand-in for b) is id b."""
    tk = require_tokenizers()
    alphabet = bytes_to_unicode()
    hf = tk.Tokenizer(tk.models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    return hf.to_str()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (its encoder.py): printable
    Latin-1 bytes stand for themselves, the other 68 for code points 256 .. 323.

    Example:
        >>> m = bytes_to_unicode()
        >>> m[ord("a")], m[ord(" ")], len(set(m.values()))
        ('a', 'Ġ', 256)
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def export_files(params: dict, config: ModelConfig, tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files of a Hugging Face directory: config.json, model.safetensors and, for a
    bpe or byte tokenizer, tokenizer.json; with the special ids of an imported
    tokenizer, config.json names them and generation_config.json holds them. A model
    of Llama's shape (`llama.family`) is written as a Llama or Qwen2; any other must
    have GPT-2's shape (GPT2Error otherwise): learned positions, and tied embeddings
    (or an untied head with a zero bias, as an imported untied GPT-2 has)."""
    from minitx_fn import llama
    if type(config) is not ModelConfig:
        raise GPT2Error(f"the model {getattr(config, 'code', type(config).__name__)!r} is code of its own, with no "
                        f"Hugging Face mapping; export-hf writes the built-in model's GPT-2, Llama and Qwen2 shapes")
    kind = llama.family(config)
    if kind is None:
        _check_gpt2_shape(params, config)
    writer = _reader(kind or "gpt2")
    st = require_safetensors()
    special = getattr(tokenizer, "special", {})                  # an imported tokenizer's bos, eos and pad ids
    hf_config = {**writer.config_to_hf(config), **{name: special.get(name) for name in SPECIAL_TOKENS}}
    files = {"config.json": json.dumps(hf_config, indent=2).encode(),
             WEIGHTS: st.save(writer.params_to_hf(params, config), metadata={"format": "pt"})}
    if special:                # what transformers' generate reads them from (as save_pretrained writes it)
        files["generation_config.json"] = json.dumps(special, indent=2).encode()
    if isinstance(tokenizer, BPETokenizer):
        files["tokenizer.json"] = tokenizer.to_json().encode()
    elif isinstance(tokenizer, ByteTokenizer):
        files["tokenizer.json"] = byte_tokenizer_json().encode()
    return files


def _check_gpt2_shape(params: dict, config: ModelConfig) -> None:
    """GPT2Error naming the fields that keep a model (not of Llama's shape) from being
    written: those that differ from GPT-2's, or from Llama's when it is nearer to that."""
    head_bias = np.asarray(params["head"].get("b", 0.0)) if "head" in params else None
    untied_ok = head_bias is not None and not head_bias.any()        # an imported untied GPT-2: a zero head bias
    shapes = {"GPT-2 has": ({**defaults.ARCHS["gpt2"], "n_kv_heads": config.n_heads, "qkv_bias": True},
                            " (an untied head only with a zero bias, as in an imported GPT-2)", "--arch gpt2"),
              "Llama and Qwen2 have": ({f: v for f, v in defaults.ARCHS["llama"].items() if f != "tie_embeddings"},
                                       "", "--arch llama")}
    differ = {name: {field: getattr(config, field) for field, value in fields.items()
                     if getattr(config, field) != value and not (field == "tie_embeddings" and untied_ok)}
              for name, (fields, _, _) in shapes.items()}
    name = min(differ, key=lambda n: len(differ[n]))                  # the shape this model is nearer to
    other = differ[name]
    if other:
        fields, note, fix = shapes[name]
        raise GPT2Error(f"{name} " + ", ".join("{want_%s}" % f for f in other)
                        + f"{note}; this model has " + ", ".join("{%s}" % f for f in other)
                        + f": train one with {fix}", **{f: (f, value) for f, value in other.items()},
                        **{f"want_{f}": (f, fields[f]) for f in other})


TEMPORARY_KIND = "export"          # temporary folders: runs.owned_prefix("export"), .export-PID-*


def write_dir(out_dir: str, files: dict[str, bytes]) -> None:
    """Write files into a new folder out_dir: in a temporary sibling first
    (`.export-<pid>-*`), renamed into place, so a full disk or a signal never leaves
    half a directory; such a folder that a killed export left (its process gone) is
    removed. An existing empty folder is written in place (renaming a folder over it
    would swap the folder a shell stands in): each file under a temporary name, then
    renamed, config.json last, so a folder that has it is whole. GPT2Error if out_dir
    exists and is not an empty folder."""
    out_dir = os.path.realpath(out_dir)         # a link to an empty folder: write where it points
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise GPT2Error(f"{out_dir!r} already exists and is not an empty folder; choose a new --out")
    in_place = os.path.isdir(out_dir)
    parent = out_dir if in_place else os.path.dirname(out_dir)
    ancestor = parent
    while not os.path.isdir(ancestor):
        if os.path.exists(ancestor):
            raise GPT2Error(f"cannot create {out_dir!r}: {ancestor!r} is a file")
        ancestor = os.path.dirname(ancestor)
    made = runs.make_dirs(parent)
    runs.remove_abandoned(parent, TEMPORARY_KIND)      # folders of killed exports
    tmp = tempfile.mkdtemp(prefix=runs.owned_prefix(TEMPORARY_KIND), dir=parent)
    try:
        for name, blob in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, runs.dir_mode())          # mkdtemp makes it 0700
        signals.check()                         # a stop asked while writing: the temporary folder goes, nothing else
        if in_place:
            for name in sorted(files, key=lambda n: n == "config.json"):
                os.rename(os.path.join(tmp, name), os.path.join(out_dir, name))
            os.rmdir(tmp)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if in_place:
            for name in files:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out_dir, name))
        runs.remove_made(made)
        raise


def import_run(hf_dir: str, run_dir: str, *, log=None) -> tuple[ModelConfig, int]:
    """A Hugging Face GPT-2, Llama or Qwen2 directory (`import_dir`) -> a new run at
    step 0 (`job.new_run`, its origin recorded), after a memory check made before any
    weight is read: `minitx import-hf`. Returns the model's config and parameter
    count; `checkpoint.load_model(run_dir)` then gives the model to generate from."""
    import jax

    from minitx_fn import job, llama, memory, model
    # Before reading the weights: the tensors as read, our tree, Adam's two moments,
    # and the bytes of the files a save builds in memory, about 6 copies in all.
    memory.check(6 * 4 * memory.param_count(read_config(hf_dir)), "importing this model",
                 "import it on a machine with more memory")
    config, params, tokenizer = import_dir(hf_dir)
    params = jax.tree.map(jax.numpy.asarray, params)
    signals.check()
    key = "hf" if llama.family(config) else "gpt2"                          # checkpoint.IMPORTED
    created = not os.path.exists(run_dir)
    job.new_run(run_dir, params, model=config, tokenizer=tokenizer, origin={key: os.path.abspath(hf_dir)},
                log=log)
    try:
        signals.check()                  # a stop asked while the run was written: take the run back out
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return config, model.count_params(params)


def export_run(run_dir: str, out_dir: str, *, trust_code: bool = False):
    """A run -> a new Hugging Face folder, a GPT-2, Llama or Qwen2 by the run's shape
    (`export_files`, `write_dir`): `minitx export-hf`. Returns the names of the files
    written and the run's `checkpoint.Model`. A run of a model of one's own
    (`trust_code` to load it) has no mapping: GPT2Error."""
    import jax

    from minitx_fn import checkpoint
    from minitx_fn.errors import StorageError
    loaded = checkpoint.load_model(run_dir, trust_code=trust_code)
    files = export_files(jax.device_get(loaded.params), loaded.model, loaded.tokenizer)
    signals.check()
    try:
        write_dir(out_dir, files)
    except OSError as e:
        raise StorageError(out_dir, e) from None
    return sorted(files), loaded


__all__ = ["BLOCK_TENSORS", "GPT2Error", "TOP_TENSORS", "bytes_to_unicode", "config_from_hf", "config_to_hf",
           "expected_shapes", "export_files", "export_run", "import_dir", "import_run", "params_from_hf", "params_to_hf", "read_config",
           "read_tensors", "read_tokenizer", "write_dir"]
