"""LoRA (#26, part 2): adapters as a transform of the parameter tree, their laws as
properties in float32 and float64, and runs that train them on a frozen base."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import checkpoint, defaults, job, lora, model, testing, train
from minitx_fn.config import LoraConfig, ModelConfig, OptimizerConfig
from minitx_fn.defaults import LORA_TARGETS
from minitx_fn.testing import assert_close_scaled, enable_x64
from tests import numpy_model
from tests.helpers import assert_one_error_line, run_main, standard_promotion

DTYPES = testing.dtypes()
SEEDS = st.integers(0, 2**16)
TARGETS = st.sampled_from(sorted(LORA_TARGETS))


@contextlib.contextmanager
def _x64(dtype: str):
    """float64 on when the dtype asks for it; standard promotion, which optax needs."""
    with enable_x64() if dtype == "float64" else contextlib.nullcontext(), standard_promotion():
        yield


def _model(dtype: str, d: int, layers: int, **changes) -> ModelConfig:
    return ModelConfig(vocab_size=11, d_model=d, n_heads=2, n_layers=layers, max_len=8, dtype=dtype,
                       param_dtype=dtype, **changes)


def _adapters(key, mc: ModelConfig, params, config: LoraConfig) -> dict:
    return lora.init(key, params, lora.targets(mc, params, config), config.rank)


def _random_adapters(key, mc: ModelConfig, params, config: LoraConfig) -> dict:
    """Adapters with B drawn too (a trained adapter), not the fresh B = 0."""
    fresh = _adapters(key, mc, params, config)
    leaves, tree = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype) * 0.3 for k, a in zip(keys, leaves)])


@given(d=st.sampled_from([8, 16]), layers=st.sampled_from([1, 2]), rank=st.sampled_from([1, 2, 4]), targets=TARGETS,
       alpha=st.sampled_from([None, 0.5, 16.0]), dtype=DTYPES, seed=SEEDS)
def test_fresh_adapters_leave_the_model_exactly_as_it_was(d, layers, rank, targets, alpha, dtype, seed):
    """Law: with B = 0 the model equals its base exactly, bit for bit in every leaf."""
    with _x64(dtype):
        mc = _model(dtype, d, layers)
        key = jax.random.key(seed)
        params = model.init(key, mc)
        config = LoraConfig(rank=rank, alpha=alpha, targets=targets)
        adapters = _adapters(jax.random.fold_in(key, 1), mc, params, config)
        assert all(not b.any() for name, b in checkpoint.named_arrays(adapters).items() if name.endswith("/b"))
        merged = lora.merge(params, adapters, scale=config.scale)
        jax.tree.map(np.testing.assert_array_equal, merged, params)     # every leaf, so every logit, the same


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _merged_logits(params, adapters, tokens, *, scale, config):
    """Jitted: run eagerly, every operation of merge and apply compiles on its own."""
    return model.apply(lora.merge(params, adapters, scale=scale), tokens, config=config)


# GPT-2's shape, and Llama's (SwiGLU's gate adapted too; multi-query, rotary).
ARCHS = {"gpt2": ({"positions": "learned", "tie_embeddings": True}, {}),
         "llama": ({**defaults.ARCHS["llama"], "n_kv_heads": 1}, {"n_kv_heads": 1, "rope_theta": 10000.0})}


@given(rank=st.sampled_from([1, 3]), targets=TARGETS, dtype=DTYPES, seed=SEEDS, length=st.sampled_from([1, 5, 8]),
       arch=st.sampled_from(sorted(ARCHS)))
def test_merged_adapters_equal_unmerged_ones_in_the_numpy_model(rank, targets, dtype, seed, length, arch):
    """Law: folding A B into the weights (lora.merge, then our model) gives the logits of
    the independent NumPy model that adds scale (x A) B to each adapted layer's output
    and never changes a weight."""
    options, numpy_args = ARCHS[arch]
    with _x64(dtype):
        mc = _model(dtype, 8, 2, **options)
        key = jax.random.key(seed)
        params = model.init(key, mc)
        config = LoraConfig(rank=rank, alpha=2.0, targets=targets)
        adapters = _random_adapters(jax.random.fold_in(key, 2), mc, params, config)
        ids = np.asarray(jax.random.randint(key, (length,), 0, 11))
        ours = _merged_logits(params, adapters, jnp.asarray(ids[None]), scale=config.scale, config=mc)[0]
        theirs = numpy_model.logits(jax.device_get(params), ids, n_heads=2, adapters=jax.device_get(adapters),
                                    scale=config.scale, **numpy_args)
        unadapted = numpy_model.logits(jax.device_get(params), ids, n_heads=2, **numpy_args)
        if arch == "llama" and targets != "attn":
            assert "gate" in adapters["blocks"]["mlp"]
        assert np.abs(theirs - unadapted).max() > 1e-3          # the adapters change the model: the law bites
        assert_close_scaled(ours, theirs, 1e-11 if dtype == "float64" else 2e-5)


@given(targets=TARGETS, dtype=DTYPES, seed=SEEDS, accumulate=st.sampled_from([1, 2]))
def test_a_lora_step_changes_only_the_adapters_and_keeps_no_state_for_the_base(targets, dtype, seed, accumulate):
    """Law: a step returns new adapters and their optimiser state only; the base it was
    given is unchanged, and merged after the step the model differs from the base in
    the adapted weights alone."""
    with _x64(dtype):
        mc = _model(dtype, 8, 2)
        key = jax.random.key(seed)
        base = model.init(key, mc)
        kept = jax.tree.map(np.array, base)
        config = LoraConfig(rank=2, targets=targets)
        oc = OptimizerConfig(decay_steps=10, warmup=0, lr=0.05)
        state = train.lora_state(jax.random.fold_in(key, 1), mc, base, oc, config)
        moments = sum(a.size for a in jax.tree.leaves(state.opt_state) if a.ndim)
        assert moments == 2 * model.count_params(state.params)           # Adam's two moments, of the adapters only
        x = jax.random.randint(key, (4, 8), 0, 11)
        for _ in range(2):                                        # the first step moves B only (A B = 0)
            state, metrics = train.train_step(state, (x, jnp.roll(x, 1, axis=1)), base, model=mc,
                                              optimizer_config=oc, accumulate=accumulate, lora=config)
        assert np.isfinite(float(metrics["loss"]))
        jax.tree.map(np.testing.assert_array_equal, base, kept)
        merged = lora.merge(base, state.params, scale=config.scale)
        adapted = {f"{p}/w" for p in lora.targets(mc, base, config)}
        for name, value in checkpoint.named_arrays(merged).items():
            before = checkpoint.named_arrays(kept)[name]
            assert (not np.array_equal(value, before)) == (name in adapted), name


def test_a_lora_step_needs_its_base_and_only_it_takes_one():
    mc = _model("float32", 8, 1)
    oc = OptimizerConfig(decay_steps=10, warmup=0)
    base = model.init(jax.random.key(0), mc)
    x = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(TypeError, match="needs base="):
        train.train_step(train.lora_state(jax.random.key(1), mc, base, oc, LoraConfig(rank=1)), (x, x),
                         model=mc, optimizer_config=oc, lora=LoraConfig(rank=1))


# ----------------------------------------------------------------------------- runs

SMALL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_len": 16, "positions": "learned", "tie_embeddings": True}
TEXT = "to be or not to be, that is the question. " * 40
LORA = {"steps": 4, "batch_size": 8, "log_every": 2, "save_every": 2, "optimizer": {"decay_steps": 4, "lr": 1e-2},
        "lora": {"rank": 2, "alpha": 4.0, "targets": "all"}}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A GPT-2-shaped run exported as a Hugging Face folder and imported back, as a
    downloaded GPT-2 would be, beside the text to fine-tune on."""
    pytest.importorskip("safetensors", reason="export and import need the test extra's safetensors")
    from minitx_fn import hf
    folder = tmp_path_factory.mktemp("lora")
    with standard_promotion():
        job.train(text=TEXT, tokenizer="byte", model=SMALL, training={"steps": 4, "batch_size": 8, "log_every": 2},
                  run_dir=str(folder / "mine"), sample_tokens=0, log=io.StringIO())
        hf.export_run(str(folder / "mine"), str(folder / "hf"))
        hf.import_run(str(folder / "hf"), str(folder / "imported"), log=io.StringIO())
    (folder / "t.txt").write_text(TEXT)
    return folder


