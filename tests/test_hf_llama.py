"""Llama and Qwen2 from Hugging Face folders (#28): the tensor mapping and its inverse,
config.json's refusals, and parity with transformers' own LlamaForCausalLM and
Qwen2ForCausalLM (random weights, small configs with grouped-query attention, tied
and untied heads, Qwen2's q/k/v biases): logits in float32 and float64 (to float32's
1e-5: see TOLERANCE), greedy tokens, export -> transformers, and export -> import bit
for bit.

The parity tests need torch and transformers (the `parity` extra) and skip, saying
so, without them; the rest needs only safetensors and tokenizers (the test extra).
"""

from __future__ import annotations

import contextlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitx_fn import checkpoint, defaults, model
from minitx_fn.errors import HFError
from minitx_fn.hf import folder as hf_folder, llama
from minitx_fn.config import ModelConfig
from minitx_fn.generate import generate
from minitx_fn.tokenizer import BPETokenizer
from tests.helpers import assert_close_scaled, assert_one_error_line, enable_x64, run_main, standard_promotion

pytest.importorskip("safetensors", reason="the Llama import tests need safetensors: pip install -e \".[test]\"")
pytest.importorskip("tokenizers", reason="the Llama import tests need tokenizers: pip install -e \".[test]\"")
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness. The quick brown fox jumps over the lazy dog.\n") * 10


def _config(**changes) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 11, "d_model": 16, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
                          "max_len": 32, **defaults.ARCHS["llama"], **changes})


@given(layers=st.sampled_from([1, 3]), heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]), tied=st.booleans(),
       qwen=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_every_tensor_lands_on_its_leaf_and_comes_back(layers, heads, tied, qwen, seed):
    """Hugging Face tensors -> our tree -> Hugging Face tensors is the identity; q, k, v
    become the [Q | K | V] column blocks of the fused matrix, transposed; block i is
    row i of every stack."""
    h, g = heads
    c = _config(n_layers=layers, n_heads=h, n_kv_heads=g, tie_embeddings=tied, qkv_bias=qwen)
    rng = np.random.default_rng(seed)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in llama.expected_shapes(c).items()}
    tree = llama.params_from_hf(tensors, c)
    assert model.param_shapes(tree) == model.param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), c)))
    k = c.head_dim
    last = f"model.layers.{layers - 1}.self_attn."
    qkv = tree["blocks"]["attn"]["qkv"]["w"][layers - 1]                              # (D, (H + 2G) K)
    np.testing.assert_array_equal(qkv[:, :h * k], tensors[last + "q_proj.weight"].T)
    np.testing.assert_array_equal(qkv[:, h * k:(h + g) * k], tensors[last + "k_proj.weight"].T)
    np.testing.assert_array_equal(qkv[:, (h + g) * k:], tensors[last + "v_proj.weight"].T)
    if qwen:
        np.testing.assert_array_equal(tree["blocks"]["attn"]["qkv"]["b"][layers - 1, h * k:(h + g) * k],
                                      tensors[last + "k_proj.bias"])
    back = llama.params_to_hf(tree, c)
    assert back.keys() == tensors.keys()
    for name, array in back.items():
        np.testing.assert_array_equal(array, tensors[name])
    assert llama.config_from_hf(llama.config_to_hf(c)) == c.replace(embed_std=c.init_std)


