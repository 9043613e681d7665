"""Generation: cached decoding equals recomputing the full, cropped context; every row
of a batch decodes as it would alone; float32 and float64; one compiled loop."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import defaults, model, testing
from minitx_fn import generate as gen
from minitx_fn.config import ModelConfig
from minitx_fn.sampling import Sampler
from tests import numpy_model
from tests.helpers import count_calls, enable_x64

CFG = ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_len=8, init_std=0.5)
PARAMS = model.init(jax.random.key(11), CFG)
# Logits agree within this fraction of their scale: the cached step multiplies (1, D)
# rows where the recompute multiplies (S, D) blocks, and XLA's kernels for the two
# round differently in the last bits.
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}
SEEDS = st.integers(0, 2**31 - 1)


def precision(dtype: str):
    """The context a dtype's tests run in: 64-bit JAX for float64."""
    return enable_x64() if dtype == "float64" else contextlib.nullcontext()


def config(dtype: str, **changes) -> ModelConfig:
    return CFG.replace(dtype=dtype, param_dtype=dtype, **changes)


def random_prompts(seed: int, lengths, vocab_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).astype(np.int32) for n in lengths]


def assert_logits_close(actual, expected, dtype: str):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE[dtype] * scale, rtol=0)


# ----------------------------------------------------------------------------- cached = recompute


# Llama's choices with multi-query attention: rotary keys in the cache, one cached head.
LLAMA = {**defaults.ARCHS["llama"], "n_kv_heads": 1}


@pytest.mark.parametrize("impl, dtype, arch", [("einsum", "float32", {}), ("einsum", "float64", {}),
                                               ("dot_product_attention", "float32", {}),
                                               ("einsum", "float64", LLAMA),
                                               ("dot_product_attention", "float32", LLAMA)],
                         ids=["einsum-float32", "einsum-float64", "dpa-float32", "llama-float64", "llama-dpa-float32"])