@pytest.fixture
def here(imported, tmp_path, monkeypatch):
    for name in ("imported", "t.txt"):
        (shutil.copytree if name == "imported" else shutil.copy)(imported / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    with standard_promotion():
        yield tmp_path


def _lora_run(run_dir: str, **training):
    return job.train("t.txt", init_from="imported", run_dir=run_dir, training={**LORA, **training}, sample_tokens=0,
                     log=io.StringIO())


def test_a_lora_run_saves_adapters_resumes_exactly_and_loads_as_its_merged_model(here, capsys):
    """A LoRA run from an imported GPT-2-shaped model: its checkpoint holds the adapters
    and a checked reference to the base; stopped half-way and resumed it ends where an
    uninterrupted run does; loaded, generated from, evaluated and exported it is the
    merged model."""
    whole = _lora_run("whole")
    base = checkpoint.load_model("imported")
    ckpt = checkpoint.load("whole")
    assert ckpt.origin == {"init_from": {"path": os.path.abspath("imported"),
                                         "sha256": base.meta["files"]["params.npz"]["sha256"]}}
    assert set(checkpoint.named_arrays(ckpt.state.params)) == {
        f"blocks/{p}/{m}" for p in LORA_TARGETS["all"] if p != "mlp/gate" for m in "ab"}   # GPT-2 has no gate
    full = os.path.getsize("imported/checkpoint/params.npz")
    assert os.path.getsize("whole/checkpoint/params.npz") < full / 4
    loaded = checkpoint.load_model("whole")
    merged = lora.merge(base.params, ckpt.state.params, scale=LORA["lora"]["alpha"] / LORA["lora"]["rank"])
    jax.tree.map(np.testing.assert_array_equal, loaded.params, merged)
    jax.tree.map(np.testing.assert_array_equal, whole.params, merged)
    assert not np.array_equal(merged["blocks"]["mlp"]["up"]["w"], base.params["blocks"]["mlp"]["up"]["w"])

    # Law: resume equals an uninterrupted run.
    _lora_run("halves", steps=2)
    code, _, err = run_main(capsys, "train", "--resume", "halves", "--steps", "4", "--max-new-tokens", "2")
    assert code == 0, err
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load("halves").state, ckpt.state)

    # generate, eval and export-gpt2 take it like any run; export merges.
    code, out, err = run_main(capsys, "generate", "--checkpoint", "whole", "--prompt", "to be", "--max-new-tokens", "5")
    assert code == 0, err
    code, _, err = run_main(capsys, "eval", "--checkpoint", "whole", "--data", "t.txt", "--json", "e.json")
    assert code == 0, err
    assert json.load(open("e.json"))["loss"] > 0
    code, _, err = run_main(capsys, "export-gpt2", "whole", "--out", "hf-merged")
    assert code == 0, err
    code, _, err = run_main(capsys, "import-gpt2", "hf-merged", "--out", "back")
    assert code == 0, err
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_model("back").params, merged)

    # A full fine-tune may start from the LoRA run: its base is the merged model.
    plan = job.plan(job.make("t.txt", init_from="whole", run_dir="next", training={"steps": 2}), log=io.StringIO())
    jax.tree.map(np.testing.assert_array_equal, plan.state.params, merged)


