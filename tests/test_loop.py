"""The training loop: what it logs, what it refuses to save, how signals stop it, and
that stopping and resuming changes nothing."""

from __future__ import annotations

import functools
import io
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minitx_fn import loop, model, runs, train
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.signals import Interrupted, StopSignals
from tests.helpers import standard_promotion

MC = ModelConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=1, max_len=8)
TC = TrainConfig(steps=20, batch_size=4, log_every=5, eval_every=10, save_every=10,
                 optimizer={"lr": 1e-2, "warmup": 2})
DATA = jnp.asarray(np.tile(np.arange(13, dtype=np.int32), 20))


@pytest.fixture(autouse=True)
def _optax_promotion():
    with standard_promotion():
        yield


def run(tc=TC, state=None, step=None, mc=MC, **kwargs):
    """fit on the 13-token cycle from a fresh state (or `state`), with train_step (or `step`)."""
    init_key, data_key, _ = train.keys(tc.seed)
    state = train.init_state(init_key, mc, tc.optimizer) if state is None else state
    step = step or functools.partial(train.train_step, model=mc, optimizer_config=tc.optimizer)

    def next_batch(s):
        return train.batch_at(DATA, data_key, s, batch_size=tc.batch_size, context=mc.max_len)

    kwargs.setdefault("out", io.StringIO())
    return loop.fit(state, step=step, next_batch=next_batch, steps=tc.steps, log_every=tc.log_every,
                    eval_every=tc.eval_every, save_every=tc.save_every, tokens_per_step=tc.batch_size * mc.max_len,
                    **kwargs)


def test_every_evaluation_reaches_the_log_and_the_metrics(tmp_path):
    """eval_every = 6 is no multiple of log_every = 4: steps 6, 12 and 18 are evaluated
    and must each be a record (issue 15: evaluations were computed and lost)."""
    metrics = str(tmp_path / runs.METRICS)
    out = io.StringIO()
    evaluated = []

    def evaluate(params):
        evaluated.append(1)
        return 1.5

    run(TC.replace(log_every=4, eval_every=6, steps=20), evaluate=evaluate, metrics_path=metrics, out=out)
    records = runs.read_records(metrics).records
    assert [r["step"] for r in records] == [4, 6, 8, 12, 16, 18, 20]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12, 18, 20] and len(evaluated) == 4
    assert "Step 6, Loss: " in out.getvalue() and "Val loss: 1.5000" in out.getvalue()


def test_the_loss_of_a_record_is_the_mean_since_the_previous_record():
    losses = []

    def step(state, batch):
        state, metrics = train.train_step(state, batch, model=MC, optimizer_config=TC.optimizer)
        losses.append(float(metrics["loss"]))
        return state, metrics

    result = run(step=step)
    assert result.last_record["step"] == 20
    assert result.last_record["loss"] == pytest.approx(np.mean(losses[15:20]), rel=1e-6)


def test_a_nan_loss_names_the_first_bad_step_and_nothing_after_it_is_saved():
    saved = []
    with pytest.raises(loop.NonFiniteError) as info:
        run(TC.replace(steps=200, log_every=50, save_every=1, optimizer=TC.optimizer.replace(lr=1e30, warmup=0)),
            save=lambda s: saved.append(int(s.step)))
    assert info.value.step >= 1 and all(s < info.value.step for s in saved)


def test_non_finite_parameters_never_reach_a_save():
    """A step whose loss is finite but whose update leaves an infinity in the parameters
    (issue 12: --lr 1e300 saved infinities and called them the last good checkpoint):
    the save of that step is refused, and the one before it stands."""
    def step(state, batch):
        state, metrics = train.train_step(state, batch, model=MC, optimizer_config=TC.optimizer)
        if int(state.step) == 3:
            params = jax.tree.map(lambda a: a, state.params)
            params["head"]["b"] = params["head"]["b"].at[0].set(jnp.inf)
            state = state._replace(params=params)
        return state, metrics

    saved = []
    with pytest.raises(loop.NonFiniteError) as info:
        run(TC.replace(save_every=1, log_every=1), step=step, save=lambda s: saved.append(int(s.step)))
    assert (info.value.step, info.value.what) == (3, "parameters") and saved == [1, 2]


def test_an_overflowing_gradient_norm_stops_the_run_instead_of_a_step_that_changes_nothing():
    """A finite loss with an infinite gradient norm: clipping would scale every gradient
    by 0 and the run would go on unchanged (a LoRA alpha of 3e38 did). It is named at
    its step, and nothing from that step on is saved."""
    def step(state, batch):
        state, metrics = train.train_step(state, batch, model=MC, optimizer_config=TC.optimizer)
        if int(state.step) >= 2:
            metrics = {**metrics, "grad_norm": jnp.float32(jnp.inf)}
        return state, metrics

    saved = []
    with pytest.raises(loop.NonFiniteError) as info:
        run(TC.replace(save_every=1, log_every=1), step=step, save=lambda s: saved.append(int(s.step)))
    assert (info.value.step, info.value.what) == (2, "gradient norm") and saved == [1]