@given(lengths=st.lists(st.sampled_from([1, 2, 5, 8, 11]), min_size=3, max_size=3), seed=SEEDS)
def test_cached_greedy_equals_recompute_inside_and_after_the_window(impl, dtype, arch, lengths, seed):
    """Three prompts of mixed lengths (11 > S = 8 keeps the last 8); 30 new tokens slide
    every row's window several times, each at its own step. The compiled shapes are
    the same for every example, so hypothesis varies the data, not the compilation.
    With rotary positions a slide re-encodes the kept tokens at positions 0 .., as the
    recompute does."""
    n_new = 30
    with precision(dtype):
        cfg = config(dtype, attention=impl, **arch)
        params = model.init(jax.random.key(seed), cfg)
        prompts = random_prompts(seed, lengths, cfg.vocab_size)
        key = jax.random.key(seed + 1)
        ids, logits = gen.generate(params, prompts, model=cfg, key=key, max_new_tokens=n_new, return_logits=True)
        ref_ids, ref_logits = gen.generate_recompute(params, prompts, model=cfg, key=key, max_new_tokens=n_new,
                                                     return_logits=True)
    np.testing.assert_array_equal(np.stack(ids), np.stack(ref_ids))
    # jax.nn.dot_product_attention computes its softmax in float32 whatever the input.
    assert_logits_close(np.stack(logits), np.stack(ref_logits), "float32" if impl != "einsum" else dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cached_sampling_equals_recompute_with_the_same_keys(dtype, key):
    sampler = Sampler(temperature=1.0, top_k=5, top_p=0.95)
    with precision(dtype):
        cfg = config(dtype)
        params = model.init(jax.random.key(11), cfg)
        prompts = random_prompts(3, [3, 1, 7, 4], cfg.vocab_size)
        ids = gen.generate(params, prompts, model=cfg, key=key, max_new_tokens=20, sampler=sampler)
        ref_ids = gen.generate_recompute(params, prompts, model=cfg, key=key, max_new_tokens=20, sampler=sampler)
    np.testing.assert_array_equal(np.stack(ids), np.stack(ref_ids))


# ----------------------------------------------------------------------------- rows are independent


def test_float64_generation_is_the_numpy_model_and_x64_leaves_float32_alone():
    """Issue 13: generate failed whenever jax_enable_x64 was on. In float64 every logit a
    token was drawn from equals the NumPy model's over the whole context (1e-12 of its
    scale); a float32 model decodes the same tokens with 64-bit JAX on as off."""
    from tests import numpy_model
    f32 = ModelConfig(vocab_size=5, d_model=8, n_heads=2, max_len=8, init_std=0.5)
    with enable_x64():
        cfg = f32.replace(dtype="float64", param_dtype="float64")
        params = model.init(jax.random.key(0), cfg)
        [out], [logits] = gen.generate(params, [[1, 2]], model=cfg, max_new_tokens=4, return_logits=True)
        out32_x64 = gen.generate(model.init(jax.random.key(0), f32), [[1, 2]], model=f32, max_new_tokens=4)[0]
    out32 = gen.generate(model.init(jax.random.key(0), f32), [[1, 2]], model=f32, max_new_tokens=4)[0]
    np.testing.assert_array_equal(out32_x64, out32)
    host, context = jax.device_get(params), [1, 2]
    for token, row in zip(out, logits):
        expected = numpy_model.logits(host, context, n_heads=2)[-1]
        assert np.abs(row - expected).max() <= 1e-12 * np.abs(expected).max()
        assert token == expected.argmax()
        context.append(int(token))


def test_short_row_keeps_its_context_when_a_long_row_slides():
    """Reproduction of issue 13: the short row changed from new token 12 on when batched."""
    cfg = ModelConfig(vocab_size=7, d_model=12, n_heads=3, n_layers=2, max_len=16, init_std=0.3)
    params = model.init(jax.random.key(0), cfg)
    short, long = [1, 2, 3], list(range(7)) * 2 + [1, 2]
    key = jax.random.key(1)
    alone = gen.generate(params, [short], model=cfg, key=key, max_new_tokens=40)[0]
    batched = gen.generate(params, [short, long], model=cfg, key=key, max_new_tokens=40)
    np.testing.assert_array_equal(batched[0], alone)
    np.testing.assert_array_equal(batched[1], gen.generate(params, [long], model=cfg, key=key, max_new_tokens=40)[0])


@given(lengths=st.lists(st.integers(1, 12), min_size=3, max_size=3), stop_len=st.sampled_from([0, 2]), seed=SEEDS,
       dtype=testing.dtypes())
def test_each_greedy_row_equals_its_prompt_alone(lengths, stop_len, seed, dtype):
    """For any mix of prompt lengths, window slides (S = 8, 40 new tokens: each row
    slides up to 9 times, at its own steps) and a stop sequence that ends some rows
    early, row i of the batch is exactly `generate([prompt_i])`, tokens and logits."""
    n_new = 40
    with precision(dtype):
        cfg = config(dtype)
        params = model.init(jax.random.key(seed), cfg)
        prompts = random_prompts(seed, lengths, cfg.vocab_size)
        key = jax.random.key(0)
        stop = ()
        if stop_len:                  # a piece of row 0's own continuation, so at least that row stops early
            free = gen.generate(params, prompts[:1], model=cfg, key=key, max_new_tokens=n_new)[0]
            stop = tuple(int(t) for t in free[len(free) // 2:][:stop_len])
        ids, logits = gen.generate(params, prompts, model=cfg, key=key, max_new_tokens=n_new, stop=stop,
                                   return_logits=True)
        for i, prompt in enumerate(prompts):
            alone_ids, alone_logits = gen.generate(params, [prompt], model=cfg, key=key, max_new_tokens=n_new,
                                                   stop=stop, return_logits=True)
            np.testing.assert_array_equal(ids[i], alone_ids[0])
            assert_logits_close(logits[i], alone_logits[0], dtype)
    if stop:
        assert len(ids[0]) < n_new and tuple(ids[0][-len(stop):]) == stop


@given(lengths=st.lists(st.integers(1, 12), min_size=3, max_size=3), other=st.lists(st.integers(1, 12), min_size=3,
       max_size=3), seed=SEEDS)
def test_a_sampled_row_depends_only_on_its_prompt_key_and_row(lengths, other, seed):
    """Row b samples with fold_in(fold_in(key, b), n): replacing every other row of the
    batch changes nothing in row b, and row 0 is what the prompt gives alone."""
    sampler = Sampler(temperature=1.0, top_k=6)
    prompts = random_prompts(seed, lengths, CFG.vocab_size)
    replaced = random_prompts(seed + 1, other, CFG.vocab_size)
    key = jax.random.key(seed)
    batch = gen.generate(PARAMS, prompts, model=CFG, key=key, max_new_tokens=20, sampler=sampler)
    for b in range(3):
        mixed = [prompts[i] if i == b else replaced[i] for i in range(3)]
        np.testing.assert_array_equal(
            gen.generate(PARAMS, mixed, model=CFG, key=key, max_new_tokens=20, sampler=sampler)[b], batch[b])
    np.testing.assert_array_equal(
        gen.generate(PARAMS, prompts[:1], model=CFG, key=key, max_new_tokens=20, sampler=sampler)[0], batch[0])


def test_sampling_is_a_function_of_the_key(key):
    """The same prompts and key give the same tokens; another key gives other tokens."""
    sampler = Sampler(temperature=2.0)                     # flat distributions: 40 equal draws by chance ~ 0
    prompts = [[1, 2], [3]]
    first = gen.generate(PARAMS, prompts, model=CFG, key=key, max_new_tokens=40, sampler=sampler)
    again = gen.generate(PARAMS, prompts, model=CFG, key=key, max_new_tokens=40, sampler=sampler)
    other = gen.generate(PARAMS, prompts, model=CFG, key=jax.random.fold_in(key, 1), max_new_tokens=40,
                         sampler=sampler)
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_greedy_ignores_the_key(key):
    a = gen.generate(PARAMS, [[1, 2]], model=CFG, key=key, max_new_tokens=5, sampler=Sampler(temperature=0.0))
    b = gen.generate(PARAMS, [[1, 2]], model=CFG, key=jax.random.fold_in(key, 1), max_new_tokens=5)
    np.testing.assert_array_equal(a[0], b[0])


# ----------------------------------------------------------------------------- stop, compilation, bad input


def test_stop_sequence_ends_a_row_and_the_loop(key):
    first = gen.generate(PARAMS, [[1, 2]], model=CFG, key=key, max_new_tokens=12)[0]
    stop = tuple(int(t) for t in first[3:5])
    stopped = gen.generate(PARAMS, [[1, 2]], model=CFG, key=key, max_new_tokens=12, stop=stop)[0]
    # It ends right after the first occurrence of the stop sequence.
    first_end = next(i + len(stop) for i in range(len(first)) if tuple(first[i:i + len(stop)]) == stop)
    np.testing.assert_array_equal(stopped, first[:first_end])


def test_one_compiled_loop_for_every_token_position_and_prompt_in_a_bucket(key, monkeypatch):
    """The decode loop compiles once per (batch size, prompt bucket, settings): prompts
    at the start and at the end of the window, and 20 tokens that slide it, reuse it."""
    cfg = CFG.replace(init_std=0.49)                       # a config no other test uses: a fresh jit cache entry
    params = model.init(key, cfg)
    traces = count_calls(monkeypatch, gen, "row_keys")     # called once in the body of decode_loop: once per trace
    gen.generate(params, [[1, 2, 3]], model=cfg, key=key, max_new_tokens=20)
    gen.generate(params, [[4, 5, 6, 7, 1]], model=cfg, key=key, max_new_tokens=20)       # same bucket (8)
    gen.generate(params, [[1] * 8], model=cfg, key=key, max_new_tokens=20)                # a full window
    assert len(traces) == 1
    gen.generate(params, [[1, 2], [3, 4, 5]], model=cfg, key=key, max_new_tokens=20)      # batch 2: a new shape
    assert len(traces) == 2


@pytest.mark.parametrize("prompts, match", [([[]], "empty"), ([[1, 99]], "outside"), ([], "no prompts"),
                                            ([[1.5, 2.0]], "integers")])
def test_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(PARAMS, prompts, model=CFG, key=jax.random.key(0), max_new_tokens=2)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, 2**31])
def test_bad_max_new_tokens(n):
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(PARAMS, [[1]], model=CFG, key=jax.random.key(0), max_new_tokens=n)


@pytest.mark.parametrize("stop, match", [((-1, 2), "outside"), ((99,), "outside"), ((2**40,), "outside"),
                                         ((1.5,), "integers")])
def test_bad_stop_ids(stop, match):
    """-1 would match the padding before the first token; ids beyond V can never be drawn."""
    with pytest.raises(ValueError, match=f"stop sequence.*{match}"):
        gen.generate(PARAMS, [[1]], model=CFG, key=jax.random.key(0), max_new_tokens=2, stop=stop)


def test_greedy_needs_no_key_and_sampling_does():
    with_key = gen.generate(PARAMS, [[1, 2]], model=CFG, key=jax.random.key(5), max_new_tokens=4)[0]
    np.testing.assert_array_equal(gen.generate(PARAMS, [[1, 2]], model=CFG, key=None, max_new_tokens=4)[0], with_key)
    with pytest.raises(ValueError, match="sampling needs a key"):
        gen.generate(PARAMS, [[1]], model=CFG, key=None, max_new_tokens=2, sampler=Sampler(temperature=1.0))


def test_window_of_one_slot():
    """S = 1 keeps no token when it slides: every step sees only its newest token."""
    cfg = CFG.replace(max_len=1)
    params = model.init(jax.random.key(0), cfg)
    ids = gen.generate(params, [[3]], model=cfg, key=jax.random.key(0), max_new_tokens=5)[0]
    ref = gen.generate_recompute(params, [[3]], model=cfg, key=jax.random.key(0), max_new_tokens=5)
    np.testing.assert_array_equal(ids, ref[0])


def test_complete_is_text_in_text_out_and_greedy_needs_no_key():
    from minitx_fn import checkpoint
    from minitx_fn.tokenizer import CharTokenizer
    m = checkpoint.Model(PARAMS, CFG, CharTokenizer.from_text("hello world! jx"), {})      # 11 characters
    text = gen.complete(m, "hello", max_new_tokens=12)
    ids = gen.generate(m.params, [m.tokenizer.encode("hello")], model=m.model, max_new_tokens=12)[0]
    assert len(text) == 12 and m.tokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="needs a key"):
        gen.complete(m, "hello", temperature=0.8)
    for prompt, stop, said in (("Zebra", None, "the prompt: .*not in the vocabulary: 'Z"),
                               ("h\udcff", None, "not in the vocabulary: '\\\\udcff'"), ("", None, "the prompt is empty"),
                               ("hello", "?", "the stop string: .*not in the vocabulary: '\\?'")):
        with pytest.raises(gen.PromptError, match=said):
            gen.complete(m, prompt, stop=stop)


