"""The benchmark's code path on the tiny config with few steps, so it cannot rot.
It checks that every documented JSON field exists and is positive, never a speed."""

from __future__ import annotations

import json

from benchmarks.run import main

TRAIN_FIELDS = ["config", "impl", "compile_s", "step_ms_median", "step_ms_min", "step_ms_max", "tokens_per_s", "mfu"]
DECODE_FIELDS = ["config", "batch", "mode", "tokens_per_s", "ms_per_token_early", "ms_per_token_late"]


def test_quick_benchmark_writes_every_field(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["--configs", "tiny", "--steps", "2", "--blocks", "2", "--new-tokens", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"]["platform"] and result["versions"]["jax"] and result["peak_gflops"] > 0
    assert {r["impl"] for r in result["train"]} == {"minitx", "flax"}
    for row in result["train"]:
        assert all(row[f] for f in TRAIN_FIELDS)
        assert all(row[f] > 0 for f in TRAIN_FIELDS[2:]) and row["ratio_minitx_over_flax"] > 0
    assert {(r["batch"], r["mode"]) for r in result["decode"]} == {(1, "cached"), (1, "recompute"),
                                                                   (8, "cached"), (8, "recompute")}
    for row in result["decode"]:
        assert all(row[f] for f in DECODE_FIELDS) and row["tokens_per_s"] > 0
        if row["mode"] == "cached":
            assert row["bytes_per_token"] > 0 and row["achieved_gbs"] > 0
    assert "| tiny | minitx |" in capsys.readouterr().out
