"""The whole job from Python (`minitx_fn.job`), and the seams where a user's own code
meets the library's files and defaults: each of these once went silently wrong."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pydoc
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minitx_fn import checkpoint, corpus, generate, job, loop, model, runs, train
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.errors import CheckpointError, ConfigError, DataError
from tests.helpers import assert_one_error_line, run_main, standard_promotion

SMALL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_len": 16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Infinite(ModelConfig):
    slope: float = float("inf")                  # a field JSON cannot hold


@dataclasses.dataclass(frozen=True, kw_only=True)
class Narrow(ModelConfig):
    """Its apply gives one logit too few."""

    def apply(self, params, tokens, **kwargs):
        return super().apply(params, tokens, **kwargs)[..., :-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Window:
    size: int = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Nested(ModelConfig):
    """Fields of a nested dataclass and a tuple, as JSON has neither; and a lora_paths with a typo."""

    window: Window = Window()
    heads_seen: tuple[int, ...] = (1, 2)

    def lora_paths(self, targets):
        return ("blocks/attn/qkv", "blocks/attn/qvk")
TEXT = "to be or not to be, that is the question. " * 40


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with standard_promotion():
        yield


def _train(*args, **settings):
    settings.setdefault("model", SMALL)
    settings.setdefault("training", {"steps": 4, "batch_size": 8, "log_every": 2})
    settings.setdefault("sample_tokens", 0)
    return job.train(*args, log=io.StringIO(), **settings)


def test_a_run_trained_from_python_on_text_resumes_on_that_text_only(capsys):
    """A text given in memory is recorded as such (its SHA-256, no path): resuming asks
    for it again and refuses another. (A run saved from Python without data= used to be
    recorded as the built-in corpus and resumed on `hello world!` without a word.)"""
    first = _train(text=TEXT, run_dir="mem")
    assert first.records[-1]["step"] == 4 and "val_loss" in first.records[-1]
    saved = checkpoint.load("mem").data
    assert saved["path"] is None and saved == corpus.Corpus.from_text(TEXT).source
    code, _, err = run_main(capsys, "train", "--resume", "mem", "--steps", "6")
    assert_one_error_line(code, err, "a text or ids given in memory", "give the same again", "--data FILE")
    with pytest.raises(DataError, match="not what this run trained on"):
        _train(text=TEXT + "to be", resume="mem", training={"steps": 6})
    again = _train(text=TEXT, resume="mem", training={"steps": 6})
    assert int(again.state.step) == 6 and [r["step"] for r in again.records] == [2, 4, 6]


def test_checkpoint_save_wants_to_be_told_what_the_run_trained_on(capsys):
    """data= has no default; None says "not recorded", and --resume then asks for --data
    instead of taking the built-in corpus."""
    mc = ModelConfig(vocab_size=13, **SMALL)
    tc = TrainConfig(steps=4)
    state = train.init_state(jax.random.key(0), mc, tc.optimizer)
    tok = corpus.builtin().tokenizer
    with pytest.raises(TypeError, match="data"):
        checkpoint.save("r", state, model=mc, train_config=tc, tokenizer=tok)
    checkpoint.save("r", state, model=mc, train_config=tc, tokenizer=tok, data=None)
    code, _, err = run_main(capsys, "train", "--resume", "r", "--steps", "6")
    assert_one_error_line(code, err, "does not record what it trained on", "--data")
    with pytest.raises(CheckpointError, match="data must be"):
        checkpoint.save("r", state, model=mc, train_config=tc, tokenizer=tok, data={"path": "x"})
    # Saved with the corpus itself (or its .source): the built-in corpus, said explicitly.
    checkpoint.save("b", state, model=mc, train_config=tc, tokenizer=tok, data=corpus.builtin())
    assert checkpoint.load("b").data == {"builtin": True}
    code, out, err = run_main(capsys, "train", "--resume", "b", "--steps", "6", "--max-new-tokens", "3")
    assert code == 0, err


def test_save_refuses_what_load_would_refuse_before_writing_anything():
    """A model variant's parameters, or an optimiser state of another shape
    (optax.MultiSteps), were written and then refused by load."""
    mc = ModelConfig(vocab_size=13, **SMALL)
    tc = TrainConfig(steps=4)
    state = train.init_state(jax.random.key(0), mc, tc.optimizer)
    tok = corpus.builtin().tokenizer
    variant = state._replace(params={**state.params, "extra": {"w": jnp.zeros(3)}})
    multi = optax.MultiSteps(train.make_optimizer(tc.optimizer), every_k_schedule=2)
    accumulating = train.new_state(state.params, multi)
    for bad, named in ((variant, "unexpected ['extra/w']"), (accumulating, "opt_state.npz")):
        with pytest.raises(CheckpointError, match=r"cannot save: .*" + named.replace("[", r"\[").replace("]", r"\]")):
            checkpoint.save("r", bad, model=mc, train_config=tc, tokenizer=tok, data=None)
        assert not os.path.exists("r/checkpoint") and runs.artifacts("r") == []


def test_fit_logs_the_rate_the_step_ran_with_and_needs_no_model_config(tmp_path):
    """With one's own optax.adam(1e-4), metrics.jsonl said 3.17e-4 (TrainConfig's
    schedule). Now the record's lr is the step's own report, and absent without one."""
    mc = ModelConfig(vocab_size=13, **SMALL)
    ids = jnp.asarray(corpus.builtin().ids, jnp.int32)

    def next_batch(t):
        return train.batch_at(ids, jax.random.key(1), t, batch_size=4, context=mc.max_len)

    loss_fn = train.model_loss(mc)
    for schedule, expected in ((optax.constant_schedule(1e-4), 1e-4), (None, None)):
        optimizer = optax.adam(schedule or 1e-4)
        step = jax.jit(train.make_step(loss_fn, optimizer, schedule=schedule), donate_argnums=0)
        state = train.new_state(model.init(jax.random.key(0), mc), optimizer)
        metrics = str(tmp_path / f"{expected}.jsonl")
        loop.fit(state, step=step, next_batch=next_batch, steps=4, log_every=2, metrics_path=metrics,
                 out=io.StringIO())
        records = runs.read_records(metrics).records
        assert [r.get("lr") for r in records] == [pytest.approx(expected, rel=1e-6) if expected else None] * 2
        assert all("tokens_per_s" not in r for r in records)             # no tokens_per_step given
    # The library's own step reports its schedule's rate at each step.
    tc = TrainConfig(steps=10, optimizer={"lr": 1.0, "warmup": 4})
    state = train.init_state(jax.random.key(0), mc, tc.optimizer)
    rates = []
    for t in range(5):
        state, m = train.train_step(state, next_batch(t), model=mc, optimizer_config=tc.optimizer)
        rates.append(float(m["lr"]))
    assert rates == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_training_loaded_parameters_leaves_them_usable():
    """train_step donates its state: `new_state` copies the parameters it starts from, so
    the loaded ones stay alive (taking ck.state.params and training on deleted them)."""
    mc = ModelConfig(vocab_size=13, **SMALL)
    tc = TrainConfig(steps=4)
    params = model.init(jax.random.key(0), mc)
    state = train.new_state(params, train.make_optimizer(tc.optimizer))
    x = jnp.zeros((2, mc.max_len), jnp.int32)
    state, _ = train.train_step(state, (x, x), model=mc, optimizer_config=tc.optimizer)
    assert np.isfinite(np.asarray(params["embed"]["table"])).all()           # not deleted
    assert not np.array_equal(np.asarray(params["embed"]["table"]), np.asarray(state.params["embed"]["table"]))


def test_load_and_generate_text_greedy_needs_no_key():
    result = _train(run_dir="r", training={"steps": 4, "batch_size": 8, "log_every": 2})
    loaded = checkpoint.load_model("r")
    assert loaded.model == result.model and loaded.meta["step"] == 4
    text = generate.complete(loaded, "hello", max_new_tokens=12)
    assert text == generate.complete(result, "hello", max_new_tokens=12) and len(text) == 12
    ids = generate.generate(loaded.params, [loaded.tokenizer.encode("hello")], model=loaded.model,
                            max_new_tokens=12)[0]
    assert loaded.tokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="needs a key"):
        generate.complete(loaded, "hello", temperature=0.8)
    with pytest.raises(generate.PromptError, match="not in the vocabulary"):
        generate.complete(loaded, "Zebra")


def test_help_of_the_corpus_module_shows_no_environment(monkeypatch):
    """A default argument environ=os.environ printed every variable of the process in help()."""
    monkeypatch.setenv("MINITX_TEST_SECRET", "s3cr3t-value")
    assert "s3cr3t-value" not in pydoc.render_doc(corpus)


def test_settings_a_run_does_not_have_are_named():
    with pytest.raises(ConfigError, match="no settings \\['widht'\\]"):
        job.make(model={"widht": 3})
    with pytest.raises(ConfigError, match="vocab_size"):
        job.make(model={"vocab_size": 3})
    with pytest.raises(ConfigError, match="preset"):
        job.make(preset="nope")
    with pytest.raises(DataError, match="not both"):
        job.make("a.txt", text="abc")
    with pytest.raises(ConfigError, match="optimizer has no settings \\['learning_rate'\\]"):
        job.make(training={"optimizer": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match="train takes a Job or settings, not both"):
        job.train(job.make(), steps=3)


def test_the_plan_writes_nothing_and_the_run_writes_what_the_cli_writes(capsys):
    """plan: checks and data only; run: the run directory `minitx train --out` makes
    (checkpoint, metrics, picture, no lock left)."""
    open("t.txt", "w").write(TEXT)
    plan = job.plan(job.make("t.txt", model=SMALL, training={"steps": 4, "batch_size": 8, "log_every": 2},
                             run_dir="p", sample_tokens=5), log=io.StringIO())
    assert not os.path.exists("p") and plan.prompt == "t"               # the text's first character
    result = job.run(plan, log=io.StringIO())
    code, out, err = run_main(capsys, "train", "--data", "t.txt", "--width", "32", "--layers", "1", "--heads", "2",
                              "--context", "16", "--batch-size", "8", "--steps", "4", "--log-every", "2",
                              "--max-new-tokens", "5", "--out", "c")
    assert code == 0, err
    assert sorted(os.listdir("p")) == sorted(os.listdir("c")) == ["checkpoint", "loss.png", "metrics.jsonl"]
    a, b = checkpoint.load("p"), checkpoint.load("c")
    assert a.data == b.data and a.model == b.model and a.train_config == b.train_config
    assert a.meta["job"] == b.meta["job"] == plan.job.to_dict() | {"data": a.data}          # the job, as a dict
    np.testing.assert_array_equal(a.state.params["embed"]["table"], b.state.params["embed"]["table"])
    assert f"Generated text:\n{result.prompt}{result.sample}\n" in out


def test_a_run_trained_on_text_resumes_from_a_file_holding_that_text(capsys):
    """From the command line, where no text= exists: a file whose bytes are the text
    (the same SHA-256) resumes it; another file is refused."""
    _train(text=TEXT, run_dir="mem")
    open("same.txt", "w").write(TEXT)
    open("other.txt", "w").write(TEXT + "to be")
    code, _, err = run_main(capsys, "train", "--resume", "mem", "--data", "other.txt", "--steps", "6")
    assert_one_error_line(code, err, "not what this run trained on")
    code, out, err = run_main(capsys, "train", "--resume", "mem", "--data", "same.txt", "--steps", "6",
                              "--max-new-tokens", "3")
    assert code == 0, err
    assert checkpoint.load("mem").data["path"] == os.path.abspath("same.txt")           # recorded from now on


def test_bad_settings_are_refused_before_the_data_is_prepared(capsys):
    """A new run's model, training, adapter and device flags are checked before its
    text is read and tokenized (which takes minutes for a large corpus), and so is a
    resume's --steps: one line each, and no prepared data in the cache."""
    _train(text=TEXT, run_dir="mem")
    open("t.txt", "w").write(TEXT)
    for args, said in [(("--heads", "3"), "--heads 3"), (("--arch", "llama", "--kv-heads", "3"), "--kv-heads 3"),
                       (("--lr", "0"), "--lr 0"), (("--batch-size", "6", "--grad-accum", "4"), "--grad-accum 4"),
                       (("--lora-rank", "4"), "--init-from"), (("--devices", "7"), "--devices 7"),
                       (("--init-from", "mem", "--lora-rank", "100000"), "--lora-rank 100000"),
                       (("--init-from", "mem", "--lora-alpha", "3"), "lora needs --lora-rank N")]:
        code, out, err = run_main(capsys, "train", "--data", "t.txt", "--cache-dir", "cache", *args)
        assert_one_error_line(code, err, said)
        assert not os.path.exists("cache") and "Preparing" not in out + err, args
    for args, said in [(("--steps", "2"), "--steps 5"), (("--devices", "7"), "--devices 7")]:
        code, out, err = run_main(capsys, "train", "--resume", "mem", "--data", "t.txt", "--cache-dir", "cache",
                                  "--steps", "9", *args)
        assert_one_error_line(code, err, said)
        assert not os.path.exists("cache"), args


