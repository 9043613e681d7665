"""GPT-2 import and export (minitx_fn.hf.gpt2, `minitx import-gpt2` / `export-gpt2`).

The first part needs `safetensors` and `tokenizers` (the `test` extra): the name
mapping as a property (round trips, every tensor placed once), the refusals, and the
command line. The second part, parity with Hugging Face's own GPT2LMHeadModel, needs
torch and transformers (the `parity` extra) and skips, saying so, without them: a
small GPT-2 with random weights is built and saved by transformers itself, offline,
with a byte-level BPE trained here on a few KB of text, then imported and compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import checkpoint, defaults, model, runs, train
from minitx_fn.config import ModelConfig
from minitx_fn.errors import HFError
from minitx_fn.hf import folder as hf_folder, gpt2
from minitx_fn.tokenizer import BPETokenizer, ByteTokenizer, bytes_to_unicode
from tests.helpers import TINY, assert_close_scaled, assert_one_error_line, enable_x64, run_main, \
    standard_promotion

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="the GPT-2 tests need safetensors: "
                                        "pip install -e \".[test]\"")
pytest.importorskip("tokenizers", reason="the GPT-2 tests need tokenizers: pip install -e \".[test]\"")

# A few KB of English for the BPE the tests train (no download).
TEXT = ("The quick brown fox jumps over the lazy dog. A language model reads text one token at a time and "
        "guesses the next one; GPT-2 learned its positions and tied its output head to the token embedding.\n"
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness. Call me Ishmael. In the beginning was the Word.\n") * 8


def _gpt2_config(**changes) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 300, "d_model": 16, "n_heads": 2, "n_layers": 2, "max_len": 32,
                          "positions": "learned", "tie_embeddings": True, "init_std": 0.2, **changes})


def _random_tensors(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Hugging Face names -> random float32 arrays of the shapes the config needs,
    built from the shapes table alone (not from our tree)."""
    rng = np.random.default_rng(seed)
    return {("" if name == "lm_head.weight" else gpt2.PREFIX) + name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in gpt2.expected_shapes(config).items()}           # as save_pretrained names them


def _write_hf_dir(path, config: ModelConfig, tensors: dict, tokenizer: BPETokenizer) -> str:
    os.makedirs(path, exist_ok=True)
    hf_config = {**gpt2.config_to_hf(config), "tie_word_embeddings": config.tie_embeddings}
    (path / "config.json").write_text(json.dumps(hf_config))
    safetensors_numpy.save_file(tensors, str(path / hf_folder.WEIGHTS), metadata={"format": "pt"})
    (path / "tokenizer.json").write_text(tokenizer.to_json())
    return str(path)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    tok = BPETokenizer.train([TEXT], vocab_size=300)
    assert tok.vocab_size <= 300
    return tok


# ----------------------------------------------------------------------------- the mapping


@given(layers=st.sampled_from([1, 3]), width=st.sampled_from([(8, 2), (12, 3)]), tied=st.booleans(),
       prefix=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_every_tensor_lands_on_its_leaf_and_comes_back(layers, width, tied, prefix, seed):
    """Hugging Face tensors -> our tree -> Hugging Face tensors is the identity, with or
    without the "transformer." prefix; block i's tensors are row i of our stacks; the
    untied head is lm_head transposed with a zero bias; old mask buffers are skipped."""
    d, h = width
    c = ModelConfig(vocab_size=7, d_model=d, n_heads=h, n_layers=layers, max_len=5, positions="learned",
                    tie_embeddings=tied)
    tensors = _random_tensors(c, seed)
    given_names = {(k if prefix else k.removeprefix(gpt2.PREFIX)): v for k, v in tensors.items()}
    given_names["h.0.attn.bias"] = np.tril(np.ones((5, 5), np.float32))       # a causal-mask buffer, not a weight
    tree = gpt2.params_from_hf(given_names, c)
    assert model.param_shapes(tree) == model.param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), c)))
    for i in range(layers):
        np.testing.assert_array_equal(tree["blocks"]["attn"]["qkv"]["w"][i], tensors[f"transformer.h.{i}.attn.c_attn.weight"])
        np.testing.assert_array_equal(tree["blocks"]["mlp"]["down"]["b"][i], tensors[f"transformer.h.{i}.mlp.c_proj.bias"])
    np.testing.assert_array_equal(tree["pos"]["table"], tensors["transformer.wpe.weight"])
    if tied:
        assert "head" not in tree
        assert gpt2.params_to_hf(tree, c).keys() == tensors.keys()
        for name, array in gpt2.params_to_hf(tree, c).items():
            np.testing.assert_array_equal(array, tensors[name])
    else:
        np.testing.assert_array_equal(tree["head"]["w"], tensors["lm_head.weight"].T)
        assert not tree["head"]["b"].any()