HF = {"model_type": "llama", "vocab_size": 11, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
      "num_key_value_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 8}


@pytest.mark.parametrize("changes, said", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, "rope_scaling has rope_type 'dynamic', which minitx "
     "does not convert (it converts ['default', 'linear', 'llama3', 'yarn'])"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters has rope_type 'longrope'"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "rope_scaling of rope_type 'llama3' lacks "
     "['low_freq_factor', 'high_freq_factor']"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta_fast": 3}}, "rope_parameters holds "
     "['beta_fast'], which rope_type 'linear' does not read here"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 0.5}}, "rope_parameters.factor = 0.5 is invalid: it must "
     "be a number in [1, 3.4e38]"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "rope_parameters.factor = '2' is invalid"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "beta_fast": 1.0, "beta_slow": 2.0}},
     "rope_parameters.beta_slow = 2.0 is invalid: it must be below rope_parameters.beta_fast = 1.0"),
    ({"original_max_position_embeddings": 0, "rope_parameters": {"rope_type": "llama3", "factor": 2.0,
                                                                 "low_freq_factor": 1, "high_freq_factor": 4}},
     ": original_max_position_embeddings = 0 is invalid"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor = 0.5 must be 1"),
    ({"rope_scaling": "linear"}, "rope_scaling = 'linear' must be null or an object"),
    ({"rope_parameters": {"rope_type": ["llama3"]}}, "rope_parameters has rope_type ['llama3'], which minitx does "
     "not convert"),
    ({"rope_parameters": {"rope_type": "yarn"}}, "rope_parameters of rope_type 'yarn' lacks ['factor']"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "mscale": "1", "mscale_all_dim": 1}},
     "rope_parameters.mscale = '1' must be a number"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": math.e, "mscale": 1, "mscale_all_dim": -10}},
     "rope_parameters.mscale = 1 and rope_parameters.mscale_all_dim = -10 give the attention factor"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1, "high_freq_factor": 4,
                          "original_max_position_embeddings": 2.5}},
     "rope_parameters.original_max_position_embeddings = 2.5 is invalid"),
    ({"attention_bias": True}, "attention_bias = True must be false"),
    ({"mlp_bias": True}, "mlp_bias = True must be false"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu' must be \"silu\""),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window = True must be false"),
    ({"head_dim": 8}, "head_dim = 8 must be hidden_size / num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3 is invalid: it must divide num_attention_heads = 4"),
    ({"num_key_value_heads": 0}, "num_key_value_heads = 0 must be a positive whole number"),
    ({"num_key_value_heads": False}, "num_key_value_heads = False must be a positive whole number"),
    ({"num_hidden_layers": 0}, "num_hidden_layers = 0 must be a positive whole number"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
])
def test_config_json_whose_maths_this_model_lacks_is_refused_naming_the_key(changes, said):
    with pytest.raises(HFError, match=None) as e:
        llama.config_from_hf({**HF, **changes})
    assert said in str(e.value), str(e.value)
    assert llama.config_from_hf({**HF, "rope_scaling": {"rope_type": "default"}}).n_kv_heads == 2
    assert llama.config_from_hf({**HF, "num_key_value_heads": None}).n_kv_heads == 4           # null: multi-head
    # Both forms of the rotary base: transformers 5's rope_parameters, and the top-level key before it.
    assert llama.config_from_hf({**HF, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_theta == 5e5
    assert llama.config_from_hf({**HF, "rope_theta": 5e5, "rope_scaling": None}).rope_theta == 5e5
    # Scaled: the older rope_scaling with "type", and original_max_position_embeddings at the top level first.
    scaled = llama.config_from_hf({**HF, "original_max_position_embeddings": 4, "rope_scaling": {
        "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 6}})
    assert scaled.rope_scaling.kind == "yarn" and scaled.rope_scaling.original_max_len == 4


# ----------------------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT], vocab_size=280)


# (model_type, tied head): Llama with 2 key/value heads for 4, and Qwen2 (q, k, v
# biases) with one key/value head and a tied head.
FAMILIES = [("llama", False), ("qwen2", True)]


def _save_hf(hf, bpe, path, kind: str, tied: bool, **changes):
    """transformers' own model, random weights (initializer_range 0.2, so greedy choices
    are clear) and random norm scales and biases, saved by save_pretrained with our BPE."""
    torch, transformers = hf
    torch.manual_seed(0)
    sizes = dict(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                 num_key_value_heads=2 if kind == "llama" else 1, num_hidden_layers=2, max_position_embeddings=64,
                 initializer_range=0.2, tie_word_embeddings=tied, rope_theta=500.0, rms_norm_eps=1e-6,
                 bos_token_id=None, eos_token_id=None) | changes
    if kind == "llama":
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    else:
        hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))
    with torch.no_grad():                       # norms and biases away from their 1 and 0 starts
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(str(path))
    (path / "tokenizer.json").write_text(bpe.to_json())
    return path


@pytest.fixture(scope="module")
def hf_dirs(hf, tmp_path_factory, bpe):
    return {kind: _save_hf(hf, bpe, tmp_path_factory.mktemp("hf") / kind, kind, tied) for kind, tied in FAMILIES}


def _load(transformers, path, dtype: str):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
    return hf_model.double() if dtype == "float64" else hf_model


def _their_logits(torch, hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


# transformers' Llama and Qwen2 keep float32 islands in a float64 model: RMSNorm casts
# its input to float32, eager attention takes its softmax in float32, and the rotary
# angles are float32 (inv_freq and a .float() in the forward). So in float64 they agree
# with ours only as float32 does; float64 is held instead against the Flax reference
# (to 1e-10) and the NumPy model (to 1e-12), in tests/test_model_reference.py.
TOLERANCE = {"float32": 1e-5, "float64": 1e-5}


@pytest.mark.parametrize("kind", [kind for kind, _ in FAMILIES])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_imported_logits_equal_transformers(hf, hf_dirs, bpe, kind, dtype):
    torch, transformers = hf
    hf_model = _load(transformers, hf_dirs[kind], dtype)
    ids = np.stack([bpe.encode(TEXT)[:40], bpe.encode(TEXT[300:])[:40]])               # (2, 40)
    with enable_x64() if dtype == "float64" else contextlib.nullcontext():
        c, params, _ = hf_folder.import_dir(str(hf_dirs[kind]), param_dtype=dtype)
        assert llama.family(c) == kind and c.n_kv_heads == (2 if kind == "llama" else 1)
        with standard_promotion():
            ours = jax.jit(model.apply, static_argnames="config")(params, jnp.asarray(ids), config=c)
        theirs = _their_logits(torch, hf_model, ids)
        assert theirs.dtype == np.dtype(dtype)
        assert_close_scaled(ours, theirs, TOLERANCE[dtype])


@pytest.mark.parametrize("kind", [kind for kind, _ in FAMILIES])
def test_greedy_tokens_equal_transformers_generate(hf, hf_dirs, bpe, tmp_path, capsys, kind):
    torch, transformers = hf
    hf_model = _load(transformers, hf_dirs[kind], "float32")
    ids = bpe.encode("It was the best")
    with torch.no_grad():
        expected = hf_model.generate(torch.from_numpy(ids[None].astype(np.int64)), do_sample=False,
                                     max_new_tokens=20, pad_token_id=0)[0, len(ids):].numpy()
    code, out, err = run_main(capsys, "import-hf", hf_dirs[kind], "--out", tmp_path / "run")
    assert code == 0 and {"llama": "Imported Llama", "qwen2": "Imported Qwen2"}[kind] in out, err
    assert checkpoint.load(str(tmp_path / "run")).origin == {"hf": str(hf_dirs[kind])}
    loaded = checkpoint.load_model(str(tmp_path / "run"))
    with standard_promotion():
        ours = generate(loaded.params, [ids], model=loaded.model, max_new_tokens=20)[0]
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("kind", [kind for kind, _ in FAMILIES])
def test_export_loads_in_transformers_and_imports_back_bit_for_bit(hf, hf_dirs, bpe, tmp_path, capsys, kind):
    torch, transformers = hf
    assert run_main(capsys, "import-hf", hf_dirs[kind], "--out", tmp_path / "run")[0] == 0
    code, out, err = run_main(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "out")
    assert code == 0 and "AutoModelForCausalLM" in out, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    ids = bpe.encode(TEXT[:120])[None]
    assert_close_scaled(_their_logits(torch, _load(transformers, tmp_path / "out", "float32"), ids),
                        _their_logits(torch, _load(transformers, hf_dirs[kind], "float32"), ids), 1e-6)
    assert run_main(capsys, "import-hf", tmp_path / "out", "--out", tmp_path / "again")[0] == 0
    first, again = (checkpoint.load(str(tmp_path / d)).state.params for d in ("run", "again"))
    jax.tree.map(np.testing.assert_array_equal, first, again)


# ----------------------------------------------------------------------------- scaled rotary positions


@settings(max_examples=50)       # no compiling: cheap enough for many draws
@given(kind=st.sampled_from(["linear", "llama3", "yarn"]), head=st.sampled_from([8, 16, 64, 128]),
       theta=st.sampled_from([100.0, 1e4, 5e5, 1e6]), factor=st.sampled_from([1.0, 2.0, 8.0, 32.0]),
       original=st.sampled_from([16, 512, 8192]), low_high=st.sampled_from([(1.0, 4.0), (0.5, 2.0)]),
       yarn=st.sampled_from([{}, {"beta_fast": 4.0, "beta_slow": 0.5}, {"truncate": False},
                             {"mscale": 0.707, "mscale_all_dim": 0.707}, {"mscale": 1.0, "mscale_all_dim": 0.5},
                             {"attention_factor": 1.5}, {"factor": None}]))
def test_scaled_rotary_frequencies_equal_transformers_own(hf, kind, head, theta, factor, original, low_high, yarn):
    """Each rope_type's frequencies and attention factor, converted from config.json by
    `llama.config_from_hf`, equal what transformers computes for the same config
    (its ROPE_INIT_FUNCTIONS), defaults and YaRN's mscale variants included."""
    torch, transformers = hf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minitx_fn.layers import rotary
    rope = {"rope_type": kind, "rope_theta": theta, "factor": factor}
    if kind == "llama3":
        rope |= {"low_freq_factor": low_high[0], "high_freq_factor": low_high[1],
                 "original_max_position_embeddings": original}
    elif kind == "yarn":
        rope |= {"original_max_position_embeddings": original} | yarn
    hf_config = transformers.LlamaConfig(hidden_size=head * 2, num_attention_heads=2, num_hidden_layers=1,
                                         vocab_size=8, intermediate_size=8, max_position_embeddings=original * 4,
                                         rope_parameters=dict(rope))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, None)
    ours = llama.config_from_hf(hf_config.to_dict())
    np.testing.assert_allclose(rotary.frequencies(head, rope_theta=ours.rope_theta, scaling=ours.rope_scaling),
                               inv_freq.numpy(), rtol=2e-6)
    assert (ours.rope_scaling.attention_factor or 1.0) == pytest.approx(attention_factor, rel=1e-12)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "rope_theta": 100.0}, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 50.0},
    {"rope_parameters": {}, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
    {"rope_scaling": {}, "rope_parameters": {"rope_type": "yarn", "factor": None}, "original_max_position_embeddings": 8},
    {"rope_scaling": None, "rope_theta": 30.0, "rope_parameters": {"rope_type": "default", "rope_theta": 70.0}},
    {"rope_scaling": None, "rope_theta": 30.0},
])
def test_rotary_settings_are_read_where_transformers_reads_them(hf, rope):
    """Both keys, null or empty ones, a top-level rope_theta and
    original_max_position_embeddings: the frequencies and attention factor of the
    imported config equal those of transformers' own LlamaRotaryEmbedding built from
    the same config.json."""
    torch, transformers = hf
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from minitx_fn.layers import rotary
    config_json = {**HF, "hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 32, **rope}
    theirs = LlamaRotaryEmbedding(config=transformers.LlamaConfig.from_dict(dict(config_json)))
    ours = llama.config_from_hf(config_json)
    np.testing.assert_allclose(rotary.frequencies(16, rope_theta=ours.rope_theta, scaling=ours.rope_scaling),
                               theirs.inv_freq.numpy(), rtol=2e-6)
    assert ((ours.rope_scaling and ours.rope_scaling.attention_factor) or 1.0) == pytest.approx(
        theirs.attention_scaling, rel=1e-12)


# Scaled rotary positions as transformers writes them, over a context 4 times the 16
# positions of "pre-training". K = 8 and theta = 100 give wavelengths 6.3, 20, 63 and
# 199: Llama 3.1's kept, blended and divided regimes all occur, and YaRN's ramp.
SCALED = {"linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
          "llama3": ("llama", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5, "high_freq_factor": 2.0,
                               "original_max_position_embeddings": 16}),
          "yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                             "beta_fast": 2.0, "beta_slow": 0.1})}


@pytest.mark.parametrize("scaling", sorted(SCALED))
def test_scaled_rotary_models_equal_transformers_logits_greedy_and_export(hf, bpe, tmp_path, capsys, scaling):
    """A Llama or Qwen2 with scaled rotary positions: imported, its logits over 60
    positions (past the original 16) and its 20 greedy tokens (llama3 and yarn: linear
    only stretches the same frequencies) equal transformers'; exported through a run,
    transformers reads the same model back and the import is bit for bit."""
    torch, transformers = hf
    kind, rope = SCALED[scaling]
    folder = _save_hf(hf, bpe, tmp_path / "hf", kind, kind == "qwen2", rope_parameters={**rope, "rope_theta": 100.0})
    ids = np.stack([bpe.encode(TEXT)[:60], bpe.encode(TEXT[300:])[:60]])               # (2, 60)
    hf_model = _load(transformers, folder, "float32")
    c, params, _ = hf_folder.import_dir(str(folder))
    assert c.rope_scaling.kind == scaling and c.rope_theta == 100.0
    with standard_promotion():
        ours = jax.jit(model.apply, static_argnames="config")(params, jnp.asarray(ids), config=c)
        assert_close_scaled(ours, _their_logits(torch, hf_model, ids), 1e-5)
        prompt = ids[0, :30]
        if scaling != "linear":         # the cached path with stretched frequencies (and YaRN's scaled keys)
            with torch.no_grad():
                expected = hf_model.generate(torch.from_numpy(prompt[None].astype(np.int64)), do_sample=False,
                                             max_new_tokens=20, pad_token_id=0)[0, len(prompt):].numpy()
            np.testing.assert_array_equal(generate(params, [prompt], model=c, max_new_tokens=20)[0], expected)
    assert run_main(capsys, "import-hf", folder, "--out", tmp_path / "run")[0] == 0
    code, _, err = run_main(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]["rope_type"] == scaling
    assert_close_scaled(_their_logits(torch, _load(transformers, tmp_path / "out", "float32"), ids),
                        _their_logits(torch, hf_model, ids), 1e-6)
    again, again_params, _ = hf_folder.import_dir(str(tmp_path / "out"))
    assert again == c                                   # through the run's meta.json and back
    jax.tree.map(np.testing.assert_array_equal, again_params, params)


def test_a_table_padded_past_the_tokenizer_imports_and_never_writes_the_padding(hf, bpe, tmp_path, capsys):
    """Qwen2's vocab_size is larger than its tokenizer's ids. Such a model imports with
    its whole table (logits equal transformers', all V columns), generates only ids the
    tokenizer has (transformers' greedy with those ids suppressed, while without the
    suppression it would write padding here), fine-tunes, and exports with its padding."""
    import io

    from safetensors.numpy import load_file, save_file

    from minitx_fn import job
    from minitx_fn.generate import complete
    torch, transformers = hf
    n, padded = bpe.vocab_size, bpe.vocab_size + 13
    folder = _save_hf(hf, bpe, tmp_path / "hf", "qwen2", True, vocab_size=padded)
    tensors = load_file(str(folder / hf_folder.WEIGHTS))                 # padding rows that win an unmasked argmax
    tensors["model.embed_tokens.weight"][n:] *= 40
    save_file(tensors, str(folder / hf_folder.WEIGHTS), metadata={"format": "pt"})
    hf_model = _load(transformers, folder, "float32")
    ids = np.stack([bpe.encode(TEXT)[:40]])
    assert run_main(capsys, "import-hf", folder, "--out", tmp_path / "run")[0] == 0
    loaded = checkpoint.load_model(str(tmp_path / "run"))
    assert loaded.model.vocab_size == padded and loaded.tokenizer.vocab_size == n
    with standard_promotion():
        ours = jax.jit(model.apply, static_argnames="config")(loaded.params, jnp.asarray(ids), config=loaded.model)
        assert_close_scaled(ours, _their_logits(torch, hf_model, ids), 1e-5)
        prompt = bpe.encode("It was the best")
        with torch.no_grad():
            def theirs(**settings):
                return hf_model.generate(torch.from_numpy(prompt[None].astype(np.int64)), do_sample=False,
                                         max_new_tokens=20, pad_token_id=0, **settings)[0, len(prompt):].numpy()
            assert (theirs() >= n).any()                              # the padding would be written
            expected = theirs(suppress_tokens=list(range(n, padded)))
        assert (expected < n).all()
        assert complete(loaded, "It was the best", max_new_tokens=20) == bpe.decode(expected)
        (tmp_path / "t.txt").write_text(TEXT)
        tuned = job.train(str(tmp_path / "t.txt"), init_from=str(tmp_path / "run"), run_dir=str(tmp_path / "tuned"),
                          training={"steps": 2, "batch_size": 2, "log_every": 2}, model={"max_len": 16},
                          sample_tokens=4, log=io.StringIO())
    assert tuned.model.vocab_size == padded and len(tuned.sample) > 0
    assert run_main(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "out")[0] == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == padded
    again, params, _ = hf_folder.import_dir(str(tmp_path / "out"))
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(loaded.params))


