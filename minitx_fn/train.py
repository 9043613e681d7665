"""The train step: one batch from tokens to new parameters, jitted; and evaluation.

    key_t      = fold_in(data_key, t)                    a fresh key per step, never reused
    x, y       = batch_at(data, data_key, t)             (B, T) inputs and next-token targets
    loss, g    = value_and_grad(loss)(params, x, y)      loss = cross_entropy(model.apply(params, x), y)
    params'    = AdamW(clip(g)) with warm-up + cosine learning rate

`model` is any model value (`config.LanguageModel`: the built-in `ModelConfig`, or
one of one's own): the step, its loss and evaluation call its `apply`.

`train_step(state, batch) -> (state, metrics)` does the last two lines in one jitted
function that donates the old state (`make_step` builds the same step for any loss
function and optax optimizer: a model of one's own trains through it), so XLA updates parameters and optimiser
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

from minitx_fn import lora as adapters_lib
from minitx_fn import memory
from minitx_fn.config import LanguageModel, LoraConfig, ModelConfig, OptimizerConfig, TrainConfig  # noqa: F401  (doctests)
from minitx_fn.data import sample_batch

Batch = tuple[jax.Array, jax.Array]        # x, y: (B, T) inputs and next-token targets


class TrainState(NamedTuple):
    params: dict      # the model's parameter tree
    opt_state: Any    # optax state: clip (empty), AdamW moments mu and nu shaped like params, count (or Muon's)
    step: jax.Array   # () int32, steps taken so far


def learning_rate_schedule(oc: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0 to lr over `warmup` steps, then cosine decay to min_lr at `decay_steps`.

    Example:
        >>> f = learning_rate_schedule(OptimizerConfig(decay_steps=100, lr=1.0, warmup=10))
        >>> [round(float(f(s)), 3) for s in (0, 5, 10, 100)]
        [0.0, 0.5, 1.0, 0.1]
    """
    return optax.warmup_cosine_decay_schedule(0.0, oc.lr, oc.warmup, oc.decay_steps, end_value=oc.min_lr)


