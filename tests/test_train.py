"""The train step, the schedule, batches, evaluation."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import data, model, testing, train
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.errors import ConfigError
from tests.helpers import assert_close_scaled, count_calls, enable_x64, standard_promotion

MC = ModelConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=1, max_len=8)
TC = TrainConfig(steps=20, batch_size=4, log_every=5, eval_every=10, save_every=10,
                 optimizer={"lr": 1e-2, "warmup": 2})


@pytest.fixture(autouse=True)
def _optax_promotion():
    with standard_promotion():
        yield


def test_schedule_by_hand():
    tc = TrainConfig(steps=100, optimizer={"lr": 1.0, "min_lr": 0.1, "warmup": 10})
    f = train.learning_rate_schedule(tc.optimizer)
    assert float(f(0)) == 0.0 and float(f(5)) == pytest.approx(0.5) and float(f(10)) == pytest.approx(1.0)
    # Cosine from 1 to 0.1 over steps 10..100: halfway (step 55) is 0.55.
    assert float(f(55)) == pytest.approx(0.55, abs=1e-6) and float(f(100)) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices_and_embedding():
    mask = train.decay_mask(model.init(jax.random.key(0), MC))
    assert mask["embed"]["table"] and mask["head"]["w"] and mask["blocks"]["attn"]["qkv"]["w"]
    assert not mask["head"]["b"] and not mask["ln_f"]["scale"] and not mask["blocks"]["ln1"]["bias"]


@pytest.mark.parametrize("method", ["adamw", "muon"])
def test_train_step_compiles_once_and_learns(key, monkeypatch, method):
    ids = jnp.asarray(np.tile(np.arange(13, dtype=np.int32), 20))          # a cycle: perfectly learnable
    init_key, data_key = jax.random.split(key)
    tc = TC.replace(steps=60, batch_size=5, optimizer=TC.optimizer.replace(lr=1.1e-2, method=method))   # compiled nowhere else
    state = train.init_state(init_key, MC, tc.optimizer)
    # Traced once each: train_step calls step_fn, batch_at calls sample_batch, while tracing only.
    step_traces, batch_traces = count_calls(monkeypatch, train, "step_fn"), count_calls(monkeypatch, train, "sample_batch")
    losses, compiled = [], []
    for _ in range(60):
        batch = train.batch_at(ids, data_key, state.step, batch_size=tc.batch_size, context=MC.max_len)
        state, metrics = train.train_step(state, batch, model=MC, optimizer_config=tc.optimizer)
        losses.append(float(metrics["loss"]))
        compiled.append((len(step_traces), len(batch_traces)))
    assert set(compiled) == {compiled[0]} and compiled[0][0] == 1 >= compiled[0][1]   # traced at the first step
    # (batch_at once, by whichever method's test ran first), never again
    assert int(state.step) == 60
    assert losses[0] > math.log(13) - 0.5 and losses[-1] < 0.5 * losses[0]


def test_train_step_equals_value_and_grad_plus_optax(key, rng):
    """The jitted step is exactly loss -> grad -> the optimiser, written out by hand here."""
    import optax
    state = train.init_state(key, MC, TC.optimizer)
    x = rng.integers(0, 13, (4, 8)).astype(np.int32)
    y = np.roll(x, -1, axis=1)

    @jax.jit                              # jitted only for speed; jit == no jit is tested elsewhere
    def by_hand(params):
        loss, grads = jax.value_and_grad(lambda p: train.cross_entropy(MC.apply(p, x), y))(params)
        opt = train.make_optimizer(TC.optimizer)
        updates, _ = opt.update(grads, opt.init(params), params)
        return loss, optax.apply_updates(params, updates), optax.tree.norm(grads)

    loss, expected, grad_norm = by_hand(state.params)
    new_state, metrics = train.train_step(jax.tree.map(jnp.copy, state), (x, y), model=MC, optimizer_config=TC.optimizer)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, expected)
    assert int(new_state.step) == 1


def test_batch_of_a_step_is_a_function_of_the_key_and_step(key):
    """Step t's batch comes from fold_in(data_key, t): the same on every call (resume is
    exact), another for another step."""
    ids = jnp.arange(200, dtype=jnp.int32)
    a, b, c = (train.batch_at(ids, key, jnp.int32(t), batch_size=4, context=8) for t in (5, 5, 6))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    expected = data.sample_batch(ids, jax.random.fold_in(key, 5), batch_size=4, context=8)
    np.testing.assert_array_equal(a[0], expected[0])


def test_is_finite_looks_at_every_float_leaf():
    tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, 2.0]), "n": jnp.int32(7)}}
    assert bool(train.is_finite(tree))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(train.is_finite({**tree, "b": {"c": jnp.array([1.0, bad]), "n": jnp.int32(7)}}))


def test_sample_batch_targets_are_inputs_shifted(key):
    ids = jnp.arange(100, dtype=jnp.int32)
    x, y = jax.jit(data.sample_batch, static_argnames=("batch_size", "context"))(ids, key, batch_size=5, context=8)
    assert x.shape == y.shape == (5, 8)
    np.testing.assert_array_equal(y, x + 1)                           # consecutive text
    assert int(x.max()) < 99


def test_evaluate_averages_every_window_once(key, rng):
    params = model.init(key, MC)
    ids = rng.integers(0, 13, 8 * 10 + 1).astype(np.int32)
    windows = np.asarray(data.eval_windows(ids, 8))
    assert windows.shape == (10, 9)
    np.testing.assert_array_equal(windows[1, 0], ids[8])
    expected = float(train.cross_entropy(MC.apply(params, windows[:, :-1]), jnp.asarray(windows[:, 1:])))
    # batch_size 3 does not divide 10: the padded last batch must not count.
    assert train.evaluate(params, windows, model=MC, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_dropout_is_off_without_a_rate_and_fresh_at_every_step(key, rng):
    """Rate 0: the model with a key is bit for bit the model without one. Rate 0.3: the
    same state and batch give other losses at steps 0 and 1 (fresh masks per step), the
    same loss when step 0 is repeated, and evaluation (no key) is deterministic."""
    x = rng.integers(0, 13, (4, 8)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    params = model.init(key, MC)
    apply = jax.jit(model.apply, static_argnames="config")
    np.testing.assert_array_equal(apply(params, x, config=MC, key=key), apply(params, x, config=MC))
    dropped = MC.replace(dropout=0.3)
    np.testing.assert_array_equal(apply(params, x, config=dropped), apply(params, x, config=MC))   # no key: no drop
    step = jax.jit(train.step_fn(dropped, TC.optimizer))
    state = train.init_state(key, dropped, TC.optimizer)
    at = [float(step(state._replace(step=jnp.int32(s)), (x, y))[1]["loss"]) for s in (0, 1, 0)]
    assert at[0] != at[1] and at[0] == at[2]


@given(accumulate=st.sampled_from([2, 4]), dtype=testing.dtypes())
def test_gradient_accumulation_is_the_big_batch(accumulate, dtype):
    """K micro-batches of B / K, their gradients averaged, then one update: the same
    losses and parameters as the batch of B at once, over three steps (float64 to
    1e-12, float32 to round-off, of each leaf's scale)."""
    tol = {"float32": 2e-5, "float64": 1e-12}[dtype]
    with (enable_x64() if dtype == "float64" else contextlib.nullcontext()):
        mc = MC.replace(dtype=dtype, param_dtype=dtype)
        ids = jnp.asarray(np.tile(np.arange(13, dtype=np.int32), 20))
        runs = {}
        for k in (1, accumulate):
            state, losses = train.init_state(jax.random.key(7), mc, TC.optimizer), []
            for t in range(3):
                batch = train.batch_at(ids, train.keys(0).data, t, batch_size=8, context=mc.max_len)
                state, metrics = train.train_step(state, batch, model=mc, optimizer_config=TC.optimizer,
                                                  accumulate=k)
                losses.append(float(metrics["loss"]))
            runs[k] = (jax.device_get(state.params), losses)
    assert_close_scaled(runs[accumulate][0], runs[1][0], tol)
    np.testing.assert_allclose(runs[accumulate][1], runs[1][1], rtol=tol)


def test_a_batch_the_micro_batches_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match="grad_accum=3 is invalid: it must divide batch_size=8"):
        TrainConfig(batch_size=8, grad_accum=3)