def test_special_token_ids_survive_import_and_export(hf, bpe, tmp_path, capsys):
    """bos, eos (a list, as Llama 3 writes) and pad ids of config.json ride with the
    run's tokenizer; export writes them into config.json and generation_config.json,
    where transformers reads them, and imports back equal. A run without them exports
    nulls and no generation_config.json, and drafts for one with them; an id the
    tokenizer lacks is one line."""
    from minitx_fn.generate import complete
    torch, transformers = hf
    special = {"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0}
    folder = _save_hf(hf, bpe, tmp_path / "hf", "llama", False, **special)
    assert run_main(capsys, "import-hf", folder, "--out", tmp_path / "run")[0] == 0
    loaded = checkpoint.load_model(str(tmp_path / "run"))
    assert loaded.tokenizer.special == special
    assert run_main(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "out")[0] == 0
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "out"))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, [2, 3], 0)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, [2, 3], 0)
    assert hf_folder.import_dir(str(tmp_path / "out"))[2] == loaded.tokenizer
    plain = hf_folder.export_files(loaded.params, loaded.model, bpe)
    assert "generation_config.json" not in plain and json.loads(plain["config.json"])["eos_token_id"] is None
    # The same vocabulary with other special ids (a base model drafting for its instruct
    # sibling) is the same tokenizer to a draft.
    hf_folder.write_dir(str(tmp_path / "plain"), plain)
    assert run_main(capsys, "import-hf", tmp_path / "plain", "--out", tmp_path / "draft")[0] == 0
    with standard_promotion():
        assert complete(loaded, "It was", max_new_tokens=4, draft=str(tmp_path / "draft")) == complete(
            loaded, "It was", max_new_tokens=4)
    for bad in (bpe.vocab_size, [2, -1], "2"):
        config_json = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config_json, "eos_token_id": bad}))
        code, _, err = run_main(capsys, "import-hf", folder, "--out", tmp_path / "bad")
        assert_one_error_line(code, err, f"config.json: eos_token_id = {bad!r} must be an id in [0, "
                                         f"{bpe.vocab_size}) or a list of them")
        assert not (tmp_path / "bad").exists()