def decay_mask(params):
    """True for the leaves weight decay applies to: weight matrices and the embedding
    table (leaves named "w" and "table"), not biases or norms; both matrices of a LoRA
    adapter {"a", "b"} (`lora.py`), so the update A B decays towards the base. A leaf
    with no name (in a list or tuple of a model of one's own) decays if it is a matrix.

    Example:
        >>> decay_mask({"w": 0, "b": 0, "table": 0})
        {'w': True, 'b': False, 'table': True}
        >>> decay_mask({"qkv": {"a": 0, "b": 0}}), decay_mask([np.zeros((2, 2)), np.zeros(2)])
        ({'qkv': {'a': True, 'b': True}}, [True, False])
    """
    if isinstance(params, dict):
        if set(params) == {"a", "b"}:
            return {"a": True, "b": True}
        return {k: k in ("w", "table") if not isinstance(v, (dict, list, tuple)) else decay_mask(v)
                for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        masks = [decay_mask(v) if isinstance(v, (dict, list, tuple)) else np.ndim(v) >= 2 for v in params]
        return type(params)(*masks) if hasattr(params, "_fields") else type(params)(masks)
    return np.ndim(params) >= 2


def make_optimizer(oc: OptimizerConfig, mask: Callable[[Any], Any] = decay_mask) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on what `mask` marks) on
    the schedule; or with `oc.method == "muon"`, Muon (`optax.contrib.muon`) for the
    matrices `muon_dimensions` picks, at muon_lr on the same schedule's shape, with
    weight decay; Adam (Nesterov, as optax's Muon pairs it) at lr without weight decay
    for the rest, as modded-nanogpt and nanochat split them.

    The benchmarks pass a mask for the Flax reference's parameter names, so both
    models train with this one optimiser.

    Example:
        >>> opt = make_optimizer(OptimizerConfig(decay_steps=100))
        >>> state = opt.init({'w': jnp.zeros((2, 2))})
        >>> type(opt).__name__
        'GradientTransformationExtraArgs'
    """
    schedule = learning_rate_schedule(oc)
    if oc.method == "muon":
        # The same shape at muon_lr, its end scaled alike (Python floats: no float32 ratio of two rates).
        matrices = learning_rate_schedule(oc.replace(lr=oc.muon_lr, min_lr=oc.muon_lr * (oc.min_lr / oc.lr)))
        update = optax.contrib.muon(matrices, beta=oc.momentum,
                                    weight_decay=oc.weight_decay, adam_b1=oc.b1, adam_b2=oc.b2,
                                    adam_learning_rate=schedule, muon_weight_dimension_numbers=muon_dimensions)
    else:
        update = optax.adamw(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(oc.grad_clip), update)


def muon_dimensions(params):
    """Which leaves Muon orthogonalises, and along which axes: every leaf named "w" with
    two axes or more (a `linear` layer's weight, of the built-in or a model of one's
    own) but the output head's (the top-level "head"), its last two axes (D_in, D_out)
    the matrix and any leading axis (the stacked blocks' L) a batch, so each layer's
    matrix is orthogonalised alone; None for the rest (embeddings, the head, norms,
    biases, LoRA's adapters "a" and "b", and a matrix under any other name), which Adam
    steps. (MuonDimensionNumbers is a NamedTuple: a `jax.tree` map over this tree and
    the parameters needs `is_leaf`.)

    Example:
        >>> dims = muon_dimensions({"blocks": {"w": jnp.zeros((4, 8, 16)), "b": jnp.zeros((4, 16))},
        ...                         "head": {"w": jnp.zeros((8, 5))}, "embed": {"table": jnp.zeros((5, 8))}})
        >>> dims["blocks"]["w"], dims["blocks"]["b"], dims["head"]["w"], dims["embed"]["table"]
        (MuonDimensionNumbers(reduction_axis=1, output_axis=2), None, None, None)
    """
    def dims(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if names[-1:] == ["w"] and names[:1] != ["head"] and np.ndim(leaf) >= 2:
            return optax.contrib.MuonDimensionNumbers(reduction_axis=np.ndim(leaf) - 2, output_axis=np.ndim(leaf) - 1)
        return None
    return jax.tree_util.tree_map_with_path(dims, params)


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


def new_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0 of training `params` with `optimizer` (any optax transformation): the
    parameters copied, so a train step, which donates its state, never deletes the
    arrays the caller passed in (a loaded run's, another model's) and they stay usable.

    Example:
        >>> params = {"w": jnp.ones((2, 2))}
        >>> state = new_state(params, optax.adam(1e-3))
        >>> int(state.step), state.params["w"] is params["w"]
        (0, False)
    """
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), params)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("model", "optimizer_config"))
def init_state(key: jax.Array, model: LanguageModel, optimizer_config: OptimizerConfig) -> TrainState:
    """Fresh parameters (`model.init`), the optimiser's initial state, and step 0 (jitted).

    Example:
        >>> s = init_state(jax.random.key(0), ModelConfig(vocab_size=5, d_model=8, n_heads=2),
        ...                OptimizerConfig(decay_steps=100))
        >>> int(s.step), s.params['head']['w'].shape
        (0, (8, 5))
    """
    params = model.init(key)
    return TrainState(params, make_optimizer(optimizer_config).init(params), jnp.zeros((), jnp.int32))


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


LossFn = Callable[[dict, Batch, jax.Array], jax.Array]     # (params, (x, y), step) -> () mean loss


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits (B, T, V), targets (B, T) -> (B, T): -log softmax(logits)[target] per position.

    log_softmax and a gather of the target's entry: no (B, T, V) one-hot.

    Example:
        >>> token_losses(jnp.zeros((1, 2, 4)), jnp.array([[2, 0]])).shape
        (1, 2)
    """
    logp = jax.nn.log_softmax(logits, axis=-1)                           # (B, T, V)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over (B, T) of -log softmax(logits)[target].

    Example:
        >>> float(cross_entropy(jnp.zeros((1, 1, 4)), jnp.array([[2]])))  # uniform: log 4
        1.3862943649291992
    """
    return token_losses(logits, targets).mean()