def test_the_step_reports_the_rate_of_its_schedule(key):
    tc = TrainConfig(steps=10, optimizer={"lr": 1.0, "warmup": 4})
    state = train.init_state(key, MC, tc.optimizer)
    x = jnp.zeros((2, MC.max_len), jnp.int32)
    rates = []
    for _ in range(5):
        state, m = train.train_step(state, (x, x), model=MC, optimizer_config=tc.optimizer)
        rates.append(float(m["lr"]))
    assert rates == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_training_loaded_parameters_leaves_them_usable(key):
    """train_step donates its state: `new_state` copies the parameters it starts from, so
    the loaded ones stay alive (taking ck.state.params and training on deleted them)."""
    tc = TrainConfig(steps=4)                                  # its warm-up is no step: the first one moves
    params = model.init(key, MC)
    state = train.new_state(params, train.make_optimizer(tc.optimizer))
    x = jnp.zeros((2, MC.max_len), jnp.int32)
    state, _ = train.train_step(state, (x, x), model=MC, optimizer_config=tc.optimizer)
    assert np.isfinite(np.asarray(params["embed"]["table"])).all()           # not deleted
    assert not np.array_equal(np.asarray(params["embed"]["table"]), np.asarray(state.params["embed"]["table"]))


# ----------------------------------------------------------------------------- Muon

