"""Speculative decoding: greedy with a draft is greedy without it, for any draft and any
K; sampling with a draft keeps the model's distribution; rows stay independent; one
compiled loop; bad drafts and K refused in one line."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn import defaults, model
from minitx_fn import generate as gen
from minitx_fn import speculative
from minitx_fn.errors import ConfigError
from minitx_fn.sampling import Sampler
from tests.helpers import count_calls
from tests.test_generate import CFG, SEEDS, assert_logits_close, config, precision, random_prompts

# A draft of another shape: one layer, narrower, its own random weights.
DRAFT = dict(d_model=8, n_layers=1)
LLAMA = {**defaults.ARCHS["llama"], "n_kv_heads": 1}


def draft_of(cfg, kind: str, params, seed: int):
    """The model itself (every proposal accepted), or a random small model (almost none)."""
    if kind == "self":
        return SimpleNamespace(params=params, model=cfg)
    small = cfg.replace(**DRAFT)
    return SimpleNamespace(params=model.init(jax.random.key(seed + 7), small), model=small)


@pytest.mark.parametrize("dtype, arch, k, kind", [("float32", {}, 3, "random"), ("float64", {}, 7, "self"),
                                                  ("float64", {}, 1, "random"), ("float64", LLAMA, 3, "self")],
                         ids=["float32-k3-random", "float64-k7-self", "float64-k1-random", "llama-float64-k3-self"])
@given(lengths=st.lists(st.sampled_from([1, 2, 5, 8, 11]), min_size=3, max_size=3), seed=SEEDS)
def test_greedy_with_a_draft_is_greedy_without(dtype, arch, lengths, seed, k, kind):
    """Three prompts of mixed lengths in the S = 8 window, 30 new tokens: every row slides
    several times, rounds straddle the window's end, and each row accepts its own
    count. Tokens equal, and the logits each was chosen from within rounding. K from
    1 to S - 1; the draft the model itself (all accepted) or a random small model
    (almost none). Hypothesis varies the data, not the compiled shapes."""
    with precision(dtype):
        cfg = config(dtype, **arch)
        params = model.init(jax.random.key(seed), cfg)
        prompts = random_prompts(seed, lengths, cfg.vocab_size)
        draft = draft_of(cfg, kind, params, seed)
        ids, logits = gen.generate(params, prompts, model=cfg, max_new_tokens=30, return_logits=True)
        out = speculative.speculate(params, prompts, model=cfg, draft=draft, draft_tokens=k, max_new_tokens=30,
                                    return_logits=True)
    np.testing.assert_array_equal(np.stack(out.tokens), np.stack(ids))
    assert_logits_close(np.stack(out.logits), np.stack(logits), dtype)
    rounds, proposed, accepted = out.rounds, out.proposed, out.accepted
    # 29 tokens after the first: one a round plus those accepted (the last round may overshoot).
    assert np.all((rounds + accepted >= 29) & (rounds + accepted <= 29 + k))
    assert np.all((accepted <= proposed) & (proposed <= k * rounds))
    if kind == "self":                                   # a draft equal to the model (float64): every one kept
        np.testing.assert_array_equal(accepted, proposed)


def test_greedy_stop_sequence_and_a_row_alone(key):
    """A stop sequence ends a row where it ends it without a draft; each row of a mixed
    batch decodes as it does alone."""
    params = model.init(jax.random.key(3), CFG)
    draft = draft_of(CFG, "random", params, 3)
    prompts = random_prompts(5, [2, 7, 4], CFG.vocab_size)
    first = gen.generate(params, prompts[:1], model=CFG, max_new_tokens=12)[0]
    stop = tuple(int(t) for t in first[5:7])
    want = gen.generate(params, prompts, model=CFG, max_new_tokens=12, stop=stop)
    got = speculative.speculate(params, prompts, model=CFG, max_new_tokens=12, stop=stop, draft=draft,
                                draft_tokens=3).tokens
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    alone = speculative.speculate(params, prompts[1:2], model=CFG, max_new_tokens=12, stop=stop, draft=draft,
                                  draft_tokens=3).tokens
    np.testing.assert_array_equal(alone[0], got[1])


def test_a_sampled_row_depends_only_on_its_prompt_key_and_row(key):
    sampler = Sampler(temperature=1.0, top_k=6)
    params = model.init(jax.random.key(4), CFG)
    draft = draft_of(CFG, "random", params, 4)
    a = random_prompts(1, [3, 6, 2], CFG.vocab_size)
    b = [a[0], random_prompts(2, [9], CFG.vocab_size)[0], a[2]]
    out_a = speculative.speculate(params, a, model=CFG, key=key, max_new_tokens=20, sampler=sampler, draft=draft).tokens
    out_b = speculative.speculate(params, b, model=CFG, key=key, max_new_tokens=20, sampler=sampler, draft=draft).tokens
    alone = speculative.speculate(params, a[:1], model=CFG, key=key, max_new_tokens=20, sampler=sampler,
                                  draft=draft).tokens
    for row in (0, 2):
        np.testing.assert_array_equal(out_a[row], out_b[row])
    np.testing.assert_array_equal(alone[0], out_a[0])


def exact_distribution(params, cfg, prompt, temperature: float, top_k: int, n: int) -> dict[tuple, float]:
    """P(t_1 .. t_n | prompt) of every sequence of n ids when each is drawn from
    softmax(logits / temperature) over the top_k most likely, written out in NumPy.

    One forward pass (no cache, no draft) over every continuation of n - 1 ids: under
    the causal mask the logits at position len(prompt) - 1 + j depend only on the
    first j ids, so they give P(t_{j+1} | t_1 .. t_j)."""
    import itertools
    v, p = cfg.vocab_size, len(prompt)
    tails = list(itertools.product(range(v), repeat=n - 1))
    logits = np.asarray(jax.jit(cfg.apply)(params, np.array([list(prompt) + list(t) for t in tails],
                                                                         np.int32)), np.float64) / temperature

    def dist(row) -> np.ndarray:
        kept = np.argsort(row)[-top_k:]
        out = np.zeros_like(row)
        out[kept] = np.exp(row[kept] - row[kept].max())
        return out / out.sum()

    probs = {}
    for seq in itertools.product(range(v), repeat=n):
        row = tails.index(seq[:n - 1])                 # a continuation that starts with seq's first n - 1 ids
        probs[seq] = float(np.prod([dist(logits[row, p - 1 + j])[seq[j]] for j in range(n)]))
    return {seq: q for seq, q in probs.items() if q > 0}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sampling_with_a_draft_keeps_the_model_distribution(dtype, key):
    """4,000 rows (independent draws, one call) of 3 tokens from a 4-token vocabulary,
    K = 2 with a random draft: the counts of the 27 possible sequences against the
    model's exact probabilities, a chi-square test at p = 1e-6. The same counts
    against the draft's own distribution are far beyond it: the test can tell the two
    apart."""
    from scipy.stats import chi2 as chi2_dist           # scipy comes with jax
    rows, n, vocab, temperature, top_k = 4000, 3, 4, 2.0, 3
    sampler = Sampler(temperature=temperature, top_k=top_k)   # top-k: some tokens impossible, as a filter makes them
    with precision(dtype):
        cfg = config(dtype, vocab_size=vocab, init_std=0.3)
        params = model.init(jax.random.key(21), cfg)
        small = cfg.replace(**DRAFT)
        draft = SimpleNamespace(params=model.init(jax.random.key(22), small), model=small)
        prompt = [1, 3, 0]
        out = speculative.speculate(params, [prompt] * rows, model=cfg, draft=draft, draft_tokens=2,
                                    max_new_tokens=n, key=key, sampler=sampler)
        want = exact_distribution(params, cfg, prompt, temperature, top_k, n)
        theirs = exact_distribution(draft.params, small, prompt, temperature, top_k, n)
    counts: dict[tuple, int] = {}
    for seq in out.tokens:
        counts[tuple(int(t) for t in seq)] = counts.get(tuple(int(t) for t in seq), 0) + 1
    assert set(counts) <= set(want), "a sequence the model's sampler cannot produce"
    assert out.accepted.sum() > 0                         # the rule was exercised, not only the model's own draws

    def chi2(probs) -> tuple[float, int]:
        """The statistic over cells of at least 5 expected counts (the rest pooled), and its degrees of freedom."""
        seqs = [s for s in probs if probs[s] * rows >= 5]
        rest = rows - sum(counts.get(s, 0) for s in seqs)
        rest_p = 1 - sum(probs[s] for s in seqs)
        stat = sum((counts.get(s, 0) - rows * probs[s]) ** 2 / (rows * probs[s]) for s in seqs)
        pooled = rest_p * rows >= 5
        return stat + ((rest - rows * rest_p) ** 2 / (rows * rest_p) if pooled else 0), len(seqs) - 1 + pooled

    stat, df = chi2(want)
    assert df >= 15 and stat < chi2_dist.isf(1e-6, df)
    stat, df = chi2(theirs)
    assert stat > 10 * chi2_dist.isf(1e-6, df)


def test_one_compiled_loop_for_every_position_and_prompt_in_a_bucket(key, monkeypatch):
    cfg = CFG.replace(init_std=0.47)                     # a config no other test uses: a fresh jit cache entry
    params = model.init(key, cfg)
    draft = draft_of(cfg, "random", params, 0)
    traces = count_calls(monkeypatch, speculative, "row_keys")   # once in the body of _speculate: once per trace
    for prompt in ([1, 2, 3], [4, 5, 6, 7, 1], [1] * 8):
        speculative.speculate(params, [prompt], model=cfg, draft=draft, draft_tokens=3, max_new_tokens=20)
    assert len(traces) == 1


def test_complete_refuses_a_draft_of_another_tokenizer():
    from minitx_fn.tokenizer import ByteTokenizer, CharTokenizer
    cfg = CFG.replace(vocab_size=11)
    params = model.init(jax.random.key(0), cfg)
    run = SimpleNamespace(params=params, model=cfg, tokenizer=CharTokenizer("abcdefghijk"))
    other = SimpleNamespace(params=params, model=cfg, tokenizer=CharTokenizer("abcdefghijl"))
    assert gen.complete(run, "abc", max_new_tokens=5, draft=run) == gen.complete(run, "abc", max_new_tokens=5)
    with pytest.raises(ConfigError, match="a draft for complete is a run"):
        gen.complete(run, "abc", max_new_tokens=5, draft=SimpleNamespace(params=params, model=cfg))
    with pytest.raises(ConfigError, match="the draft's tokenizer .* is not the model's"):
        gen.complete(run, "abc", max_new_tokens=5, draft=other)
    byte = cfg.replace(vocab_size=ByteTokenizer().vocab_size)
    with pytest.raises(ConfigError, match="byte, 256 tokens"):
        gen.complete(run, "abc", max_new_tokens=5,
                     draft=SimpleNamespace(params=model.init(jax.random.key(0), byte), model=byte,
                                           tokenizer=ByteTokenizer()))


def test_what_is_no_draft_is_refused_in_one_line():
    params = model.init(jax.random.key(0), CFG)
    for draft in ("runs/small", params, CFG, (params, CFG)):
        with pytest.raises(ConfigError, match="a draft is a model with .params and .model"):
            speculative.speculate(params, [[1]], model=CFG, max_new_tokens=4, draft=draft)
    from minitx_fn.tokenizer import CharTokenizer
    run = SimpleNamespace(params=params, model=CFG, tokenizer=CharTokenizer("abcdefghijk"))
    with pytest.raises(ConfigError, match="draft_tokens=-3 was given without a draft"):
        gen.complete(run, "a", max_new_tokens=4, draft_tokens=-3)
    one = CFG.replace(max_len=1)
    with pytest.raises(ConfigError, match="a context of 1 position leaves no room"):
        speculative.speculate(model.init(jax.random.key(0), one), [[1]], model=one, max_new_tokens=4,
                              draft=SimpleNamespace(params=None, model=one))


@pytest.mark.parametrize("change, k, match", [
    (dict(vocab_size=12), 3, "vocabulary has 12 tokens and the model's 11"),
    (dict(max_len=16), 3, "context is 16 positions and the model's 8"),
    (dict(max_len=4), 3, "context is 4 positions"),
    ({}, 0, r"draft_tokens=0 is invalid: it must be a whole number in \[1, 8\)"),
    ({}, -2, "draft_tokens=-2"), ({}, 8, "draft_tokens=8"), ({}, 2.5, "draft_tokens=2.5"), ({}, True, "draft_tokens=True")])
def test_a_draft_that_cannot_serve_is_refused(change, k, match):
    small = CFG.replace(**DRAFT, **change)
    draft = SimpleNamespace(params=model.init(jax.random.key(0), small), model=small)
    with pytest.raises(ConfigError, match=match):
        speculative.speculate(model.init(jax.random.key(0), CFG), [[1]], model=CFG, max_new_tokens=4, draft=draft,
                              draft_tokens=k)
