# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # minitx_fn, from text to loss and back
#
# A walk through one batch of the built-in corpus: text to token ids, embeddings
# plus positions, one attention head by hand and then the library's attention, a
# block, the model, the loss, `jax.grad`, one optax step, and a sample; then what
# `jit` compiles (jaxprs, remat, XLA's cost analysis). Every step prints its
# shapes. Run it as a script (`python docs/walkthrough.py`, under a minute on a
# CPU) or open it as a notebook with jupytext.
#
# Letters for dimensions: B batch, T positions, D width, H heads, K = D / H head
# width, F feed-forward width, V vocabulary, L layers.

# %%
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn import data, model, train
from minitx_fn.config import ModelConfig, TrainConfig
from minitx_fn.generate import generate
from minitx_fn.layers import attention, block, embedding, linear, norm, positional
from minitx_fn.tokenizer import CharTokenizer

# %% [markdown]
# ## 1. Text to token ids
# Each distinct character is a token; ids follow sorted order.

# %%
text = data.builtin_text()
tok = CharTokenizer.from_text(text)
ids = tok.encode(text)
print("vocabulary:", repr(tok.chars), "V =", tok.vocab_size)
print("first ids:", ids[:12].tolist(), "->", repr(tok.decode(ids[:12])))

# %% [markdown]
# ## 2. A model and fresh parameters
# A model is a value: a frozen config (hashable, so `jax.jit` takes it as a static
# argument) whose methods are the model's pure functions, `init`, `apply`, and for
# decoding `init_cache` and `apply_cached`. Parameters are a plain dict of arrays.
# PRNG keys are explicit: one key is split into one subkey per consumer, never reused.

# %%
cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_layers=2, max_len=16)
init_key, data_key, dropout_key = train.keys(seed=0)                 # one key per consumer
params = cfg.init(init_key)                                       # model.init(init_key, cfg), jitted
print(jax.tree.map(lambda a: a.shape, params))
print("parameters:", model.count_params(params))

# %% [markdown]
# ## 3. A batch, embeddings plus positions
# `sample_batch` picks B random windows; targets are the inputs shifted by one.
# The sinusoidal encoding is a fixed (T, D) table, added to the (B, T, D) embeddings.

# %%
x, y = data.sample_batch(jnp.asarray(ids), jax.random.fold_in(data_key, 0), batch_size=4, context=cfg.max_len)
print("x", x.shape, "y", y.shape, repr(tok.decode(x[0])), "->", repr(tok.decode(y[0])))
emb = embedding.apply(params["embed"], x)                          # (B, T, D)
pe = positional.table(cfg.max_len, cfg.d_model)                   # (T, D), entries in [-1, 1]
h0 = emb + pe[None]                                               # (B, T, D)
print("embeddings", emb.shape, "+ positions", pe.shape, "=", h0.shape)

# %% [markdown]
# ## 4. One attention head by hand
# softmax(q k^T / sqrt(K) + mask) v for head 0 of layer 0, in plain jnp, then the
# library's attention for all heads: head 0 of its output must match.

# %%
layer0 = jax.tree.map(lambda a: a[0], params["blocks"])           # block params of layer 0
h = norm.apply(layer0["ln1"], h0)                                 # (B, T, D)
qkv = linear.apply(layer0["attn"]["qkv"], h)                      # (B, T, 3D)
D, K, T = cfg.d_model, cfg.head_dim, cfg.max_len
q, k, v = qkv[..., 0:K], qkv[..., D:D + K], qkv[..., 2 * D:2 * D + K]   # head 0: (B, T, K) each
scores = q @ k.transpose(0, 2, 1) / math.sqrt(K)                  # (B, T, T)
scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
by_hand = jax.nn.softmax(scores, axis=-1) @ v                     # (B, T, K)

q_all, k_all, v_all = attention.project_qkv(layer0["attn"], h, cfg.attention_spec)   # (B, T, H, K): heads split
library = attention.scaled_dot_product(q_all, k_all, v_all, attention.causal_mask(T)[None, None])
print("head 0 by hand vs library, max difference:", float(jnp.abs(by_hand - library[:, :, 0]).max()))

# %% [markdown]
# ## 5. A block and the model
# A pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)). A layer takes its options
# as one value, its spec (`cfg.block_spec`: the attention's heads, rotary settings,
# norm, MLP). The model runs its L stacked blocks with `jax.lax.scan`: one compiled
# loop body, whatever L is.

