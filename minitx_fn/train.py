"""Loss, optimiser, the jitted train step, evaluation and the training loop.

One batch from text to new parameters:

    key_t      = fold_in(data_key, step)                 a fresh key per step, never reused
    x, y       = sample_batch(data, key_t)               (B, T) inputs and next-token targets
    loss, g    = value_and_grad(model.loss)(params, x, y)
    params'    = AdamW(clip(g)) with warm-up + cosine learning rate

`train_step` does all of it in one jitted function that donates the old state, so
XLA updates parameters and optimiser moments in place. Because the batch key is a
function of the step alone, a resumed run samples exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh

from minitx_fn import distributed, model
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.data import sample_batch


class TrainState(NamedTuple):
    params: dict      # the model's parameter tree
    opt_state: Any    # optax state: clip (empty), AdamW moments mu and nu shaped like params, count
    step: jax.Array   # () int32, steps taken so far


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"the loss became {value} at step {step}")
        self.step, self.value = step, value


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to lr over `warmup` steps, then cosine decay to min_lr at `decay_steps`.

    Example:
        >>> f = learning_rate_schedule(TrainConfig(steps=100, lr=1.0, warmup=10))
        >>> [round(float(f(s)), 3) for s in (0, 5, 10, 100)]
        [0.0, 0.5, 1.0, 0.1]
    """
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, tc.decay_steps, end_value=tc.min_lr)


def _decay_mask(params: dict) -> dict:
    """Weight decay on weight matrices and the embedding table; not on biases or norms."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("w", "table"), params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay) on the schedule.

    Example:
        >>> opt = make_optimizer(TrainConfig())
        >>> state = opt.init({'w': jnp.zeros((2, 2))})
        >>> type(opt).__name__
        'GradientTransformationExtraArgs'
    """
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                    mask=_decay_mask),
    )


def keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init_key, data_key) from the run's seed: one key per consumer.

    Example:
        >>> init_key, data_key = keys(0)
        >>> bool((jax.random.key_data(init_key) != jax.random.key_data(data_key)).any())
        True
    """
    init_key, data_key = jax.random.split(jax.random.key(seed))
    return init_key, data_key


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


def _update(state: TrainState, x: jax.Array, y: jax.Array, mc: ModelConfig, tc: TrainConfig):
    loss, grads = jax.value_and_grad(model.loss)(state.params, x, y, config=mc)
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return TrainState(params, opt_state, state.step + 1), {"loss": loss, "grad_norm": grad_norm}


@functools.partial(jax.jit, static_argnames=("model_config", "train_config"), donate_argnums=0)
def update(state: TrainState, x: jax.Array, y: jax.Array, *, model_config: ModelConfig,
           train_config: TrainConfig) -> tuple[TrainState, dict]:
    """One step on a given batch x, y (B, T). Returns the new state and {"loss", "grad_norm"}."""
    return _update(state, x, y, model_config, train_config)


@functools.partial(jax.jit, static_argnames=("model_config", "train_config", "mesh", "fsdp"), donate_argnums=0)
def train_step(state: TrainState, data: jax.Array, data_key: jax.Array, *, model_config: ModelConfig,
               train_config: TrainConfig, mesh: Mesh | None = None, fsdp: bool = False) -> tuple[TrainState, dict]:
    """One step on a batch sampled from data (N,) with key fold_in(data_key, step).

    With a mesh (see `distributed`), the batch is split along B over its "data" axis
    and the new state keeps the layout of the old (replicated, or FSDP-split):
    the same global batch and the same maths as on one device.
    """
    x, y = sample_batch(data, jax.random.fold_in(data_key, state.step),
                        batch_size=train_config.batch_size, context=model_config.max_len)
    if mesh is not None:
        x, y = (jax.lax.with_sharding_constraint(a, distributed.batch_sharding(mesh)) for a in (x, y))
    state, metrics = _update(state, x, y, model_config, train_config)
    if mesh is not None:
        state = jax.lax.with_sharding_constraint(state, distributed.state_shardings(state, mesh, fsdp))
    return state, metrics


@functools.partial(jax.jit, static_argnames="config")
def _window_loss_sum(params: dict, windows: jax.Array, weights: jax.Array, *, config: ModelConfig) -> jax.Array:
    """windows (B, T + 1), weights (B,) -> sum over rows of weight * mean token loss of the row."""
    logits = model.apply(params, windows[:, :-1], config=config)                       # (B, T, V)
    return jnp.sum(model.token_losses(logits, windows[:, 1:]).mean(axis=1) * weights)


def evaluate(params: dict, windows: np.ndarray, *, config: ModelConfig, batch_size: int = 64) -> float:
    """Mean next-token loss over all windows (W, T + 1), in fixed-size batches (the last
    one padded with zero-weight rows, so one compiled shape serves every batch).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=4)
        >>> windows = np.zeros((3, 5), np.int32)
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


# ----------------------------------------------------------------------------- the loop


