"""Where a run's model comes from, and proof that it is the model that was saved.

A run records three things of its model (`record`), and loading holds the model to
them (`verify`), so nothing decodes a saved run as a model it is not:

    code     the model's class as `module:qualname` and its fields (`resolve` builds it
             again; a class other than the built-in one is imported only with the
             caller's consent, trust_code=True, as Hugging Face's trust_remote_code)
    digests  a digest of the code that computes the built-in model (its layer
             modules, `model.py`, the layers' specs, its config classes) and of the model's own modules,
             with the library's version and Python's: with the same versions, library
             code that differs is a patched layer or an edited install, refused
             whatever it computes (`minitx upgrade` records code changed on purpose)
    probe    what the model computed when saved: `apply`'s logits on fixed tokens (a few
             rows covering up to 128 ids, up to 64 positions), seen through
             PROBE_PROJECTIONS fixed random directions of the V logits, so a change in
             any logit moves them; loading computes them again with `apply` and with
             the cached decode (`apply_cached`), which must agree

The probe is the check where versions differ (another release of the library, the
model's own code edited): the maths must be the same to a tolerance that devices and
compilers leave (`probe_tolerance`). Within one process a jitted function keeps the
code it was traced with; the digests see a patch at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import math
import re
import sys
import types
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minitx_fn.config import LanguageModel, ModelConfig
from minitx_fn.errors import CheckpointError, Error

BUILTIN_CODE = f"{ModelConfig.__module__}:{ModelConfig.__qualname__}"   # the built-in model needs no consent
# The code that computes the built-in model: what a patch of "a layer" changes.
LIBRARY_MODULES = ("minitx_fn.layers", "minitx_fn.layers.attention", "minitx_fn.layers.block",
                   "minitx_fn.layers.dropout", "minitx_fn.layers.dtypes", "minitx_fn.layers.embedding",
                   "minitx_fn.layers.feedforward",
                   "minitx_fn.layers.linear", "minitx_fn.layers.norm", "minitx_fn.layers.positional",
                   "minitx_fn.layers.rmsnorm", "minitx_fn.layers.rotary", "minitx_fn.layers.swiglu", "minitx_fn.model",
                   "minitx_fn.specs")
LIBRARY_CLASSES = (LanguageModel, ModelConfig)   # of minitx_fn.config
PROBE_ROWS, PROBE_POSITIONS, PROBE_IDS, PROBE_PROJECTIONS = 4, 64, 128, 2


# ----------------------------------------------------------------------------- the model's code


def resolve(code: Any, config: Any, *, trust_code: bool = False, where: str = "meta.json") -> LanguageModel:
    """The model a run names: its class (`module:qualname`) built from its fields, each
    checked. The built-in model is built at once; any other class is imported only
    with trust_code=True. CheckpointError, naming the run and the code, for a class
    without consent, one that cannot be imported, one that is no model, or fields it refuses.

    Example:
        >>> resolve("mymodels:ALiBi", {}, where="runs/x")
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: runs/x: its model is 'mymodels:ALiBi', code of its own; loading it imports and runs that code: pass trust_code=True if you trust it
    """
    if not (isinstance(code, str) and re.fullmatch(r"[\w.]+:[\w.]+", code)):
        raise CheckpointError(f"{where}: model code {code!r} is not 'module:qualname'")
    if code == BUILTIN_CODE:
        cls = ModelConfig
    elif not trust_code:
        raise CheckpointError(f"{where}: its model is {code!r}, code of its own; loading it imports and runs that "
                              f"code: pass {{trust}} if you trust it", trust=("trust_code", True))
    else:
        cls = _import(code, where)
    return from_dict(cls, config, f"{where}: model {code!r}")


def _import(code: str, where: str):
    module, qualname = code.split(":")
    try:
        found = importlib.import_module(module)
        for name in qualname.split("."):
            found = getattr(found, name)
    except Exception as e:                  # ImportError, AttributeError, or whatever the module raised
        fix = ("it was defined in the script or notebook that saved the run: define the same class there (in "
               "__main__) before loading, or move it into a module" if module == "__main__" else
               "put the folder of the module that defines it on the path (PYTHONPATH=FOLDER), or work from that folder")
        raise CheckpointError(f"{where}: its model {code!r} cannot be imported ({type(e).__name__}: {e}); "
                              f"{fix}") from None
    if not (isinstance(found, type) and issubclass(found, LanguageModel) and dataclasses.is_dataclass(found)):
        raise CheckpointError(f"{where}: {code!r} is no model class (a dataclass and a config.LanguageModel)")
    return found


def check_importable(model: LanguageModel) -> None:
    """CheckpointError unless a run of `model` could be loaded again: a dataclass
    LanguageModel whose class `model.code` imports back (not a class defined inside a
    function), and whose fields survive JSON (`resolve` rebuilds an equal model).

    Example:
        >>> check_importable(ModelConfig(vocab_size=5))
    """
    if not (isinstance(model, LanguageModel) and dataclasses.is_dataclass(model)):
        raise CheckpointError(f"a run's model is a model value (a dataclass and a config.LanguageModel), not "
                              f"{type(model).__name__}")
    if model.code != BUILTIN_CODE and _import(model.code, "this model") is not type(model):
        raise CheckpointError(f"the model's class {model.code!r} does not import back as itself; define it at the "
                              f"top level of a module, so a run can name it")
    try:
        config = json.loads(json.dumps(model.to_dict(), allow_nan=False))
        back = from_dict(type(model), config, f"model {model.code!r}")
    except (TypeError, ValueError) as e:     # a field JSON cannot hold: inf, nan, complex, an object
        raise CheckpointError(f"model {model.code!r} has a field JSON cannot hold ({e}); give it fields of plain "
                              f"values (finite numbers, strings, booleans, None, lists, nested dataclasses)") from None
    if back != model:
        raise CheckpointError(f"model {model.code!r} does not come back equal from its fields as JSON; give it "
                              f"fields of plain values (finite numbers, strings, booleans, None, lists, nested "
                              f"dataclasses)")


def _matches(value: Any, hint) -> bool:
    """Whether a JSON value has the type a dataclass field declares (bool is not an int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):                 # JSON has lists: for a tuple field too
        return isinstance(value, list) and all(_matches(v, a) for a in typing.get_args(hint)[:1] if a is not ...
                                               for v in value)
    return isinstance(origin, type) and isinstance(value, origin)