# %%
h1 = block.apply(layer0, h0, cfg.block_spec)                      # the block's options from the model
print("block:", h0.shape, "->", h1.shape, "with", cfg.block_spec.attention)
logits = cfg.apply(params, x)                                     # (B, T, V): model.apply(params, x, config=cfg)
print("logits:", logits.shape)

# %% [markdown]
# ## 6. The loss and its gradient
# Mean cross-entropy; at initialisation it is close to log V (uniform guessing).
# `jax.grad` returns a tree shaped exactly like the parameters.

# %%
# jax.jit compiles the whole gradient computation once (run eagerly, each of its
# operations would be compiled on its own); the model is closed over: a constant.
value_and_grad = jax.jit(jax.value_and_grad(lambda p, x, y: train.cross_entropy(cfg.apply(p, x), y)))
loss, grads = value_and_grad(params, x, y)
print(f"loss {float(loss):.3f} vs log V = {math.log(cfg.vocab_size):.3f}")
print("grad tree has the same shapes:", jax.tree.map(lambda a: a.shape, grads) == model.param_shapes(params))

# %% [markdown]
# ## 7. One optax step, then the jitted train step
# `train.make_optimizer` chains global-norm clipping and AdamW. `train.train_step`
# is the same maths, `(state, batch) -> (state, metrics)`, in one `jax.jit`-compiled
# function that donates the old state; it is where `jit` belongs, at the boundary.
# `train.batch_at` samples step t's batch on the device with `fold_in(data_key, t)`.

# %%
tc = TrainConfig(steps=300, batch_size=16, optimizer={"lr": 3e-3, "warmup": 0})   # no warm-up: step 0 already moves
opt = train.make_optimizer(tc.optimizer)
first_update = jax.jit(lambda g, p: opt.update(g, opt.init(p), p)[0])        # the optimiser's first step
updates = first_update(grads, params)
print("one update moved the parameters by", float(jnp.sqrt(sum(jnp.sum(u ** 2) for u in jax.tree.leaves(updates)))))

state = train.init_state(init_key, cfg, tc.optimizer)
for _ in range(tc.steps):
    batch = train.batch_at(jnp.asarray(ids), data_key, state.step, batch_size=tc.batch_size, context=cfg.max_len)
    state, metrics = train.train_step(state, batch, model=cfg, optimizer_config=tc.optimizer)
print(f"after {tc.steps} steps: loss {float(metrics['loss']):.3f}")

# %% [markdown]
# ## 8. `vmap`: the model on one sequence, mapped over the batch
# `model.apply` takes a batch; `jax.vmap` of a one-sequence version gives the same.

# %%
one = lambda seq: cfg.apply(state.params, seq[None])[0]         # (T,) -> (T, V)
print("vmap equals the batched call:", bool(jnp.allclose(jax.vmap(one)(x), cfg.apply(state.params, x), atol=1e-5)))

# %% [markdown]
# ## 9. A sample
# `generate` prefills the prompt into the model's cache (`cfg.init_cache`) and
# decodes with `cfg.apply_cached` inside one compiled `lax.while_loop`.

# %%
new = generate(state.params, [tok.encode("hello")], model=cfg, key=jax.random.key(0), max_new_tokens=40)[0]
print(repr("hello" + tok.decode(new)))

# %% [markdown]
# ## 10. The same in one call, and back from disk
# `job.train` is everything above (and what `minitx train` runs): data, configs, the
# jitted step, evaluation, checkpoints, signals, into a run directory that `minitx
# generate`, `plot` and `--resume` read. `checkpoint.load_model` reads a run's
# parameters, model and tokenizer back; `generate.complete` continues a text.

# %%
import io
import tempfile

from minitx_fn import checkpoint, job
from minitx_fn.generate import complete

run_dir = os.path.join(tempfile.mkdtemp(), "hello")
result = job.train(model={"d_model": 32, "n_heads": 4, "n_layers": 2, "max_len": 16},
                   training={"steps": 300, "batch_size": 16, "optimizer": {"lr": 3e-3, "warmup": 0}},
                   run_dir=run_dir, sample_tokens=0, log=io.StringIO())
print("job.train:", result.records[-1])
loaded = checkpoint.load_model(run_dir)
print("loaded from disk:", repr("hello" + complete(loaded, "hello", max_new_tokens=40)))

# %% [markdown]
# ## 11. How equality with Flax is checked
# `tests/flax_reference.py` builds the same model from Flax's own layers and maps our
# parameter tree into Flax's; `tests/test_layers.py` (each layer) and
# `tests/test_model_reference.py` (the whole model) compare outputs, losses,
# gradients and an Adam step. Here, the same check for the whole model (Flax is a
# test dependency, so this cell runs only where it is installed).

