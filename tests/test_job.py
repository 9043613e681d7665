"""The whole job from Python (`minitx_fn.job`): settings made into a checked job
(`make`), planned (`plan`: the data, the state, nothing written) and run (`run`,
`train`); what a new run or a resume refuses, before any data is prepared; a resume
on its own text only; failures while training (a full or read-only disk, a picture
that cannot be written, a non-finite loss) that keep the last good checkpoint;
`evaluate`; and models of one's own through the whole machinery."""

from __future__ import annotations

import dataclasses
import io
import os
import sys

import jax
import numpy as np
import pytest

from minitx_fn import checkpoint, corpus, generate, job, quantize, runs, speculative
from minitx_fn.config import ModelConfig
from minitx_fn.errors import CheckpointError, ConfigError, DataError, MemoryBudgetError, RunDirError
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
    settings.setdefault("log", io.StringIO())
    return job.train(*args, **settings)


def test_a_run_trained_from_python_on_text_resumes_on_that_text_only():
    """A text given in memory is recorded as such (its SHA-256, no path): resuming asks
    for it again and refuses another. (A run saved from Python without data= used to be
    recorded as the built-in corpus and resumed on `hello world!` without a word.)"""
    first = _train(text=TEXT, run_dir="mem")
    assert first.records[-1]["step"] == 4 and "val_loss" in first.records[-1]
    saved = checkpoint.load("mem").data
    assert saved["path"] is None and saved == corpus.Corpus.from_text(TEXT).source
    with pytest.raises(DataError, match="a text or ids given in memory.*give the same again"):
        _train(resume="mem", training={"steps": 6})
    with pytest.raises(DataError, match="not what this run trained on"):
        _train(text=TEXT + "to be", resume="mem", training={"steps": 6})
    again = _train(text=TEXT, resume="mem", training={"steps": 6})
    assert int(again.state.step) == 6 and [r["step"] for r in again.records] == [2, 4, 6]


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


def test_a_run_trained_on_text_resumes_from_a_file_holding_that_text():
    """As the command line must, where no text= exists: a file whose bytes are the text
    (the same SHA-256) resumes it, and is recorded from then on; another file is refused."""
    _train(text=TEXT, run_dir="mem")
    open("same.txt", "w").write(TEXT)
    open("other.txt", "w").write(TEXT + "to be")
    with pytest.raises(DataError, match="not what this run trained on"):
        _train("other.txt", resume="mem", training={"steps": 6})
    _train("same.txt", resume="mem", training={"steps": 6})
    assert checkpoint.load("mem").data["path"] == os.path.abspath("same.txt")           # recorded from now on


def test_bad_settings_are_refused_before_the_data_is_prepared():
    """A new run's model, training, adapter and device settings are checked before its
    text is read and tokenized (which takes minutes for a large corpus), and so is a
    resume's steps: no prepared data in the cache."""
    from minitx_fn.errors import Error
    _train(text=TEXT, run_dir="mem")
    open("t.txt", "w").write(TEXT)
    for settings, said in [({"model": {"n_heads": 3}}, "n_heads=3"),
                           ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "n_kv_heads=3"),
                           ({"training": {"optimizer": {"lr": 0.0}}}, "lr=0.0"),
                           ({"training": {"batch_size": 6, "grad_accum": 4}}, "grad_accum=4"),
                           ({"training": {"lora": {"rank": 4}}}, "init_from"), ({"devices": 7}, "devices=7"),
                           ({"init_from": "mem", "training": {"lora": {"rank": 100000}}}, "lora.rank=100000"),
                           ({"init_from": "mem", "training": {"lora": {"alpha": 3.0}}}, "lora needs lora.rank")]:
        with pytest.raises(Error, match=said.replace("(", r"\(")):
            job.train("t.txt", cache_dir="cache", log=io.StringIO(), **settings)
        assert not os.path.exists("cache"), settings
    for settings, said in [({"training": {"steps": 2}}, "steps=5"), ({"devices": 7, "training": {"steps": 9}},
                                                                      "devices=7")]:
        with pytest.raises(Error, match=said):
            job.train("t.txt", resume="mem", cache_dir="cache", log=io.StringIO(), **settings)
        assert not os.path.exists("cache"), settings


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


