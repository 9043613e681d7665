"""What a user needs to prove a layer or a model of their own, the helpers this
project's own tests use (needs the test extra: chex, hypothesis).

    from minitx_fn import testing
    testing.fast_compile()                   # before JAX starts: the XLA flags that make tests compile fast
    testing.check_model(MyModel(d_model=16, n_heads=2, n_layers=1, max_len=8))    # the model contract, as laws
    params, y = testing.check_layer(lambda: my_layer.init(key, d=8), my_layer.apply,
                                    expected_shapes={"w": (8, 8)}, x=jnp.ones((2, 8)), out_shape=(2, 8))

- `check_model`: a model value (`config.LanguageModel`) keeps its contract, over
  random sizes and inputs, in float32 and float64: parameters, logits and cache of
  the declared shapes and dtypes, the cache's shapes static; cached decode equals
  recompute, past the window too (a sliding window equals recompute on its last
  tokens); a row alone equals the same row in a mixed batch.
- `check_layer`: the layer contract in one call (init's shapes and dtype, apply's
  output shape and dtype, finite, `jit(apply) == apply`).
- `model_sizes`, `dtypes`, `keys`: hypothesis strategies for a model's sizes, its
  dtype ("float32" or "float64") and PRNG keys.
- `assert_close_scaled`: trees equal within a tolerance relative to each leaf's scale.
- `assert_param_shapes`: a parameter tree has exactly these shapes and one dtype.
- `fast_compile`: XLA flags that compile several times faster on a CPU (same maths):
  call it first in a test suite's conftest.py, before JAX compiles anything.
- `private_names`: where Python source reaches a private name (`module._name`), so a
  suite can check that its tests use only public API.
- `float_copies`: the buffers of a compiled program (`jit(f).lower(...).compile()
  .as_text()`) that hold a float array of given shapes: a quantized weight converted
  whole to float32, instead of row by row inside a fused product.
- `enable_x64`, `standard_promotion`: float64 in a block; standard dtype promotion
  for code (optax, Flax) not written for strict promotion.

JAX, chex and hypothesis are imported when a helper is called, not with this
module, so `fast_compile` can run before JAX starts.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.metadata
import os

import numpy as np

# Compiling, not running, is what small tests spend their time on (the programs are
# tiny, and every new shape of an eager operation is a program of its own). Two XLA
# flags make the CPU compiler several times faster: LLVM at optimisation level 0, and
# (for jaxlib 0.10, whose flag it is: XLA aborts on one it does not know) XLA's older
# CPU fusion code generator. The numbers are the same maths; this project's suite took
# about half as long with them.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",)
FAST_COMPILE_FLAGS_0_10 = ("--xla_cpu_use_fusion_emitters=false",)


def fast_compile(environ=None) -> list[str]:
    """Add the fast-compile XLA flags to XLA_FLAGS in `environ` (default os.environ);
    call it before JAX is imported (a test suite's conftest.py), which reads them at
    start-up. Returns the flags it added (those not already there).

    Example:
        >>> env = {}
        >>> fast_compile(env)[0], env["XLA_FLAGS"].startswith("--xla_backend_optimization_level=0")
        ('--xla_backend_optimization_level=0', True)
    """
    environ = os.environ if environ is None else environ
    flags = list(FAST_COMPILE_FLAGS)
    if importlib.metadata.version("jaxlib").startswith("0.10."):
        flags += FAST_COMPILE_FLAGS_0_10
    added = [flag for flag in flags if flag.split("=")[0] not in environ.get("XLA_FLAGS", "")]
    environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", ""), *added]).strip()
    return added


def _max_abs(a) -> float:
    return float(np.abs(np.asarray(a, np.float64)).max(initial=0.0))


def assert_close_scaled(actual, expected, tol: float, *, floor: float = 1e-3) -> None:
    """Every leaf: max |actual - expected| <= tol * scale, the scale being the leaf's own
    max |expected|, floored at `floor` times the largest value in the whole tree.

    The floor matters for leaves whose value is (near) zero, where a relative error
    means nothing: biases that start at zero and have moved by one step, or the
    entries of a gradient that cancel. floor=1 measures every leaf on the tree's scale.

    Example:
        >>> assert_close_scaled({"w": np.array([100.0, 1.0])}, {"w": np.array([100.001, 1.0])}, 1e-5)
        >>> assert_close_scaled({"w": np.array([1.0])}, {"w": np.array([1.1])}, 1e-5)
        Traceback (most recent call last):
        AssertionError: ['w']: max abs error 1.000e-01 > 1e-05 x scale 1.100e+00
    """
    import chex
    import jax
    chex.assert_trees_all_equal_shapes(actual, expected)
    floor = floor * max([_max_abs(e) for e in jax.tree.leaves(expected)] + [1e-30])
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(_max_abs(e64), floor)
        err = float(np.abs(a64 - e64).max(initial=0.0))
        assert err <= tol * scale, (
            f"{jax.tree_util.keystr(path) + ': ' if path else ''}max abs error {err:.3e} > {tol:.0e} x scale {scale:.3e}")


def assert_param_shapes(params, expected_shapes: dict, dtype) -> None:
    """The parameter tree has exactly these leaf shapes, all of `dtype`.

    Example:
        >>> import jax.numpy as jnp
        >>> assert_param_shapes({"w": jnp.zeros((2, 3))}, {"w": (2, 3)}, jnp.float32)
    """
    import chex
    import jax
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda a: a.shape, params), expected_shapes)
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a.shape, params), expected_shapes)
    chex.assert_type(jax.tree.leaves(params), [dtype] * len(jax.tree.leaves(params)))


def check_layer(init_fn, apply_fn, *, expected_shapes: dict, x, out_shape, dtype=np.float32, out_dtype=None):
    """The one layer-contract check (init_fn takes no arguments: close over the key and
    sizes, `lambda: my_layer.init(key, d=8)`): init's parameters have the expected shapes and
    dtype, apply accepts exactly them (eval_shape, no FLOPs), returns out_shape, and
    the jitted apply equals the plain one. Returns (params, y).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from minitx_fn.layers import linear
        >>> params, y = check_layer(lambda: linear.init(jax.random.key(0), d_in=4, d_out=3), linear.apply,
        ...                         expected_shapes={"w": (4, 3), "b": (3,)}, x=jnp.ones((2, 4)), out_shape=(2, 3))
    """
    import chex
    import jax
    params = init_fn()
    assert_param_shapes(params, expected_shapes, dtype)
    abstract = jax.eval_shape(apply_fn, params, x)
    chex.assert_shape(abstract, out_shape)
    y = apply_fn(params, x)
    chex.assert_shape(y, out_shape)
    chex.assert_type(y, out_dtype or dtype)
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_close(jax.jit(apply_fn)(params, x), y, rtol=1e-6, atol=1e-6)
    return params, y


def enable_x64():
    """jax.enable_x64 (jax >= 0.7) or jax.experimental.enable_x64 (older): float64 in a `with` block.

    Example:
        >>> import jax.numpy as jnp
        >>> with enable_x64():
        ...     jnp.ones(1, jnp.float64).dtype
        dtype('float64')
    """
    import jax
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # pragma: no cover
    return legacy()


def standard_promotion():
    """Standard dtype promotion for a block of code that runs optax or Flax.

    The suite runs with strict promotion to catch implicit casts in our library, but
    the third-party code we compare against is not written for it: optax (0.2.x)
    computes Adam's bias correction as `decay ** count` with an int32 count, and
    Flax's LayerNorm and attention mix float32 constants into float64 inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> with standard_promotion():
        ...     (jnp.ones(1, jnp.float32) + jnp.ones(1, jnp.int32)).dtype
        dtype('float32')
    """
    import jax
    return jax.numpy_dtype_promotion("standard")


# ----------------------------------------------------------------------------- a model's laws


SIZE_FIELDS = ("vocab_size", "n_layers", "max_len", "d_model")      # what `model_sizes` varies, where a model has them


def model_sizes(model):
    """A hypothesis strategy of changes to a model's sizes (a dict for `replace`), small
    enough to compile fast: vocab_size, n_layers, max_len and (keeping its heads)
    d_model, those of them the model has. A model without them: no changes.

    Example:
        >>> from hypothesis import find
        >>> from minitx_fn import ModelConfig
        >>> find(model_sizes(ModelConfig(vocab_size=5, n_heads=2)), lambda sizes: True)    # the smallest
        {'vocab_size': 5, 'n_layers': 1, 'max_len': 6, 'd_model': 4}
    """
    from hypothesis import strategies as st
    fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()
    choices = {"vocab_size": st.sampled_from([5, 11]), "n_layers": st.sampled_from([1, 2]),
               "max_len": st.sampled_from([6, 9])}
    if "d_model" in fields and "n_heads" in fields:
        choices["d_model"] = st.sampled_from([2, 4]).map(lambda k: k * model.n_heads)   # head width K = 2 or 4
    return st.fixed_dictionaries({name: s for name, s in choices.items() if name in fields})


def dtypes(*, x64: bool = True):
    """A hypothesis strategy of the dtypes a model computes in: "float32", and with x64
    "float64" (run those draws in an `enable_x64()` block, and give them to `with_dtype`).

    Example:
        >>> from hypothesis import find
        >>> find(dtypes(), lambda dtype: dtype == "float64"), find(dtypes(x64=False), lambda dtype: True)
        ('float64', 'float32')
    """
    from hypothesis import strategies as st
    return st.sampled_from(["float32", "float64"] if x64 else ["float32"])


def keys():
    """A hypothesis strategy of PRNG keys (from 32-bit seeds).

    Example:
        >>> from hypothesis import find
        >>> find(keys(), lambda key: True).shape
        ()
    """
    import jax
    from hypothesis import strategies as st
    return st.integers(0, 2**32 - 1).map(jax.random.key)


def with_dtype(model, dtype: str):
    """The model computing and storing its parameters in `dtype` ("float32" or
    "float64"), where it has the fields `dtype` and `param_dtype`; else as it is.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> with enable_x64():
        ...     with_dtype(ModelConfig(vocab_size=5), "float64").param_dtype
        'float64'
    """
    names = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()
    changes = {name: dtype for name in ("dtype", "param_dtype") if name in names}
    return model.replace(**changes) if changes else model


def check_model(model, *, examples: int | None = None, dtypes=("float32", "float64"), vary_sizes: bool = True,
                shrink: bool = True) -> None:
    """The model contract (`config.LanguageModel`) as laws, run as a hypothesis property
    on the model as given and over random sizes (`model_sizes`), prompts, batches and
    keys, in each of `dtypes` (float64 in a `jax.enable_x64` block; a model without dtype
    fields runs in its own), with weights drawn larger than training starts from
    (init_std 0.3, where the model has one), so every layer moves the logits:

    1. `init`'s parameters have the shapes and dtypes `jax.eval_shape(model.init)`
       declares; `apply` gives (B, T, V) logits of a floating dtype; `init_cache` has its
       declared shapes, and `apply_cached` returns a cache of the same shapes and dtypes
       (static shapes: nothing recompiles per token).
    2. Cached decode equals recompute: `generate.generate` (prefill, then one token at a
       time from the cache) gives the tokens and logits `generate.generate_recompute`
       (the whole context through `apply` for every token) gives, for longer than the
       window, so the slide is checked too: a sliding window equals recompute on its
       last tokens.
    3. A row alone equals the same row in a mixed batch of other lengths.
    4. Dropout is passed on: for a model with a `dropout` field, at rate 0.5 a key
       changes what each block's `apply_block` computes (a model not built on
       `ModelConfig`'s blocks: what `apply` computes).

    AssertionError names the law, the model's fields and the sizes that broke it
    (hypothesis shrinks them to the smallest that fail, which compiles the model many
    times: shrink=False reports the first). `examples` (random ones, beside the model as
    given) defaults to the active hypothesis profile's.

    Example:
        >>> from minitx_fn import ModelConfig
        >>> check_model(ModelConfig(d_model=8, n_heads=2, n_layers=1, max_len=6), examples=1, dtypes=("float32",))
    """
    from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

    from minitx_fn.config import LanguageModel
    from minitx_fn.errors import ConfigError
    if not (isinstance(model, LanguageModel) and dataclasses.is_dataclass(model)):
        raise ConfigError(f"check_model takes a model value (a dataclass and a config.LanguageModel), not "
                          f"{type(model).__name__}")
    sizes = model_sizes(model) if vary_sizes else st.just({})
    current = settings()
    phases = [p for p in current.phases if shrink or p is not Phase.shrink]

    @settings(current, deadline=None, max_examples=examples or current.max_examples, phases=phases,
              report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
    @given(sizes=sizes, dtype=st.sampled_from(list(dtypes)), seed=st.integers(0, 2**16),
           lengths=st.lists(st.integers(1, 64), min_size=2, max_size=3), row=st.integers(0, 2))
    @example(sizes={}, dtype=dtypes[0], seed=0, lengths=[64, 1, 3], row=1)     # as given; a full window
    def laws(sizes, dtype, seed, lengths, row):
        with enable_x64() if dtype == "float64" else contextlib.nullcontext():
            _check_one(_sensitive(with_dtype(model.replace(**sizes), dtype)), dtype, seed, lengths, row)

    laws()


def _sensitive(model):
    """The model with larger initial weights, where it has init_std: at training's small
    start a layer's share of the logits can hide below a float32 tolerance."""
    names = {f.name for f in dataclasses.fields(model)}
    return model.replace(init_std=0.3) if "init_std" in names else model


def _law(name: str, where: str, check) -> None:
    """check(), its AssertionError prefixed with the law it breaks and the model."""
    try:
        check()
    except AssertionError as e:
        raise AssertionError(f"{name}: {str(e).strip()} [{where}]") from None


def _check_one(model, dtype: str, seed: int, lengths: list[int], row: int) -> None:
    import chex
    import jax
    import jax.numpy as jnp

    from minitx_fn import generate
    if model.vocab_size is None:
        model = model.replace(vocab_size=7)
    v, s = model.vocab_size, model.max_len
    lengths = [min(n, s) for n in lengths]
    row = row % len(lengths)
    where = f"{model.code}({model.to_dict()}), prompt lengths {lengths} (at most max_len)"
    key = jax.random.key(seed)
    params = model.init(key)
    declared = jax.eval_shape(model.init, key)
    _law("law 1, init's shapes", where, lambda: chex.assert_trees_all_equal_shapes_and_dtypes(params, declared))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, v, n) for n in lengths]
    tokens = jnp.asarray(rng.integers(0, v, (len(lengths), s)), jnp.int32)
    logits = model.apply(params, tokens)
    _law("law 1, apply", where, lambda: chex.assert_shape(logits, (len(lengths), s, v)))
    _law("law 1, apply's dtype", where, lambda: _is(jnp.issubdtype(logits.dtype, jnp.floating),
                                                     f"logits of {logits.dtype}"))
    cache = model.init_cache(len(lengths), s)
    _law("law 1, init_cache", where, lambda: chex.assert_trees_all_equal_shapes_and_dtypes(
        cache, jax.eval_shape(lambda: model.init_cache(len(lengths), s))))
    out, after = model.apply_cached(model.decode_params(params), tokens[:, :2], cache,
                                    index=jnp.zeros(len(lengths), jnp.int32))
    _law("law 1, apply_cached", where, lambda: chex.assert_shape(out, (len(lengths), 2, v)))
    _law("law 1, apply_cached's cache", where, lambda: chex.assert_trees_all_equal_shapes_and_dtypes(after, cache))

    tol = 1e-9 if dtype == "float64" else 2e-4
    new = s + 3                                                    # past the window: every row slides
    ids, got = generate.generate(params, prompts, model=model, max_new_tokens=new, return_logits=True)
    ref_ids, ref = generate.generate_recompute(params, prompts, model=model, max_new_tokens=new, return_logits=True)
    for b in range(len(prompts)):
        _law(f"law 2, cached decode != recompute (row {b}, logits)", where,
             lambda: assert_close_scaled(got[b], ref[b], tol, floor=1.0))
        _law(f"law 2, cached decode != recompute (row {b}, tokens)", where,
             lambda: np.testing.assert_array_equal(ids[b], ref_ids[b]))
    alone_ids, alone = generate.generate(params, [prompts[row]], model=model, max_new_tokens=new, return_logits=True)
    _law(f"law 3, row {row} alone != in the batch", where, lambda: (np.testing.assert_array_equal(alone_ids[0], ids[row]),
                                                                  assert_close_scaled(alone[0], got[row], tol, floor=1.0)))
    if "dropout" in {f.name for f in dataclasses.fields(model)}:
        _law("law 4, dropout", where, lambda: _drops(model.replace(dropout=0.5), params, tokens, seed))