@pytest.mark.parametrize("settings, error", [
    ({"training": {"steps": "100"}}, "steps='100'"), ({"training": {"optimizer": {"decay_steps": "9"}}},
                                                      "decay_steps='9'"),
    ({"model": "tiny"}, "model"), ({"training": "fast"}, "training"), ({"text": b"abc"}, "must be a str"),
    ({"text": "ab\ud800c " * 20}, "lone surrogate"), ({"data_path": 3}, "must be a path"),
    ({"tokenizer": "bpe", "vocab_size": "300"}, "vocab_size='300'"), ({"devices": "2"}, "devices='2'"),
    ({"sample_tokens": True}, "sample_tokens=True"), ({"run_dir": ""}, "is empty"),
])
def test_wrong_types_are_one_error_naming_the_setting(settings, error):
    from minitx_fn.errors import Error
    data_path = settings.pop("data_path", None)
    with pytest.raises(Error, match=error.replace("(", r"\(").replace(")", r"\)")):
        job.make(data_path, **settings)


def test_numpy_numbers_are_the_numbers_they_stand_for():
    tc = TrainConfig(steps=np.int64(40), optimizer={"lr": np.float32(2e-3)})
    assert tc.steps == 40 and type(tc.steps) is int and type(tc.optimizer.lr) is float
    assert tc == TrainConfig(steps=40, optimizer={"lr": tc.optimizer.lr})


