"""The `minitx` command (`minitx_fn.cli`) as a user meets it: flags parsed and checked
as they are read, each class of error as one line `minitx: error: ...` with its exit
status, the commands end to end (train, resume, generate, eval's --json, attention,
plot, data, prepare, upgrade), signals at any moment, and fuzzed flags. The checks
behind each error live in the unit tests of their modules (config, job, corpus, data,
checkpoint, runs, plot, distributed, generate); this module holds one case of each
class, for how the command line renders it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitx_fn import checkpoint, cli, data, generate, job, plot, runs
from minitx_fn.cli import UsageError, build_parser
from minitx_fn.defaults import PRESETS
from tests.helpers import (RUN, TINY, Snapshot, assert_one_error_line, fail_fsync, legacy_meta, run_main,
                           standard_promotion, user_env)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def hello_run(tmp_path_factory):
    """A TINY run on the built-in corpus, trained once for the module."""
    root = tmp_path_factory.mktemp("hello")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from tests.helpers import standard_promotion
        from minitx_fn.cli import main
        with standard_promotion():
            assert main(["train", *TINY, "--steps", "300", "--out", "r"]) == 0
    finally:
        os.chdir(cwd)
    return root / "r"


@pytest.mark.heavy
def test_main_job_on_the_builtin_corpus():
    """`minitx train` with no arguments: the README's first command, in a process of
    its own with the user's XLA flags (not the suite's compile-fast ones)."""
    done = subprocess.run([sys.executable, "-m", "minitx_fn", "train"], capture_output=True, text=True,
                          env=user_env(), timeout=600)
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err
    assert "Starting training..." in out
    steps = [line for line in out.splitlines() if line.startswith("Step ")]
    assert [s.split(",")[0] for s in steps] == [f"Step {n}" for n in range(100, 501, 100)]
    assert all(len(s.split("Loss: ")[1]) == 6 for s in steps)                  # X.XXXX
    generated = out.split("Generated text:\n")[1].splitlines()[0]
    assert generated.startswith("hello") and len(generated) == len("hello") + 100
    # Seed plus continuation is a piece of the corpus cycle.
    assert generated in data.BUILTIN_CORPUS * 5
    records = runs.read_records("runs/hello-001/metrics.jsonl").records
    assert [r["step"] for r in records] == [100, 200, 300, 400, 500] and records[-1]["loss"] < 0.2
    # What to do next, with the real run directory filled in.
    assert "minitx generate --checkpoint runs/hello-001 --prompt hello" in out
    assert "minitx plot runs/hello-001" in out and "minitx attention --checkpoint runs/hello-001" in out
    assert int(checkpoint.load("runs/hello-001").meta["step"]) == 500
    assert not os.path.exists("runs/hello-001/.lock")


def test_resumed_run_logs_the_same_losses_bit_for_bit(capsys):
    common = [*TINY, "--decay-steps", "60", "--log-every", "15", "--save-every", "30"]
    assert run_main(capsys, "train", *common, "--steps", "60", "--out", "a")[0] == 0
    assert run_main(capsys, "train", *common, "--steps", "30", "--out", "b")[0] == 0
    code, out, err = run_main(capsys, "train", "--resume", "b", "--steps", "60")
    assert code == 0, err
    assert "Resuming b from step 30" in out
    losses = [[(r["step"], r["loss"]) for r in runs.read_records(f"{d}/metrics.jsonl").records] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (checkpoint.load(d).state.params for d in "ab")
    np.testing.assert_array_equal(a["head"]["w"], b["head"]["w"])


def test_a_run_saved_in_format_3_resumes_and_is_saved_in_the_current_format(capsys):
    """Runs saved before learned positions, tied heads and imports (format 3) go on once
    `minitx upgrade` has rewritten them."""
    import json
    assert run_main(capsys, "train", *TINY, "--steps", "2", "--out", "old")[0] == 0
    meta = legacy_meta(json.load(open("old/checkpoint/meta.json")), 3)
    meta["data"] = None                                      # format 3 wrote null for the built-in corpus
    del meta["origin"], meta["model_config"]["positions"], meta["model_config"]["tie_embeddings"]
    json.dump(meta, open("old/checkpoint/meta.json", "w"))
    code, _, err = run_main(capsys, "train", "--resume", "old", "--steps", "3")
    assert_one_error_line(code, err, "format version 3 is older than this minitx_fn reads", "minitx upgrade RUN")
    code, out, err = run_main(capsys, "upgrade", "old")
    assert code == 0 and "from format 3 to format 9" in out, err
    code, out, err = run_main(capsys, "train", "--resume", "old", "--steps", "3")
    assert code == 0, err
    meta = json.load(open("old/checkpoint/meta.json"))
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 9 and meta["job"]["data"] == {"builtin": True}


def test_arch_llama_trains_resumes_and_generates(capsys):
    """--arch llama with a single flag over it (--kv-heads): the run records Llama's
    choices, resumes, generates; a resume with another --arch names the fields it
    would change, as flags."""
    common = [*TINY, "--arch", "llama", "--kv-heads", "1", "--save-every", "4", "--log-every", "4"]
    code, out, err = run_main(capsys, "train", *common, "--steps", "4", "--out", "ll", "--max-new-tokens", "5")
    assert code == 0, err
    mc = checkpoint.load("ll").model
    assert (mc.positions, mc.norm, mc.mlp, mc.bias, mc.n_kv_heads, mc.tie_embeddings) == (
        "rotary", "rmsnorm", "swiglu", False, 1, False)
    code, _, err = run_main(capsys, "train", "--resume", "ll", "--steps", "8")
    assert code == 0, err
    code, out, _ = run_main(capsys, "generate", "--checkpoint", "ll", "--prompt", "hello", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("hello")
    assert int(checkpoint.load("ll").state.step) == 8
    code, _, err = run_main(capsys, "train", "--resume", "ll", "--steps", "9", "--arch", "gpt")
    assert_one_error_line(code, err, "--positions sinusoidal (saved: --positions rotary)")


def test_generate_command(capsys, hello_run):
    code, out, _ = run_main(capsys, "generate", "--checkpoint", hello_run, "--prompt", "hello", "--max-new-tokens", "20")
    assert code == 0 and out.startswith("hello") and len(out.strip()) == 25
    code, out, _ = run_main(capsys, "generate", "--checkpoint", hello_run, "--prompt", "hel", "--temperature", "0.8",
                            "--top-k", "3", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "30", "--stop", "!")
    assert code == 0 and out.strip().endswith("!") and out.count("!") == 1


def test_generate_and_eval_from_quantized_weights(capsys, hello_run):
    """--quantize: generate prints the text `complete` makes from the quantized run;
    eval prints and writes how the quantized weights stand to the float ones (its figures
    against a NumPy model: test_job.py); a kind it does not know is one line."""
    from minitx_fn import generate, quantize
    argv = ["generate", "--checkpoint", str(hello_run), "--prompt", "hello", "--max-new-tokens", "20"]
    code, out, err = run_main(capsys, *argv, "--quantize", "int8")
    quantized = quantize.quantized(checkpoint.load_model(hello_run))
    assert code == 0, err
    assert out == "hello" + generate.complete(quantized, "hello", max_new_tokens=20) + "\n"
    open("h.txt", "w").write("hello world! hello jax! hello flax! " * 20)
    code, out, err = run_main(capsys, "eval", "--checkpoint", str(hello_run), "--data", "h.txt", "--quantize",
                              "bfloat16", "--json", "q.json")
    assert code == 0, err
    got = json.load(open("q.json"))["quantized"]
    assert got["to"] == "bfloat16" and f"loss {100 * got['loss_rise']:+.3f}% against" in out
    for command in (argv, ["eval", "--checkpoint", str(hello_run), "--data", "h.txt"]):
        code, _, err = run_main(capsys, *command, "--quantize", "int4")
        assert_one_error_line(code, err, "--quantize", "int4")


def test_generate_with_a_draft(capsys, hello_run):
    """The run as its own draft: the same greedy text. --draft-tokens needs --draft, and a
    draft that cannot be loaded is named as the draft (what a draft must be:
    test_speculative.py)."""
    argv = ["generate", "--checkpoint", str(hello_run), "--prompt", "hello", "--max-new-tokens", "20"]
    code, plain, _ = run_main(capsys, *argv)
    code_draft, drafted, _ = run_main(capsys, *argv, "--draft", str(hello_run), "--draft-tokens", "3")
    assert code == code_draft == 0 and drafted == plain
    from minitx_fn import generate                    # from Python the draft may be the run's directory
    assert generate.complete(checkpoint.load_model(hello_run), "hello", max_new_tokens=20,
                             draft=str(hello_run)) == plain.rstrip("\n")[len("hello"):]
    for extra, fragments in [(["--draft-tokens", "2"], ["--draft-tokens needs --draft"]),
                             (["--draft", "no-such-run"], ["--draft: ", "no-such-run"])]:
        code, _, err = run_main(capsys, *argv, *extra)
        assert_one_error_line(code, err, *fragments)


def test_every_validation_loss_reaches_the_metrics_the_log_and_the_plot(capsys, rng):
    """eval_every 30, log_every 20: steps 30 and 60 are evaluated between records."""
    words = ["to", "be", "or", "not", "that", "is", "the", "question"]
    open("text.txt", "w").write(" ".join(rng.choice(words, 800)))
    code, out, err = run_main(capsys, "train", *TINY, "--data", "text.txt", "--steps", "60", "--log-every", "20",
                              "--eval-every", "30", "--out", "v")
    assert code == 0, err
    records = runs.read_records("v/metrics.jsonl").records
    assert [r["step"] for r in records] == [20, 30, 40, 60]
    assert [r["step"] for r in records if "val_loss" in r] == [30, 60]
    assert "Step 30, Loss: " in out and out.count("Val loss: ") == 2
    assert os.path.getsize("v/loss.png") > 1000


def test_pictures_of_a_run(capsys, hello_run, monkeypatch):
    drawn = {}
    real = plot.plot_attention

    def spy(maps, labels, png):
        drawn["arrays"] = real(maps, labels, png)
        return drawn["arrays"]

    monkeypatch.setattr(plot, "plot_attention", spy)
    code, out, err = run_main(capsys, "attention", "--checkpoint", hello_run, "--prompt", "hello jax", "--out",
                              "att.png")
    assert code == 0, err
    assert os.path.getsize("att.png") > 1000 and len(drawn["arrays"]) == 1 * 2
    for array in drawn["arrays"]:                                           # the model's own distributions
        np.testing.assert_allclose(array.sum(-1), 1.0, atol=1e-5)
        assert np.all(array[np.triu_indices(9, 1)] == 0.0)
    code, out, err = run_main(capsys, "plot", hello_run, "--log", "--out", "loss.svg")
    assert code == 0 and os.path.getsize("loss.svg") > 1000, err


def test_without_matplotlib_the_picture_commands_say_how_to_install(capsys, hello_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib now fails
    code, _, err = run_main(capsys, "plot", hello_run)
    assert_one_error_line(code, err, "matplotlib is not installed", "pip install")
    code, _, err = run_main(capsys, "attention", "--checkpoint", hello_run, "--prompt", "hello", "--out", "a.png")
    assert_one_error_line(code, err, "matplotlib is not installed")
    code, out, err = run_main(capsys, "train", *TINY, "--steps", "10", "--out", "np")
    assert code == 0 and 'pip install -e ".[plot]"' in out and not os.path.exists("np/loss.png")


def _help(capsys, *command) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _option_helps(text: str) -> dict[str, str]:
    """The help of each option in `--help` output: {first flag: its help text}."""
    helps, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, words = line.strip().partition("  ")
            current = invocation.split(",")[0].split()[0]
            helps[current] = words.strip()
        elif line.startswith(" " * 4) and current:
            helps[current] = (helps[current] + " " + line.strip()).strip()
        else:
            current = None
    return helps


def test_every_flag_has_help_with_its_default_and_every_command_has_examples(capsys):
    for name in cli.COMMANDS:
        text = _help(capsys, name)
        assert "examples:" in text, name
        missing = [flag for flag, words in _option_helps(text).items() if not words]
        assert not missing, f"{name} {missing} have no help"
    helps = _option_helps(_help(capsys, "train"))
    for flag, value in (("--steps", PRESETS["hello"]["train"]["steps"]),
                        ("--batch-size", PRESETS["shakespeare-baby"]["train"]["batch_size"]),
                        ("--layers", 2), ("--seed", 0), ("--eval-every", 250), ("--log-every", 100)):
        assert "default" in helps[flag] and str(value) in helps[flag], (flag, helps[flag])
    assert set(cli.COMMANDS) <= set(_help(capsys).split("options:")[0].replace(",", " ").replace("{", " ").split())


def test_sigterm_to_a_training_process_saves_and_resumes(tmp_path):
    """In its own process, as a scheduler or `docker stop` would send it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "minitx_fn", "train", *TINY, "--steps", "100000",
                             "--log-every", "20", "--out", "r"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if line.startswith("Step 20,"):
                break
        proc.terminate()                                                   # SIGTERM
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Stopped by SIGTERM at step" in out and "Traceback" not in err
    step = checkpoint.load(str(tmp_path / "r")).meta["step"]
    assert step >= 20 and f"at step {step};" in out
    resumed = subprocess.run([sys.executable, "-m", "minitx_fn", "train", "--resume", "r", "--steps", str(step + 5)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming r from step {step}" in resumed.stdout


def test_data_command_downloads_checks_and_keeps(capsys, monkeypatch):
    """Against a local file:// URL; the expected checksum is this file's."""
    import hashlib
    open("src.txt", "w").write("to be or not to be")
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(b"to be or not to be").hexdigest())
    url = "file://" + os.path.abspath("src.txt")
    code, out, err = run_main(capsys, "data", "shakespeare", "--url", url, "--out", "d/ts.txt")
    assert code == 0 and "Downloaded d/ts.txt" in out and "minitx train --data d/ts.txt" in out, err
    assert open("d/ts.txt").read() == "to be or not to be"
    code, out, _ = run_main(capsys, "data", "shakespeare", "--url", url, "--out", "d/ts.txt")
    assert code == 0 and "Already here" in out


@given(run_dir=st.text(min_size=1, max_size=12), prompt=st.text(min_size=1, max_size=12))
def test_next_step_commands_are_shell_words_that_give_back_the_run_and_prompt(run_dir, prompt):
    """Each printed command, split as a POSIX shell splits it, passes exactly this run
    directory and this prompt (spaces, quotes, $, ;, newlines, any Unicode)."""
    import shlex

    from minitx_fn.cli import next_steps
    text = next_steps(run_dir, prompt, "loss.png")
    generate = shlex.split(text[text.index("minitx generate"):text.index("minitx attention")])
    assert generate[generate.index("--checkpoint") + 1] == run_dir
    assert generate[generate.index("--prompt") + 1] == prompt


def test_a_finished_command_ignores_stop_signals_in_its_last_moments():
    """Python's finalization puts the default action back on the handlers it installed:
    a SIGHUP landing after a finished `generate` killed it with no word (exit -1, seen
    by the random offsets of test_a_signal_at_any_moment_...). Once main() has its status (as the program, argv
    None), the stop signals are ignored, so the status stands."""
    script = textwrap.dedent("""
        import signal, sys
        from minitx_fn import cli, signals
        sys.argv = ["minitx", "plot", "no-such-run"]
        code = cli.main()
        print(code, all(signal.getsignal(s) == signal.SIG_IGN for s in signals.STOP_SIGNALS))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert done.stdout.split() == ["2", "True"], done.stderr


# ----------------------------------------------------------------------------- flags, as they are parsed


@pytest.mark.parametrize("argv, said", [
    (["train", "--bogus"], "unrecognized arguments: --bogus (see 'minitx --help')"),
    (["train", "--seed", "1e29"], "--seed: '1e29' is not a whole number"),
    (["train", "--seed", str(2**40)], "--seed: 1099511627776 must lie in [0, "),
    (["train", "--steps", str(2**31)], "--steps: 2147483648 must lie in [1, 2,147,483,647]"),
    (["train", "--lr", "nan"], "--lr: 'nan' is not a finite number"),
    (["train", "--eval-tokens", "0"], "--eval-tokens: 0 must lie in"),
    (["train", "--eval-tokens", "some"], "is not a whole number"),
    (["train", "--batches", "disk"], "invalid choice: 'disk'"),
    (["train", "--out", ""], "--out: is empty"),
    (["generate", "--checkpoint", "r", "--prompt", "h", "--max-new-tokens", str(10**12)],
     "--max-new-tokens: 1000000000000 must lie in"),
    (["generate", "--checkpoint", "r", "--prompt", "h", "--draft-tokens", "0"], "--draft-tokens: 0 must lie in"),
    (["prepare"], "the following arguments are required: --data"),
    (["prepare", "--data", "x", "--tokenizer", "words"], "invalid choice: 'words'"),
    (["prepare", "--data", "x", "--vocab-size", "12"], "--vocab-size: 12 must lie in [256"),
    (["prepare", "--data", "x", "--cache-dir", ""], "--cache-dir: is empty"),
])
def test_flag_values_are_checked_as_they_are_parsed(argv, said):
    """What a flag's type or choices refuse, before any command runs (the checks of the
    values themselves are their modules': test_config.py, test_corpus.py, ...)."""
    with pytest.raises(UsageError) as info:
        build_parser().parse_args(argv)
    assert said in str(info.value)


def test_messages_name_flags_where_the_library_named_fields():
    from minitx_fn.errors import ConfigError
    e = ConfigError("{a} is invalid: it must lie in [0, {b}]", a=("min_lr", 1.0), b=("lr", 0.003))
    assert cli.message(e) == "--min-lr 1.0 is invalid: it must lie in [0, --lr 0.003]"
    assert cli.flag_name("max_len", 64) == "--context 64" and cli.flag_name("d_model", 8) == "--width 8"


# ----------------------------------------------------------------------------- one case of each class of error


def _nothing(work):
    pass


def _not_utf8(work):
    open("in.txt", "wb").write(b"caf\xe9 au lait")


def _flip_byte(path):
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0x01
    open(path, "wb").write(bytes(blob))


# (class, setup(work), argv, fragments of the one error line, the run that must stay intact, exit status)
ERRORS = [
    ("UsageError", _nothing, ["train", "--bogus"], ["unrecognized arguments: --bogus"], None, 2),
    ("ConfigError", _nothing, ["train", "--width", "30", "--heads", "4"],
     ["--width 30 is invalid", "divisible by --heads 4"], None, 2),
    ("ProcessesError", _nothing, ["train", "--coordinator", "garbage", "--num-processes", "2", "--process-id", "0"],
     ["--coordinator garbage is not HOST:PORT"], None, 2),
    ("DataError", _not_utf8, ["train", "--data", "in.txt"], ["not UTF-8", "offset 3"], None, 2),
    ("CheckpointError", lambda w: _flip_byte("builtin/checkpoint/params.npz"),
     ["generate", "--checkpoint", "builtin", "--prompt", "hello"], ["params.npz", "is damaged"], None, 2),
    ("RunDirError", _nothing, ["train", *RUN, "--out", "builtin"], ["already holds a run", "checkpoint"], "builtin", 2),
    ("MemoryBudgetError", _nothing, ["train", "--width", "65536", "--layers", "64"],
     ["needs at least", "GB of memory", "--width 65536"], None, 2),
    ("PromptError", _nothing, ["generate", "--checkpoint", "builtin", "--prompt", "hello Zebra"],
     ["'Zb'", "not in the vocabulary"], "builtin", 2),
    ("PicturePathError", _nothing, ["attention", "--checkpoint", "builtin", "--prompt", "hello", "--out", "a.bogus"],
     ["give a file name ending in .png"], None, 2),
    ("RunFailed", lambda w: open("wrong.txt", "w").write("not shakespeare"),
     ["data", "shakespeare", "--url", "file://{work}/wrong.txt", "--out", "ts.txt"],
     ["not the expected", "nothing was written to ts.txt"], None, 1),
]


@pytest.mark.parametrize("name, setup, argv, fragments, keep, status", ERRORS, ids=[e[0] for e in ERRORS])
def test_each_class_of_error_is_one_line_and_its_exit_status(work, capsys, name, setup, argv, fragments, keep,
                                                              status):
    """Bad input exits 2, a failed run 1: one line `minitx: error: ...` naming flags where
    the library named fields, no traceback; a run that was there is unchanged, and a
    refused new run wrote nothing."""
    intact = Snapshot(keep) if keep else None
    setup(work)
    argv = [a.replace("{work}", str(work)) for a in argv]
    code, out, err = run_main(capsys, *argv)
    assert_one_error_line(code, err, *fragments, status=status)
    if intact:
        intact.assert_unchanged()
    if argv[0] == "train" and "--out" in argv and keep is None:
        assert not os.path.exists(os.path.join(argv[argv.index("--out") + 1], "checkpoint"))
    assert not os.path.exists("runs")                                # nor took a default run directory


def test_a_disk_that_fails_before_training_is_a_storage_failure_that_changes_nothing(tmp_path, capsys, monkeypatch):
    """StorageError (a full disk while preparing the data): exit 1, not 2 (bad input)."""
    open("t.txt", "w").write("to be or not to be " * 20)
    fail_fsync(monkeypatch, errno.ENOSPC)
    code, _, err = run_main(capsys, "prepare", "--data", "t.txt", "--cache-dir", "cache")
    assert_one_error_line(code, err, "No space left on device", "nothing was changed", status=1)
    assert not os.path.exists("cache")


# ----------------------------------------------------------------------------- commands


def test_eval_writes_its_json_and_never_over_a_text_or_a_checkpoint(work, capsys):
    """`minitx eval --json`: the numbers of `job.evaluate` (test_job.py), written where a
    .json may go; a text, a run's checkpoint, a missing folder are refused before the
    work, and nothing is overwritten."""
    code, out, err = run_main(capsys, "eval", "--checkpoint", "text", "--data", "text.txt", "--json", "e.json")
    assert code == 0, err
    got = json.load(open("e.json"))
    assert set(got) == {"loss", "perplexity", "bits_per_byte", "tokens", "quantized"} and got["quantized"] is None
    assert f"Loss {got['loss']:.4f}" in out
    shutil.copy("text.txt", "t.json")
    kept = {path: open(path, "rb").read() for path in ("text.txt", "t.json", "text/checkpoint/params.npz",
                                                        "text/checkpoint/meta.json")}
    for data_path, target, said in (("text.txt", "no/e.json", "give a file name in an existing folder"),
                                    ("text.txt", "text.txt", "ending in .json"),
                                    ("t.json", "t.json", "is the --data file"),
                                    ("text.txt", "text/checkpoint/params.npz", "ending in .json"),
                                    ("text.txt", "text/checkpoint/meta.json", "inside the files of the run"),
                                    ("text.txt", "latest/meta.json", "inside the files of the run"),
                                    ("text.txt", "elsewhere/meta.json", "inside the files of the run")):
        os.makedirs("text/checkpoint.old", exist_ok=True)
        for link, to in (("latest", "text/checkpoint"), ("elsewhere", "text/checkpoint.old")):
            if not os.path.lexists(link):                 # links into the run's own folders, by any route
                os.symlink(os.path.abspath(to), link)
        code, _, err = run_main(capsys, "eval", "--checkpoint", "text", "--data", data_path, "--json", target)
        assert_one_error_line(code, err, f"--json {target!r}", said)
    assert kept == {path: open(path, "rb").read() for path in kept}


def test_prepare_then_train_byte_and_generate_any_text(capsys):
    text = "First Citizen: héllo, wörld! 😀 Before we proceed any further, hear me speak.\n" * 40
    open("t.txt", "w", encoding="utf-8").write(text)
    code, out, err = run_main(capsys, "prepare", "--data", "t.txt", "--tokenizer", "byte", "--cache-dir", "cache")
    assert code == 0, err
    assert "byte (256 ids)" in out and "minitx train --data t.txt --tokenizer byte --cache-dir cache" in out
    code, out, err = run_main(capsys, "train", *TINY, "--data", "t.txt", "--tokenizer", "byte", "--cache-dir", "cache",
                              "--steps", "2", "--out", "b", "--max-new-tokens", "5", "--eval-tokens", "20")
    assert code == 0, err
    assert "prepared before" in out and "vocabulary 256 (byte)" in out and "(a fixed sample)" in out
    assert checkpoint.load("b").tokenizer.kind == "byte"
    code, out, err = run_main(capsys, "generate", "--checkpoint", "b", "--prompt", "∑ never seen 🙂",
                              "--max-new-tokens", "7", "--top-k", "3")
    assert code == 0 and out.startswith("∑ never seen 🙂"), err


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_saves_the_step_and_exits_with_its_status(work, capsys, monkeypatch, signum):
    """The signal is sent from inside the run (at its first metrics record), in-process."""
    real = runs.append_record

    def signal_once(path, record):
        real(path, record)
        if record["step"] == 30:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(runs, "append_record", signal_once)
    code, out, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "1000")
    assert code == 128 + signum and err == ""
    saved = checkpoint.load("builtin").meta["step"]
    assert saved in (30, 31) and f"Stopped by {signal.Signals(signum).name} at step {saved}" in out
    assert not os.path.exists("builtin/.lock")


def test_a_second_signal_during_the_save_leaves_a_whole_checkpoint(work, capsys, monkeypatch):
    real_save = checkpoint.save
    calls = []

    def save_under_fire(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)        # first: a request to stop
        os.kill(os.getpid(), signal.SIGINT)             # second, in the middle of the write
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_under_fire)
    code, _, err = run_main(capsys, "train", "--resume", "builtin", "--steps", "1000", "--save-every", "25")
    assert code == 128 + signal.SIGINT and "interrupted by SIGINT" in err and len(err.strip().splitlines()) == 1
    assert checkpoint.load("builtin").meta["step"] == 25