def _drops(model, params, tokens, seed: int) -> None:
    """AssertionError unless a key changes what the model's blocks (`apply_block`), or
    for a model not built on them `apply`, compute: else dropout is silently off."""
    import jax
    import jax.numpy as jnp

    from minitx_fn.config import ModelConfig
    key = jax.random.key(seed + 1)
    if isinstance(model, ModelConfig):
        first = jax.tree.map(lambda a: a[0], params["blocks"])                  # layer 0 of the stacked blocks
        x = jax.random.normal(key, (*tokens.shape, model.d_model), jnp.result_type(*jax.tree.leaves(first)))
        positions = jnp.arange(tokens.shape[1])[None]
        plain, dropped = (model.apply_block(first, x, positions=positions, key=k) for k in (None, key))
        what = "apply_block"
    else:
        plain, dropped = model.apply(params, tokens), model.apply(params, tokens, key=key)
        what = "apply"
    assert not np.array_equal(np.asarray(plain), np.asarray(dropped)), (
        f"at dropout 0.5 a key changes nothing {what} computes: pass the key on (to block.apply, "
        f"attention.apply, block.mlp_half or dropout.apply)")


def _is(ok: bool, what: str) -> None:
    assert ok, what


# ----------------------------------------------------------------------------- tests that use public names only


