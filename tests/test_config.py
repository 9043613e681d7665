"""Configs are frozen, hashable, derive their defaults, and name the field on bad values."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from minitx_fn.config import LoraConfig, ModelConfig, TrainConfig
from tests.helpers import enable_x64


def test_defaults_are_derived_and_configs_hash_by_value():
    a = ModelConfig(vocab_size=10, d_model=32, n_heads=4)
    assert a.d_ff == 128 and a.head_dim == 8
    assert hash(a) == hash(ModelConfig(vocab_size=10, d_model=32, n_heads=4)) and a == a.replace()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.d_model = 64
    llama = ModelConfig(vocab_size=10, d_model=48, n_heads=4, mlp="swiglu", bias=False)
    # SwiGLU's three matrices at 8 D / 3 (rounded up to a multiple of 8) hold about the GELU MLP's two at 4 D.
    assert llama.d_ff == 128 and llama.n_kv_heads == 4 and llama.qkv_bias is False
    assert abs(3 * llama.d_ff - 2 * 4 * 48) <= 3 * 8
    scaled = ModelConfig(vocab_size=10, positions="rotary", rope_scaling={"kind": "yarn", "factor": 4.0,
                                                                          "original_max_len": 16})
    assert scaled == ModelConfig(**scaled.to_dict()) and hash(scaled) == hash(ModelConfig(**scaled.to_dict()))
    t = TrainConfig(steps=300, optimizer={"lr": 2e-3})
    assert t.optimizer.decay_steps == 300 and t.optimizer.min_lr == pytest.approx(2e-4) and t.optimizer.warmup == 30
    assert t == TrainConfig(**t.to_dict()) and hash(t) == hash(TrainConfig(**t.to_dict()))   # meta.json's dicts
    assert TrainConfig(steps=300, lora={"rank": 4}).lora == LoraConfig(rank=4, alpha=4.0, targets="attn")
    # A model whose vocabulary a tokenizer will give: every other field is checked now.
    assert ModelConfig(d_model=32, n_heads=4).vocab_size is None and ModelConfig(vocab_size=3, positions="none")
    spec = ModelConfig(vocab_size=10, d_model=32, n_heads=4, n_kv_heads=2, positions="rotary").block_spec
    assert (spec.attention.n_kv_heads, spec.attention.rope_theta, spec.attention.groups) == (2, 10000.0, 2)
    assert ModelConfig(vocab_size=10, d_model=32, n_heads=4).attention_spec.rope_theta is None


@pytest.mark.parametrize("changes, field, hint", [
    ({"d_model": 30, "n_heads": 4}, "d_model=30", "divisible by n_heads=4"),
    ({"vocab_size": 0}, "vocab_size=0", r"\[1, 2,147,483,647\]"),
    ({"n_layers": 0}, "n_layers=0", r"\[1, "),
    ({"n_layers": 2**31 - 1}, "n_layers=2147483647", "at most 1024"),       # refused before a layer is built
    ({"d_model": 2**31 - 4, "n_heads": 4}, "d_model=2147483644", "feed-forward width"),   # not d_ff, no flag of it
    ({"max_len": 2**31}, "max_len=2147483648", "whole number in"),
    ({"max_len": 2.5}, "max_len=2.5", "whole number"),
    ({"dtype": "float16"}, "dtype='float16'", "choose one of"),
    ({"attention": "flash"}, "attention='flash'", "choose one of"),
    ({"ln_eps": 0.0}, "ln_eps=0.0", r"\(0, 3.4e38\]"),
    ({"init_std": float("inf")}, "init_std=inf", "number in"),
    ({"attention_block": -1}, "attention_block=-1", ">= 0"),
    ({"attention_block": 2.0}, "attention_block=2.0", "whole number"),
    ({"remat": "some"}, "remat='some'", "choose one of"),
    ({"n_kv_heads": 3}, "n_kv_heads=3", "must divide n_heads=4"),
    ({"n_kv_heads": 0}, "n_kv_heads=0", r"\[1, "),
    ({"norm": "batchnorm"}, "norm='batchnorm'", "choose one of"),
    ({"mlp": "relu"}, "mlp='relu'", "choose one of"),
    ({"rope_theta": 1.0}, "rope_theta=1.0", r"\(1, 3.4e38\]"),
    ({"rope_theta": float("nan")}, "rope_theta=nan", "number in"),
    ({"rope_theta": 500.0}, "rope_theta=500.0", "base of rotary positions; it needs positions='rotary'"),
    ({"bias": 1}, "bias=1", "True or False"),
    ({"qkv_bias": "yes"}, "qkv_bias='yes'", "True or False"),
    ({"positions": "rotary", "d_model": 12}, "d_model=12", "head width d_model / n_heads=3 must be even"),
    ({"rope_scaling": {"kind": "linear", "factor": 2.0}}, "rope_scaling=", "it needs positions='rotary'"),
    ({"positions": "rotary", "rope_scaling": {"kind": "ntk", "factor": 2.0}}, "rope_scaling.kind='ntk'",
     "choose one of"),
    ({"positions": "rotary", "rope_scaling": {"kind": "linear", "factor": 0.5}}, "rope_scaling.factor=0.5",
     r"\[1, 3.4e38\]"),
    ({"positions": "rotary", "rope_scaling": {"kind": "linear"}}, "rope_scaling=", "kind and factor among them"),
    ({"positions": "rotary", "rope_scaling": {"kind": "linear", "factor": 2.0, "scale": 1}}, "rope_scaling=",
     "it takes the keys"),
    ({"positions": "rotary", "rope_scaling": {"kind": "linear", "factor": 2.0, "original_max_len": 8}},
     "rope_scaling.original_max_len=8", "rope_scaling.kind='linear' does not read it"),
    ({"positions": "rotary", "rope_scaling": {"kind": "llama3", "factor": 2.0}}, "rope_scaling.original_max_len=None",
     "whole number"),
    ({"positions": "rotary", "rope_scaling": {"kind": "llama3", "factor": 2.0, "original_max_len": 8,
                                              "low_freq_factor": 4.0}}, "rope_scaling.low_freq_factor=4.0",
     "below rope_scaling.high_freq_factor=4.0"),
    ({"positions": "rotary", "rope_scaling": {"kind": "yarn", "factor": 2.0, "original_max_len": 8,
                                              "attention_factor": float("nan")}}, "rope_scaling.attention_factor=nan",
     r"\(0, 3.4e38\]"),
    ({"positions": "rotary", "rope_scaling": {"kind": "yarn", "factor": 2.0, "original_max_len": 8, "truncate": 1}},
     "rope_scaling.truncate=1", "True or False"),
    ({"positions": "rotary", "rope_scaling": "linear"}, "rope_scaling='linear'", "None or a RopeScaling"),
])
def test_model_config_rejects_bad_values(changes, field, hint):
    kwargs = {"vocab_size": 10, "d_model": 32, "n_heads": 4} | changes
    with pytest.raises(ValueError, match=rf"{field}.*{hint}"):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("changes, field", [
    ({"steps": 0}, "steps=0"), ({"batch_size": -1}, "batch_size=-1"), ({"optimizer": {"lr": 0.0}}, "lr=0.0"),
    ({"optimizer": {"warmup": 10}, "steps": 10}, "warmup=10"), ({"optimizer": {"b2": 1.0}}, "b2=1.0"),
    ({"optimizer": {"grad_clip": 0}}, "grad_clip=0"), ({"optimizer": {"lr": 1e300}}, "lr=1e\\+300"),
    ({"seed": 2**32}, "seed=4294967296"), ({"seed": -1}, "seed=-1"), ({"steps": 2**31}, "steps=2147483648"),
    ({"optimizer": {"weight_decay": float("nan")}}, "weight_decay=nan"),
    ({"optimizer": {"beta1": 0.9}}, r"optimizer has no settings \['beta1'\]"),
    ({"optimizer": 3e-3}, "optimizer=0.003 must be an OptimizerConfig or a dict"),
    ({"lora": {"alpha": 8.0}}, "lora needs lora.rank='N'"), ({"lora": {"rank": 0}}, "lora.rank=0"),
    ({"lora": {"rank": 2, "targets": "ffn"}}, "lora.targets='ffn'"),
    ({"optimizer": {"lr": 3e-3, "min_lr": 1.0}}, r"min_lr=1.0 is invalid.*\[0, lr=0.003\]"),
])
def test_train_config_rejects_bad_values(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**changes)


def test_float64_without_x64_says_how_to_enable_it():
    for field in ("dtype", "param_dtype"):
        with pytest.raises(ValueError, match=rf"{field}='float64'.*jax_enable_x64"):
            ModelConfig(vocab_size=5, **{field: "float64"})
    with enable_x64():
        assert ModelConfig(vocab_size=5, dtype="float64", param_dtype="float64").residual_dtype == jnp.float64


def test_numpy_numbers_are_the_numbers_they_stand_for():
    tc = TrainConfig(steps=np.int64(40), optimizer={"lr": np.float32(2e-3)})
    assert tc.steps == 40 and type(tc.steps) is int and type(tc.optimizer.lr) is float
    assert tc == TrainConfig(steps=40, optimizer={"lr": tc.optimizer.lr})