def test_mismatched_tensors_are_named_all_at_once():
    c = _gpt2_config()
    tensors = _random_tensors(c, 0)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((16, 17), np.float32)
    tensors["transformer.h.2.ln_1.weight"] = np.zeros(16, np.float32)
    with pytest.raises(HFError) as e:
        gpt2.params_from_hf(tensors, c)
    message = str(e.value)
    assert "missing h.1.mlp.c_fc.bias" in message and "unexpected h.2.ln_1.weight" in message
    assert "h.0.attn.c_proj.weight (16, 17) (needs (16, 16))" in message
    tensors = _random_tensors(c, 0)
    tensors["transformer.ln_f.bias"][3] = np.nan
    with pytest.raises(HFError, match="ln_f.bias hold NaN"):
        gpt2.params_from_hf(tensors, c)
    tensors = _random_tensors(c, 0)                  # float64 beyond float32's range: infinite once cast
    tensors["transformer.ln_f.weight"] = np.full(16, 1e39)
    with pytest.raises(HFError, match="ln_f.weight hold NaN or infinite values in float32"):
        gpt2.params_from_hf(tensors, c)
    tensors = _random_tensors(c, 0)                  # the same tensor under both names: refused, not a guess
    tensors["wte.weight"] = 3 * tensors["transformer.wte.weight"]
    with pytest.raises(HFError, match="wte.weight appear both with and without the prefix"):
        gpt2.params_from_hf(tensors, c)


def test_a_stored_tied_head_is_accepted_only_as_a_copy_of_the_embedding():
    c = _gpt2_config()
    tensors = _random_tensors(c, 0)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    gpt2.params_from_hf(tensors, c)
    tensors["lm_head.weight"][0, 0] += 1
    with pytest.raises(HFError, match="lm_head.weight differs from wte.weight"):
        gpt2.params_from_hf(tensors, c)


def test_bfloat16_and_float16_files_are_read_into_float32():
    import ml_dtypes
    c = _gpt2_config()
    tensors = _random_tensors(c, 0)
    for dtype in (ml_dtypes.bfloat16, np.float16):
        narrow = {name: array.astype(dtype) for name, array in tensors.items()}
        tree = gpt2.params_from_hf(narrow, c)
        assert {a.dtype for a in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
        np.testing.assert_array_equal(tree["embed"]["table"], narrow["transformer.wte.weight"].astype(np.float32))


def test_a_tokenizer_whose_ids_leave_gaps_is_refused(bpe):
    """An id beyond 0 .. V - 1 would reach no row of the model: refused when read."""
    meta = json.loads(bpe.to_json())
    vocab = meta["model"]["vocab"]
    vocab[max(vocab, key=vocab.get)] = 5000
    with pytest.raises(ValueError, match="not 0 .. 2\\d\\d without gaps \\(largest 5000\\)"):
        BPETokenizer.from_json(json.dumps(meta))


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "llama"}, "only \"gpt2\""),       # config_from_hf is GPT-2's own reader
    ({"activation_function": "gelu"}, "activation_function = 'gelu' must be one of"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = True must be false"),
    ({"n_head": 3}, "n_embd = 16 is invalid: it must be divisible by n_head = 3"),
    ({"n_layer": 0}, "n_layer = 0 must be a positive whole number"),
    ({"n_embd": "768"}, "n_embd = '768'"),
    ({"layer_norm_epsilon": -1}, "layer_norm_epsilon = -1"),
    ({"n_inner": -5}, "n_inner = -5"),
])
def test_configs_this_model_cannot_be_are_refused(change, fragment):
    hf = {**gpt2.config_to_hf(_gpt2_config()), **change}
    with pytest.raises(HFError, match="config.json") as e:
        gpt2.config_from_hf(hf)
    assert fragment in str(e.value)