# A namedtuple's methods and fields begin with an underscore so as not to clash with its
# own fields; they are its public API. os._exit is os's documented way out of a child.
PUBLIC_UNDERSCORE = frozenset({"_replace", "_asdict", "_fields", "_field_defaults", "_make", "_exit"})


def float_copies(hlo: str, shapes) -> list[str]:
    """The instructions of a compiled program's HLO text that write a whole float array
    of one of `shapes` to memory: those outside fused computations (a fusion's inside
    lives in registers; its result, the fusion instruction itself, is a buffer), not
    counting parameters.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jnp.ones((16, 8), jnp.int8)
        >>> f = jax.jit(lambda w, x: x @ w.astype(jnp.float32).T)
        >>> float_copies(f.lower(w, jnp.ones((1, 8))).compile().as_text(), {(16, 8)})      # batch 1: row by row
        []
        >>> len(float_copies(f.lower(w, jnp.ones((8, 8))).compile().as_text(), {(16, 8)})) > 0   # batch 8: a copy
        True
    """
    import re
    found = []
    for computation in re.split(r"\n(?=\S)", hlo):
        name = computation.split("\n", 1)[0].replace("ENTRY ", "").strip()
        if re.match(r"%(fused|wrapped)", name):
            continue
        for line in computation.split("\n")[1:]:
            made = re.search(r"= (f64|f32|bf16|f16)\[([\d,]*)\]", line)
            if made and "parameter(" not in line and tuple(int(d) for d in made.group(2).split(",") if d) in shapes:
                found.append(line.strip())
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
        and name not in PUBLIC_UNDERSCORE


