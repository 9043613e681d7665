"""Sampling rules: properties from their definitions, and a chi-square test of frequencies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitx_fn.sampling import MIN_TEMPERATURE, Sampler, greedy, top_k_mask, top_p_mask

V_CHOICES = st.sampled_from([5, 17])
SEEDS = st.integers(0, 2**31 - 1)


def _logits(seed: int, v: int, b: int = 3, ties: bool = False) -> jax.Array:
    x = np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32)
    return jnp.asarray(np.round(x) if ties else x)        # rounding makes many exact ties


@given(v=V_CHOICES, seed=SEEDS)
def test_greedy_is_argmax(v, seed):
    logits = _logits(seed, v)
    np.testing.assert_array_equal(greedy(logits, None), np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(Sampler(temperature=0.0)(logits, jax.random.key(seed)), greedy(logits))
    for limit in (1, 3, v, v + 2):           # only ids below id_limit: the argmax of those columns
        np.testing.assert_array_equal(Sampler(temperature=0.0, id_limit=limit)(logits, None),
                                      np.argmax(np.asarray(logits)[:, :limit], axis=-1))


@given(v=V_CHOICES, k=st.sampled_from([1, 2, 4]), seed=SEEDS, ties=st.booleans())
def test_top_k_keeps_exactly_k_of_the_largest(v, k, seed, ties):
    logits = np.asarray(_logits(seed, v, ties=ties))
    mask = np.asarray(top_k_mask(jnp.asarray(logits), k))
    assert (mask.sum(-1) == k).all()
    kth = np.sort(logits, axis=-1)[:, -k][:, None]                  # the k-th largest value per row
    assert (logits[mask].reshape(-1, k) >= kth).all()               # nothing kept is below it
    assert (logits[~mask].reshape(len(logits), -1) <= kth).all()    # nothing dropped is above it
    tokens = Sampler(temperature=1.0, top_k=k)(jnp.asarray(logits), jax.random.key(seed))
    assert mask[np.arange(len(logits)), np.asarray(tokens)].all()


def test_top_k_treats_signed_zeros_as_a_tie_like_greedy():
    """-0.0 == 0.0: the lower id wins the tie, as in argmax (found by hypothesis, seed 10)."""
    logits = jnp.array([[-2.0, -0.0, 0.0, 0.0, -0.0]])
    np.testing.assert_array_equal(top_k_mask(logits, 1), [[False, True, False, False, False]])
    assert int(greedy(logits)[0]) == 1


@given(v=V_CHOICES, p=st.sampled_from([0.05, 0.5, 0.9, 1.0]), seed=SEEDS, ties=st.booleans())
def test_top_p_keeps_the_smallest_set_reaching_p(v, p, seed, ties):
    logits = _logits(seed, v, ties=ties)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    mask = np.asarray(top_p_mask(logits, p))
    for row in range(len(probs)):
        kept = probs[row][mask[row]]
        assert kept.size >= 1
        assert kept.sum() >= p - 1e-6 or kept.size == v                  # reaches p
        assert kept.sum() - kept.min() < p + 1e-6                        # minimal: without its least, it falls short
        assert kept.min() >= probs[row][~mask[row]].max(initial=-1.0) - 1e-7   # the most likely ones


def test_top_p_by_hand():
    """probs [0.5, 0.3, 0.2]: p = 0.5 keeps {0}; p = 0.6 keeps {0, 1}; p = 1 keeps all."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    assert np.asarray(top_p_mask(logits, 0.5)).tolist() == [[True, False, False]]
    assert np.asarray(top_p_mask(logits, 0.6)).tolist() == [[True, True, False]]
    assert np.asarray(top_p_mask(logits, 1.0)).tolist() == [[True, True, True]]


@given(v=V_CHOICES, seed=SEEDS)
def test_top_1_and_tiny_temperature_equal_greedy(v, seed):
    logits = _logits(seed, v) * 3.0
    key = jax.random.key(seed)
    np.testing.assert_array_equal(Sampler(temperature=1.0, top_k=1)(logits, key), greedy(logits))
    np.testing.assert_array_equal(Sampler(temperature=1e-4)(logits, key), greedy(logits))
    np.testing.assert_array_equal(Sampler(temperature=0.0)(logits, key), greedy(logits))


@given(seed=SEEDS)
def test_same_key_same_tokens_other_key_other_tokens(seed):
    """A sampler is a function of (logits, key): the same key repeats its draw, and over
    64 rows of a flat distribution another key differs somewhere (all 64 equal by
    chance: 17^-64 at most for a fair draw)."""
    logits = _logits(seed, 17, b=64) * 0.1
    s = Sampler(temperature=1.0, top_k=16, top_p=0.99)
    key = jax.random.key(seed)
    np.testing.assert_array_equal(s(logits, key), s(logits, key))
    assert not np.array_equal(s(logits, key), s(logits, jax.random.fold_in(key, 1)))


@pytest.mark.parametrize("sampler", [Sampler(temperature=1.0), Sampler(temperature=0.7, top_k=3),
                                     Sampler(temperature=1.0, top_p=0.8), Sampler(temperature=1.3, top_k=4, top_p=0.9),
                                     Sampler(temperature=1.0, top_p=0.8, id_limit=4), Sampler(top_k=2, id_limit=5)])
def test_frequencies_match_the_truncated_distribution(sampler):
    """Chi-square goodness of fit over 20,000 draws with a fixed key.

    Expected probabilities are computed here in numpy from the definition (scale by
    1/T, drop ids from id_limit on, keep the top k / the nucleus, renormalise). The bound 60 for at most 5
    degrees of freedom has a p-value below 1e-10 for a correct sampler, and the key
    is fixed, so the test is deterministic: it cannot flake."""
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float64)
    keep = np.arange(len(logits)) < (sampler.id_limit or len(logits))
    z = np.where(keep, logits / sampler.temperature, -np.inf)
    order = np.argsort(-z)
    if sampler.top_k:
        keep[order[sampler.top_k:]] = False
    if sampler.top_p:
        p = np.exp(z - z.max()) * keep
        p /= p.sum()
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= sampler.top_p]] = False
    expected = np.exp(z - z.max()) * keep
    expected /= expected.sum()
    n = 20_000
    draws = sampler(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)), jax.random.key(1234))
    counts = np.bincount(np.asarray(draws), minlength=len(logits))
    assert (counts[~keep] == 0).all()
    chi2 = (((counts - n * expected)[keep] ** 2) / (n * expected[keep])).sum()
    assert chi2 < 60.0, (counts, n * expected)


def test_the_smallest_temperature_is_greedy(rng):
    """t -> 0 is the argmax: at the smallest temperature allowed (float32's smallest
    normal number) every row draws greedy's token, never a NaN's id 0."""
    logits = jnp.asarray(rng.standard_normal((64, 7)), jnp.float32)
    cold = Sampler(temperature=MIN_TEMPERATURE)(logits, jax.random.key(0))
    np.testing.assert_array_equal(cold, greedy(logits))


@pytest.mark.parametrize("kwargs, match", [({"temperature": -1.0}, "temperature"),
                                           ({"temperature": 1e-320}, "temperature"), ({"top_k": 0}, "top_k"),
                                           ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                           ({"id_limit": 0}, "id_limit"), ({"id_limit": True}, "id_limit")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)