def test_bytes_that_are_not_utf8_are_no_prompt_for_a_byte_tokenizer():
    """A command line's lone surrogates: the byte tokenizer would echo them back."""
    from minitx_fn.tokenizer import ByteTokenizer
    for text, what in (("ab\udcff", "the prompt"), ("\udcff", "the stop string")):
        with pytest.raises(gen.PromptError, match=f"{what} holds bytes that are not UTF-8"):
            gen.encode_prompt(ByteTokenizer(), text, what)


@pytest.mark.parametrize("cut", [(1, 3), (2, 3), (4, 7)])
def test_a_stop_string_ends_the_text_wherever_the_tokenizer_put_its_boundaries(key, cut):
    """BPE writes one text with many id sequences: the stop string is found in the text,
    not matched on ids (it ran past a stop whose ids differed from the tokens drawn)."""
    pytest.importorskip("tokenizers", reason="the bpe tokenizer needs the test extra's tokenizers")
    from minitx_fn import checkpoint
    from minitx_fn.tokenizer import BPETokenizer
    tok = BPETokenizer.train(["hello world, hello there " * 40], vocab_size=290)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, max_len=32, init_std=0.5)
    m = checkpoint.Model(model.init(key, cfg), cfg, tok, {})
    full = gen.complete(m, "hello", max_new_tokens=24)
    stop = full[cut[0]:cut[1]]
    assert stop and gen.complete(m, "hello", max_new_tokens=24, stop=stop) == full[:full.find(stop) + len(stop)]


