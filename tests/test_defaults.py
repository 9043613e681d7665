"""The presets (`defaults.PRESETS`): what each makes of a job, as `job.make` and
`job.plan` apply them."""

from __future__ import annotations

import io

import pytest

from minitx_fn import defaults, job


@pytest.fixture
def text(tmp_path, rng) -> str:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(["to", "be", "or", "not"], 3000)))
    return str(path)


def test_shakespeare_char_preset_is_nanogpts_gpu_recipe(text):
    """The preset's configs, as planned (the run itself is the GPU script's job: on two
    CPU cores its 5000 steps take hours)."""
    plan = job.plan(job.make(text, preset="shakespeare-char"), log=io.StringIO())
    mc, tc, oc = plan.model, plan.train_config, plan.train_config.optimizer
    assert (mc.n_layers, mc.n_heads, mc.d_model, mc.max_len, mc.dropout) == (6, 6, 384, 256, 0.2)
    assert (tc.batch_size, tc.steps, oc.lr, oc.warmup, oc.min_lr) == (64, 5000, 1e-3, 100, 1e-4)
    assert (oc.b1, oc.b2, oc.weight_decay, oc.grad_clip) == (0.9, 0.99, 0.1, 1.0)


@pytest.mark.parametrize("preset", ["shakespeare-baby", "shakespeare-char"])
def test_a_lower_lr_brings_the_presets_final_lr_down_with_it(text, preset):
    """No preset fixes min_lr: it is lr / 10, so an lr below the preset's floor is a
    valid run, not an error about a setting the user never gave."""
    oc = job.make(text, preset=preset, training={"optimizer": {"lr": 5e-5}}).training.optimizer
    assert (oc.lr, oc.min_lr) == (5e-5, 5e-5 / 10)


def test_the_default_preset_is_hello_on_the_built_in_corpus_and_shakespeare_baby_on_a_text():
    assert defaults.preset(None, has_data=False) == defaults.PRESETS[defaults.PRESET_BUILTIN]
    assert defaults.preset(None, has_data=True) == defaults.PRESETS[defaults.PRESET_TEXT]
    assert (defaults.PRESET_BUILTIN, defaults.PRESET_TEXT) == ("hello", "shakespeare-baby")
    with pytest.raises(ValueError, match="preset"):
        defaults.preset("nope", has_data=False)