def from_dict(cls, value: Any, where: str):
    """A config dataclass from its saved dict: no field it lacks, each of its type, every
    required one there (one with a default that the dict leaves out takes it), nested
    dataclasses from their dicts, tuples from lists; and valid. CheckpointError otherwise.

    Example:
        >>> from minitx_fn.config import TrainConfig
        >>> o = from_dict(TrainConfig, {"steps": 10, "optimizer": {"decay_steps": 10, "warmup": 1}}, "meta.json").optimizer
        >>> o.decay_steps, o.warmup, o.lr, o.min_lr, o.method        # what the dict leaves out takes its default
        (10, 1, 0.001, 0.0001, 'adamw')
    """
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {cls.__name__} is {type(value).__name__}, not an object")
    hints = typing.get_type_hints(cls)
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(value) - names), sorted(required - set(value))
    if unknown or missing:
        problems = [f"unknown fields {unknown}" if unknown else "", f"lacks {missing}" if missing else ""]
        raise CheckpointError(f"{where}: {cls.__name__} " + " and ".join(p for p in problems if p))
    fields = {}
    for name in sorted(value):                          # a field an older run lacks takes its default
        hint, field = hints[name], value[name]
        nested = [h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)]   # X, or X | None
        if nested and isinstance(field, dict):
            field = from_dict(nested[0], field, f"{where}: {cls.__name__}.{name}")
        elif not _matches(field, hint):
            raise CheckpointError(f"{where}: {cls.__name__}.{name} = {field!r} is not of type {hint}")
        elif (typing.get_origin(hint) or hint) is tuple:
            field = tuple(field)
        fields[name] = field
    try:
        return cls(**fields)
    except Error as e:
        raise CheckpointError(f"{where}: {cls.__name__}: {e}") from None
    except TypeError as e:                              # a class whose __init__ refuses what its fields say
        raise CheckpointError(f"{where}: {cls.__name__}: {e}") from None


# ----------------------------------------------------------------------------- digests of the code