class _StopFlag:
    """Turns the first Ctrl-C into a request to stop after the current step; a second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


class FitResult(NamedTuple):
    state: TrainState
    interrupted: bool
    last_record: dict | None


def fit(state: TrainState, *, data: jax.Array, data_key: jax.Array, model_config: ModelConfig,
        train_config: TrainConfig, val_windows: np.ndarray | None = None, metrics_path: str | None = None,
        save: Callable[[TrainState], None] | None = None, out=None, mesh: Mesh | None = None,
        fsdp: bool = False) -> FitResult:
    """Run train_step from state.step up to train_config.steps.

    Losses stay on the device until a log point, where they are fetched together
    (one host sync per log interval, not per step) and checked: a NaN or infinite
    loss raises NonFiniteLossError naming the first bad step, before anything is
    saved. On a terminal a progress line is refreshed every few steps.
    `save(state)` is called every save_every steps, at the end and on Ctrl-C.
    With a mesh, steps run data-parallel (see `train_step`); in a multi-process run
    every process calls fit, and only process 0 should pass metrics_path and out.

    Example:
        >>> import io
        >>> cfg = ModelConfig(vocab_size=4, d_model=8, n_heads=2, n_layers=1, max_len=4)
        >>> tc = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup=0, log_every=10)
        >>> init_key, data_key = keys(0)
        >>> out = io.StringIO()
        >>> result = fit(init_state(init_key, cfg, tc), data=jnp.arange(40) % 4, data_key=data_key,
        ...              model_config=cfg, train_config=tc, out=out)
        >>> [line.split(',')[0] for line in out.getvalue().splitlines()]
        ['Step 10', 'Step 20']
        >>> int(result.state.step), result.interrupted
        (20, False)
    """
    mc, tc = model_config, train_config
    out = out or sys.stdout
    step = int(distributed.scalar(state.step))
    tty = hasattr(out, "isatty") and out.isatty()
    check_every = min(10, tc.log_every) if tty else tc.log_every
    schedule = learning_rate_schedule(tc)
    pending: list[tuple[int, jax.Array]] = []
    window_start, window_step = time.perf_counter(), step
    tokens_per_step = tc.batch_size * mc.max_len
    record = None
    saved_step = None
    with _StopFlag() as stop:
        while step < tc.steps:
            state, metrics = train_step(state, data, data_key, model_config=mc, train_config=tc, mesh=mesh, fsdp=fsdp)
            step += 1
            pending.append((step, metrics["loss"]))
            if mesh is not None and len(pending) > 2:
                # XLA:CPU runs each device's part of a step on a shared thread pool; with
                # dozens of multi-device steps queued, the parts of different steps can
                # hold every thread while waiting at an all-reduce, and deadlock. Keeping
                # at most two steps in flight still overlaps dispatch with compute.
                pending[-3][1].block_until_ready()
            at_end = step == tc.steps or stop.requested
            due = [at_end or step % every == 0 for every in (tc.log_every, tc.eval_every, tc.save_every)]
            if not (any(due) or step % check_every == 0):
                continue
            losses = np.array([distributed.scalar(loss) for _, loss in pending], np.float64)
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                raise NonFiniteLossError(pending[bad[0]][0], float(losses[bad[0]]))
            now = time.perf_counter()
            tokens_per_s = (step - window_step) * tokens_per_step / max(now - window_start, 1e-9)
            if tty:
                _progress(out, step, tc.steps, float(losses[-1]), tokens_per_s)
            if not any(due):
                continue
            pending.clear()
            log, evaluate_now, save_now = due
            record = {"step": step, "loss": float(losses.mean()), "lr": float(schedule(step - 1)),
                      "tokens_per_s": round(tokens_per_s, 1)}
            if evaluate_now and val_windows is not None and len(val_windows):
                params = state.params if mesh is None else jax.device_put(distributed.to_host(state.params),
                                                                           jax.local_devices()[0])
                record["val_loss"] = evaluate(params, val_windows, config=mc)
            if log:
                line = f"Step {step}, Loss: {record['loss']:.4f}"
                if "val_loss" in record:
                    line += f", Val loss: {record['val_loss']:.4f}"
                print(("\r\033[K" if tty else "") + line, file=out, flush=True)
                if metrics_path:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if save_now and save is not None:
                save(state)
                saved_step = step
            if stop.requested:
                break
            window_start, window_step = time.perf_counter(), step
        interrupted = stop.requested
    # Ctrl-C may land after this step's save decision: the state was checked above, save it now.
    if interrupted and save is not None and saved_step != step:
        save(state)
    return FitResult(state, interrupted, record)


def _progress(out, step: int, steps: int, loss: float, tokens_per_s: float) -> None:
    width = 30
    filled = int(width * step / steps)
    bar = "#" * filled + "-" * (width - filled)
    out.write(f"\r\033[K[{bar}] {step}/{steps} loss {loss:.4f} {tokens_per_s:,.0f} tok/s")
    out.flush()


def truncate_metrics(metrics_path: str, last_step: int) -> None:
    """Drop records after `last_step` (logged after the checkpoint a run resumes from).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), 'metrics.jsonl')
        >>> _ = open(path, 'w').write(''.join(json.dumps({'step': s}) + chr(10) for s in (100, 200, 300)))
        >>> truncate_metrics(path, 200)
        >>> open(path).read().split()
        ['{"step":', '100}', '{"step":', '200}']
    """
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(metrics_path, "w") as f:
        f.writelines(kept)


def model_flops_per_step(config: ModelConfig, batch_size: int, n_params_non_embedding: int) -> float:
    """6 N B T for the matmuls (forward + backward) + 12 L B T^2 D for attention scores and mixing.

    Example:
        >>> # N = 100, B = 2, T = 4, L = 1, D = 8: 6 * 100 * 2 * 4 + 12 * 1 * 2 * 4**2 * 8 = 4800 + 3072
        >>> model_flops_per_step(ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=1, max_len=4), 2, 100)
        7872.0
    """
    b, t = batch_size, config.max_len
    return 6.0 * n_params_non_embedding * b * t + 12.0 * config.n_layers * b * t * t * config.d_model


def non_embedding_params(params: dict) -> int:
    """N in the FLOP count: every parameter but the (V, D) token table.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=1)
        >>> p = model.init(jax.random.key(0), cfg)
        >>> non_embedding_params(p) == model.count_params(p) - 5 * 8
        True
    """
    return model.count_params(params) - math.prod(params["embed"]["table"].shape)