def test_eval_is_the_mean_loss_the_numpy_model_gives_every_window_of_the_text():
    """`job.evaluate` on a whole file: the loss equals the NumPy model's mean next-token
    loss over the windows of the text (written from the formulas, not from the
    library), perplexity is its exponential, and bits per byte is the loss in bits over
    the bytes predicted (one per character of an ASCII text). A text the run's
    tokenizer cannot read, or shorter than a window, is refused naming it."""
    from tests import numpy_model
    result = _train(run_dir="r", training={"steps": 30, "batch_size": 8, "log_every": 10})
    text = "hello jax! hello world! hello flax! " * 12
    open("t.txt", "w").write(text)
    got = job.evaluate("r", "t.txt", log=io.StringIO())
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
    assert got.tokens == len(losses) * t
    assert got.loss == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert got.perplexity == pytest.approx(np.exp(got.loss), rel=1e-9)
    assert got.bits_per_byte == pytest.approx(got.loss / np.log(2), rel=1e-9)
    # Quantized: the loss is the NumPy model's under the dequantized weights, the float
    # loss and the KL divergence per token are the NumPy model's too.
    quantized = job.evaluate("r", "t.txt", quantize="int8", log=io.StringIO())
    coarse = numpy_model.to_float64(jax.device_get(quantize.dequantize(quantize.quantize(result.params))))
    q_losses, kls = [], []
    for start in range(0, len(ids) - t, t):
        window = ids[start:start + t + 1]
        logq, logp = (_log_softmax(numpy_model.logits(tree, window[:-1].tolist(), n_heads=SMALL["n_heads"]))
                      for tree in (coarse, host))
        q_losses.append(-logq[np.arange(t), window[1:]].mean())
        kls.append((np.exp(logp) * (logp - logq)).sum(-1).mean())
    assert quantized.loss == pytest.approx(float(np.mean(q_losses)), rel=1e-5)
    stood = quantized.quantized
    assert stood["float_loss"] == pytest.approx(got.loss, rel=1e-6)
    assert stood["kl"] == pytest.approx(float(np.mean(kls)), rel=1e-3, abs=1e-7)
    assert stood["loss_rise"] == pytest.approx(quantized.loss / got.loss - 1, rel=1e-9)
    assert stood["greedy_tokens"] == t - 1 and 0 <= stood["greedy_equal"] <= t - 1
    assert stood["weight_bytes"] < stood["float_weight_bytes"] / 2 and got.quantized is None
    with pytest.raises(ConfigError, match="quantize='int4' is not a kind of quantization"):
        job.evaluate("r", "t.txt", quantize="int4", log=io.StringIO())
    open("odd.txt", "w").write("Zebra! " * 40)
    with pytest.raises(DataError, match="odd.txt.*char tokenizer lacks.*'Zb'"):
        job.evaluate("r", "odd.txt", log=io.StringIO())
    open("short.txt", "w").write("hello")
    with pytest.raises(DataError, match="the text has 5 tokens.*at least 17"):
        job.evaluate("r", "short.txt", log=io.StringIO())


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_a_char_run_started_from_without_data_names_the_built_in_corpus():
    _train(text=TEXT, run_dir="words")                        # its characters: TEXT's, no '!' or 'h'
    with pytest.raises(DataError, match="the built-in corpus holds characters the run's char tokenizer lacks"):
        job.plan(job.make(init_from="words"), log=io.StringIO())