def test_what_a_lora_run_refuses_and_a_base_that_moved_or_changed(here, capsys):
    """Bad input, one line each; a LoRA run whose base is gone or was replaced says so."""
    for argv, said in ((["--lora-rank", "2"], "--lora-rank 2 trains adapters on the frozen parameters of another run"),
                       (["--init-from", "imported", "--lora-alpha", "4"], "lora needs --lora-rank N"),
                       (["--init-from", "imported", "--lora-rank", "33"], "--lora-rank 33 exceeds the model's width"),
                       (["--init-from", "imported", "--lora-rank", "2", "--lora-targets", "heads"], "--lora-targets"),
                       (["--init-from", "imported", "--lora-rank", "2", "--lora-alpha", "-1"], "--lora-alpha -1.0")):
        code, _, err = run_main(capsys, "train", "--data", "t.txt", *argv, "--out", "x")
        assert_one_error_line(code, err, said)
        assert not os.path.exists("x")
    with open("imported/.lock", "w") as f:             # a live process (this one) training the base
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    code, _, err = run_main(capsys, "train", "--data", "t.txt", "--init-from", "imported", "--lora-rank", "2",
                            "--out", "x")
    assert_one_error_line(code, err, "imported' is being trained (PID", "a LoRA run needs its base to stay")
    os.remove("imported/.lock")
    # alpha / R so large the gradient norm overflows: clipping would zero every update without a word.
    code, _, err = run_main(capsys, "train", "--data", "t.txt", "--init-from", "imported", "--lora-rank", "2",
                            "--lora-alpha", "3e38", "--steps", "2", "--out", "x")
    assert_one_error_line(code, err, "the gradient norm became non-finite at step 1", "--lora-alpha", status=1)
    shutil.rmtree("x")
    _lora_run("tuned", steps=2)
    code, _, err = run_main(capsys, "train", "--resume", "tuned", "--steps", "4", "--lora-rank", "4")
    assert_one_error_line(code, err, "--lora-rank 4 (saved: --lora-rank 2)")
    # Copies of a LoRA run with its B zeroed, each naming the one before as its base, so
    # every link is that run's model (and its probe holds): a chain deeper than
    # checkpoint.MAX_BASES is one line, not a RecursionError.
    arrays = dict(np.load("tuned/checkpoint/params.npz"))
    blob = io.BytesIO()
    np.savez(blob, **{name: np.zeros_like(a) if name.endswith("/b") else a for name, a in arrays.items()})
    zeroed = {"bytes": len(blob.getvalue()), "sha256": hashlib.sha256(blob.getvalue()).hexdigest()}
    previous = "tuned"
    for i in range(checkpoint.MAX_BASES + 1):
        shutil.copytree("tuned", f"chain{i}")
        open(f"chain{i}/checkpoint/params.npz", "wb").write(blob.getvalue())
        meta_path = f"chain{i}/checkpoint/meta.json"
        meta = json.load(open(meta_path))
        meta["origin"]["init_from"] = {"path": os.path.abspath(previous),
                                       "sha256": json.load(open(f"{previous}/checkpoint/meta.json"))[
                                           "files"]["params.npz"]["sha256"]}
        meta["files"]["params.npz"] = zeroed
        json.dump(meta, open(meta_path, "w"))
        previous = f"chain{i}"
    checkpoint.load_model(f"chain{checkpoint.MAX_BASES - 3}")     # chain i, i earlier links, tuned, imported: 16 runs
    code, _, err = run_main(capsys, "generate", "--checkpoint", previous, "--prompt", "to")
    assert_one_error_line(code, err, f"more than {checkpoint.MAX_BASES} runs deep")

    os.rename("imported", "moved")
    code, _, err = run_main(capsys, "generate", "--checkpoint", "tuned", "--prompt", "to")
    assert_one_error_line(code, err, "the base this run's adapters apply to", "cannot be loaded")
    job.train("t.txt", init_from="moved", run_dir="other", training={"steps": 2, "optimizer": {"lr": 0.5}},
              sample_tokens=0, log=io.StringIO())
    shutil.copytree("other", "imported")              # another model where the base stood: the checksum differs
    for argv in (["generate", "--checkpoint", "tuned", "--prompt", "to"],
                 ["train", "--resume", "tuned", "--steps", "4"]):
        code, _, err = run_main(capsys, *argv)
        assert_one_error_line(code, err, "has changed since the run started")
