"""`minitx_fn.testing`: the model contract as laws (`check_model`) holds for the
built-in model and for two models of one's own (`tests/variants.py`), in float32 and
float64; and it fails a model that breaks the contract, so it can fail. Its strategies
and fast-compile flags; and `private_names` holding this repository's tests and
benchmarks to public names, in test modules named for the module each tests."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pkgutil

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minitx_fn
from minitx_fn import ModelConfig, testing
from minitx_fn.errors import ConfigError
from minitx_fn.layers import block
from tests.helpers import standard_promotion
from tests.variants import ALiBi, Parallel

SIZES = dict(d_model=8, n_heads=2, n_layers=1, max_len=6)


@pytest.mark.heavy
@pytest.mark.parametrize("model, dtypes", [
    (ALiBi(**SIZES), ("float32", "float64")), (Parallel(**SIZES), ("float64", "float32")),
    (ModelConfig(**SIZES, positions="learned", tie_embeddings=True), ("float64",)),                 # GPT-2's shape
    (ModelConfig(**SIZES, norm="rmsnorm", mlp="swiglu", positions="rotary", n_kv_heads=1, bias=False), ("float32",)),
], ids=["alibi", "parallel", "gpt2-f64", "llama-mqa-f32"])
def test_the_built_in_models_and_models_of_ones_own_keep_the_contract(model, dtypes):
    """Cached decode equals recompute past the window, a row alone equals the row in a
    batch, the declared shapes hold: for the model as given, in the first of its dtypes,
    and for one random draw of sizes and dtype beside it (a fresh one each run, so over
    runs the models of one's own meet both dtypes at many sizes). (The built-in model's
    laws are also tests/test_generate.py's, test_model.py's and test_speculative.py's.)"""
    with standard_promotion():
        testing.check_model(model, examples=1, dtypes=dtypes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Forgetful(ModelConfig):
    """Its cached decode reads only the token it is given: the cache is written, never read."""

    def apply_block_cached(self, params, x, cache, *, index, positions, mask):
        only = jnp.arange(cache.k.shape[1])[None, None, None, :] == positions[:, None, :, None]   # (B, 1, T, S)
        return block.apply_cached(params, x, cache, self.block_spec, index=index, mask=mask & only)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Crowded(ModelConfig):
    """Its rows see each other: every row's block input is shifted by the batch's mean."""

    def apply_block(self, params, x, *, positions, mask=None, key=None):
        return super().apply_block(params, x + x.mean(axis=0, keepdims=True), positions=positions, mask=mask)

    def apply_block_cached(self, params, x, cache, *, index, positions, mask):
        return super().apply_block_cached(params, x + x.mean(axis=0, keepdims=True), cache, index=index,
                                          positions=positions, mask=mask)


class _Bent(ALiBi):
    """ALiBi whose cached path bends its bias (`bend`); apply is ALiBi's own."""

    def bend(self, bias, q_pos, slots):
        return bias

    def apply_block_cached(self, params, x, cache, *, index, positions, mask):
        slots = jnp.arange(cache.k.shape[1], dtype=jnp.int32)[None]
        return block.apply_cached(params, x, cache, self.block_spec, index=index, mask=mask,
                                  score_bias=self.bend(self.alibi(positions, slots), positions, slots))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Nearsighted(_Bent):
    """Its cached path sees no key farther than 4 positions: wrong only late in the window."""

    def bend(self, bias, q_pos, slots):
        return jnp.maximum(bias, self.alibi(jnp.full_like(q_pos, 4), jnp.zeros_like(slots)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Steep(_Bent):
    """Its cached path's slopes are a tenth steeper than apply's: a small change of one layer."""

    def bend(self, bias, q_pos, slots):
        return 1.1 * bias


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dry(ModelConfig):
    """Its block forgets dropout's key: training would silently drop nothing."""

    def apply_block(self, params, x, *, positions, mask=None, key=None):
        return super().apply_block(params, x, positions=positions, mask=mask)


@pytest.mark.parametrize("broken, law", [(Forgetful, "law 2, cached decode != recompute"),
                                         (Crowded, "law [23], "), (Nearsighted, "law 2, cached decode != recompute"),
                                         (Steep, "law 2, cached decode != recompute"), (Dry, "law 4, dropout")])
def test_a_model_that_breaks_the_contract_fails_it_naming_the_law(broken, law):
    """Each broken where a fixed small input would not show it: in the cache, across rows,
    past position 4 of the window, by a tenth in one layer; or in training alone."""
    with standard_promotion(), pytest.raises(AssertionError, match=law):
        testing.check_model(broken(**{**SIZES, "max_len": 12}), examples=1, dtypes=("float32",), shrink=False)
    with standard_promotion(), pytest.raises(ConfigError, match="takes a model value"):
        testing.check_model({"d_model": 8})


def test_fast_compile_adds_its_flags_once():
    env = {"XLA_FLAGS": "--xla_foo=1"}
    added = testing.fast_compile(env)
    assert added and env["XLA_FLAGS"].startswith("--xla_foo=1 ") and testing.fast_compile(env) == []
    assert all(flag in os.environ.get("XLA_FLAGS", "") for flag in added)      # the suite's conftest set them


@given(data=st.data())
def test_model_sizes_keep_a_models_heads_with_even_head_widths(data):
    sizes = data.draw(testing.model_sizes(ModelConfig(d_model=12, n_heads=3)))
    assert sizes["d_model"] % 3 == 0 and (sizes["d_model"] // 3) % 2 == 0
    assert ModelConfig(d_model=12, n_heads=3, positions="rotary").replace(**sizes)     # valid, rotary too


@given(sizes=st.data(), dtype=testing.dtypes(), key=testing.keys())
def test_the_strategies_draw_valid_models_in_either_dtype(sizes, dtype, key):
    model = ModelConfig(vocab_size=7, d_model=8, n_heads=2)
    drawn = model.replace(**sizes.draw(testing.model_sizes(model)))
    with testing.enable_x64() if dtype == "float64" else contextlib.nullcontext():
        params = jax.eval_shape(testing.with_dtype(drawn, dtype).init, key)          # traced, not compiled
        assert {str(a.dtype) for a in jax.tree.leaves(params)} == {dtype}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test modules that test the repository rather than one module: its README, its docs
# (docstring examples, the walkthrough) and its benchmarks.
REPOSITORY_TESTS = {"readme", "docs", "benchmarks"}


def test_every_test_module_is_named_for_the_module_it_tests():
    """tests/test_M.py (or test_M_WHAT.py) for a module or package M of minitx_fn, at any
    depth, or minitx_fn itself (the package as a whole)."""
    modules = {m.name.rsplit(".", 1)[-1] for m in pkgutil.walk_packages(minitx_fn.__path__, "minitx_fn.")}
    modules.add("minitx_fn")
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        name = os.path.basename(path)[len("test_"):-len(".py")]
        assert name in REPOSITORY_TESTS or any(name == m or name.startswith(m + "_") for m in modules), (
            f"{os.path.basename(path)} names no module of minitx_fn")


# Modules of minitx_fn whose tests live in a module named otherwise, and where.
TESTED_ELSEWHERE = {
    "minitx_fn.__main__": "cli",                     # `python -m minitx_fn`: test_cli runs it in processes
    "minitx_fn.hf": "hf_gpt2",                       # the package: its re-exported folder functions
    "minitx_fn.hf.folder": "hf_gpt2",                # each family's folders, read and written: test_hf_gpt2, _llama
    "minitx_fn.hf.tensors": "hf_gpt2",               # the mappings' shared checks, through each mapping
    **{f"minitx_fn.layers.{name}": "layers" for name in ("attention", "block", "dropout", "dtypes", "embedding",
                                                          "feedforward", "linear", "norm", "positional", "rmsnorm",
                                                          "rotary", "swiglu")},   # test_layers: a part per layer
}


def test_every_library_module_has_a_test_module():
    """tests/test_M.py for module M (test_hf_families for hf/families.py), or the test
    module TESTED_ELSEWHERE names."""
    tests = {os.path.basename(p)[len("test_"):-len(".py")] for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    untested = [m.name for m in pkgutil.walk_packages(minitx_fn.__path__, "minitx_fn.")
                if not ({"_".join(m.name.split(".")[1:]), m.name.rsplit(".", 1)[-1]} & tests)
                and TESTED_ELSEWHERE.get(m.name) not in tests]
    assert not untested, f"modules with no test module: {untested}"


def test_no_test_or_benchmark_reaches_a_private_name():
    """A test of a private name pins how the library is written, not what it does, and a
    benchmark that calls one breaks when the library is rewritten: both use what a user
    can, and faults are injected at the operating system's seams (os.fsync, signals)."""
    reached = [f"{os.path.relpath(path, ROOT)}:{line}: {what}"
               for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py")) +
                                  glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
               for line, what in testing.private_names(open(path, encoding="utf-8").read())]
    assert not reached, "private names reached:\n" + "\n".join(reached)