def test_a_run_started_from_an_imported_gpt2_fine_tunes_resumes_and_records_its_source():
    """--init-from (#26, part 1): a GPT-2-shaped run exported and imported back (as a
    Hugging Face GPT-2 would be) starts a new run at step 0 from exactly its parameters,
    with its tokenizer and a shorter context (the learned positions' first rows), a
    fresh optimiser; the source is recorded, and the run resumes like any other."""
    pytest.importorskip("safetensors", reason="export and import need the test extra's safetensors")
    from minitx_fn import hf
    gpt = {**SMALL, "positions": "learned", "tie_embeddings": True}
    _train(run_dir="mine", tokenizer="byte", model=gpt)
    hf.export_run("mine", "hf")
    hf.import_run("hf", "imported", log=io.StringIO())
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
    _train("t.txt", resume="tuned", training={"steps": 6}, model=None)
    assert checkpoint.load("tuned").origin == tuned.origin and checkpoint.saved_step("tuned") == 6
    # What a start from another run refuses, naming the settings.
    from minitx_fn.errors import Error
    for settings, said in (({"model": {"d_model": 64}}, r"d_model=64 \(its own: d_model=32\)"),
                           ({"model": {"max_len": 64}}, r"max_len=64 \(its own: max_len=16\)"),
                           ({"resume": "tuned"}, "give one of them"), ({"tokenizer": "char"}, "keeps its tokenizer"),
                           ({"init_from": "nowhere"}, "no run directory 'nowhere'")):
        with pytest.raises(Error, match=said):
            job.make("t.txt", **{"init_from": "imported", "run_dir": "x", **settings})
    with pytest.raises(Error, match="start a new run from it with init_from='imported'"):
        job.make(resume="imported", training={"steps": 3})


def test_a_muon_run_resumes_exactly():
    """Law: resume equals an uninterrupted run, under Muon too (its momentum, Adam's
    moments for the rest and the Newton-Schulz coefficients are in the checkpoint)."""
    open("t.txt", "w").write(TEXT)
    muon = {"steps": 4, "batch_size": 8, "log_every": 2, "optimizer": {"method": "muon", "decay_steps": 4}}
    whole = _train("t.txt", run_dir="whole", training=muon)
    _train("t.txt", run_dir="half", training={**muon, "steps": 2})
    resumed = _train(resume="half", model=None, training={"steps": 4})
    jax.tree.map(np.testing.assert_array_equal, resumed.state, whole.state)
    assert resumed.train_config.optimizer.method == "muon"


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
    ref_ids, ref_logits = generate.generate_recompute(loaded.params, prompts, model=loaded.model, max_new_tokens=20,
                                                      return_logits=True)
    for b in range(2):
        np.testing.assert_array_equal(ids[b], ref_ids[b])
        np.testing.assert_allclose(logits[b], ref_logits[b], atol=2e-4 * np.abs(ref_logits[b]).max())
    _train("t.txt", model=parallel, run_dir="parallel")
    draft = checkpoint.load_model("parallel", trust_code=True)
    drafted = speculative.speculate(loaded.params, prompts, model=loaded.model, max_new_tokens=20, draft=draft,
                                    draft_tokens=4).tokens
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


# ----------------------------------------------------------------------------- the data a run trains on


def test_memory_mapped_training_equals_device_training_and_resumes_exactly_on_the_same_text():
    """Batches gathered on the host from the memory-mapped tokens (`batches="memmap"`) are
    the device's, bit for bit: the same losses, and validation losses, through a resume.
    Resuming on an edited text is refused after one SHA-256, before any encoding."""
    text = "First Citizen: héllo, wörld! 😀 Before we proceed any further, hear me speak.\n" * 40
    open("t.txt", "w", encoding="utf-8").write(text)
    training = {"log_every": 1, "eval_every": 3, "batch_size": 8, "optimizer": {"decay_steps": 6, "warmup": 2}}
    log = io.StringIO()
    device = _train("t.txt", run_dir="device", batches="device", training={**training, "steps": 6}, log=log)
    assert "sampled on the device" in log.getvalue()
    log = io.StringIO()
    _train("t.txt", run_dir="mapped", batches="memmap", training={**training, "steps": 3}, log=log)
    assert "memory-mapped" in log.getvalue() and "prepared before" in log.getvalue()
    mapped = _train(resume="mapped", training={"steps": 6}, model=None)
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in mapped.records] == \
        [(r["step"], r["loss"], r.get("val_loss")) for r in device.records]
    open("t.txt", "a").write("an edit")
    log = io.StringIO()
    with pytest.raises(DataError, match="changed since the run trained on it"):
        _train(resume="mapped", training={"steps": 9}, model=None, log=log)
    assert "Data: prepared" not in log.getvalue()


# ----------------------------------------------------------------------------- what a run refuses