def model_loss(model: LanguageModel, seed: int = 0) -> LossFn:
    """A model's loss as a LossFn: next-token cross-entropy of `model.apply`, given a
    dropout key fold_in(keys(seed).dropout, step), so a resumed run draws the masks an
    uninterrupted one would (a model without dropout ignores it).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> x = jnp.zeros((1, 4), jnp.int32)
        >>> float(model_loss(cfg)(cfg.init(jax.random.key(0)), (x, x), jnp.int32(0))) > 0
        True
    """
    def loss(params: dict, batch: Batch, step: jax.Array) -> jax.Array:
        x, y = batch
        return cross_entropy(model.apply(params, x, key=jax.random.fold_in(keys(seed).dropout, step)), y)
    return loss


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, schedule: optax.Schedule | None = None,
              accumulate: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The train step as a plain function (state, batch) -> (state, metrics), for any
    loss function of (params, batch, step) and any optax optimizer: jit it at the
    boundary (`jax.jit(make_step(...), donate_argnums=0)`). metrics: "loss", "grad_norm"
    (before clipping) and, with `schedule`, "lr" (the rate this step applied).

    accumulate = K: the batch's B rows run as K micro-batches of B / K (rows k, k + K,
    k + 2K, ...: each spread over the devices like the whole batch), under `lax.scan`,
    so activations are held for B / K rows at a time; their mean losses and gradients
    are averaged, which is the whole batch's mean loss and gradient, and one update
    follows. K = 1 is the plain step.

    Example:
        >>> def loss_fn(params, batch, step):
        ...     x, y = batch
        ...     return jnp.mean((params["w"] * x - y) ** 2)
        >>> step = jax.jit(make_step(loss_fn, optax.sgd(0.1)))
        >>> state, metrics = step(new_state({"w": jnp.float32(0.0)}, optax.sgd(0.1)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> round(float(state.params["w"]), 6), float(metrics["loss"])    # w - 0.1 * d/dw mean((w x - y)^2)
        (0.4, 4.0)
    """
    def loss_and_grads(params, batch, step):
        if accumulate == 1:
            return jax.value_and_grad(loss_fn)(params, batch, step)
        micro = jax.tree.map(lambda a: a.reshape(a.shape[0] // accumulate, accumulate, *a.shape[1:]).swapaxes(0, 1),
                             batch)                                                   # (K, B / K, ...)

        def add(total, part):                                                          # one micro-batch
            loss, grads = jax.value_and_grad(loss_fn)(params, part, step)
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        loss_shape = jax.eval_shape(loss_fn, params, jax.tree.map(lambda a: a[0], micro), step)
        zero = (jnp.zeros(loss_shape.shape, loss_shape.dtype), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(add, zero, micro)
        return jax.tree.map(lambda a: a / accumulate, (loss, grads))

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        loss, grads = loss_and_grads(state.params, batch, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))     # before clipping
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def step_fn(model: LanguageModel, optimizer_config: OptimizerConfig, seed: int = 0, accumulate: int = 1,
            lora: LoraConfig | None = None) -> Callable[..., tuple[TrainState, dict]]:
    """A model's step for these settings, (state, batch) -> (state, metrics)
    with metrics {"loss", "grad_norm", "lr"}: what `train_step` jits, and what
    `distributed.data_parallel` jits with shardings. `seed` seeds dropout (`model_loss`).

    With `lora`, the step is (state, batch, base) -> (state, metrics): state.params are
    the adapters, the only thing differentiated and updated, and the loss is the
    model's at lora.merge(base, adapters); `base` is an argument, not a constant baked
    into the compiled step, and is neither donated nor changed.

    Example:
        >>> mc, oc = ModelConfig(vocab_size=5, d_model=8, n_heads=2), OptimizerConfig(decay_steps=100)
        >>> state = init_state(jax.random.key(0), mc, oc)
        >>> x = jnp.zeros((2, 4), jnp.int32)
        >>> new, metrics = jax.eval_shape(step_fn(mc, oc), state, (x, x))   # traced, not run: shapes only
        >>> new.step.shape, sorted(metrics)
        ((), ['grad_norm', 'loss', 'lr'])
    """
    loss = model_loss(model, seed)
    settings = dict(schedule=learning_rate_schedule(optimizer_config), accumulate=accumulate)
    if lora is None:
        return make_step(loss, make_optimizer(optimizer_config), **settings)

    def step(state: TrainState, batch: Batch, base: dict) -> tuple[TrainState, dict]:
        def adapted_loss(adapters, batch, t):
            return loss(adapters_lib.merge(base, adapters, scale=lora.scale), batch, t)
        return make_step(adapted_loss, make_optimizer(optimizer_config), **settings)(state, batch)
    return step


@functools.partial(jax.jit, static_argnames=("model", "optimizer_config", "seed", "accumulate", "lora"),
                   donate_argnums=0)
def train_step(state: TrainState, batch: Batch, base: dict | None = None, *, model: LanguageModel,
               optimizer_config: OptimizerConfig, seed: int = 0, accumulate: int = 1,
               lora: LoraConfig | None = None) -> tuple[TrainState, dict]:
    """One step on batch = (x, y), each (B, T): returns the new state and {"loss", "grad_norm", "lr"}.
    With `lora`, state.params are adapters on the frozen `base` (`step_fn`).

    Donated: the old state's arrays (parameters, optimiser state, step) are freed by
    the call, so XLA updates them in place; do not use `state` after it. To train
    arrays you still need (a loaded run's parameters), start from `new_state`, which
    copies them. The configs and seed are static (hashed into the compilation cache);
    pass `train_config.optimizer`, so runs that differ in cadence share one compiled step.

    Example:
        >>> mc, tc = ModelConfig(vocab_size=5, d_model=8, n_heads=2), TrainConfig()
        >>> x = jnp.zeros((2, 4), jnp.int32)
        >>> state, metrics = train_step(init_state(jax.random.key(0), mc, tc.optimizer), (x, x), model=mc,
        ...                             optimizer_config=tc.optimizer)
        >>> int(state.step)
        1
    """
    if (lora is None) != (base is None):
        raise TypeError("train_step: a LoRA step needs base= (the frozen parameters), and only a LoRA step takes it")
    step = step_fn(model, optimizer_config, seed, accumulate, lora)
    return step(state, batch) if lora is None else step(state, batch, base)


def lora_state(key: jax.Array, model: LanguageModel, base: dict, optimizer_config: OptimizerConfig,
               lora: LoraConfig) -> TrainState:
    """Step 0 of training fresh adapters on `base` (model's parameter tree, or its
    jax.eval_shape): the adapters (`lora.init` on model.lora_paths) and their optimiser state only.

    Example:
        >>> mc = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> s = lora_state(jax.random.key(0), mc, mc.init(jax.random.key(1)), OptimizerConfig(decay_steps=100),
        ...                LoraConfig(rank=2))
        >>> jax.tree.map(lambda a: a.shape, s.params)["blocks"]["attn"]["out"]
        {'a': (2, 8, 2), 'b': (2, 2, 8)}
    """
    adapters = adapters_lib.init(key, base, adapters_lib.targets(model, base, lora), lora.rank)
    return TrainState(adapters, make_optimizer(optimizer_config).init(adapters), jnp.zeros((), jnp.int32))


def is_finite(tree) -> jax.Array:
    """() bool: every floating-point leaf of the tree is finite (no NaN, no +-inf).

    Example:
        >>> bool(is_finite({"w": jnp.array([1.0, jnp.inf])})), bool(is_finite({"w": jnp.ones(2), "n": jnp.int32(1)}))
        (False, True)
    """
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


@functools.partial(jax.jit, static_argnames="model")
def _window_loss_sum(params: dict, windows: jax.Array, weights: jax.Array, *, model: LanguageModel) -> jax.Array:
    """windows (B, T + 1), weights (B,) -> sum over rows of weight * mean token loss of the row."""
    logits = model.apply(params, windows[:, :-1])                                     # (B, T, V)
    return jnp.sum(token_losses(logits, windows[:, 1:]).mean(axis=1) * weights)


def evaluate(params: dict, windows: np.ndarray, *, model: LanguageModel, batch_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> float:
    """Mean next-token loss over all windows (W, T + 1), in fixed-size batches (the last
    one padded with zero-weight rows, so one compiled shape serves every batch) of
    batch_size windows (at most W), by default as many as memory holds
    (`memory.evaluation_batch`: GPT-2 small's 50,257 logits a position make a window
    617 MB). The windows may be a `data.Windows` over a memory map: each batch is gathered when it
    is needed, so a text larger than memory is fine. progress(done, W) after each batch.

    `model` is any model value (its `apply`; equal values share one compiled function).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> windows = np.zeros((3, 5), np.int32)                        # W = 3 windows of T + 1 = 5
        >>> evaluate(cfg.init(jax.random.key(0)), windows, model=cfg, batch_size=2) > 0
        True
    """
    batch_size = batch_size or memory.evaluation_batch(model, windows.shape[1] - 1)
    return float(_window_means(functools.partial(_window_loss_sum, params, model=model), windows, batch_size,
                               progress)[0])


class Comparison(NamedTuple):
    """How far a model's parameters stand from a reference's on the same windows
    (`compare`): means over every predicted token."""

    loss: float                 # next-token loss under params
    reference_loss: float       # ... under the reference
    kl: float                   # KL(reference || params) of the next-token distributions, nats
    top1_agreement: float       # share of positions where both rank the same token first


@functools.partial(jax.jit, static_argnames="model")
def _window_comparison(params: dict, reference: dict, windows: jax.Array, weights: jax.Array, *,
                       model: LanguageModel) -> jax.Array:
    """windows (B, T + 1), weights (B,) -> (4,) weighted sums over rows of the row means
    of Comparison's fields."""
    logp = jax.nn.log_softmax(model.apply(params, windows[:, :-1]), axis=-1)        # (B, T, V)
    logr = jax.nn.log_softmax(model.apply(reference, windows[:, :-1]), axis=-1)
    targets = windows[:, 1:, None]
    per_position = jnp.stack([-jnp.take_along_axis(logp, targets, axis=-1)[..., 0],
                              -jnp.take_along_axis(logr, targets, axis=-1)[..., 0],
                              jnp.sum(jnp.exp(logr) * (logr - logp), axis=-1),
                              (jnp.argmax(logp, -1) == jnp.argmax(logr, -1)).astype(logp.dtype)])  # (4, B, T)
    return jnp.sum(per_position.mean(axis=2) * weights[None, :], axis=1)


def compare(params: dict, reference: dict, windows: np.ndarray, *, model: LanguageModel,
            batch_size: int | None = None, progress: Callable[[int, int], None] | None = None) -> Comparison:
    """The loss of params and of reference (a quantized model and its float32 weights,
    say) over the same windows, the KL divergence between their next-token
    distributions and how often they agree on the most likely token, batched as in
    `evaluate` (by default as many windows as memory holds with
    `memory.COMPARISON_COPIES` sets of logits).

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> p = cfg.init(jax.random.key(0))
        >>> c = compare(p, p, np.zeros((3, 5), np.int32), model=cfg, batch_size=2)
        >>> c.loss == c.reference_loss, abs(c.kl) < 1e-6, c.top1_agreement
        (True, True, 1.0)
    """
    batch_size = batch_size or memory.evaluation_batch(model, windows.shape[1] - 1, memory.COMPARISON_COPIES)
    sums = _window_means(functools.partial(_window_comparison, params, reference, model=model), windows, batch_size,
                         progress)
    return Comparison(*map(float, sums))


def _window_means(fn: Callable, windows: np.ndarray, batch_size: int, progress) -> np.ndarray:
    """The mean over windows of fn(windows (B, T + 1), weights (B,)) -> weighted sums,
    batch_size windows at a time (at most W; the last batch padded with zero-weight rows,
    so one compiled shape serves every batch)."""
    batch_size = min(batch_size, max(1, len(windows)))
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = np.asarray(windows[start:start + batch_size])
        weights = np.zeros(batch_size, np.float32)
        weights[:len(chunk)] = 1.0
        chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
        total = total + np.asarray(fn(jnp.asarray(chunk), jnp.asarray(weights)), np.float64)
        if progress is not None:
            progress(min(start + batch_size, len(windows)), len(windows))
    return np.atleast_1d(total / len(windows))
