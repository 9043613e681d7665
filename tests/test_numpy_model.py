"""The library against `tests/numpy_model.py`, the model written from the formulas in
plain NumPy float64: logits to 1e-12 of their scale, greedy generation token for token."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from minitx_fn import defaults, model
from minitx_fn import generate as gen
from minitx_fn.config import ModelConfig
from tests import numpy_model
from tests.helpers import enable_x64

LLAMA = {**defaults.ARCHS["llama"], "n_kv_heads": 2}


@pytest.mark.parametrize("d_model, n_heads, max_len, t, attention_block, impl, options", [
    (12, 3, 16, 1, 128, "einsum", {}),                  # one token
    (12, 3, 16, 16, 128, "einsum", {}),                 # T = max_len, one attention block
    (12, 3, 16, 16, 5, "einsum", {}),                   # blocks of 5, 5, 5, 1 query rows
    (9, 3, 12, 7, 3, "einsum", {}),                     # odd width: the sinusoid table's last pair is cut
    (10, 5, 8, 8, 0, "einsum", {}),                     # the whole score matrix at once, K = 2
    (12, 3, 16, 11, 4, "dot_product_attention", {}),
    (12, 3, 16, 16, 5, "einsum", {"positions": "learned", "tie_embeddings": True}),   # GPT-2's choices
    (16, 4, 16, 13, 5, "einsum", LLAMA),                # Llama's: rotary, RMSNorm, SwiGLU, 2 key/value heads
    (16, 4, 16, 9, 4, "einsum", {**LLAMA, "n_kv_heads": 1, "qkv_bias": True, "tie_embeddings": True}),
])
def test_model_apply_equals_the_numpy_model(d_model, n_heads, max_len, t, attention_block, impl, options, key):
    with enable_x64():
        cfg = ModelConfig(vocab_size=13, d_model=d_model, n_heads=n_heads, n_layers=3, max_len=max_len,
                          attention_block=attention_block, attention=impl, dtype="float64", param_dtype="float64",
                          init_std=0.3, **options)
        params = model.init(key, cfg)
        tokens = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (2, t), 0, cfg.vocab_size))
        ours = np.asarray(jax.jit(model.apply, static_argnames="config")(params, tokens, config=cfg))
    host = jax.device_get(params)
    # jax.nn.dot_product_attention computes its softmax in float32, whatever the input.
    tol = 1e-12 if impl == "einsum" else 1e-6
    for row in range(2):
        expected = numpy_model.logits(host, tokens[row], n_heads=n_heads, **_numpy_args(cfg))
        assert np.abs(ours[row] - expected).max() <= tol * np.abs(expected).max()


def _numpy_args(cfg: ModelConfig) -> dict:
    """What the NumPy model cannot read from the parameter tree."""
    return {"n_kv_heads": cfg.n_kv_heads, "rope_theta": cfg.rope_theta if cfg.positions == "rotary" else None}


@pytest.mark.parametrize("lengths, options", [([3], {}), ([1, 8, 5], {}),
                                              ([1, 8, 5], {"positions": "learned", "tie_embeddings": True}),
                                              ([1, 8, 5], {**LLAMA, "n_kv_heads": 1})])
def test_greedy_generation_equals_numpy_argmax_over_full_recompute(lengths, options, key):
    """40 new tokens with S = 8: every row's window slides several times (and with
    learned positions, goes back to the table's first rows each time)."""
    with enable_x64():
        cfg = ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_len=8, init_std=0.5,
                          dtype="float64", param_dtype="float64", **options)
        params = model.init(key, cfg)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 11, n) for n in lengths]
        ids = gen.generate(params, prompts, model=cfg, key=key, max_new_tokens=40)
    host = jax.device_get(params)
    for prompt, row in zip(prompts, ids):
        assert row.tolist() == numpy_model.greedy(host, prompt.tolist(), 40, n_heads=2, max_len=8, **_numpy_args(cfg))