def test_config_round_trip_and_gpt2_small_sizes():
    c = _gpt2_config(ln_eps=1e-6)
    assert gpt2.config_from_hf(gpt2.config_to_hf(c)) == c.replace(embed_std=c.init_std)
    # GPT-2 small as its config.json gives it: 124,439,808 parameters (the paper's "117M" counted differently).
    small = gpt2.config_from_hf({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
                                 "n_layer": 12, "n_head": 12, "n_inner": None})
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), small))
    assert model.count_params(shapes) == 124_439_808


def test_gpt2_byte_alphabet_by_its_definition():
    """GPT-2's encoder.py: printable Latin-1 bytes map to themselves, the other 68 in
    byte order to U+0100 ... U+0143."""
    table = bytes_to_unicode()
    assert table[ord("A")] == "A" and table[0] == "\u0100" and table[ord(" ")] == "\u0120"
    assert table[127] == chr(256 + 33) and table[255] == "\u00ff"        # 0..32 are the first 33 stand-ins
    assert sorted(ord(table[b]) for b in range(256) if ord(table[b]) >= 256) == list(range(256, 324))


@given(st.text(max_size=40))
def test_exported_byte_tokenizer_gives_each_byte_its_own_id(text):
    import tokenizers
    hf = tokenizers.Tokenizer.from_str(ByteTokenizer().hf_json())
    ids = hf.encode(text).ids
    assert ids == ByteTokenizer().encode(text).tolist()
    assert hf.decode(ids) == text


def test_vocab_and_merges_files_tokenize_like_tokenizer_json(tmp_path, bpe):
    """GPT-2's original pair of files and the single tokenizer.json give the same ids."""
    import tokenizers
    hf = tokenizers.Tokenizer.from_str(bpe.to_json())
    hf.model.save(str(tmp_path))                                   # writes vocab.json and merges.txt
    from_pair = hf_folder.read_tokenizer(str(tmp_path))
    sample = TEXT[:300] + " naïve 東京 \u00e9t\u00e9"
    np.testing.assert_array_equal(from_pair.encode(sample), bpe.encode(sample))
    assert from_pair.decode(from_pair.encode(sample)) == sample


# ----------------------------------------------------------------------------- the command line


@pytest.fixture
def hf_dir(tmp_path, bpe):
    c = _gpt2_config(vocab_size=bpe.vocab_size)
    return _write_hf_dir(tmp_path / "hf", c, _random_tensors(c, 1), bpe)


def test_import_then_generate_from_the_command_line(tmp_path, capsys, hf_dir, bpe):
    code, out, err = run_main(capsys, "import-gpt2", hf_dir, "--out", tmp_path / "run")
    assert code == 0, err
    assert "Imported GPT-2 (2 layers, 2 heads, width 16, context 32" in out
    ck = checkpoint.load(str(tmp_path / "run"))
    assert ck.tokenizer == bpe and ck.model.positions == "learned" and ck.model.tie_embeddings
    tensors = safetensors_numpy.load_file(os.path.join(hf_dir, hf_folder.WEIGHTS))
    np.testing.assert_array_equal(ck.state.params["embed"]["table"], tensors["transformer.wte.weight"])
    code, out, err = run_main(capsys, "generate", "--checkpoint", tmp_path / "run", "--prompt", "The quick",
                              "--max-new-tokens", "5")
    assert code == 0 and out.startswith("The quick"), err
    # No training text and no schedule of its own: resuming it is refused, not run on the built-in corpus.
    code, _, err = run_main(capsys, "train", "--resume", tmp_path / "run", "--steps", "5")
    assert_one_error_line(code, err, "imported from", "nothing to resume")