def private_names(source: str) -> list[tuple[int, str]]:
    """(line, what) for every place Python `source` reaches a private name of another
    module or object: `from m import _x`, `import m._x`, `obj._x` (but `self._x` and
    `cls._x`, an object's own), a string "_x" given to getattr, setattr, delattr,
    hasattr or monkeypatch's setattr and delattr, and a dotted string "m._x" given to
    those. Names with an underscore that are public API (a namedtuple's `_replace`,
    `os._exit`: PUBLIC_UNDERSCORE) and dunders are not private.

    Example:
        >>> private_names("import argparse\\nargparse.ArgumentParser()._actions\\nstate._replace(step=1)")
        [(2, '._actions')]
        >>> private_names("from minitx_fn.cli import _main\\nmonkeypatch.setattr(checkpoint, '_write', None)")
        [(1, 'import _main'), (2, "setattr(..., '_write')")]
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _private(a.name)]
            if any(_private(part) for part in (node.module or "").split(".")):
                found.append((node.lineno, f"from {node.module}"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if any(_private(part) for part in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called in ("getattr", "setattr", "delattr", "hasattr"):
                for arg in node.args[:2]:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                            any(_private(part) for part in arg.value.split(".")):
                        found.append((node.lineno, f"{called}(..., {arg.value!r})"))
    return sorted(found)
