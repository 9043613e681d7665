"""The benchmark's code path on the micro config with few steps, so it cannot rot.
It checks that every documented JSON field exists and is positive, and that options
change what runs; never a speed."""

from __future__ import annotations

import json
import math
import os

import importlib.util

import pytest

from benchmarks.run import main

HAVE_TORCH = importlib.util.find_spec("torch") is not None

TRAIN_FIELDS = ["config", "impl", "compile_s", "step_ms_median", "step_ms_min", "step_ms_max", "tokens_per_s", "mfu"]
DECODE_FIELDS = ["config", "batch", "mode", "tokens_per_s", "ms_per_token_early", "ms_per_token_late"]


@pytest.mark.parametrize("argv, fragment", [(["--blocks", "0"], "--blocks"), (["--steps", "-1"], "--steps"),
                                            (["--json", "/no/such/folder/out.json"], "--json '/no/such"),
                                            (["--plot", "/no/such/folder/out.png"], "--plot '/no/such"),
                                            (["--option", "d_model=1048576", "--configs", "micro"], "memory")])
def test_bad_arguments_stop_before_any_timing(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and "Traceback" not in err


def test_count_compiles_sees_a_new_shape_and_not_a_cached_one():
    import jax
    import jax.numpy as jnp

    from benchmarks.common import count_compiles, xla_flops_per_step
    f = jax.jit(lambda x: x @ x)
    small, big = jnp.ones((3, 3)), jnp.ones((4, 4))
    f(small)
    with count_compiles() as compiles:
        f(small)
        assert len(compiles) == 0
        f(big)
    assert len(compiles) == 1
    assert xla_flops_per_step(f.lower(big).compile()) == 2 * 4**3                    # a 4 x 4 matmul


@pytest.mark.parametrize("argv, fragment", [(["--draft-tokens", "64"], "--draft-tokens 64"),
                                            (["--new-tokens", "1"], "--new-tokens 1: give at least 2"),
                                            (["--data", "/no/such.txt"], "--data '/no/such.txt'"),
                                            (["--json", "/no/such/folder/x.json"], "--json '/no/such")])
def test_the_speculative_benchmark_checks_its_flags_before_training(argv, fragment, capsys):
    from benchmarks import speculative
    with pytest.raises(SystemExit) as exit_info:
        speculative.main(["--data", __file__, *argv] if argv[0] != "--data" else argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [(["--reps", "0"], "--reps"), (["--new-tokens", "0"], "--new-tokens"),
                                            (["--new-tokens", "1"], "--new-tokens 1 must lie in [2, 512]"),
                                            (["--size", "tiny", "--new-tokens", "49"], "[2, 48]"),
                                            (["--window", "0"], "--window"),
                                            (["--json", "/no/such/folder/x.json"], "--json '/no/such")])
def test_the_gpt2_benchmark_checks_its_flags_before_any_work(argv, fragment, capsys):
    from benchmarks import gpt2
    with pytest.raises(SystemExit) as exit_info:
        gpt2.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and "Traceback" not in err


def test_outside_the_repository_the_benchmark_says_what_it_needs_before_timing(tmp_path, monkeypatch, capsys):
    """Its Flax rows need tests/flax_reference.py, which an installed package lacks: one
    line, exit 2, no timing (it was a ModuleNotFoundError after timing began)."""
    import sys
    monkeypatch.setitem(sys.modules, "tests", None)                  # as where the repository's tests/ is absent
    with pytest.raises(SystemExit) as exit_info:
        main(["--configs", "micro"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "repository's root folder" in err and "Traceback" not in err


def test_unknown_model_option_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--option", "colour=blue"])
    assert exit_info.value.code == 2 and "expected FIELD=VALUE" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed; the benchmark's torch rows are optional")
@pytest.mark.parametrize("options", [{}, {"positions": "learned", "tie_embeddings": True}],
                         ids=["sinusoidal-untied", "gpt2-learned-tied"])
def test_torch_reference_computes_our_loss_and_gradients(key, options):
    """Same weights, same batch: PyTorch's loss and gradients equal minitx_fn's (to float32 rounding);
    tied, the embedding's gradient sums the lookup's and the head's on both sides."""
    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_reference import TorchLM
    from minitx_fn import model, train
    from minitx_fn.config import ModelConfig

    c = ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_len=8, init_std=0.2, **options)
    params = model.init(key, c)
    data = jax.random.randint(jax.random.fold_in(key, 1), (3, 9), 0, 11)
    x, y = data[:, :-1], data[:, 1:]
    loss, grads = jax.jit(jax.value_and_grad(lambda p: train.cross_entropy(c.apply(p, x), y)))(params)
    for fused in (True, False):
        lm = TorchLM(c, fused).from_minitx(params)
        logits = lm(torch.from_numpy(np.array(x)).long())
        theirs = F.cross_entropy(logits.reshape(-1, 11), torch.from_numpy(np.array(y)).long().reshape(-1))
        theirs.backward()
        np.testing.assert_allclose(theirs.item(), float(loss), rtol=1e-5)
        np.testing.assert_allclose(lm.blocks[1].qkv.weight.grad.numpy().T, grads["blocks"]["attn"]["qkv"]["w"][1],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(lm.embed.weight.grad.numpy(), grads["embed"]["table"], rtol=1e-4, atol=1e-6)
        if "pos" in grads:
            np.testing.assert_allclose(lm.pos.weight.grad.numpy(), grads["pos"]["table"], rtol=1e-4, atol=1e-6)


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


@pytest.mark.heavy
def test_gpu_script_runs_every_step_at_toy_sizes_and_every_field_and_option_arrives(tmp_path, capsys, monkeypatch):
    """`python -m benchmarks.gpu --smoke`: the GPU session's script, proven on the CPU
    before a GPU ever sees it. Its two benchmark runs (bfloat16 and float32, with
    --option attention_block=4) are also the benchmark's own test: every documented
    JSON field is there and positive, and --dtype and --option reach the configs that
    are compiled and decoded, not only the JSON."""
    from benchmarks import gpu, run
    from tests.helpers import standard_promotion
    seen = []
    real_step, real_generate = run.train.train_step, run.gen.generate

    class Spy:
        def lower(self, *args, model, **settings):          # args: state, batch (and a LoRA base)
            seen.append(model)
            return real_step.lower(*args, model=model, **settings)

        def __call__(self, *args, model, **settings):
            seen.append(model)
            return real_step(*args, model=model, **settings)

    def generate(*args, model, **kwargs):
        seen.append(model)
        return real_generate(*args, model=model, **kwargs)

    monkeypatch.setattr(run.train, "train_step", Spy())
    monkeypatch.setattr(run.gen, "generate", generate)
    with standard_promotion():
        code = gpu.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in ("env.json", "bench-bfloat16.png", "bench-float32.png", "summary.md",
                 "shakespeare-char/checkpoint/meta.json"):
        assert (tmp_path / name).exists(), name
    summary = (tmp_path / "summary.md").read_text()
    assert "| recipe | ok |" in summary and "shakespeare-char: validation loss" in summary
    # The micro config's runs: both benchmarks with attention_block=4; the variants step (defaults) in float32.
    micro = {(c.dtype, c.attention_block, c.remat) for c in seen if c.vocab_size == 17}
    assert micro >= {("bfloat16", 4, "matmuls"), ("float32", 4, "matmuls")}
    assert micro <= {("bfloat16", 4, "matmuls"), ("float32", 4, "matmuls"), ("float32", 128, "matmuls"),
                     ("float32", 128, "none")}

    for dtype in ("bfloat16", "float32"):
        result = json.loads((tmp_path / f"bench-{dtype}.json").read_text())
        assert result["device"]["platform"] and result["versions"]["jax"] and result["peak_gflops"] > 0
        assert result["options"]["dtype"] == dtype and result["options"]["attention_block"] == 4
        assert {r["impl"] for r in result["train"]} == {"minitx", "flax"}
        for row in result["train"]:
            assert all(row[f] for f in TRAIN_FIELDS) and all(row[f] > 0 for f in TRAIN_FIELDS[2:])
            assert row["xla_gflops_per_step"] > 0 and row["mfu_xla"] > 0
        ours = next(r for r in result["train"] if r["impl"] == "minitx")
        assert ours["ratio_minitx_over_flax"] > 0 and ours["ratio_minitx_over_torch"] is None
        [loop] = result["loop"]
        assert loop["config"] == "micro" and loop["steps"] == 1 and loop["loop_over_bare"] > 0
        assert loop["compiles_while_timed"] == 0                    # the step and the loop compiled once
        assert {(r["batch"], r["mode"]) for r in result["decode"]} == {(2, "cached"), (2, "recompute")}
        for row in result["decode"]:
            assert all(row[f] for f in DECODE_FIELDS[:4]) and row["tokens_per_s"] > 0
            # Per-token times of a tiny model can sink below the timer's noise: then null, never negative.
            assert all(row[f] is None or row[f] > 0 for f in DECODE_FIELDS[4:])
            if row["mode"] == "cached":
                assert row["bytes_per_token"] > 0
                assert (row["achieved_gbs"] is None) == (row["ms_per_token_late"] is None)


def test_scaling_sweep_and_pictures_from_a_saved_result(tmp_path):
    import jax

    from benchmarks import plot
    from benchmarks.run import bench_scaling
    sweep = {"context": dict(d_model=16, n_layers=1, n_heads=2, batch=2, values=[8, 16]),
             "width": dict(max_len=8, n_layers=1, n_heads=2, batch=2, values=[8, 16])}
    with jax.numpy_dtype_promotion("standard"):
        rows = bench_scaling(steps=1, sweep=sweep)
    assert [(r["axis"], r["context"], r["width"]) for r in rows] == [("context", 8, 16), ("context", 16, 16),
                                                                     ("width", 8, 8), ("width", 8, 16)]
    assert all(r["step_ms"] > 0 and r["model_gflops_per_step"] > 0 for r in rows)
    assert rows[1]["model_gflops_per_step"] > rows[0]["model_gflops_per_step"]
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps({"device": {"kind": "cpu", "platform": "cpu"}, "versions": {"jax": "x"},
                                 "scaling": rows}))
    assert plot.main(["--json", str(saved), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("content", ["[1, 2]", '{"train": [{"config": "a"}]}', '{"train": [1]}',
                                     '{"decode": [{"config": "a", "mode": "cached"}]}', '{"scaling": [{}]}'])
def test_plot_of_json_that_is_no_result_is_one_usage_line(tmp_path, capsys, content):
    from benchmarks import plot
    saved = tmp_path / "r.json"
    saved.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        plot.main(["--json", str(saved), "--out", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not a result of python -m benchmarks" in err and "Traceback" not in err


def test_data_benchmark_writes_its_text_and_times_a_preparation(tmp_path, capsys):
    """The data benchmark's code path at 1 MB with the byte tokenizer (no training: that
    path is the one `minitx train` runs, tested in test_corpus.py): the deterministic
    text is the same twice, and the result names each measured field."""
    from benchmarks import data as data_bench
    first = data_bench.write_corpus(str(tmp_path / "a.txt"), 1)
    assert data_bench.write_corpus(str(tmp_path / "b.txt"), 1) == first
    assert os.path.getsize(tmp_path / "a.txt") <= 1 << 20
    (tmp_path / "a.txt").read_bytes().decode("utf-8")                     # whole characters only
    assert data_bench.main(["--size-mb", "1", "--tokenizers", "byte", "--dir", str(tmp_path / "d"),
                            "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    row = result["prepare"][0]
    assert row["tokenizer"] == "byte" and row["peak_rss_mb"] > 0 and row["mb_per_s"] > 0
    assert result["text"]["sha256"] == first


def test_the_accumulation_benchmark_shrinks_the_temporaries_and_checks_its_flags(tmp_path, capsys):
    from benchmarks import accumulate
    from tests.helpers import standard_promotion
    with pytest.raises(SystemExit) as exit_info:
        accumulate.main(["--batch", "8", "--accumulate", "3"])
    assert exit_info.value.code == 2 and "must divide --batch 8" in capsys.readouterr().err
    with standard_promotion():
        assert accumulate.main(["--config", "micro", "--batch", "8", "--accumulate", "1", "4", "--reps", "1",
                                "--json", str(tmp_path / "a.json")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [r["micro_batch"] for r in rows] == [8, 2] and rows[1]["temp_mb"] < rows[0]["temp_mb"]


def test_the_fine_tuning_recipe_runs_end_to_end_at_toy_sizes_and_checks_its_flags(tmp_path, capsys):
    """benchmarks.finetune (#26, part 5): pretrain, export, import, then scratch, full and
    LoRA runs on the second half; LoRA trains fewer parameters and saves a smaller
    checkpoint, and a fine-tune starts where the imported model stands."""
    pytest.importorskip("safetensors", reason="export and import need the test extra's safetensors")
    from benchmarks import finetune
    from tests.helpers import standard_promotion
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--data", str(tmp_path / "none.txt")])
    assert exit_info.value.code == 2 and "--data" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 60)
    with standard_promotion():
        assert finetune.main(["--data", str(text), "--config", "micro", "--pretrain-steps", "2", "--steps", "2",
                              "--eval-every", "1", "--lora-rank", "2", "--memory-config", "micro",
                              "--memory-context", "16", "--work", str(tmp_path / "w"),
                              "--json", str(tmp_path / "f.json")]) == 0
    result = json.loads((tmp_path / "f.json").read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["scratch"]["val_loss_start"] is None
    assert rows["full"]["val_loss_start"] == rows["lora"]["val_loss_start"]
    assert rows["lora"]["trained_parameters"] < rows["full"]["trained_parameters"]
    assert rows["lora"]["checkpoint_mb"] < rows["full"]["checkpoint_mb"]
    assert [r["mode"] for r in result["memory"]["rows"]] == ["full", "lora attn", "lora all"]


def test_the_architecture_comparison_trains_each_arch_and_reports_its_cache(tmp_path, capsys):
    """benchmarks.arch (#28) at toy size, one of its rows (--rows; the suite's time):
    Llama with one key/value head has a loss and a decode speed, and its KV cache per
    token is 2 L G K floats (computed here from the preset), H times less than
    multi-head attention's."""
    from benchmarks import arch
    from minitx_fn import defaults
    from tests.helpers import standard_promotion
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 60)
    with standard_promotion():
        assert arch.main(["--data", str(text), "--preset", "hello", "--steps", "2", "--eval-every", "2",
                          "--new-tokens", "3", "--rows", "llama, 1 kv head", "--json", str(tmp_path / "a.json")]) == 0
    (row,) = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert row["arch"] == "llama, 1 kv head" and row["fields"]["n_kv_heads"] == 1
    assert row["val_loss"] > 0 and row["decode_tokens_per_s"] > 0 and row["parameters"] > 0
    hello = defaults.PRESETS["hello"]["model"]
    head = hello["d_model"] // hello["n_heads"]
    assert row["kv_cache_bytes_per_token"] == 2 * hello["n_layers"] * 1 * head * 4
    assert "llama, 1 kv head" in capsys.readouterr().out


def test_the_quantize_benchmark_runs_tiny_and_agrees_with_float32(tmp_path, capsys):
    """`python -m benchmarks.quantize --size tiny`: a row per kind of weights, the int8
    ones a quarter of float32's matrices, greedy tokens that agree, and its flags checked."""
    from benchmarks import quantize as bench
    out = tmp_path / "q.json"
    assert bench.main(["--size", "tiny", "--new-tokens", "4", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"float32", "int8", "bfloat16"}
    assert rows["int8"]["weight_bytes"] < rows["bfloat16"]["weight_bytes"] < rows["float32"]["weight_bytes"]
    assert all(row["relative_logit_diff"] < 0.05 for row in rows.values())
    with pytest.raises(SystemExit):
        bench.main(["--size", "tiny", "--new-tokens", "60"])
    assert "must fit the context, 64" in capsys.readouterr().err


def test_the_evaluation_memory_benchmark_sizes_its_batch_and_evaluates(tmp_path):
    """`python -m benchmarks.eval_memory --size tiny`: the batch evaluation_batch sized,
    the loss of random weights near ln V, and the figures written."""
    from benchmarks import eval_memory as bench
    out = tmp_path / "e.json"
    assert bench.main(["--size", "tiny", "--windows", "3", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["batch"] >= 1 and got["windows"] == 3 and got["peak_rss_bytes"] > 0
    assert abs(got["loss"] - math.log(256)) < 0.5


def test_the_int8_loop_probe_times_both_kinds_of_weights_in_both_places(tmp_path):
    """`python -m benchmarks.int8_loop`: four rows (float32 and int8, alone and inside a
    loop), each a positive time."""
    from benchmarks import int8_loop as bench
    out = tmp_path / "l.json"
    assert bench.main(["--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(row["ms_per_pass"] > 0 for row in rows.values())


def test_the_time_to_quality_benchmark_runs_every_recipe_at_toy_sizes(tmp_path, capsys):
    """`python -m benchmarks.quality --steps-scale 0.01`: every recipe (the PyTorch
    yardstick too, when torch is installed) trains, validates and is summarised
    against the yardstick's target; its flags are checked before any work."""
    from benchmarks import quality as bench
    from tests.helpers import standard_promotion
    text = tmp_path / "t.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    recipes = list(bench.RECIPES) if importlib.util.find_spec("torch") else ["adamw", "fast"]
    out = tmp_path / "q.json"
    with standard_promotion():                            # optax's Adam, as a user runs it
        assert bench.main(["--data", str(text), "--seeds", "1", "--steps-scale", "0.01", "--eval-every", "5",
                           "--recipes", *recipes, "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert set(got["summary"]) == set(recipes) and got["yardstick"] == recipes[0]
    assert got["summary"][recipes[0]]["reached"] == "1 of 1"                   # the yardstick reaches its own best
    assert all(r["curve"][-1]["step"] == r["steps"] for rs in got["runs"].values() for r in rs)
    (tmp_path / "short.txt").write_text("to be or not to be")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    for argv, said in ((["--steps-scale", "0"], "--steps-scale 0.0"), (["--data", str(tmp_path / "no")], "no such"),
                       (["--data", str(tmp_path / "short.txt"), "--recipes", "adamw"], "give a longer text"),
                       (["--data", str(tmp_path / "bin.txt"), "--recipes", "adamw"], "as UTF-8 text")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert said in capsys.readouterr().err