# ----------------------------------------------------------------------------- against the NumPy model


@pytest.mark.parametrize("lengths, options", [([3], {}), ([1, 8, 5], {}),
                                              ([1, 8, 5], {"positions": "learned", "tie_embeddings": True}),
                                              ([1, 8, 5], {**defaults.ARCHS["llama"], "n_kv_heads": 1})])
def test_greedy_generation_equals_numpy_argmax_over_full_recompute(lengths, options, key):
    """40 new tokens with S = 8: every row's window slides several times (and with
    learned positions, goes back to the table's first rows each time)."""
    with enable_x64():
        cfg = ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_len=8, init_std=0.5,
                          dtype="float64", param_dtype="float64", **options)
        params = model.init(key, cfg)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 11, n) for n in lengths]
        ids = gen.generate(params, prompts, model=cfg, key=key, max_new_tokens=40)
    host = jax.device_get(params)
    for prompt, row in zip(prompts, ids):
        assert row.tolist() == numpy_model.greedy(host, prompt.tolist(), 40, n_heads=2, max_len=8, **numpy_model.config_args(cfg))


def test_complete_decodes_prompt_and_continuation_together():
    """A tokenizer whose decoder strips a leading space (Llama-2's Metaspace) decodes the
    continuation alone as "th th"; together with the prompt the ids say "to be th th",
    so complete returns " th th" (the text equals the decoded ids). complete also takes a
    run's folder."""
    tk = pytest.importorskip("tokenizers", reason="the Metaspace tokenizer needs the test extra's tokenizers")
    from minitx_fn.tokenizer import BPETokenizer
    hf = tk.Tokenizer(tk.models.WordLevel({"▁to": 0, "▁be": 1, "▁th": 2, "<unk>": 3}, unk_token="<unk>"))
    hf.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    hf.decoder = tk.decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = BPETokenizer(hf)
    assert tokenizer.decode([2, 2]) == "th th" and tokenizer.decode([0, 1, 2, 2]) == "to be th th"   # the trap
    cfg = ModelConfig(vocab_size=4, d_model=8, n_heads=2, max_len=8, tie_embeddings=False)
    params = model.init(jax.random.key(0), cfg)
    params["head"]["b"] = params["head"]["b"].at[2].set(100.0)               # greedy: always "▁th"
    from types import SimpleNamespace
    assert gen.complete(SimpleNamespace(params=params, model=cfg, tokenizer=tokenizer), "to be",
                        max_new_tokens=2) == " th th"


def test_complete_takes_a_runs_folder(saved_runs):
    from minitx_fn import checkpoint
    loaded = checkpoint.load_model(str(saved_runs / "builtin"))
    assert gen.complete(str(saved_runs / "builtin"), "hello", max_new_tokens=6) == gen.complete(loaded, "hello",
                                                                                              max_new_tokens=6)