def test_a_broken_llama_folder_is_one_line_and_writes_nothing(hf, hf_dirs, tmp_path, capsys):
    """A missing tensor, a misshapen one and a rope scaling minitx does not convert: one line each."""
    import shutil

    from safetensors.numpy import load_file, save_file
    for case in ("missing", "shape", "rope"):
        folder = tmp_path / case
        shutil.copytree(hf_dirs["llama"], folder)
        tensors = load_file(str(folder / hf_folder.WEIGHTS))
        if case == "missing":
            del tensors["model.layers.1.mlp.gate_proj.weight"]
        elif case == "shape":
            tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
        else:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {
                "rope_type": "dynamic", "factor": 4.0, "rope_theta": 500.0}}))
        save_file(tensors, str(folder / hf_folder.WEIGHTS), metadata={"format": "pt"})
        code, _, err = run_main(capsys, "import-hf", folder, "--out", tmp_path / f"run-{case}")
        said = {"missing": "missing model.layers.1.mlp.gate_proj.weight",
                "shape": "model.layers.0.self_attn.k_proj.weight (32, 32) (needs (16, 32))",
                "rope": "rope_parameters"}[case]
        assert_one_error_line(code, err, said)
        assert not (tmp_path / f"run-{case}").exists()


def test_an_imported_qwen2_fine_tunes_with_lora_on_every_matrix_gate_included(hf, hf_dirs, bpe, tmp_path, capsys):
    """An imported run is a run: LoRA on it adapts the SwiGLU gate too, trains, and
    loads as its merged model."""
    import io

    from minitx_fn import job
    assert run_main(capsys, "import-hf", hf_dirs["qwen2"], "--out", tmp_path / "qwen")[0] == 0
    (tmp_path / "t.txt").write_text(TEXT)
    with standard_promotion():
        result = job.train(str(tmp_path / "t.txt"), init_from=str(tmp_path / "qwen"), run_dir=str(tmp_path / "lora"),
                           training={"steps": 3, "batch_size": 2, "lora": {"rank": 2, "targets": "all"},
                                     "log_every": 3}, model={"max_len": 16}, sample_tokens=0, log=io.StringIO())
    assert set(result.state.params["blocks"]["mlp"]) == {"gate", "up", "down"}
    loaded = checkpoint.load_model(str(tmp_path / "lora"))
    assert llama.family(loaded.model) == "qwen2" and loaded.model.max_len == 16
    jax.tree.map(np.testing.assert_allclose, jax.device_get(loaded.params), jax.device_get(result.params))