MUON = dict(decay_steps=10, warmup=0, lr=1e-3, muon_lr=0.02, grad_clip=1e30, weight_decay=0.0, method="muon")


def _muon_update(grads, params, momentum=0.0, **settings):
    """The first update of make_optimizer's Muon on these gradients: with no momentum
    (and Nesterov's mix of it) the momentum is the gradient itself."""
    from minitx_fn.config import OptimizerConfig
    opt = train.make_optimizer(OptimizerConfig(**{**MUON, "momentum": momentum, **settings}))
    return opt.update(grads, opt.init(params), params)[0]


def _polar(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """G = U S V^T in float64 (NumPy's SVD): the independent reference for U V^T."""
    return np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)


SHAPES = st.sampled_from([(8, 8), (8, 24), (24, 8), (16, 48)])


@given(shape=SHAPES, seed=st.integers(0, 2**31), power=st.integers(-8, 8), x64=st.booleans())
def test_muon_steps_along_the_polar_factor_whatever_the_gradients_scale(shape, seed, power, x64):
    """Laws of the orthogonalisation, through the optimiser itself (momentum 0): the
    step of c G is the step of G (c > 0); its singular vectors are G's (the SVD's
    U V^T direction); its singular values, over lr and the width scale
    sqrt(max(1, D_out / D_in)), land in a band around 1 (Newton-Schulz's quintic
    does not converge all the way: Keller Jordan's Muon, which optax follows); a
    transposed gradient steps along the transposed direction. float32 and float64."""
    with enable_x64() if x64 else contextlib.nullcontext():
        dtype = jnp.float64 if x64 else jnp.float32
        g = np.random.default_rng(seed).standard_normal(shape)
        params = {"w": jnp.zeros(shape, dtype)}
        step = np.asarray(_muon_update({"w": jnp.asarray(g, dtype)}, params)["w"], np.float64)
        scaled = np.asarray(_muon_update({"w": jnp.asarray(g * 2.0 ** power, dtype)}, params)["w"], np.float64)
        np.testing.assert_allclose(scaled, step, atol=1e-4 * np.abs(step).max())
        width = np.sqrt(max(1.0, shape[1] / shape[0]))
        u, _, vt = _polar(g)
        inner = u.T @ (-step / (MUON["muon_lr"] * width)) @ vt.T          # diagonal when U, V are G's
        diagonal = np.diag(inner)
        assert np.abs(inner - np.diag(diagonal)).max() <= 0.02 * diagonal.max()
        assert 0.5 <= diagonal.min() and diagonal.max() <= 1.25, diagonal
        flipped = _muon_update({"w": jnp.asarray(g.T, dtype)}, {"w": jnp.zeros(shape[::-1], dtype)})["w"]
        width_t = np.sqrt(max(1.0, shape[0] / shape[1]))
        np.testing.assert_allclose(np.asarray(flipped, np.float64) / width_t, step.T / width, atol=1e-4 * width)


