"""The train step, the schedule, evaluation and the loop's bookkeeping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitx_fn import data, model, train
from minitx_fn.config import ModelConfig, TrainConfig
from tests.helpers import standard_promotion

MC = ModelConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=1, max_len=8)
TC = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup=2, log_every=5, eval_every=10, save_every=10)


@pytest.fixture(autouse=True)
def _optax_promotion():
    with standard_promotion():
        yield


def test_schedule_by_hand():
    tc = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup=10)
    f = train.learning_rate_schedule(tc)
    assert float(f(0)) == 0.0 and float(f(5)) == pytest.approx(0.5) and float(f(10)) == pytest.approx(1.0)
    # Cosine from 1 to 0.1 over steps 10..100: halfway (step 55) is 0.55.
    assert float(f(55)) == pytest.approx(0.55, abs=1e-6) and float(f(100)) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_and_embedding():
    mask = train._decay_mask(model.init(jax.random.key(0), MC))
    assert mask["embed"]["table"] and mask["head"]["w"] and mask["blocks"]["attn"]["qkv"]["w"]
    assert not mask["head"]["b"] and not mask["ln_f"]["scale"] and not mask["blocks"]["ln1"]["bias"]


def test_train_step_compiles_once_and_learns(key):
    ids = jnp.asarray(np.tile(np.arange(13, dtype=np.int32), 20))          # a cycle: perfectly learnable
    init_key, data_key = jax.random.split(key)
    state = train.init_state(init_key, MC, TC)
    before = train.train_step._cache_size()
    losses = []
    for _ in range(60):
        state, metrics = train.train_step(state, ids, data_key, model_config=MC, train_config=TC.replace(steps=60))
        losses.append(float(metrics["loss"]))
    assert train.train_step._cache_size() - before == 1
    assert int(state.step) == 60
    assert losses[0] > math.log(13) - 0.5 and losses[-1] < 0.5 * losses[0]


def test_update_equals_value_and_grad_plus_optax(key):
    """The jitted step is exactly loss -> grad -> the optimiser, written out by hand here."""
    import optax
    state = train.init_state(key, MC, TC)
    x = jax.random.randint(key, (4, 8), 0, 13)
    y = jnp.roll(x, -1, axis=1)
    @jax.jit                              # jitted only for speed; jit == no jit is tested elsewhere
    def by_hand(params):
        loss, grads = jax.value_and_grad(model.loss)(params, x, y, config=MC)
        opt = train.make_optimizer(TC)
        updates, _ = opt.update(grads, opt.init(params), params)
        return loss, optax.apply_updates(params, updates)

    loss, expected = by_hand(state.params)
    new_state, metrics = train.update(jax.tree.map(jnp.copy, state), x, y, model_config=MC, train_config=TC)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected)


def test_sample_batch_targets_are_inputs_shifted(key):
    ids = jnp.arange(100, dtype=jnp.int32)
    x, y = data.sample_batch(ids, key, batch_size=5, context=8)
    assert x.shape == y.shape == (5, 8)
    np.testing.assert_array_equal(y, x + 1)                           # consecutive text
    assert int(x.max()) < 99


def test_evaluate_averages_every_window_once(key):
    params = model.init(key, MC)
    ids = np.asarray(jax.random.randint(key, (8 * 10 + 1,), 0, 13))
    windows = data.eval_windows(ids, 8)
    assert windows.shape == (10, 9)
    np.testing.assert_array_equal(windows[1, 0], ids[8])
    expected = float(model.loss(params, jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:]), config=MC))
    # batch_size 3 does not divide 10: the padded last batch must not count.
    assert train.evaluate(params, windows, config=MC, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_nonfinite_loss_names_the_first_bad_step(key):
    ids = jnp.asarray(np.tile(np.arange(13, dtype=np.int32), 20))
    init_key, data_key = jax.random.split(key)
    tc = TC.replace(lr=1e30, steps=200, log_every=50)
    state = train.init_state(init_key, MC, tc)
    saved_steps = []
    with pytest.raises(train.NonFiniteLossError) as info:
        train.fit(state, data=ids, data_key=data_key, model_config=MC, train_config=tc,
                  save=lambda s: saved_steps.append(int(s.step)))
    assert info.value.step in range(1, 201) and not np.isfinite(info.value.value)
    # Saves happen only after a finite check of every step before them.
    assert all(step < info.value.step for step in saved_steps)
