"""Memory estimates: the parameter count from a config equals the model's, and the
estimates are lower bounds of what the arrays really take."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import memory, model, train
from minitx_fn.config import LoraConfig, ModelConfig, TrainConfig
from minitx_fn.errors import MemoryBudgetError
from tests.helpers import standard_promotion


@given(v=st.integers(1, 300), heads=st.integers(1, 4), per_head=st.integers(1, 8), layers=st.integers(1, 4),
       d_ff=st.one_of(st.none(), st.integers(1, 64)), positions=st.sampled_from(["sinusoidal", "learned"]),
       tied=st.booleans(), max_len=st.integers(1, 100))
def test_param_count_equals_the_initialised_model(v, heads, per_head, layers, d_ff, positions, tied, max_len):
    cfg = ModelConfig(vocab_size=v, d_model=heads * per_head, n_heads=heads, n_layers=layers, d_ff=d_ff,
                      positions=positions, tie_embeddings=tied, max_len=max_len)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), cfg))              # no arrays built
    assert memory.param_count(cfg) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def test_estimates_are_lower_bounds_of_the_real_arrays():
    cfg = ModelConfig(vocab_size=13, d_model=32, n_heads=2, n_layers=2, max_len=16)
    state = jax.eval_shape(lambda: train.init_state(jax.random.key(0), cfg, TrainConfig().optimizer))
    state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
    # params + two Adam moments exist for certain; gradients and activations come on top.
    assert memory.training_bytes(cfg, 8) >= state_bytes
    cache = model.init_cache(cfg, 3)
    assert memory.generation_bytes(cfg, 3, 10) >= sum(a.nbytes for a in jax.tree.leaves(cache))


@pytest.mark.parametrize("targets", [None, "attn", "all"])
def test_the_training_estimate_is_below_what_the_compiled_step_holds(targets):
    """A lower bound of XLA's own figure for the step (its arguments and temporaries),
    and a LoRA step's estimate below a full one's: a fine-tune that fits with adapters
    is not refused for the memory a full fine-tune would need."""
    cfg = ModelConfig(vocab_size=50, d_model=64, n_heads=4, n_layers=2, max_len=32)
    oc, key, x = TrainConfig().optimizer, jax.random.key(0), jax.ShapeDtypeStruct((4, 32), np.int32)
    lora = None if targets is None else LoraConfig(rank=4, targets=targets)
    base = jax.eval_shape(lambda: model.init(key, cfg))
    if lora is None:
        args = (jax.eval_shape(lambda: train.init_state(key, cfg, oc)), (x, x))
    else:
        args = (jax.eval_shape(lambda: train.lora_state(key, cfg, base, oc, lora)), (x, x), base)
    with standard_promotion():                                       # optax's bias correction mixes types
        compiled = train.train_step.lower(*args, model=cfg, optimizer_config=oc, lora=lora).compile()
    analysis = compiled.memory_analysis()
    held = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
    assert memory.training_bytes(cfg, 4, lora) <= held
    if lora is not None:
        assert memory.training_bytes(cfg, 4, lora) < memory.training_bytes(cfg, 4)


def test_check_refuses_what_cannot_fit_and_names_the_fix():
    memory.check(1, "a byte", "nothing to do")
    with pytest.raises(MemoryBudgetError, match="needs at least .* GB of memory.*try a smaller max_len=99"):
        memory.check(10**20, "this", "try a smaller {c}", c=("max_len", 99))


def test_a_huge_batch_split_into_micro_batches_is_refused_for_its_ids(tmp_path):
    """Accumulation shrinks the activations, not the batch: B = 2^31 - 1 sequences of
    ids must exist at once whatever K is (it crashed in XLA before the check counted them)."""
    from minitx_fn import job
    big = 2**31 - 1
    with pytest.raises(MemoryBudgetError, match="training this model needs at least"):
        job.plan(job.make(training={"batch_size": big, "grad_accum": big, "steps": 2}, run_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_evaluation_batches_fit_gpt2_small_and_larger_tables_in_the_memory_there_is(monkeypatch):
    """Evaluation sizes its batch from memory (traced shapes only, nothing allocated):
    GPT-2 small over 1,024 positions holds 3 x 1,024 x 50,257 float32 logits a window
    (617 MB), so 24 GB free takes 16 windows a batch, not 64 (40 GB); an imported
    65,536-id table over 8,192 positions (6.4 GB a window) takes 1; and where not even
    one window fits, one MemoryBudgetError naming the fields."""
    from minitx_fn import defaults
    monkeypatch.setattr(memory, "available_bytes", lambda: 24 * 10**9)
    gpt2 = ModelConfig(vocab_size=50257, max_len=1024, d_model=768, n_heads=12, n_layers=12, **defaults.ARCHS["gpt2"])
    assert 3 * 1024 * 50257 * 4 == 617_558_016
    assert memory.evaluation_batch(gpt2, 1024) == 16
    big = ModelConfig(vocab_size=65536, max_len=8192, d_model=64, n_heads=4, n_layers=1, **defaults.ARCHS["llama"])
    assert memory.evaluation_batch(big, 8192) == 1
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    with pytest.raises(MemoryBudgetError, match="evaluating this model needs at least .*max_len=8192 or "
                                                "vocab_size=65536"):
        memory.evaluation_batch(big, 8192)
