"""The train step: one batch from tokens to new parameters, jitted; and evaluation.

    key_t      = fold_in(data_key, t)                    a fresh key per step, never reused
    x, y       = batch_at(data, data_key, t)             (B, T) inputs and next-token targets
    loss, g    = value_and_grad(model.loss)(params, x, y)
    params'    = AdamW(clip(g)) with warm-up + cosine learning rate

`train_step(state, batch) -> (state, metrics)` does the last two lines in one jitted
function that donates the old state, so XLA updates parameters and optimiser
moments in place. Where the batch comes from is the caller's business: `batch_at`
samples it on the device from text kept there. Because the batch key is a function
of the step alone, a resumed run sees exactly the batches an uninterrupted one
would. The loop around the step (logging, checkpoints, signals) is `loop.py`; several
devices wrap the step (`distributed.data_parallel`), they are not threaded through it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitx_fn import model
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.data import sample_batch

Batch = tuple[jax.Array, jax.Array]        # x, y: (B, T) inputs and next-token targets


class TrainState(NamedTuple):
    params: dict      # the model's parameter tree
    opt_state: Any    # optax state: clip (empty), AdamW moments mu and nu shaped like params, count
    step: jax.Array   # () int32, steps taken so far


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to lr over `warmup` steps, then cosine decay to min_lr at `decay_steps`.

    Example:
        >>> f = learning_rate_schedule(TrainConfig(steps=100, lr=1.0, warmup=10))
        >>> [round(float(f(s)), 3) for s in (0, 5, 10, 100)]
        [0.0, 0.5, 1.0, 0.1]
    """
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, tc.decay_steps, end_value=tc.min_lr)


def decay_mask(params: dict) -> dict:
    """True for the leaves weight decay applies to: weight matrices and the embedding
    table, not biases or norms.

    Example:
        >>> decay_mask({"w": 0, "b": 0, "table": 0})
        {'b': False, 'table': True, 'w': True}
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("w", "table"), params)


def make_optimizer(tc: TrainConfig, mask: Callable[[Any], Any] = decay_mask) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on what `mask` marks) on the schedule.

    The benchmarks pass a mask for the Flax reference's parameter names, so both
    models train with this one optimiser.

    Example:
        >>> opt = make_optimizer(TrainConfig())
        >>> state = opt.init({'w': jnp.zeros((2, 2))})
        >>> type(opt).__name__
        'GradientTransformationExtraArgs'
    """
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=mask),
    )


class RunKeys(NamedTuple):
    init: jax.Array      # the parameters' initialisation
    data: jax.Array      # batches: the key of step t is fold_in(data, t)
    dropout: jax.Array   # dropout masks: the key of step t is fold_in(dropout, t)


def keys(seed: int) -> RunKeys:
    """The run's keys from its seed, one per consumer: split(key(seed), 3). (Its first
    two equal split(key(seed), 2), the keys of runs made before dropout existed, so
    their batches are unchanged.)

    Example:
        >>> init_key, data_key, dropout_key = keys(0)
        >>> bool((jax.random.key_data(init_key) != jax.random.key_data(data_key)).any())
        True
    """
    return RunKeys(*jax.random.split(jax.random.key(seed), 3))


@functools.partial(jax.jit, static_argnames=("model_config", "train_config"))
def init_state(key: jax.Array, model_config: ModelConfig, train_config: TrainConfig) -> TrainState:
    """Fresh parameters, the optimiser's initial state, and step 0 (jitted, like `model.init`).

    Example:
        >>> s = init_state(jax.random.key(0), ModelConfig(vocab_size=5, d_model=8, n_heads=2), TrainConfig())
        >>> int(s.step), s.params['head']['w'].shape
        (0, (8, 5))
    """
    params = model.init(key, model_config)
    return TrainState(params, make_optimizer(train_config).init(params), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("batch_size", "context"))