# %%
import sys

here = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()   # script or notebook
repo = next((d for d in (here, os.path.dirname(here)) if os.path.isfile(os.path.join(d, "tests", "flax_reference.py"))),
            None)
if repo is not None:
    sys.path.insert(0, repo)                                      # tests/ lives at the repository root
try:
    from tests import flax_reference as ref
except ImportError as e:
    print(f"this cell needs the repository's tests/ and flax (pip install -e '.[test]'): {e}")
else:
    flax_logits = ref.FlaxLM(cfg).apply(ref.to_flax_model(state.params, cfg), x)
    print("max |ours - flax| =", float(np.abs(np.asarray(cfg.apply(state.params, x)) - flax_logits).max()))

# %% [markdown]
# ## 12. Reading what jit compiles
# `jax.jit` traces a function once into a *jaxpr*, JAX's typed list of primitive
# operations, lowers it to XLA and compiles it. `jax.make_jaxpr` shows the first
# step. The plainest thing to read is one block: a layer norm, the fused QKV matmul
# (`dot_general`), the attention's scores, mask and softmax, the output projection,
# then the MLP, with every shape written on its variable.

# %%
import collections
import dataclasses

from jax.extend.core import jaxprs_in_params

block_jaxpr = jax.make_jaxpr(lambda p, h: block.apply(p, h, cfg.block_spec))(layer0, h0)
print(block_jaxpr)


def primitives(jaxpr, counts=None):
    """How many times each primitive occurs, counting inside scans, jits and remats too."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for inner in jaxprs_in_params(eqn.params):
            primitives(inner, counts)
    return counts


print("the block:", dict(primitives(block_jaxpr.jaxpr).most_common(6)))

# %% [markdown]
# The train step is the same machinery around the model: `train.step_fn` is what
# `train.train_step` jits. Its jaxpr holds two `lax.scan`s over the L stacked
# blocks, the forward pass and the backward one (the scan's transpose), each with one
# block's body however large L is; around them the embedding, the loss, its gradient
# and the optimiser's update, all as plain primitives. The backward body is a single
# `remat2`, which is what `jax.checkpoint` is called in a jaxpr (below).

# %%
def step_jaxpr(model):
    return jax.make_jaxpr(train.step_fn(model, tc.optimizer))(train.init_state(init_key, model, tc.optimizer), (x, y))


def scans(jaxpr):
    """Each scan's length, its body's top-level primitives, and all the equations inside it."""
    found = []
    for eqn in jaxpr.eqns:
        body = eqn.params["jaxpr"].jaxpr if eqn.primitive.name == "scan" else None
        if body is not None:
            top = sorted({e.primitive.name for e in body.eqns}) if len(body.eqns) < 4 else "..."
            found.append((eqn.params["length"], top, sum(primitives(body).values())))
        for inner in jaxprs_in_params(eqn.params):
            found += scans(inner)
    return found


step_default = step_jaxpr(cfg)
print("train step:", sum(primitives(step_default.jaxpr).values()), "equations")
for length, top, size in scans(step_default.jaxpr):
    print(f"  a scan of length {length}: body {top}, {size} equations in all")

# %% [markdown]
# **Remat, and where `reduce_precision` comes from.** `model.apply` wraps the scanned
# block in `jax.checkpoint` with the policy `cfg.remat` names: `"matmuls"` (the
# default) saves only the weight matmuls' outputs for the backward pass and
# recomputes the rest there, so the backward body grows and the forward one shrinks
# (it hands over fewer residuals); `"none"` saves everything.
# Each residual that `jax.checkpoint` saves is marked with a `reduce_precision` to its
# own dtype (a no-op on the value): JAX inserts it so that XLA cannot keep extra
# precision in the forward pass that the backward recomputation would not have. So
# the `reduce_precision`s in a step are the residuals the policy keeps: under
# `"matmuls"`, one per weight matmul whose output the backward pass needs.

# %%
def residuals(jaxpr):
    """The shapes that jax.checkpoint marked as saved residuals."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_precision":
            found.append(eqn.outvars[0].aval.str_short())
        for inner in jaxprs_in_params(eqn.params):
            found += residuals(inner)
    return found