def _signal_at(step_number: int, signum: int):
    """A step function that sends `signum` to this process after step `step_number`."""
    def step(state, batch):
        state, metrics = train.train_step(state, batch, model=MC, optimizer_config=TC.replace(steps=1000).optimizer)
        if int(state.step) == step_number:
            os.kill(os.getpid(), signum)
        return state, metrics
    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_saves_at_the_next_step_boundary_and_stops(signum):
    tc = TC.replace(steps=1000)
    saved, before = [], signal.getsignal(signum)
    with StopSignals() as signals:
        result = run(tc, step=_signal_at(7, signum), save=lambda s: saved.append(int(s.step)), signals=signals)
    assert result.stopped_by == signum
    assert int(result.state.step) == 7 and saved == [7]
    assert signal.getsignal(signum) is before                          # the previous handler is back


def test_a_second_signal_during_the_save_waits_for_it_to_finish():
    """The first SIGTERM asks to stop; a second one arrives while the checkpoint is
    being written: the write completes, then the run is interrupted."""
    tc = TC.replace(steps=1000)
    completed = []

    def slow_save(state):
        os.kill(os.getpid(), signal.SIGINT)          # lands inside the critical section
        completed.append(int(state.step))

    with StopSignals() as signals:
        with pytest.raises(Interrupted) as info:
            run(tc, step=_signal_at(3, signal.SIGTERM), save=slow_save, signals=signals)
    assert info.value.signum == signal.SIGINT and completed == [3]


def test_stopping_and_resuming_changes_nothing(key):
    """20 steps in one go, or 10, a stop, and 10 more from the state of step 10: the same
    parameters bit for bit (the batch of step t depends on t alone)."""
    tc = TC.replace(steps=20)
    straight = run(tc).state
    first = run(tc.replace(steps=10)).state
    resumed = run(tc, state=jax.tree.map(jnp.copy, first)).state
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, straight.opt_state)


def test_stopping_and_resuming_with_dropout_changes_nothing():
    """With dropout the masks of step t come from fold_in(dropout_key, t): a resumed run
    draws the masks the uninterrupted one did, so the parameters agree bit for bit."""
    mc, tc = MC.replace(dropout=0.2), TC.replace(steps=12)
    straight = run(tc, mc=mc).state
    first = run(tc.replace(steps=6), mc=mc).state
    resumed = run(tc, state=jax.tree.map(jnp.copy, first), mc=mc).state
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)


def test_fit_alone_installs_its_own_handlers(tmp_path):
    """A loop of one's own calls fit without a StopSignals: SIGTERM at step 3 still saves
    that step and returns stopped_by (it killed the process before)."""
    saved, before = [], signal.getsignal(signal.SIGTERM)
    result = run(TC, step=_signal_at(3, signal.SIGTERM), save=lambda s: saved.append(int(s.step)))
    assert result.stopped_by == signal.SIGTERM and saved == [int(result.state.step)] and 3 <= saved[0] <= 4
    assert signal.getsignal(signal.SIGTERM) is before                               # put back afterwards


def test_fit_logs_the_rate_the_step_ran_with_and_needs_no_model_config(tmp_path):
    """With one's own optax.adam(1e-4), metrics.jsonl said 3.17e-4 (TrainConfig's
    schedule). Now the record's lr is the step's own report, and absent without one."""
    _, data_key, _ = train.keys(TC.seed)

    def next_batch(t):
        return train.batch_at(DATA, data_key, t, batch_size=4, context=MC.max_len)

    loss_fn = train.model_loss(MC)
    for schedule, expected in ((optax.constant_schedule(1e-4), 1e-4), (None, None)):
        optimizer = optax.adam(schedule or 1e-4)
        step = jax.jit(train.make_step(loss_fn, optimizer, schedule=schedule), donate_argnums=0)
        state = train.new_state(model.init(jax.random.key(0), MC), optimizer)
        metrics = str(tmp_path / f"{expected}.jsonl")
        loop.fit(state, step=step, next_batch=next_batch, steps=4, log_every=2, metrics_path=metrics,
                 out=io.StringIO())
        records = runs.read_records(metrics).records
        assert [r.get("lr") for r in records] == [pytest.approx(expected, rel=1e-6) if expected else None] * 2
        assert all("tokens_per_s" not in r for r in records)             # no tokens_per_step given