def test_import_refusals_are_one_line_and_write_nothing(tmp_path, capsys, hf_dir):
    def refused(*fragments, hf=hf_dir):
        out_dir = tmp_path / "never"
        code, _, err = run_main(capsys, "import-gpt2", hf, "--out", out_dir)
        assert_one_error_line(code, err, *fragments)
        assert not out_dir.exists()

    refused("is not a directory", hf=tmp_path / "nope")
    weights = os.path.join(hf_dir, hf_folder.WEIGHTS)
    blob = open(weights, "rb").read()
    open(weights, "wb").write(blob[: len(blob) // 2])                      # a truncated download
    refused("is not a safetensors file")
    os.remove(weights)
    refused("has no model.safetensors")
    os.mkdir(weights)                                                      # a folder where the file should be
    refused("model.safetensors' is a directory")
    os.rmdir(weights)
    open(weights, "wb").write(blob)
    config_path = os.path.join(hf_dir, "config.json")
    hf_config = json.load(open(config_path))
    open(config_path, "w").write(json.dumps(hf_config)[:-3])
    refused("config.json", "is not valid JSON")
    open(config_path, "w").write(json.dumps({**hf_config, "vocab_size": hf_config["vocab_size"] - 1}))
    refused("the tokenizer has", "the model has no embedding for the ids past it")
    open(config_path, "w").write(json.dumps({**hf_config, "n_layer": 3}))
    refused("missing h.2.attn.c_attn.bias")
    open(config_path, "w").write(json.dumps({**hf_config, "bos_token_id": [0, 1]}))   # transformers refuses it
    refused("bos_token_id = [0, 1] must be one id: only eos_token_id may list several")
    open(config_path, "w").write(json.dumps(hf_config))
    os.rename(weights, os.path.join(hf_dir, "shard.safetensors"))              # shards must lie beside their index
    index = {"weight_map": {"transformer.wte.weight": "../elsewhere/model.safetensors"}}
    open(os.path.join(hf_dir, hf_folder.WEIGHTS_INDEX), "w").write(json.dumps(index))
    refused("names shard files outside its folder")
    os.remove(os.path.join(hf_dir, hf_folder.WEIGHTS_INDEX))
    # Two shards and their index, as save_pretrained writes a large model: read; then an
    # index that disagrees with what the shards hold is refused.
    tensors = safetensors_numpy.load_file(os.path.join(hf_dir, "shard.safetensors"))
    os.remove(os.path.join(hf_dir, "shard.safetensors"))
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        safetensors_numpy.save_file({n: tensors[n] for n in part}, os.path.join(hf_dir, file))
    weight_map = {n: file for file, part in halves.items() for n in part}
    index_path = os.path.join(hf_dir, hf_folder.WEIGHTS_INDEX)
    open(index_path, "w").write(json.dumps({"weight_map": weight_map}))
    assert hf_folder.read_tensors(hf_dir).keys() == tensors.keys()
    open(index_path, "w").write(json.dumps({"weight_map": {**weight_map, names[0]: "b.safetensors"}}))
    refused("a.safetensors' disagrees with model.safetensors.index.json", f"it holds {names[0]}",
            "puts elsewhere or nowhere")
    os.remove(index_path)
    for file in halves:
        os.remove(os.path.join(hf_dir, file))
    safetensors_numpy.save_file(tensors, weights)
    tokenizer_path = os.path.join(hf_dir, "tokenizer.json")
    tokenizer_json = open(tokenizer_path).read()
    open(tokenizer_path, "w").write(tokenizer_json[: len(tokenizer_json) // 2])    # truncated
    refused("tokenizer.json", "not a valid tokenizers JSON")
    open(tokenizer_path, "wb").write(b"\xff\xfe garbage")                         # not UTF-8 at all
    refused("tokenizer.json")
    os.remove(tokenizer_path)
    refused("has no tokenizer", "vocab.json and merges.txt")
    open(os.path.join(hf_dir, "vocab.json"), "w").write('{"a": 0')                 # the pair, one of them cut
    open(os.path.join(hf_dir, "merges.txt"), "w").write("#version: 0.2\n")
    refused("vocab.json", "not a valid vocabulary and merge list")
    open(tokenizer_path, "w").write(tokenizer_json)
    open(config_path, "w").write(json.dumps({**hf_config, "n_layer": 10**6}))          # absurd: refused unread
    refused("n_layer = 1000000 is invalid", "at most 1024")
    open(config_path, "w").write(json.dumps({**hf_config, "n_layer": 1000, "n_embd": 2**16}))   # too large here
    refused("importing this model needs at least", "GB of memory")


@pytest.mark.parametrize("command", ["import-gpt2", "export-gpt2"])
def test_sigterm_while_reading_is_one_line_and_writes_nothing(tmp_path, capsys, hf_dir, monkeypatch, command,
                                                             gpt2_shaped_run):
    """SIGTERM arrives while the weights are read: exit 143, one line, no folder."""
    import signal
    real = hf_folder.import_dir if command == "import-gpt2" else hf_folder.export_files

    def read_then_signalled(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(hf_folder, "import_dir" if command == "import-gpt2" else "export_files", read_then_signalled)
    source = hf_dir if command == "import-gpt2" else gpt2_shaped_run
    code, _, err = run_main(capsys, command, source, "--out", tmp_path / "out")
    assert code == 128 + signal.SIGTERM and err.strip() == "minitx: interrupted by SIGTERM; nothing saved was lost"
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_import_never_overwrites_a_run(tmp_path, capsys, hf_dir):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    code, _, err = run_main(capsys, "import-gpt2", hf_dir, "--out", tmp_path / "run")
    assert_one_error_line(code, err, "already holds a run")


def test_a_killed_import_is_redone_and_a_failed_one_leaves_nothing(tmp_path, capsys, hf_dir, monkeypatch):
    """A save killed mid-way leaves a temporary folder: the next import removes it and
    succeeds. A full disk: one line, exit 1, and no empty --out folder left."""
    leftover = tmp_path / "run" / ".checkpoint.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "params.npz").write_bytes(b"half")
    assert run_main(capsys, "import-gpt2", hf_dir, "--out", tmp_path / "run")[0] == 0
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save", full_disk)
    code, _, err = run_main(capsys, "import-gpt2", hf_dir, "--out", tmp_path / "second")
    assert_one_error_line(code, err, "No space left on device", status=1)
    assert not (tmp_path / "second").exists()


@pytest.fixture(scope="module")
def gpt2_shaped_run(tmp_path_factory):
    """A TINY run with learned positions and a tied head, byte tokenizer, a few steps."""
    root = tmp_path_factory.mktemp("gpt2run")
    from minitx_fn.cli import main
    with standard_promotion():
        assert main(["train", *TINY, "--steps", "3", "--tokenizer", "byte", "--positions", "learned",
                     "--tie-embeddings", "--out", str(root / "r")]) == 0
    return root / "r"


def test_export_then_import_gives_back_the_same_model(tmp_path, capsys, gpt2_shaped_run):
    code, out, err = run_main(capsys, "export-gpt2", gpt2_shaped_run, "--out", tmp_path / "hf")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert run_main(capsys, "import-gpt2", tmp_path / "hf", "--out", tmp_path / "back")[0] == 0
    original, back = checkpoint.load(str(gpt2_shaped_run)), checkpoint.load(str(tmp_path / "back"))
    jax.tree.map(np.testing.assert_array_equal, back.state.params, original.state.params)
    assert back.tokenizer.encode("héllo").tolist() == ByteTokenizer().encode("héllo").tolist()
    assert back.model == original.model.replace(embed_std=original.model.init_std)


def test_an_untied_gpt2_goes_back_out_as_it_came_in(tmp_path, capsys, bpe):
    """tie_word_embeddings false: lm_head.weight becomes our head (bias zero) and is
    exported again as lm_head.weight, bit for bit."""
    c = _gpt2_config(vocab_size=bpe.vocab_size, tie_embeddings=False)
    tensors = _random_tensors(c, 2)
    hf = _write_hf_dir(tmp_path / "hf", c, tensors, bpe)
    assert run_main(capsys, "import-gpt2", hf, "--out", tmp_path / "run")[0] == 0
    assert run_main(capsys, "export-gpt2", tmp_path / "run", "--out", tmp_path / "again")[0] == 0
    again = safetensors_numpy.load_file(str(tmp_path / "again" / hf_folder.WEIGHTS))
    assert again.keys() == tensors.keys()
    for name, array in tensors.items():
        np.testing.assert_array_equal(again[name], array)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_killed_export_leaves_nothing_the_next_one_keeps(tmp_path):
    """write_dir's temporary folder carries its PID: the next export removes those of
    processes that are gone, and leaves a live one's alone."""
    dead = tmp_path / (runs.owned_prefix(hf_folder.TEMPORARY_KIND, 2**31 - 2) + "x")      # no process has this PID here
    live = tmp_path / (runs.owned_prefix(hf_folder.TEMPORARY_KIND) + "y")
    for left in (dead, live):
        left.mkdir()
        (left / "model.safetensors").write_bytes(b"partial")
    hf_folder.write_dir(str(tmp_path / "out"), {"config.json": b"{}"})
    assert not dead.exists() and live.exists()
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"


def test_nothing_is_written_inside_a_runs_checkpoint_by_any_route(tmp_path, capsys, hf_dir, gpt2_shaped_run):
    """export-hf and import-hf refuse an --out inside a run's own folders (its next save
    would delete it), named directly or through a link, and write nothing there."""
    run = tmp_path / "run"
    import shutil
    shutil.copytree(gpt2_shaped_run, run)
    (tmp_path / "link").symlink_to(run / "checkpoint")
    before = sorted(os.listdir(run / "checkpoint"))
    for command, source, out in (("export-hf", run, run / "checkpoint" / "hf"),
                                 ("export-hf", run, tmp_path / "link" / "hf"),
                                 ("import-hf", hf_dir, run / "checkpoint" / "imp"),
                                 ("import-hf", hf_dir, tmp_path / "link" / "imp")):
        code, _, err = run_main(capsys, command, source, "--out", out)
        assert_one_error_line(code, err, "inside the files of the run")
    assert sorted(os.listdir(run / "checkpoint")) == before


def test_export_refuses_what_gpt2_cannot_hold(tmp_path, capsys, gpt2_shaped_run):
    code, _, err = run_main(capsys, "export-gpt2", gpt2_shaped_run, "--out", gpt2_shaped_run)
    assert_one_error_line(code, err, "already exists and is not an empty folder")
    (tmp_path / "a-file").write_text("x")
    code, _, err = run_main(capsys, "export-gpt2", gpt2_shaped_run, "--out", tmp_path / "a-file" / "hf")
    assert_one_error_line(code, err, "a-file' is a file")
    ck = checkpoint.load(str(gpt2_shaped_run))
    for options, named in (({"positions": "sinusoidal"}, "positions='sinusoidal'"),
                           ({"tie_embeddings": False}, "tie_embeddings=False"),
                           ({"positions": "rotary", "norm": "rmsnorm"}, "positions='rotary', norm='rmsnorm'"),
                           ({"n_kv_heads": 1, "bias": False, "qkv_bias": True}, "bias=False, n_kv_heads=1")):
        with pytest.raises(HFError, match=re.escape(f"this model has {named}: train one with arch='gpt2'")):
            hf_folder.export_files(ck.state.params, ck.model.replace(**options), ck.tokenizer)
    # Nearer Llama's shape than GPT-2's (a Llama with biases): named against Llama's.
    llama_with_bias = ck.model.replace(**{**defaults.ARCHS["llama"], "bias": True})
    with pytest.raises(HFError, match=re.escape("Llama and Qwen2 have bias=False; this model has bias=True: "
                                                       "train one with arch='llama'")):
        hf_folder.export_files(ck.state.params, llama_with_bias, ck.tokenizer)
    assert not (tmp_path / "hf").exists()


def test_export_into_the_folder_one_stands_in_writes_it_in_place(tmp_path, capsys, monkeypatch, gpt2_shaped_run):
    """`export-gpt2 RUN --out .` from an empty folder: the files appear in that very
    folder (its inode kept: renaming a new folder over it left the shell in an empty,
    deleted one)."""
    here = tmp_path / "empty"
    here.mkdir()
    inode = os.stat(here).st_ino
    monkeypatch.chdir(here)
    code, out, err = run_main(capsys, "export-gpt2", gpt2_shaped_run, "--out", ".")
    assert code == 0, err
    assert os.stat(".").st_ino == inode == os.stat(here).st_ino
    assert sorted(os.listdir(".")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["empty"]                           # no temporary folder left


# ----------------------------------------------------------------------------- parity with Hugging Face

# The `hf` fixture (torch, transformers, or a skip saying how to install them) is conftest's.


@pytest.fixture(scope="module")
def hf_model_dir(hf, tmp_path_factory, bpe):
    """transformers' own GPT-2 (random weights, initializer_range 0.2 so the logits
    spread and greedy choices are clear), saved by save_pretrained with our BPE."""
    torch, transformers = hf
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    (path / "tokenizer.json").write_text(bpe.to_json())
    return path


def _hf_logits(torch, hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_imported_logits_and_loss_equal_hugging_face(hf, hf_model_dir, bpe, dtype):
    torch, transformers = hf
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(hf_model_dir), attn_implementation="eager").eval()
    tol = {"float32": 1e-5, "float64": 1e-10}[dtype]
    ids = np.stack([bpe.encode(TEXT)[:24], bpe.encode(TEXT[200:])[:24]])             # (2, 24)
    with enable_x64() if dtype == "float64" else contextlib.nullcontext():
        if dtype == "float64":
            hf_model = hf_model.double()
        c, params, _ = hf_folder.import_dir(str(hf_model_dir), param_dtype=dtype)
        with standard_promotion():
            logits = jax.jit(model.apply, static_argnames="config")(params, jnp.asarray(ids), config=c)
        theirs = _hf_logits(torch, hf_model, ids)
        assert theirs.dtype == np.dtype(dtype)
        assert_close_scaled(logits, theirs, tol)
        inputs = torch.from_numpy(ids[:, :-1].astype(np.int64))
        with torch.no_grad():
            out = hf_model(inputs, labels=inputs)
            # The same cross-entropy by torch in the model's dtype: transformers computes
            # its own .loss in float32 whatever the model's dtype.
            by_torch = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, c.vocab_size),
                                                         inputs[:, 1:].reshape(-1)).item()
        # Hugging Face shifts the labels itself: its loss on ids[:, :-1] predicts ids[:, 1:-1].
        with standard_promotion():
            ours = float(train.cross_entropy(c.apply(params, jnp.asarray(ids[:, :-2])), jnp.asarray(ids[:, 1:-1])))
        assert abs(ours - by_torch) <= tol * abs(by_torch)
        assert abs(ours - out.loss.item()) <= 1e-5 * abs(by_torch)


def test_greedy_tokens_equal_hugging_face_generate(hf, hf_model_dir, tmp_path, capsys, bpe):
    torch, transformers = hf
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(hf_model_dir)).eval()
    prompt = "The quick brown"
    ids = bpe.encode(prompt)
    with torch.no_grad():
        expected = hf_model.generate(torch.from_numpy(ids[None].astype(np.int64)), do_sample=False,
                                     max_new_tokens=20, pad_token_id=0)[0, len(ids):].numpy()
    assert run_main(capsys, "import-gpt2", hf_model_dir, "--out", tmp_path / "run")[0] == 0
    code, out, err = run_main(capsys, "generate", "--checkpoint", tmp_path / "run", "--prompt", prompt,
                              "--max-new-tokens", "20")
    assert code == 0, err
    assert out.rstrip("\n") == prompt + bpe.decode(expected)
    from minitx_fn.generate import generate
    ck = checkpoint.load(str(tmp_path / "run"))
    with standard_promotion():
        ours = generate(ck.state.params, [ids], model=ck.model, key=None, max_new_tokens=20)[0]
    np.testing.assert_array_equal(ours, expected)


def test_exported_run_loads_in_transformers_with_the_same_logits(hf, tmp_path, capsys, gpt2_shaped_run):
    torch, transformers = hf
    assert run_main(capsys, "export-gpt2", gpt2_shaped_run, "--out", tmp_path / "hf")[0] == 0
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ck = checkpoint.load(str(gpt2_shaped_run))
    ids = ck.tokenizer.encode("hello jax! hello")[None]                                    # (1, 16)
    with standard_promotion():
        ours = jax.jit(model.apply, static_argnames="config")(ck.state.params, jnp.asarray(ids),
                                                              config=ck.model)
    assert_close_scaled(ours, _hf_logits(torch, hf_model, ids), 1e-5)


def test_a_signal_while_import_or_export_writes_takes_its_output_back(tmp_path, capsys, monkeypatch, hf_dir,
                                                                       gpt2_shaped_run):
    """SIGTERM arriving while the run or the folder is being written (after the last
    point that used to look for it) was swallowed: exit 0 and everything written. It
    is now one line, exit 143, and neither the run nor the folder exists."""
    import signal

    from minitx_fn import job
    real_new_run, real_makedirs = job.new_run, hf_folder.runs.make_dirs

    def new_run_then_signal(*args, **kwargs):
        path = real_new_run(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)                  # recorded by minitx's handler, acted on later
        return path

    monkeypatch.setattr(job, "new_run", new_run_then_signal)
    code, _, err = run_main(capsys, "import-hf", hf_dir, "--out", tmp_path / "run")
    assert (code, err.strip()) == (143, "minitx: interrupted by SIGTERM; nothing saved was lost")
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()

    def makedirs_then_signal(path):                           # write_dir: before the files are written
        made = real_makedirs(path)
        os.kill(os.getpid(), signal.SIGTERM)
        return made

    monkeypatch.setattr(hf_folder.runs, "make_dirs", makedirs_then_signal)
    code, _, err = run_main(capsys, "export-hf", gpt2_shaped_run, "--out", tmp_path / "hf-out")
    assert (code, err.strip()) == (143, "minitx: interrupted by SIGTERM; nothing saved was lost")
    assert not (tmp_path / "hf-out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".export")]


def test_a_list_of_one_bos_or_pad_id_is_that_id_and_exports_as_transformers_reads_it(tmp_path, hf_dir):
    """config.json may write bos and pad as a list of one id; the run keeps the id, and
    the exported config.json and generation_config.json hold it as transformers wants
    (only eos may be a list)."""
    config_path = os.path.join(hf_dir, "config.json")
    hf_config = json.load(open(config_path))
    json.dump({**hf_config, "bos_token_id": [1], "pad_token_id": [0], "eos_token_id": [1, 2]}, open(config_path, "w"))
    c, params, tokenizer = hf_folder.import_dir(hf_dir)
    assert tokenizer.special == {"bos_token_id": 1, "pad_token_id": 0, "eos_token_id": [1, 2]}
    files = hf_folder.export_files(params, c, tokenizer)
    written = json.loads(files["config.json"])
    assert (written["bos_token_id"], written["pad_token_id"], written["eos_token_id"]) == (1, 0, [1, 2])


def test_a_pipe_or_a_device_in_place_of_a_file_is_refused_at_once(tmp_path, capsys, hf_dir):
    """A FIFO (or a link to /dev/zero) as config.json, tokenizer.json or
    model.safetensors would block the read forever or never end it: refused in one
    line before it is opened (an alarm turns a hang into a failure)."""
    import signal

    def hung(signum, frame):
        raise TimeoutError("the import blocked on a file that is no regular file")
    previous = signal.signal(signal.SIGALRM, hung)
    try:
        for name in ("config.json", "tokenizer.json", hf_folder.WEIGHTS):
            path = os.path.join(hf_dir, name)
            os.rename(path, path + ".real")
            for make in (os.mkfifo, lambda p: os.symlink("/dev/zero", p)):
                make(path)
                signal.alarm(20)
                code, _, err = run_main(capsys, "import-hf", hf_dir, "--out", tmp_path / "never")
                signal.alarm(0)
                assert_one_error_line(code, err, f"{path!r} is not a regular file")
                os.remove(path)
            os.rename(path + ".real", path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "never").exists()