def batch_at(data: jax.Array, data_key: jax.Array, step: jax.Array, *, batch_size: int, context: int) -> Batch:
    """The batch of step t: B windows of data (N,) at offsets drawn with fold_in(data_key, t).

    Jitted, and given the step as a device array (state.step), so sampling stays on
    the device with the data.

    Example:
        >>> x, y = batch_at(jnp.arange(100), keys(0).data, jnp.int32(3), batch_size=2, context=4)
        >>> x.shape, bool((y == x + 1).all())
        ((2, 4), True)
    """
    return sample_batch(data, jax.random.fold_in(data_key, step), batch_size=batch_size, context=context)


def step_fn(model_config: ModelConfig, train_config: TrainConfig) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The step for these configs as a plain function (state, batch) -> (state, metrics),
    metrics {"loss", "grad_norm"}: what `train_step` jits, and what
    `distributed.data_parallel` jits with shardings.

    Example:
        >>> mc, tc = ModelConfig(vocab_size=5, d_model=8, n_heads=2), TrainConfig()
        >>> state = init_state(jax.random.key(0), mc, tc)
        >>> x = jnp.zeros((2, 4), jnp.int32)
        >>> new, metrics = jax.eval_shape(step_fn(mc, tc), state, (x, x))   # traced, not run: shapes only
        >>> new.step.shape, sorted(metrics)
        ((), ['grad_norm', 'loss'])
    """
    optimizer = make_optimizer(train_config)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        x, y = batch
        # Dropout masks from fold_in(dropout_key, step): fresh each step, and a resumed
        # run draws the masks an uninterrupted one would. No key at all at rate 0.
        key = jax.random.fold_in(keys(train_config.seed).dropout, state.step) if model_config.dropout else None
        loss, grads = jax.value_and_grad(model.loss)(state.params, x, y, config=model_config, key=key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))     # before clipping
        return TrainState(params, opt_state, state.step + 1), {"loss": loss, "grad_norm": grad_norm}

    return step


@functools.partial(jax.jit, static_argnames=("model_config", "train_config"), donate_argnums=0)
def train_step(state: TrainState, batch: Batch, *, model_config: ModelConfig,
               train_config: TrainConfig) -> tuple[TrainState, dict]:
    """One step on batch = (x, y), each (B, T): returns the new state and {"loss", "grad_norm"}.

    The old state is donated: do not use it after the call. The configs are static
    (hashed into the compilation cache): pass `train_config.step_config` to share one
    compiled step between runs that differ only in their loop's cadence.

    Example:
        >>> mc, tc = ModelConfig(vocab_size=5, d_model=8, n_heads=2), TrainConfig()
        >>> x = jnp.zeros((2, 4), jnp.int32)
        >>> state, metrics = train_step(init_state(jax.random.key(0), mc, tc), (x, x), model_config=mc, train_config=tc)
        >>> int(state.step)
        1
    """
    return step_fn(model_config, train_config)(state, batch)


def is_finite(tree) -> jax.Array:
    """() bool: every floating-point leaf of the tree is finite (no NaN, no +-inf).

    Example:
        >>> bool(is_finite({"w": jnp.array([1.0, jnp.inf])})), bool(is_finite({"w": jnp.ones(2), "n": jnp.int32(1)}))
        (False, True)
    """
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@functools.partial(jax.jit, static_argnames="config")
def _window_loss_sum(params: dict, windows: jax.Array, weights: jax.Array, *, config: ModelConfig) -> jax.Array:
    """windows (B, T + 1), weights (B,) -> sum over rows of weight * mean token loss of the row."""
    logits = model.apply(params, windows[:, :-1], config=config)                       # (B, T, V)
    return jnp.sum(model.token_losses(logits, windows[:, 1:]).mean(axis=1) * weights)


def evaluate(params: dict, windows: np.ndarray, *, config: ModelConfig, batch_size: int = 64) -> float:
    """Mean next-token loss over all windows (W, T + 1), in fixed-size batches (the last
    one padded with zero-weight rows, so one compiled shape serves every batch).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> windows = np.zeros((3, 5), np.int32)                        # W = 3 windows of T + 1 = 5
        >>> evaluate(model.init(jax.random.key(0), cfg), windows, config=cfg, batch_size=2) > 0
        True
    """
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[:len(chunk)] = 1.0
        chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
        total += float(_window_loss_sum(params, jnp.asarray(chunk), jnp.asarray(weights), config=config))
    return total / len(windows)
