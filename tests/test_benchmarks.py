"""The benchmark's code path on the micro config with few steps, so it cannot rot.
It checks that every documented JSON field exists and is positive, and that options
change what runs; never a speed."""

from __future__ import annotations

import json

import importlib.util

import pytest

from benchmarks.run import main

HAVE_TORCH = importlib.util.find_spec("torch") is not None

TRAIN_FIELDS = ["config", "impl", "compile_s", "step_ms_median", "step_ms_min", "step_ms_max", "tokens_per_s", "mfu"]
DECODE_FIELDS = ["config", "batch", "mode", "tokens_per_s", "ms_per_token_early", "ms_per_token_late"]


def test_benchmark_writes_every_field_and_its_options_change_what_runs(tmp_path, capsys, monkeypatch):
    """One run of the whole code path on the micro config, with --dtype and --option:
    every documented JSON field is there and positive, and the options reach the
    configs that are compiled and decoded, not only the JSON."""
    from benchmarks import run
    seen = {"train": [], "decode": []}
    real_step, real_generate = run.train.train_step, run.gen.generate

    class Spy:
        def lower(self, state, batch, *, model_config, train_config):
            seen["train"].append(model_config)
            return real_step.lower(state, batch, model_config=model_config, train_config=train_config)

        def __call__(self, state, batch, *, model_config, train_config):
            seen["train"].append(model_config)
            return real_step(state, batch, model_config=model_config, train_config=train_config)

    def generate(*args, config, **kwargs):
        seen["decode"].append(config)
        return real_generate(*args, config=config, **kwargs)

    monkeypatch.setattr(run.train, "train_step", Spy())
    monkeypatch.setattr(run.gen, "generate", generate)
    out = tmp_path / "out.json"
    assert main(["--configs", "micro", "--steps", "2", "--blocks", "2", "--new-tokens", "8", "--loop-steps", "3",
                 "--dtype", "bfloat16", "--option", "remat=none", "--option", "attention_block=4",
                 "--json", str(out)]) == 0
    for config in seen["train"] + seen["decode"]:
        assert (config.dtype, config.remat, config.attention_block) == ("bfloat16", "none", 4)
    assert seen["train"] and seen["decode"]

    result = json.loads(out.read_text())
    assert result["device"]["platform"] and result["versions"]["jax"] and result["peak_gflops"] > 0
    assert result["peak_gflops_bf16"] > 0
    assert {r["impl"] for r in result["train"]} == {"minitx", "flax"}          # torch rows: float32 only
    for row in result["train"]:
        assert all(row[f] for f in TRAIN_FIELDS)
        assert all(row[f] > 0 for f in TRAIN_FIELDS[2:])
    ours = next(r for r in result["train"] if r["impl"] == "minitx")
    assert ours["ratio_minitx_over_flax"] > 0 and ours["ratio_minitx_over_torch"] is None
    [loop] = result["loop"]
    assert loop["config"] == "micro" and loop["steps"] == 3
    assert loop["bare_tokens_per_s"] > 0 and loop["loop_tokens_per_s"] > 0 and loop["loop_over_bare"] > 0
    assert {(r["batch"], r["mode"]) for r in result["decode"]} == {(1, "cached"), (1, "recompute"),
                                                                   (8, "cached"), (8, "recompute")}
    for row in result["decode"]:
        assert all(row[f] for f in DECODE_FIELDS[:4]) and row["tokens_per_s"] > 0
        # Per-token times of a tiny model can sink below the timer's noise: then null, never negative.
        assert all(row[f] is None or row[f] > 0 for f in DECODE_FIELDS[4:])
        if row["mode"] == "cached":
            assert row["bytes_per_token"] > 0
            assert (row["achieved_gbs"] is None) == (row["ms_per_token_late"] is None)
    assert "| micro | minitx |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [(["--blocks", "0"], "--blocks"), (["--steps", "-1"], "--steps"),
                                            (["--json", "/no/such/folder/out.json"], "does not exist"),
                                            (["--option", "d_model=1048576", "--configs", "micro"], "memory")])
def test_bad_arguments_stop_before_any_timing(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and "Traceback" not in err


def test_unknown_model_option_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--option", "colour=blue"])
    assert exit_info.value.code == 2 and "expected FIELD=VALUE" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed; the benchmark's torch rows are optional")
def test_torch_reference_computes_our_loss_and_gradients(key):
    """Same weights, same batch: PyTorch's loss and gradients equal minitx_fn's (to float32 rounding)."""
    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_reference import TorchLM
    from minitx_fn import model
    from minitx_fn.config import ModelConfig

    c = ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_len=8, init_std=0.2)
    params = model.init(key, c)
    data = jax.random.randint(jax.random.fold_in(key, 1), (3, 9), 0, 11)
    x, y = data[:, :-1], data[:, 1:]
    loss, grads = jax.value_and_grad(model.loss)(params, x, y, config=c)
    for fused in (True, False):
        lm = TorchLM(c, fused).from_minitx(params)
        logits = lm(torch.from_numpy(np.array(x)).long())
        theirs = F.cross_entropy(logits.reshape(-1, 11), torch.from_numpy(np.array(y)).long().reshape(-1))
        theirs.backward()
        np.testing.assert_allclose(theirs.item(), float(loss), rtol=1e-5)
        np.testing.assert_allclose(lm.blocks[1].qkv.weight.grad.numpy().T, grads["blocks"]["attn"]["qkv"]["w"][1],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(lm.embed.weight.grad.numpy(), grads["embed"]["table"], rtol=1e-4, atol=1e-6)


def test_variants_times_each_config_variant(capsys):
    from benchmarks import variants

    assert variants.main(["micro", "", "remat=none,attention_block=4", "--steps", "1", "--blocks", "1"]) == 0
    out = capsys.readouterr().out
    assert "| defaults |" in out and "| remat=none,attention_block=4 |" in out


@pytest.mark.parametrize("argv", [["--configs", "micro", "--option", "remat=bogus"],
                                  ["--configs", "micro", "--option", "attention_block=-1"]])
def test_invalid_model_option_value_is_a_clear_error(argv, capsys):
    """A value ModelConfig refuses ends in one usage line naming the field, before any timing."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--option for config micro" in err and "Traceback" not in err


def test_variants_refuses_an_invalid_variant(capsys):
    from benchmarks import variants

    with pytest.raises(SystemExit) as exit_info:
        variants.main(["tiny", "remat=bogus"])
    assert exit_info.value.code == 2 and "remat='bogus' is invalid" in capsys.readouterr().err


def test_profile_step_lists_the_step_operations():
    """In its own process, as its XLA flag must be set before JAX starts."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "benchmarks.profile_step", "micro", "--top", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms per step" not in line]
    assert len(rows) == 3 and all(float(row.split("|")[1]) > 0 for row in rows)