def test_muons_rate_is_its_own_whatever_adams_rate():
    """The matrices step at muon_lr on the schedule's shape, however small lr is (a
    float32 ratio of the two rates once turned a tiny lr into no step at all)."""
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)}
    steps = [np.asarray(_muon_update(g, {"w": jnp.zeros((8, 8))}, lr=lr)["w"]) for lr in (1e-3, 1e-38)]
    np.testing.assert_allclose(steps[1], steps[0], rtol=1e-6)
    assert np.abs(steps[0]).max() > 0


def test_muon_goes_by_name_every_w_but_the_top_level_heads():
    """The rule of `muon_dimensions`, as docs/training.md states it."""
    z = jnp.zeros
    dims = train.muon_dimensions({"head": {"w": z((8, 5))}, "lm_head": {"w": z((8, 5))},
                                  "blocks": {"head": {"w": z((2, 8, 8))}, "kernel": z((8, 8)), "w1": {"w": z(8)}}})
    assert dims["head"]["w"] is None and dims["blocks"]["kernel"] is None and dims["blocks"]["w1"]["w"] is None
    assert dims["lm_head"]["w"] == optax.contrib.MuonDimensionNumbers(0, 1)
    assert dims["blocks"]["head"]["w"] == optax.contrib.MuonDimensionNumbers(1, 2)


@given(seed=st.integers(0, 2**31), layers=st.sampled_from([1, 3]))
def test_muon_orthogonalises_each_stacked_layer_alone_and_adam_steps_the_rest(seed, layers):
    """Stacked blocks (L, D_in, D_out): each layer's step is the step of that matrix
    alone. The embedding, the head and the biases step by Adam, Nesterov's (NAdam, as
    optax's Muon pairs it): its first step is -lr (1 + b1 / (1 + b1)) sign(g) whatever
    g's size (Dozat's bias-corrected m_hat = b1 g / (1 + b1) + g, v_hat = g^2), and no
    weight decay touches them."""
    rng = np.random.default_rng(seed)
    grads = {"blocks": {"mlp": {"w": rng.standard_normal((layers, 8, 24)), "b": rng.standard_normal((layers, 24))}},
             "head": {"w": rng.standard_normal((8, 5))}, "embed": {"table": rng.standard_normal((5, 8))}}
    grads = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), grads)
    params = jax.tree.map(jnp.ones_like, grads)
    step = _muon_update(grads, params, weight_decay=0.5)
    for i in range(layers):
        alone = _muon_update({"w": grads["blocks"]["mlp"]["w"][i]}, {"w": params["blocks"]["mlp"]["w"][i]},
                             weight_decay=0.5)
        np.testing.assert_allclose(step["blocks"]["mlp"]["w"][i], alone["w"], rtol=1e-5, atol=1e-7)
    for path in (("head", "w"), ("embed", "table"), ("blocks", "mlp", "b")):
        got, g = step, grads
        for key in path:
            got, g = got[key], g[key]
        b1 = 0.9                                                           # OptimizerConfig's default
        np.testing.assert_allclose(got, -MUON["lr"] * (1 + b1 / (1 + b1)) * np.sign(g), rtol=1e-4, atol=1e-7)