def test_a_new_run_refuses_settings_it_cannot_honour_before_anything_is_written():
    """Validation without a held-out part, a prompt the tokenizer cannot encode (unknown
    characters, or not UTF-8), a run directory that cannot be made: each before training."""
    from minitx_fn.errors import Error, RunDirError
    for name, value in (("eval_every", 5), ("eval_tokens", "all")):
        with pytest.raises(ConfigError, match=f"{name}=.* needs data with a held-out part"):
            job.make(training={name: value})
    for prompt, said in (("Zebra", "not in the vocabulary: 'Zb'"), ("h\udcff", "not in the vocabulary")):
        with pytest.raises(Error, match=said):
            job.plan(job.make(model=SMALL, run_dir="p", prompt=prompt), log=io.StringIO())
    with pytest.raises(RunDirError, match="cannot create"):
        _train(run_dir="/proc/minitx-test/r")
    assert not os.path.exists("p") and not os.path.exists("runs")


def test_a_resume_refuses_what_the_saved_run_does_not_allow(work):
    """A resume is the saved job: another model or preset, a step it has reached, data for
    a run of the built-in corpus, a data file that is gone, edited or another text, a
    run directory beside it: each refused naming the setting, and the run is unchanged."""
    from minitx_fn.errors import Error, RunDirError
    from tests.helpers import Snapshot
    builtin, text = Snapshot("builtin"), Snapshot("text")
    for settings, said in (({"model": {"d_model": 64}}, r"d_model=64 \(saved: d_model=32\)"),
                           ({"model": {"positions": "rotary"}}, r"positions='rotary' \(saved: positions='sinusoidal'\)"),
                           ({"preset": "hello"}, "preset='hello'"),
                           ({"training": {"steps": 20}}, "already at step 20"),
                           ({"tokenizer": "byte"}, "resuming keeps the run's tokenizer"),
                           ({"run_dir": "x"}, "continues a run in its own directory")):
        with pytest.raises((ConfigError, RunDirError), match=said):
            job.make(resume="builtin", **settings)
    with pytest.raises(DataError, match="trained on the built-in corpus; drop"):
        job.plan(job.make("text.txt", resume="builtin", training={"steps": 30}), log=io.StringIO())
    open("other.txt", "w").write("to be " * 200)
    with pytest.raises(DataError, match="is not the text this run trained on"):
        job.plan(job.make("other.txt", resume="text", training={"steps": 30}), log=io.StringIO())
    open("text.txt", "a").write(" more")
    with pytest.raises(DataError, match="changed since the run trained on it"):
        job.plan(job.make(resume="text", training={"steps": 30}), log=io.StringIO())
    os.rename("text.txt", "moved.txt")
    with pytest.raises(Error, match="is gone; if it moved"):
        job.plan(job.make(resume="text", training={"steps": 30}), log=io.StringIO())
    builtin.assert_unchanged()
    text.assert_unchanged()


def test_moved_data_with_the_same_text_resumes_and_records_where_it_is_now(work):
    os.rename("text.txt", "moved.txt")
    _train("moved.txt", resume="text", training={"steps": 30}, model=None)
    assert checkpoint.load("text").data["path"] == os.path.abspath("moved.txt")


def test_a_resume_clears_what_a_killed_process_left(work):
    """A killed save's temporary folder, a half-written metrics line, a lock of a process
    that is gone: removed, dropped, taken over, and said so."""
    import socket
    import subprocess
    os.mkdir("builtin/" + runs.TEMPORARY_PREFIX + "killed")
    open("builtin/metrics.jsonl", "a").write('{"step": 25, "lo')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    open("builtin/" + runs.LOCK, "w").write(f"{dead.pid} {socket.gethostname()}\n")
    log = io.StringIO()
    _train(resume="builtin", training={"steps": 30}, model=None, log=log)
    said = log.getvalue()
    assert "Removed 1 unfinished checkpoint" in said and "half-written line" in said
    assert f"Took over the lock of process {dead.pid}" in said
    assert [r["step"] for r in runs.read_records("builtin/metrics.jsonl").records] == [10, 20, 30]
    assert sorted(n for n in os.listdir("builtin") if not n.endswith(".png")) == ["checkpoint", "metrics.jsonl"]


# ----------------------------------------------------------------------------- failures while training


