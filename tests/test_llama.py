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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import checkpoint, defaults, gpt2, llama, model
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
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling = {'rope_type': 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters = {'rope_type': 'yarn'"),
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
    with pytest.raises(gpt2.GPT2Error, match=None) as e:
        llama.config_from_hf({**HF, **changes})
    assert said in str(e.value), str(e.value)
    assert llama.config_from_hf({**HF, "rope_scaling": {"rope_type": "default"}}).n_kv_heads == 2
    assert llama.config_from_hf({**HF, "num_key_value_heads": None}).n_kv_heads == 4           # null: multi-head
    # Both forms of the rotary base: transformers 5's rope_parameters, and the top-level key before it.
    assert llama.config_from_hf({**HF, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_theta == 5e5
    assert llama.config_from_hf({**HF, "rope_theta": 5e5, "rope_scaling": None}).rope_theta == 5e5


# ----------------------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT], vocab_size=280)


# (model_type, tied head): Llama with 2 key/value heads for 4, and Qwen2 (q, k, v
# biases) with one key/value head and a tied head.
FAMILIES = [("llama", False), ("qwen2", True)]


@pytest.fixture(scope="module")
def hf_dirs(hf, tmp_path_factory, bpe):
    """transformers' own models, random weights (initializer_range 0.2, so greedy choices
    are clear) and random norm scales and biases, saved by save_pretrained with our BPE."""
    torch, transformers = hf
    dirs = {}
    for kind, tied in FAMILIES:
        torch.manual_seed(0)
        sizes = dict(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                     num_key_value_heads=2 if kind == "llama" else 1, num_hidden_layers=2, max_position_embeddings=64,
                     initializer_range=0.2, tie_word_embeddings=tied, rope_theta=500.0, rms_norm_eps=1e-6,
                     bos_token_id=None, eos_token_id=None)
        if kind == "llama":
            hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
        else:
            hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))
        with torch.no_grad():                       # norms and biases away from their 1 and 0 starts
            for name, p in hf_model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
        path = tmp_path_factory.mktemp("hf") / kind
        hf_model.save_pretrained(str(path))
        (path / "tokenizer.json").write_text(bpe.to_json())
        dirs[kind] = path
    return dirs


def _load(transformers, path, dtype: str):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
    return hf_model.double() if dtype == "float64" else hf_model


def _their_logits(torch, hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


# transformers' Llama and Qwen2 keep float32 islands in a float64 model: RMSNorm casts
# its input to float32, eager attention takes its softmax in float32, and the rotary
# angles are float32 (inv_freq and a .float() in the forward). So in float64 they agree
# with ours only as float32 does; float64 to 1e-12 is held against the Flax reference
# (tests/test_equivalence.py) and the NumPy model (tests/test_numpy_model.py) instead.
TOLERANCE = {"float32": 1e-5, "float64": 1e-5}


@pytest.mark.parametrize("kind", [kind for kind, _ in FAMILIES])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_imported_logits_equal_transformers(hf, hf_dirs, bpe, kind, dtype):
    torch, transformers = hf
    hf_model = _load(transformers, hf_dirs[kind], dtype)
    ids = np.stack([bpe.encode(TEXT)[:40], bpe.encode(TEXT[300:])[:40]])               # (2, 40)
    with enable_x64() if dtype == "float64" else contextlib.nullcontext():
        c, params, _ = gpt2.import_dir(str(hf_dirs[kind]), param_dtype=dtype)
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
        ours = generate(loaded.params, [ids], config=loaded.config, max_new_tokens=20)[0]
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


def test_a_broken_llama_folder_is_one_line_and_writes_nothing(hf, hf_dirs, tmp_path, capsys):
    """A missing tensor, a misshapen one and an unsupported rope scaling: one line each."""
    import shutil

    from safetensors.numpy import load_file, save_file
    for case in ("missing", "shape", "rope"):
        folder = tmp_path / case
        shutil.copytree(hf_dirs["llama"], folder)
        tensors = load_file(str(folder / gpt2.WEIGHTS))
        if case == "missing":
            del tensors["model.layers.1.mlp.gate_proj.weight"]
        elif case == "shape":
            tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
        else:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {
                "rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}}))
        save_file(tensors, str(folder / gpt2.WEIGHTS), metadata={"format": "pt"})
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
                           training={"steps": 3, "batch_size": 2, "lora_rank": 2, "lora_targets": "all",
                                     "log_every": 3}, model={"max_len": 16}, sample_tokens=0, log=io.StringIO())
    assert set(result.state.params["blocks"]["mlp"]) == {"gate", "up", "down"}
    loaded = checkpoint.load_model(str(tmp_path / "lora"))
    assert llama.family(loaded.config) == "qwen2" and loaded.config.max_len == 16
    jax.tree.map(np.testing.assert_allclose, jax.device_get(loaded.params), jax.device_get(result.params))