def test_save_refuses_steps_and_trees_that_would_not_come_back():
    mc = ModelConfig(vocab_size=13, **SMALL)
    tc = TrainConfig(steps=4)
    state = train.init_state(jax.random.key(0), mc, tc.optimizer)
    tok = corpus.builtin().tokenizer
    for step in (jnp.int32(-5), jnp.float32(3.7)):
        with pytest.raises(CheckpointError, match="the step must be a whole number"):
            checkpoint.save("r", state._replace(step=step), model=mc, train_config=tc, tokenizer=tok, data=None)
    with pytest.raises(CheckpointError, match="train.TrainState"):
        checkpoint.save("r", {"params": state.params}, model=mc, train_config=tc, tokenizer=tok, data=None)
    assert not os.path.exists("r/checkpoint")
    for tree, said in (({"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}, "both named 'a/b'"),
                       ({"w": jnp.ones(2, jnp.bfloat16)}, "bfloat16"), ({"w": jnp.array([1.0, jnp.nan])}, "non-finite")):
        with pytest.raises(CheckpointError, match=said):
            checkpoint.save_params("p.npz", tree)
        assert not os.path.exists("p.npz")
    checkpoint.save_params("p.npz", {"w": np.ones(2), "n": 3.0})
    assert checkpoint.load_params("p.npz", like={"w": np.zeros(2), "n": 0.0})["n"] == 3.0     # plain numbers as like


def test_eval_is_the_mean_loss_the_numpy_model_gives_every_window_of_the_text(capsys):
    """`minitx eval` / `job.evaluate` on a whole file: the loss equals the NumPy model's
    mean next-token loss over the windows of the text (written from the formulas, not
    from the library), perplexity is its exponential, and bits per byte is the loss in
    bits over the bytes predicted (one per character of an ASCII text)."""
    from tests import numpy_model
    result = _train(run_dir="r", training={"steps": 30, "batch_size": 8, "log_every": 10})
    text = "hello jax! hello world! hello flax! " * 12
    open("t.txt", "w").write(text)
    code, out, err = run_main(capsys, "eval", "--checkpoint", "r", "--data", "t.txt", "--json", "e.json")
    assert code == 0, err
    got = json.load(open("e.json"))
    ids = result.tokenizer.encode(text)
    t = result.model.max_len
    host = numpy_model.to_float64(jax.device_get(result.params))
    losses = []
    for start in range(0, len(ids) - t, t):                              # windows of T + 1 stepping by T
        window = ids[start:start + t + 1]
        logits = numpy_model.logits(host, window[:-1].tolist(), n_heads=SMALL["n_heads"])
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        losses.append(-logp[np.arange(t), window[1:]].mean())
    assert got["tokens"] == len(losses) * t
    assert got["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(got["loss"]), rel=1e-9)
    assert got["bits_per_byte"] == pytest.approx(got["loss"] / np.log(2), rel=1e-9)
    assert f"Loss {got['loss']:.4f} nats per token" in out
    open("odd.txt", "w").write("Zebra! " * 40)
    code, _, err = run_main(capsys, "eval", "--checkpoint", "r", "--data", "odd.txt")
    assert_one_error_line(code, err, "odd.txt", "char tokenizer lacks", "'Zb'")
    code, _, err = run_main(capsys, "eval", "--checkpoint", "r", "--data", "t.txt", "--json", "no/e.json")
    assert_one_error_line(code, err, "--json 'no/e.json'")
    # What --json must never overwrite: the text itself, a run's checkpoint (params.npz, or its meta.json).
    shutil.copy("t.txt", "t.json")
    kept = {path: open(path, "rb").read() for path in ("t.txt", "t.json", "r/checkpoint/params.npz",
                                                        "r/checkpoint/meta.json")}
    for data, target, said in (("t.txt", "t.txt", "ending in .json"), ("t.json", "t.json", "is the --data file"),
                               ("t.txt", "r/checkpoint/params.npz", "ending in .json"),
                               ("t.txt", "r/checkpoint/meta.json", "inside a run's checkpoint")):
        code, _, err = run_main(capsys, "eval", "--checkpoint", "r", "--data", data, "--json", target)
        assert_one_error_line(code, err, f"--json {target!r}", said)
    assert kept == {path: open(path, "rb").read() for path in kept}
    open("short.txt", "w").write("hello")
    code, _, err = run_main(capsys, "eval", "--checkpoint", "r", "--data", "short.txt")
    assert_one_error_line(code, err, "the text has 5 tokens", "at least 17")


def test_a_char_run_started_from_without_data_names_the_built_in_corpus():
    _train(text=TEXT, run_dir="words")                        # its characters: TEXT's, no '!' or 'h'
    with pytest.raises(DataError, match="the built-in corpus holds characters the run's char tokenizer lacks"):
        job.plan(job.make(init_from="words"), log=io.StringIO())


def test_a_run_started_from_an_imported_gpt2_fine_tunes_resumes_and_records_its_source(capsys):
    """--init-from (#26, part 1): a GPT-2-shaped run exported and imported back (as a
    Hugging Face GPT-2 would be) starts a new run at step 0 from exactly its parameters,
    with its tokenizer and a shorter context (the learned positions' first rows), a
    fresh optimiser; the source is recorded, and the run resumes like any other."""
    pytest.importorskip("safetensors", reason="export and import need the test extra's safetensors")
    from minitx_fn import gpt2
    gpt = {**SMALL, "positions": "learned", "tie_embeddings": True}
    _train(run_dir="mine", tokenizer="byte", model=gpt)
    gpt2.export_run("mine", "hf")
    gpt2.import_run("hf", "imported", log=io.StringIO())
    open("t.txt", "w").write(TEXT)
    plan = job.plan(job.make("t.txt", init_from="imported", model={"max_len": 8}, run_dir="tuned",
                             training={"steps": 4, "batch_size": 8, "log_every": 2, "optimizer": {"lr": 1e-3}}),
                    log=io.StringIO())
    source = checkpoint.load_model("imported")
    assert plan.model == source.model.replace(max_len=8) and plan.corpus.tokenizer == source.tokenizer
    assert int(plan.state.step) == 0 and not jax.tree.leaves(plan.state.opt_state)[1].any()       # a fresh Adam
    np.testing.assert_array_equal(plan.state.params["pos"]["table"], source.params["pos"]["table"][:8])
    np.testing.assert_array_equal(plan.state.params["embed"]["table"], source.params["embed"]["table"])
    job.run(plan, log=io.StringIO())
    tuned = checkpoint.load("tuned")
    assert tuned.origin == {"init_from": {"path": os.path.abspath("imported"),
                                          "sha256": source.meta["files"]["params.npz"]["sha256"]}}
    code, _, err = run_main(capsys, "train", "--resume", "tuned", "--steps", "6", "--max-new-tokens", "3")
    assert code == 0, err
    assert checkpoint.load("tuned").origin == tuned.origin and checkpoint.saved_step("tuned") == 6
    # What a start from another run refuses, in one line each.
    for argv, said in ((["--init-from", "imported", "--width", "64"], "--width 64 (its own: --width 32)"),
                       (["--init-from", "imported", "--context", "64"], "--context 64 (its own: --context 16)"),
                       (["--init-from", "imported", "--resume", "tuned"], "give one of them"),
                       (["--init-from", "imported", "--tokenizer", "char"], "keeps its tokenizer"),
                       (["--init-from", "nowhere"], "no run directory 'nowhere'")):
        code, _, err = run_main(capsys, "train", "--data", "t.txt", *argv, "--out", "x")
        assert_one_error_line(code, err, said)
    code, _, err = run_main(capsys, "train", "--resume", "imported", "--steps", "3")
    assert_one_error_line(code, err, "start a new run from it with --init-from imported")


def test_a_model_of_ones_own_gets_the_whole_machinery(capsys):
    """ALiBi and a parallel block (tests/variants.py, public names only) train through
    job.train into a run, resume exactly, load back (with consent: their runs name code
    of their own), decode cached (equal to recompute), decode speculatively (greedy: the
    same tokens) and fine-tune with LoRA; the command line takes them with --trust-code
    and refuses, in one line each, what has no meaning for them."""
    from tests.variants import ALiBi, Parallel
    open("t.txt", "w").write(TEXT)
    alibi, parallel = ALiBi(**SMALL), Parallel(**SMALL)
    whole = _train("t.txt", model=alibi, run_dir="alibi")
    _train("t.txt", model=alibi, run_dir="half", training={"steps": 2, "batch_size": 8, "log_every": 2,
                                                          "optimizer": {"decay_steps": 4}})   # the schedule of 4
    with pytest.raises(CheckpointError, match="'tests.variants:ALiBi', code of its own.*trust_code=True"):
        _train(resume="half", model=None, training={"steps": 4})
    resumed = _train(resume="half", model=None, training={"steps": 4}, trust_code=True)
    jax.tree.map(np.testing.assert_array_equal, resumed.state, whole.state)       # resume = uninterrupted
    assert checkpoint.read_job("alibi", trust_code=True).model == whole.model == alibi.replace(vocab_size=15)

    loaded = checkpoint.load_model("alibi", trust_code=True)
    assert type(loaded.model) is ALiBi
    prompts = [loaded.tokenizer.encode(p) for p in ("to be", "or not to")]
    ids, logits = generate.generate(loaded.params, prompts, model=loaded.model, max_new_tokens=20, return_logits=True)
    ref_ids, ref_logits = generate.generate_recompute(loaded.params, prompts, model=loaded.model, max_new_tokens=20)
    for b in range(2):
        np.testing.assert_array_equal(ids[b], ref_ids[b])
        np.testing.assert_allclose(logits[b], ref_logits[b], atol=2e-4 * np.abs(ref_logits[b]).max())
    _train("t.txt", model=parallel, run_dir="parallel")
    draft = checkpoint.load_model("parallel", trust_code=True)
    drafted = generate.generate(loaded.params, prompts, model=loaded.model, max_new_tokens=20, draft=draft)
    jax.tree.map(np.testing.assert_array_equal, drafted, ids)                     # greedy: the draft changes nothing

    tuned = _train("t.txt", init_from="alibi", trust_code=True, run_dir="lora",
                   training={"steps": 2, "batch_size": 8, "log_every": 2, "lora": {"rank": 2, "targets": "all"}},
                   model=None)
    assert tuned.base is not None and type(tuned.model) is ALiBi
    jax.tree.map(np.testing.assert_allclose, checkpoint.load_model("lora", trust_code=True).params, tuned.params)

    for argv, said in ((["generate", "--checkpoint", "alibi", "--prompt", "to"], "--trust-code"),
                       (["export-hf", "alibi", "--out", "hf", "--trust-code"], "no Hugging Face mapping"),
                       (["attention", "--checkpoint", "alibi", "--prompt", "to", "--out", "a.png", "--trust-code"],
                        "has blocks of its own")):
        code, _, err = run_main(capsys, *argv)
        assert_one_error_line(code, err, "tests.variants:ALiBi", said)
    assert not os.path.exists("hf") and not os.path.exists("a.png")
    code, out, err = run_main(capsys, "generate", "--checkpoint", "alibi", "--prompt", "to", "--trust-code",
                              "--max-new-tokens", "5", "--draft", "parallel")
    assert code == 0 and out.startswith("to"), err


def test_models_of_ones_own_that_a_run_could_not_hold_are_one_line_before_training(capsys, monkeypatch):
    """What a hostile reviewer of #36 trained for nothing, or saw fail deep inside: a
    field JSON cannot hold, apply of the wrong shape, a from-scratch model given a
    field it lacks, lora_paths naming what is not there, a resume naming another class,
    the job's functions given each other's values; a model defined in the running script
    is noted, as only that script can load its run. Nested dataclasses and tuples are
    fields a run holds."""
    from tests.variants import Bigram, Parallel
    open("t.txt", "w").write(TEXT)
    with pytest.raises(CheckpointError, match="tests.test_job:Infinite' has a field JSON cannot hold"):
        job.make("t.txt", model=Infinite(**SMALL))
    with pytest.raises(ConfigError, match=r"tests.test_job:Narrow breaks the model contract: apply gives "
                                          r"\(2, 3, 14\) float32, not \(2, 3, V=15\)"):
        job.plan(job.make("t.txt", model=Narrow(**SMALL)), log=io.StringIO())
    inline = dataclasses.make_dataclass("Inline", [], bases=(Parallel,), frozen=True, kw_only=True,
                                        namespace={"__module__": "__main__"})     # as in a script of its own
    monkeypatch.setattr(sys.modules["__main__"], "Inline", inline, raising=False)
    said = io.StringIO()
    job.plan(job.make("t.txt", model=inline(**SMALL)), log=said)
    assert "the model __main__:Inline is defined in the script that runs" in said.getvalue()
    nested = _train("t.txt", model=Nested(**SMALL, window=Window(size=3), heads_seen=(2,)), run_dir="nested")
    assert checkpoint.load_model("nested", trust_code=True).model == nested.model          # back from JSON
    with pytest.raises(ConfigError, match=r"lora_paths names \['blocks/attn/qvk'\], which its parameters do not"):
        _train("t.txt", init_from="nested", trust_code=True, model=None, run_dir="n-lora",
               training={"steps": 2, "batch_size": 8, "lora": {"rank": 2}})
    scratch = _train("t.txt", model=Bigram(max_len=16), run_dir="bigram")                 # a LanguageModel from scratch
    assert len(generate.complete(scratch, "to be", max_new_tokens=5)) == 5
    with pytest.raises(ConfigError, match=r"the model has no settings \['dropout'\]"):
        job.make("t.txt", init_from="bigram", trust_code=True, model={"dropout": 0.1})
    with pytest.raises(ConfigError, match="lora.targets='attn' finds no matrices LoRA may adapt in tests.variants:"
                                          "Bigram"):
        job.plan(job.make("t.txt", init_from="bigram", trust_code=True, run_dir="b-lora",
                          training={"steps": 2, "lora": {"rank": 1}}), log=io.StringIO())
    _train("t.txt", run_dir="gpt")
    with pytest.raises(ConfigError, match="model='tests.variants:Parallel' \\(saved: model='minitx_fn.config:"
                                          "ModelConfig'\\)"):
        _train(resume="gpt", model=Parallel(**SMALL), training={"steps": 6})
    with pytest.raises(ConfigError, match="run takes a job.Plan"):
        job.run(job.make("t.txt"))
    with pytest.raises(ConfigError, match=r"Job has no fields \['bogus'\]"):
        job.make("t.txt").replace(bogus=1)
    with pytest.raises(ConfigError, match="model='tiny' must be a dict of fields or a LanguageModel"):
        job.make("t.txt", model="tiny")