def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(work, monkeypatch):
    """The disk fails at the seam where a checkpoint's files are synced (os.fsync): the run
    stops with RunFailed naming the checkpoint that stands (step 20), leaves no temporary
    folder, and continues once the disk is back. (A real full disk, a tmpfs: test_checkpoint.py.)"""
    import errno

    from minitx_fn.errors import RunFailed
    from tests.helpers import Snapshot, fail_fsync
    intact = Snapshot("builtin")
    with monkeypatch.context() as patched:
        fail_fsync(patched, errno.ENOSPC, where=lambda path: runs.TEMPORARY_PREFIX in path)
        with pytest.raises(RunFailed, match=r"No space left on device.*last good checkpoint \(step 20\)"):
            _train(resume="builtin", training={"steps": 40}, model=None)
    intact.assert_unchanged()
    assert not [n for n in os.listdir("builtin") if n.startswith(runs.TEMPORARY_PREFIX)]
    assert _train(resume="builtin", training={"steps": 40}, model=None).state.step == 40      # and it continues


def test_a_read_only_metrics_log_stops_the_run_cleanly(work, monkeypatch):
    import errno

    from minitx_fn.errors import RunFailed
    from tests.helpers import Snapshot, fail_fsync
    intact = Snapshot("builtin")
    fail_fsync(monkeypatch, errno.EROFS, where=lambda path: path.endswith(runs.METRICS))
    with pytest.raises(RunFailed, match="metrics.jsonl.*Read-only file system"):
        _train(resume="builtin", training={"steps": 40}, model=None)
    intact.assert_unchanged()


def test_a_picture_that_cannot_be_written_after_training_keeps_the_run(work, monkeypatch):
    import errno

    from minitx_fn import plot
    from minitx_fn.errors import RunFailed

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot, "plot_losses", full)
    with pytest.raises(RunFailed, match="loss.png.*No space left.*the checkpoint is saved"):
        _train(resume="builtin", training={"steps": 30}, model=None)
    assert checkpoint.load("builtin").meta["step"] == 30


def test_a_nan_loss_keeps_a_finite_checkpoint():
    """lr 1e30: the loss turns non-finite; RunFailed names the step and the checkpoint
    before it, which loads (its arrays finite, its checksums whole)."""
    from minitx_fn.errors import RunFailed
    with pytest.raises(RunFailed, match="became non-finite at step") as info:
        _train(run_dir="nan", training={"steps": 300, "batch_size": 8, "save_every": 1, "log_every": 1,
                                        "optimizer": {"lr": 1e30, "warmup": 0}})
    bad = int(str(info.value).split("at step ")[1].split(";")[0])
    if "no checkpoint had been saved" not in str(info.value):
        assert f"(step {bad - 1})" in str(info.value)
        assert checkpoint.load("nan").meta["step"] == bad - 1