plain = dataclasses.replace(cfg, remat="none", attention_block=0)         # save everything, one attention block
step_plain = step_jaxpr(plain)
print('remat="matmuls": residuals', residuals(step_default.jaxpr))
print('remat="none":   ', len(residuals(step_plain.jaxpr)), "residuals")
for name, jaxpr in (('"matmuls"', step_default), ('"none"', step_plain)):
    print(f"remat={name}: forward and backward bodies of", " and ".join(str(size) for _, _, size in scans(jaxpr.jaxpr)),
          "equations")

# %% [markdown]
# **Dropout** adds what drawing masks takes: the step folds its number into the
# dropout key, splits it per use, draws bits (`random_bits`) and keeps or zeroes
# each activation (`select_n`).

# %%
with_dropout = primitives(step_jaxpr(dataclasses.replace(cfg, dropout=0.1)).jaxpr)
without = primitives(step_default.jaxpr)
print("dropout adds:", {k: with_dropout[k] - without[k] for k in ("random_bits", "random_fold_in", "select_n")})

# %% [markdown]
# **XLA's cost analysis against the formula.** The benchmarks count a step's model
# FLOPs as 6 N B T for the matmuls (N the parameters outside the embedding; forward
# and backward) plus 12 L B T² D for attention. `jax.jit(f).lower(...).compile()`
# gives the compiled program, and its `cost_analysis()` what XLA counts in it. XLA
# counts a `lax.scan` (a while loop) body once, whatever its length: from one layer
# to two the formula doubles, XLA's count hardly moves. (`.lower(...).as_text()`
# prints the StableHLO that XLA receives, `.compile().as_text()` the program it made.)

# %%
for layers in (1, 2):
    m = dataclasses.replace(plain, n_layers=layers)
    s = train.init_state(init_key, m, tc.optimizer)
    compiled = jax.jit(train.step_fn(m, tc.optimizer)).lower(s, (x, y)).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis          # a list on older jax
    B, T = x.shape
    n = model.count_params(s.params) - s.params["embed"]["table"].size
    formula = 6 * n * B * T + 12 * m.n_layers * B * T * T * m.d_model
    print(f"L = {layers}: XLA counts {analysis['flops'] / 1e6:.2f} MFLOP, the formula {formula / 1e6:.2f}")

# %% [markdown]
# The plainest settings to read are the ones above: `remat="none"` (no recomputation
# in the backward body), `attention_block=0` (one block of scores instead of a loop
# over query blocks), `dropout=0.0` (no random bits), `attention="einsum"` (the maths
# written out, not a fused call), and `n_layers=1`. They compute the same values as
# the defaults (the tests hold the remat policies and blocked attention equal).

# %% [markdown]
# ## 13. What each head attends to, interactively
# Row t of a map is the distribution query t puts over keys 0 .. t. In Jupyter the
# sliders pick the layer and the head, and the box the prompt (`pip install -e
# ".[docs]"` brings ipywidgets); run as a script, this draws layer 0, head 0 once.
# `minitx attention` draws every layer and head of a saved run to a file.

# %%
def show_attention(prompt="hello jax", layer=0, head=0):
    try:
        ids = jnp.asarray(tok.encode(prompt))[None, :cfg.max_len]             # (1, T)
    except ValueError as e:                                                  # unknown characters, named
        print(e)
        return None
    maps = np.asarray(model.attention_maps(state.params, ids, config=cfg))   # (L, 1, H, T, T)
    shown = maps[layer, 0, head]
    labels = ["\u2423" if c == " " else c for c in prompt[:cfg.max_len]]
    import matplotlib.pyplot as plt
    size = max(2.5, 0.3 * len(labels) + 1)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shown, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, family="monospace")
    ax.set_yticks(range(len(labels)), labels, family="monospace")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"layer {layer}, head {head}")
    fig.colorbar(image, ax=ax, label="attention weight")
    if "get_ipython" in globals():                                           # a notebook shows the figure
        plt.show()
    else:
        plt.close(fig)
        print(f"layer {layer}, head {head}: query {len(labels) - 1} puts {shown[-1].max():.2f} on key "
              f"{int(shown[-1].argmax())} ({labels[int(shown[-1].argmax())]!r})")
    return shown


try:
    import ipywidgets
except ImportError:
    ipywidgets = None
if ipywidgets is not None and "get_ipython" in globals():
    ipywidgets.interact(show_attention, prompt="hello jax", layer=(0, cfg.n_layers - 1), head=(0, cfg.n_heads - 1))
else:
    rows = show_attention()
    print("rows sum to one:", bool(np.allclose(rows.sum(-1), 1.0)))
