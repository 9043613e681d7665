"""The `minitx` command as a user meets it: the main job, resume, generation, pictures,
help. Every bad input is in tests/test_faults.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import checkpoint, data, plot, runs
from minitx_fn.cli import build_parser
from minitx_fn.defaults import PRESETS
from tests.helpers import TINY, assert_one_error_line, legacy_meta, run_main, user_env

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


def test_arch_llama_trains_resumes_and_generates_and_its_conflicts_are_one_line(capsys):
    """--arch llama with a single flag over it (--kv-heads): the run records Llama's
    choices, resumes, generates; a resume with another --arch, a --kv-heads that does
    not divide --heads and an odd rotary head are one line each."""
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
    for argv, fragments in [
        (["train", "--resume", "ll", "--steps", "9", "--arch", "gpt"], ("--positions sinusoidal (saved: --positions "
                                                                          "rotary)", "--norm layernorm")),
        (["train", *TINY, "--heads", "2", "--kv-heads", "3"], ("--kv-heads 3", "must divide --heads 2")),
        (["train", *TINY, "--arch", "llama", "--width", "6", "--heads", "2"], ("--width 6", "must be even")),
    ]:
        code, _, err = run_main(capsys, *argv)
        assert_one_error_line(code, err, *fragments)
    assert int(checkpoint.load("ll").state.step) == 8


def test_generate_command(capsys, hello_run):
    code, out, _ = run_main(capsys, "generate", "--checkpoint", hello_run, "--prompt", "hello", "--max-new-tokens", "20")
    assert code == 0 and out.startswith("hello") and len(out.strip()) == 25
    code, out, _ = run_main(capsys, "generate", "--checkpoint", hello_run, "--prompt", "hel", "--temperature", "0.8",
                            "--top-k", "3", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "30", "--stop", "!")
    assert code == 0 and out.strip().endswith("!") and out.count("!") == 1
    # Unknown characters are named.
    code, _, err = run_main(capsys, "generate", "--checkpoint", hello_run, "--prompt", "hello Zebra")
    assert_one_error_line(code, err, "'Zb'", "not in the vocabulary")


def test_generate_with_a_draft(capsys, hello_run):
    """The run as its own draft: the same greedy text. A draft must share the tokenizer
    and the context; --draft-tokens needs --draft and a count below the context."""
    argv = ["generate", "--checkpoint", str(hello_run), "--prompt", "hello", "--max-new-tokens", "20"]
    code, plain, _ = run_main(capsys, *argv)
    code_draft, drafted, _ = run_main(capsys, *argv, "--draft", str(hello_run), "--draft-tokens", "3")
    assert code == code_draft == 0 and drafted == plain
    from minitx_fn import generate                    # from Python the draft may be the run's directory
    assert generate.complete(checkpoint.load_model(hello_run), "hello", max_new_tokens=20,
                             draft=str(hello_run)) == plain.rstrip("\n")[len("hello"):]
    context = checkpoint.load_model(hello_run).model.max_len
    for extra, fragments in [(["--draft-tokens", "2"], ["--draft-tokens needs --draft"]),
                             (["--draft", str(hello_run), "--draft-tokens", "0"], ["--draft-tokens", "must lie in"]),
                             (["--draft", str(hello_run), "--draft-tokens", str(context)],
                              [f"--draft-tokens {context} is invalid", f"[1, {context})"]),
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


def test_every_flag_has_help_with_its_default_and_every_command_has_examples():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert "examples:" in (sub.epilog or ""), name
        for action in sub._actions:
            if action.dest in ("help",) or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
    helps = {a.option_strings[0]: a.help for a in commands["train"]._actions if a.option_strings}
    for flag, value in (("--steps", PRESETS["hello"]["train"]["steps"]),
                        ("--batch-size", PRESETS["shakespeare-baby"]["train"]["batch_size"]),
                        ("--layers", 2), ("--seed", 0), ("--eval-every", 250), ("--log-every", 100)):
        assert "default" in helps[flag] and str(value) in helps[flag], (flag, helps[flag])
    assert "--steps" in commands["train"].format_help() and "examples:" in commands["generate"].format_help()


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


SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="../shared/data/tinyshakespeare.txt is not beside this "
                    "repository (it is in this project's workspace)")
def test_the_recorded_checksum_is_tiny_shakespeares(capsys):
    code, out, err = run_main(capsys, "data", "shakespeare", "--url", "file://" + os.path.abspath(SHARED),
                              "--out", "ts.txt")
    assert code == 0, err
    assert len(open("ts.txt", encoding="utf-8").read()) == 1_115_394


def test_shakespeare_char_preset_is_nanogpts_gpu_recipe(rng):
    """The preset's configs, as planned (the run itself is the GPU script's job: on two
    CPU cores its 5000 steps take hours)."""
    from minitx_fn import job
    open("text.txt", "w").write(" ".join(rng.choice(["to", "be", "or", "not"], 3000)))
    plan = job.plan(job.make("text.txt", preset="shakespeare-char"), log=io.StringIO())
    mc, tc, oc = plan.model, plan.train_config, plan.train_config.optimizer
    assert (mc.n_layers, mc.n_heads, mc.d_model, mc.max_len, mc.dropout) == (6, 6, 384, 256, 0.2)
    assert (tc.batch_size, tc.steps, oc.lr, oc.warmup, oc.min_lr) == (64, 5000, 1e-3, 100, 1e-4)
    assert (oc.b1, oc.b2, oc.weight_decay, oc.grad_clip) == (0.9, 0.99, 0.1, 1.0)


@pytest.mark.parametrize("preset", ["shakespeare-baby", "shakespeare-char"])
def test_a_lower_lr_brings_the_presets_final_lr_down_with_it(rng, preset):
    """No preset fixes min_lr: it is lr / 10, so an lr below the preset's floor is a
    valid run, not an error about a setting the user never gave."""
    from minitx_fn import job
    open("text.txt", "w").write(" ".join(rng.choice(["to", "be", "or", "not"], 3000)))
    oc = job.make("text.txt", preset=preset, training={"optimizer": {"lr": 5e-5}}).training.optimizer
    assert (oc.lr, oc.min_lr) == (5e-5, 5e-5 / 10)


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
    by test_faults' random offsets). Once main() has its status (as the program, argv
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