def test_a_lora_run_needs_its_base_at_rest_however_the_base_is_named(work):
    """A LoRA run's adapters apply to its base as saved: while the base is being trained
    (its lock held by a live process), a new LoRA run on it is refused, whether it is
    named as the run or its checkpoint folder, and so is resuming one (the base's next
    save would change what the adapters apply to)."""
    import shutil
    import socket
    lora = {"steps": 2, "batch_size": 8, "log_every": 2, "lora": {"rank": 2}}
    _train(init_from="builtin/checkpoint", run_dir="tuned", model=None, training=lora)
    assert checkpoint.read_job("tuned").origin["init_from"]["path"] == os.path.abspath("builtin")   # the run, once
    lock = os.path.join("builtin", runs.LOCK)
    with open(lock, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")                # a live process trains the base
    os.symlink(os.path.abspath("builtin/checkpoint"), "link")            # a link to the checkpoint folder
    for base in ("builtin", "builtin/checkpoint", os.path.abspath("builtin/checkpoint"), "link"):
        with pytest.raises(RunDirError, match="is being trained"):
            job.make(init_from=base, run_dir="again", training=lora)
    with pytest.raises(RunDirError, match="is being trained"):
        job.make(resume="tuned", training={"steps": 4})
    os.remove(lock)
    shutil.rmtree("tuned")


def test_a_lora_chain_that_could_not_load_is_refused_before_it_trains(work):
    """load_model follows at most MAX_BASES - 1 LoRA runs down to a base of its own: a
    LoRA run that would make the chain one deeper is refused at the start, and one
    that keeps it within the limit is made (the chain here is copies of one LoRA run,
    each recording the one before as its base)."""
    import json
    import shutil
    _train(init_from="builtin", run_dir="c0", model=None,
           training={"steps": 2, "batch_size": 8, "log_every": 2, "lora": {"rank": 2}})
    for k in range(1, checkpoint.MAX_BASES - 1):
        shutil.copytree(f"c{k - 1}", f"c{k}")
        meta_path = os.path.join(f"c{k}", "checkpoint", "meta.json")
        meta = json.load(open(meta_path))
        meta["origin"]["init_from"]["path"] = os.path.abspath(f"c{k - 1}")
        json.dump(meta, open(meta_path, "w"))
    deepest = f"c{checkpoint.MAX_BASES - 2}"
    assert checkpoint.lora_depth(deepest) == checkpoint.MAX_BASES - 1
    lora = {"steps": 4, "batch_size": 8, "lora": {"rank": 2}}
    job.make(init_from=f"c{checkpoint.MAX_BASES - 3}", run_dir="fits", training=lora)
    with pytest.raises(ConfigError, match=f"a chain of {checkpoint.MAX_BASES}, and at most "
                                          f"{checkpoint.MAX_BASES - 1} load"):
        job.make(init_from=deepest, run_dir="deeper", training=lora)
    job.make(init_from=deepest, run_dir="merged", training={"steps": 4, "batch_size": 8})   # in full: it merges


def test_a_batch_too_large_for_memory_names_the_micro_batches_that_would_fit(monkeypatch):
    """The refusal names the smallest grad_accum (a divisor of the batch) whose
    micro-batches fit, and none when grad_accum is already the batch size."""
    from minitx_fn import memory
    open("t.txt", "w").write("to be or not to be, that is the question. " * 40)
    model = ModelConfig(vocab_size=None, **SMALL)
    budget = memory.training_bytes(model.replace(vocab_size=20), 4096, None, 64)     # 64 micro-batches fit
    monkeypatch.setattr(memory, "available_bytes", lambda: budget)
    fits = next(k for k in range(1, 4097) if 4096 % k == 0
                and memory.training_bytes(model.replace(vocab_size=20), 4096, None, k) <= budget)
    plan = lambda accum: job.plan(job.make("t.txt", model=SMALL, run_dir=f"r{accum}", sample_tokens=0,  # noqa: E731
                                           training={"steps": 2, "batch_size": 4096, "grad_accum": accum}),
                                  log=io.StringIO())
    with pytest.raises(MemoryBudgetError, match=rf"or grad_accum={fits} \(micro-batches of {4096 // fits}\)"):
        plan(1)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    with pytest.raises(MemoryBudgetError) as refused:
        plan(4096)
    assert "grad_accum" not in str(refused.value) and "try a smaller batch_size=4096" in str(refused.value)


def test_a_run_started_from_another_refuses_what_it_would_silently_drop(work):
    """init_from keeps the run's vocabulary (its tokenizer's): another vocab_size is
    refused, not ignored; a text= with characters the run's char tokenizer lacks is
    refused naming the text, as a data file would be named."""
    with pytest.raises(ConfigError, match="vocab_size=99 is not the vocabulary of the run it starts from"):
        job.make(init_from="builtin", model={"vocab_size": 99}, run_dir="v")
    with pytest.raises(DataError, match="the text given .text='Zebra'. holds characters the run's char tokenizer "
                                        "lacks: 2 character.s. not in the vocabulary: 'Zb'"):
        job.plan(job.make(text="Zebra", init_from="builtin", run_dir="z", training={"steps": 2}), log=io.StringIO())


def test_the_evaluation_batch_is_sized_once_a_run(monkeypatch):
    """Validation during training uses one batch size for the whole run, sized from
    memory at the start: sized at each evaluation, it would follow the memory free and
    compile the loss again whenever that moved."""
    from minitx_fn import memory
    sized = []
    real = memory.evaluation_batch
    monkeypatch.setattr(memory, "evaluation_batch", lambda *a, **k: sized.append(a) or real(*a, **k))
    open("t.txt", "w").write("to be or not to be, that is the question. " * 40)
    result = _train("t.txt", training={"steps": 6, "batch_size": 8, "log_every": 2, "eval_every": 2})
    assert len([r for r in result.records if "val_loss" in r]) == 3 and len(sized) == 1