@pytest.mark.heavy
def test_a_signal_during_the_final_sample_ends_it_and_leaves_no_lock(tmp_path):
    """The run is saved before its final sample, which writes nothing, so a signal
    there ends the process at once (exit 130, one line): the run directory's lock is
    released before the sample, not left behind by the ended process (found by the
    signal-at-any-moment property drawing fresh offsets)."""
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "minitx_fn", "train", *TINY, "--steps", "4", "--log-every", "4",
                             "--max-new-tokens", "1000000", "--out", "r"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:                               # the run is finished and saved: the sample begins
            if line.startswith("Finished at step"):
                break
        time.sleep(3)                                          # past the picture and the check, into the sample
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, (proc.returncode, err)
    assert err.strip() == "minitx: interrupted by SIGINT; nothing saved was lost"
    assert (tmp_path / "r" / "checkpoint").exists() and not (tmp_path / "r" / runs.LOCK).exists()


def _handles(pid: int, signum: int) -> bool:
    """The process has installed a handler of its own for signum (Linux: /proc/PID/status);
    True where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(line for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return True
    return bool(int(caught.split()[1], 16) >> (signum - 1) & 1)


# A process of its own per example: 4 of them in the ci profile (fresh ones each run), 20 in thorough.
@settings(max_examples=max(4, settings.default.max_examples // 10), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["train", "generate", "prepare", "upgrade"]), offset=st.floats(0.0, 4.0),
       signum=st.sampled_from([signal.SIGTERM, signal.SIGINT, signal.SIGHUP]))
@pytest.mark.heavy
def test_a_signal_at_any_moment_of_a_command_is_a_clean_finish_or_one_line(saved_runs, tmp_path_factory, command,
                                                                           offset, signum):
    """`minitx train`, `generate`, `prepare` or `upgrade` signalled at any offset from the
    moment its handlers are in place (importing JAX, preparing, compiling, training,
    saving, generating): exit 0 after a clean finish, or exit 128 + N with one line on
    stderr; never a lost signal, a traceback or a crash; and whatever it left (a run, a
    cache) loads and has no half-written files. (Before the handlers, the interpreter is
    still starting, and a signal ends it as the default action does, with no word; the
    README says so.)"""
    tmp = tmp_path_factory.mktemp("signal")
    text = tmp / "big.txt"
    text.write_text("".join(chr(0x4e00 + i % 5000) for i in range(300_000)), encoding="utf-8")   # 900 KB, 5000 ids
    argv = {"train": ["train", *TINY, "--steps", "60", "--log-every", "20", "--save-every", "20",
                      "--max-new-tokens", "5", "--out", "r"],
            "generate": ["generate", "--checkpoint", str(saved_runs / "builtin"), "--prompt", "hello",
                         "--max-new-tokens", "200"],
            "prepare": ["prepare", "--data", str(text), "--cache-dir", "cache"], "upgrade": ["upgrade", "r"]}[command]
    if command == "upgrade":                                  # a run of format 8, rewritten as 9
        shutil.copytree(saved_runs / "builtin", tmp / "r")
        meta = json.load(open(tmp / "r" / "checkpoint" / "meta.json"))
        json.dump(legacy_meta(meta, 8), open(tmp / "r" / "checkpoint" / "meta.json", "w"))
    proc = subprocess.Popen([sys.executable, "-m", "minitx_fn", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp)
    try:
        started = time.monotonic()
        # SIGHUP, the last of the three the command installs (Python's own SIGINT handler is there from the start)
        while not _handles(proc.pid, signal.SIGHUP) and proc.poll() is None and time.monotonic() < started + 30:
            time.sleep(0.01)
        time.sleep(offset)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode in (0, 128 + signum), (command, offset, proc.returncode, err[-2000:])
    assert "Traceback" not in err and "Exception ignored" not in err, err
    run = tmp / "r"
    if proc.returncode and err:                               # before training: one line, nothing written
        assert len(err.strip().splitlines()) == 1 and err.startswith("minitx: interrupted by "), err
    elif proc.returncode and command == "train":              # in training: a checkpoint at this step
        assert f"Stopped by {signal.Signals(signum).name} at step" in out and (run / "checkpoint").exists(), out
    if (run / "checkpoint").exists():
        with standard_promotion():
            checkpoint.load(str(run))                         # whole: sizes and checksums hold
    if run.exists():
        assert not [n for n in os.listdir(run) if n.startswith(runs.TEMPORARY_PREFIX) or n == runs.LOCK]
    for folder, names, files in os.walk(tmp / "cache"):
        assert not [n for n in names if n.startswith(".prepare-")], names      # no unfinished preparation left
        assert "tokens.bin" not in files or "manifest.json" in files           # a cache is whole or absent


# ----------------------------------------------------------------------------- fuzzing the command line


FLAG_VALUES = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True).map(repr),
                        st.sampled_from(["", "0", "-1", "1e29", "inf", "nan", "abc", "3.5", "1e-300"]),
                        st.text(max_size=6))
TRAIN_FLAGS = ["--steps", "--batch-size", "--context", "--layers", "--heads", "--width", "--lr", "--min-lr",
               "--warmup", "--decay-steps", "--weight-decay", "--seed", "--eval-every", "--save-every",
               "--log-every", "--prompt", "--max-new-tokens", "--devices", "--preset", "--data"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None,
          max_examples=60)
@given(flags=st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), FLAG_VALUES), max_size=4))
def test_fuzzed_train_flags_exit_zero_or_two_never_a_traceback(tmp_path, capsys, monkeypatch, flags):
    """Random values for random flags of `minitx train`: every check runs; where all pass,
    the run itself is replaced by a stub (exit 0), so the fuzzing trains nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job, "run", lambda *args, **kwargs: types.SimpleNamespace(stopped_by=None, sample=None))
    argv = ["train"] + [part for flag, value in flags for part in (flag, value)]
    code, _, err = run_main(capsys, *argv)
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("minitx: error: "), (argv, err)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None,
          max_examples=30)
@given(flags=st.lists(st.tuples(st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                                                 "--stop", "--prompt"]), FLAG_VALUES), max_size=4))
def test_fuzzed_generate_flags_exit_zero_or_two_never_a_traceback(saved_runs, capsys, monkeypatch, flags):
    monkeypatch.setattr(generate, "generate", lambda *args, **kwargs: [np.zeros(0, np.int32)])
    argv = ["generate", "--checkpoint", str(saved_runs / "builtin"), "--prompt", "hello"]
    argv += [part for flag, value in flags for part in (flag, value)]
    code, _, err = run_main(capsys, *argv)
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("minitx: error: "), (argv, err)


def test_muons_own_flags_need_muon(capsys):
    """--muon-lr and --momentum set Muon's rate and momentum: on a run that steps by
    AdamW they would be recorded and do nothing, so they are refused in one line."""
    for flags in (["--muon-lr", "0.5"], ["--momentum", "0.5"], ["--optimizer", "adamw", "--muon-lr", "0.1"]):
        code, _, err = run_main(capsys, "train", *TINY, "--steps", "2", "--out", "r", *flags)
        assert_one_error_line(code, err, f"{flags[-2]} is for --optimizer muon", "adamw")
        assert not os.path.exists("r")