def _describe(obj, home: str, top: bool = True):
    """What of an object the digest keeps: the code of what `home` (a module's name)
    defines, without line numbers or file names; the name of anything else (another
    module's function, a module, a class it refers to); plain values as they are. The
    same for the same code wherever it is installed, and whatever version of JAX."""
    if callable(obj) and not isinstance(obj, type):
        obj = inspect.unwrap(obj)
    if isinstance(obj, (types.FunctionType, types.MethodType)):
        if obj.__module__ != home:
            return ("ref", obj.__module__, obj.__qualname__)
        defaults = [*(obj.__defaults__ or ()), *sorted((obj.__kwdefaults__ or {}).items())]
        return ("function", obj.__qualname__, _code(obj.__code__), [_describe(d, home, False) for d in defaults])
    if isinstance(obj, type):
        if not top or obj.__module__ != home:
            return ("ref", obj.__module__, obj.__qualname__)
        members = {k: v.fget if isinstance(v, property) else getattr(v, "__func__", v) for k, v in vars(obj).items()
                   if not k.startswith("__") or k in ("__post_init__", "__call__")}
        return ("class", obj.__qualname__, sorted((k, _describe(v, home, False)) for k, v in members.items()))
    if isinstance(obj, types.ModuleType):
        return ("module", obj.__name__)
    if isinstance(obj, functools.partial):
        return ("partial", _describe(obj.func, home, False), repr(obj.args), sorted(obj.keywords))
    if isinstance(obj, dict):
        return ("dict", sorted((repr(k), _describe(v, home, False)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list, frozenset, set)):
        return (type(obj).__name__, [_describe(v, home, False) for v in obj])
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return repr(obj)
    return ("object", type(obj).__module__, type(obj).__qualname__)


def _code(code: types.CodeType):
    return ("code", code.co_code.hex(), code.co_names,
            tuple(_code(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts))


def _module_digest(name: str, only=None) -> str:
    """SHA-256 of what a module defines (or of the classes `only` of it)."""
    module = sys.modules.get(name) or importlib.import_module(name)
    items = only if only is not None else [(k, v) for k, v in sorted(vars(module).items()) if not k.startswith("__")]
    text = repr([(k, _describe(v, name)) for k, v in items] if only is None else [_describe(v, name) for v in items])
    return hashlib.sha256(text.encode()).hexdigest()


def digests(model: LanguageModel) -> dict:
    """{"minitx_fn": version, "python": "3.11", "library": {module: digest}, "own":
    {module: digest}}: the code that computes `model` now. Library: the layer modules,
    model.py, specs.py, and the model classes of config.py; own: the modules of the model's
    classes outside minitx_fn.

    Example:
        >>> sorted(digests(ModelConfig(vocab_size=5)))
        ['library', 'minitx_fn', 'own', 'python']
    """
    own = sorted({c.__module__ for c in type(model).__mro__ if not c.__module__.startswith(("minitx_fn", "builtins"))})
    return {"minitx_fn": importlib.metadata.version("minitx_fn"), "python": "%d.%d" % sys.version_info[:2],
            "library": {**{m: _module_digest(m) for m in LIBRARY_MODULES},
                        "minitx_fn.config": _module_digest("minitx_fn.config", LIBRARY_CLASSES)},
            "own": {m: _module_digest(m) for m in own}}


# ----------------------------------------------------------------------------- the probe


def _probe_tokens(model: LanguageModel) -> jax.Array:
    """(R, L) fixed ids: L = min(max_len, PROBE_POSITIONS) positions, R rows covering up
    to PROBE_IDS distinct ids spread over the vocabulary (the same for the same V)."""
    v = model.vocab_size
    positions = min(model.max_len, PROBE_POSITIONS)
    rows = max(1, min(PROBE_ROWS, -(-min(v, PROBE_IDS) // positions)))
    ids = np.random.default_rng(v).permutation(v)
    return jnp.asarray(np.resize(ids[:min(v, PROBE_IDS)], (rows, positions)), jnp.int32)


def _directions(v: int) -> jax.Array:
    """(V, P) fixed unit directions: the logits' projections on them change when any logit does."""
    d = np.random.default_rng(v + 1).standard_normal((v, PROBE_PROJECTIONS))
    return jnp.asarray(d / np.linalg.norm(d, axis=0), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _probe_apply(model: LanguageModel, params, tokens):
    logits = model.apply(params, tokens)                                               # (R, L, V)
    return logits.astype(jnp.float32) @ _directions(model.vocab_size)                  # (R, L, P)


@functools.partial(jax.jit, static_argnums=0)
def _probe_cached(model: LanguageModel, params, tokens):
    """The same projections from the cached decode: all but the last token of each row
    prefilled, the last one decoded."""
    r, n = tokens.shape
    params, cache = model.decode_params(params), model.init_cache(r, n)
    parts = []
    if n > 1:
        logits, cache = model.apply_cached(params, tokens[:, :n - 1], cache, index=jnp.zeros(r, jnp.int32))
        parts.append(logits)
    logits, _ = model.apply_cached(params, tokens[:, n - 1:], cache, index=jnp.full(r, n - 1, jnp.int32))
    return jnp.concatenate(parts + [logits], axis=1).astype(jnp.float32) @ _directions(model.vocab_size)


def probe(model: LanguageModel, params) -> dict:
    """What a run records of what its model computes: {"shape": [R, L, P], "values": the
    projections of `apply`'s logits on the probe tokens, as one line of numbers ("nan"
    where one overflowed: weights trained past float32's range)}.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=16)
        >>> probe(cfg, cfg.init(jax.random.key(0)))["shape"]
        [1, 16, 2]
    """
    values = np.asarray(_probe_apply(model, params, _probe_tokens(model)), np.float64)
    return {"shape": list(values.shape), "values": " ".join(f"{x:.7g}" for x in values.ravel())}


def probe_problem(recorded: Any) -> str:
    """What is wrong with a recorded probe's form, or "".

    Example:
        >>> probe_problem({"shape": [1, 2, 2], "values": "1 2 3"})
        'probe must be {"shape": [R, L, P], "values": R * L * P numbers}'
    """
    try:
        shape, values = recorded["shape"], [float(x) for x in recorded["values"].split()]
        if set(recorded) == {"shape", "values"} and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape) \
                and len(values) == math.prod(shape) and not any(math.isinf(x) for x in values):
            return ""
    except (TypeError, ValueError, KeyError, AttributeError):
        pass
    return 'probe must be {"shape": [R, L, P], "values": R * L * P numbers}'


def probe_tolerance(model: LanguageModel) -> float:
    """How far, relative to the probe's largest value, a probe may move and still be the
    same model: devices and compilers round differently (a GPU's float32 matmuls may run
    in TF32); a changed layer moves it by its whole scale.

    Example:
        >>> probe_tolerance(ModelConfig(vocab_size=5)), probe_tolerance(ModelConfig(vocab_size=5, dtype="bfloat16"))
        (0.01, 0.05)
    """
    return 0.05 if getattr(model, "dtype", "float32") == "bfloat16" else 0.01


def record(model: LanguageModel, params) -> dict:
    """What meta.json records of the model (the module docstring): its digests and probe.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> sorted(record(cfg, cfg.init(jax.random.key(0))))
        ['library', 'minitx_fn', 'own', 'probe', 'python']
    """
    return {**digests(model), "probe": probe(model, params)}


def _moved(now: np.ndarray, then: np.ndarray) -> tuple[float, float]:
    """(the largest move, the scale): where `then` is finite, and nan (non-finite) at the same places."""
    finite = np.isfinite(then)
    scale = max(float(np.abs(then[finite]).max(initial=0.0)), 1e-6)
    if now.shape != then.shape or not (np.isfinite(now) == finite).all():
        return math.inf, scale
    return float(np.abs(now - then)[finite].max(initial=0.0)), scale


def verify(model: LanguageModel, params, recorded: dict | None, where: str, *, code_may_differ: bool = False) -> None:
    """CheckpointError unless the model is the one `recorded` (`record`; None: nothing
    recorded, as in format 8) describes: with the library's and Python's versions the
    same, the library code that computes it unchanged (else a patched layer or an edited
    install; `code_may_differ` lets the probe decide, as `minitx upgrade` does); the
    probe the same to `probe_tolerance`; and, recorded or not, its cached decode the
    same as its apply.

    Example:
        >>> cfg = ModelConfig(vocab_size=5, d_model=8, n_heads=2)
        >>> params = cfg.init(jax.random.key(0))
        >>> verify(cfg, params, record(cfg, params), "a run")
        >>> edited = record(cfg, params)
        >>> edited["probe"]["values"] = "9 " * 128                   # 1 row, 64 positions, 2 projections
        >>> verify(cfg, params, edited, "a run")
        Traceback (most recent call last):
        minitx_fn.errors.CheckpointError: a run: its model minitx_fn.config:ModelConfig does not compute what it computed when the run was saved (the probe moved by ...
    """
    tokens, tol = _probe_tokens(model), probe_tolerance(model)
    now = np.asarray(_probe_apply(model, params, tokens), np.float64)
    if recorded is not None:
        current = digests(model)
        changed = [m for m, d in recorded["library"].items() if current["library"].get(m) != d]
        same_release = all(recorded[k] == current[k] for k in ("minitx_fn", "python"))
        if same_release and changed and not code_may_differ:
            raise CheckpointError(f"{where}: the code of {', '.join(changed)} differs from the code that saved the "
                                  f"run, at the same minitx_fn {current['minitx_fn']}: a patched layer or an edited "
                                  f"install; if it was changed on purpose and computes what it did, `minitx upgrade "
                                  f"RUN` records it")
        then = np.array([float(x) for x in recorded["probe"]["values"].split()]).reshape(recorded["probe"]["shape"])
        if now.shape != then.shape:
            raise CheckpointError(f"{where}: the probe recorded is {list(then.shape)} and {model.code} gives "
                                  f"{list(now.shape)}: its config in meta.json, or the probe, was edited")
        moved, scale = _moved(now, then)
        if not moved <= tol * scale:
            own = [m for m, d in recorded["own"].items() if current["own"].get(m) != d]
            why = (f"its own code changed ({', '.join(own)})" if own else f"its code changed ({', '.join(changed)})"
                   if changed else "its config in meta.json, or its probe, was edited")
            raise CheckpointError(f"{where}: its model {model.code} does not compute what it computed when the run "
                                  f"was saved (the probe moved by {moved:.3g}, {moved / scale:.1%} of its scale): "
                                  f"{why}; load it with the code that saved it")
    cached = np.asarray(_probe_cached(model, params, tokens), np.float64)
    apart, scale = _moved(cached, now)
    if not apart <= tol * scale:
        raise CheckpointError(f"{where}: its model {model.code}'s cached decode (apply_cached) disagrees with its apply "
                              f"by {apart:.3g} ({apart / scale:.1%} of the logits' scale): generation would not be this "
                              f"model; fix apply_cached (testing.check_model finds where)")


# ----------------------------------------------------------------------------- the contract, from shapes alone


def check_contract(model: LanguageModel) -> None:
    """ConfigError, naming the model and what it breaks, unless its functions keep the
    contract's shapes (`config.LanguageModel`), traced with `jax.eval_shape` (nothing
    computed): floating parameters, (B, T, V) floating logits from `apply`, a cache whose
    leaves have the batch axis first, and `apply_cached` returning logits of the same
    shape and a cache of the same shapes and dtypes.

    Example:
        >>> check_contract(ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=4))
    """
    from minitx_fn.errors import ConfigError
    key, b, t = jax.random.key(0), 2, min(model.max_len, 3)
    try:
        params = jax.eval_shape(model.init, key)
        tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
        logits = jax.eval_shape(model.apply, params, tokens)
        cache = jax.eval_shape(lambda: model.init_cache(b, t))
        index = jax.ShapeDtypeStruct((b,), jnp.int32)
        cached, after = jax.eval_shape(lambda p, x, c, i: model.apply_cached(model.decode_params(p), x, c, index=i),
                                       params, tokens, cache, index)
    except Error:
        raise
    except Exception as e:                       # whatever a model of one's own raises while traced
        raise ConfigError(f"the model {model.code} fails when traced ({type(e).__name__}: {str(e)[:300]})") from None
    problems = []
    leaves = jax.tree.leaves(params)
    if not leaves or not all(jnp.issubdtype(a.dtype, jnp.floating) for a in leaves):
        problems.append("its parameters must be floating arrays (gradients are taken of them)")
    if logits.shape != (b, t, model.vocab_size) or not jnp.issubdtype(logits.dtype, jnp.floating):
        problems.append(f"apply gives {logits.shape} {logits.dtype}, not ({b}, {t}, V={model.vocab_size}) floating")
    if not all(a.shape[:1] == (b,) for a in jax.tree.leaves(cache)):
        problems.append("every leaf of its cache must have the batch axis first")
    if cached.shape != logits.shape or jax.tree.structure(after) != jax.tree.structure(cache) or not all(
            x.shape == y.shape and x.dtype == y.dtype for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(cache))):
        problems.append("apply_cached must give apply's logits and a cache of the shapes it was given")
    if problems:
        raise ConfigError(f"the model {model.code} breaks the model contract: " + "; ".join(problems))


__all__ = ["BUILTIN_CODE", "check_contract", "check_importable", "digests", "from_dict", "probe", "probe_problem",
           "probe_tolerance", "record", "resolve", "verify"]
