"""Tests of decodax.sampling against independent numpy definitions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from decodax import sampling as S

NEG_INF = -np.inf
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


def rbg_key(seed):
    """A key whose sampling programs compile fast (threefry programs take seconds to
    compile on a loaded CPU); the default threefry keys are used in the softmax-law
    and jit/vmap tests (rbg keys are not vmap-exact)."""
    return jax.random.key(seed, impl="rbg")

# --------------------------------------------------------------------------- #
# numpy references (float64, written from the papers' definitions)
# --------------------------------------------------------------------------- #


def np_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    with np.errstate(invalid="ignore"):  # an all -inf row has no distribution
        return e / e.sum(axis=-1, keepdims=True)


def ref_top_k(x, k):
    """Keep every token whose logit is >= the k-th largest (ties all kept)."""
    if k >= x.shape[-1]:
        return x.copy()
    kth = np.sort(x)[::-1][k - 1]
    return np.where(x >= kth, x, NEG_INF)


def ref_top_p_candidates(x, p, tol=1e-5):
    """All outputs allowed by 'smallest prefix (desc. logit, ties by id) with mass >= p'.

    Prefix lengths whose float64 mass is within ``tol`` of p are ambiguous in
    float32 and accepted either way.
    """
    order = np.argsort(-x, kind="stable")
    pr = np_softmax(x)[order]
    before = np.concatenate([[0.0], np.cumsum(pr)[:-1]])
    n_lo = max(1, int(np.sum(before < p - tol)))
    n_hi = max(1, int(np.sum(before < p + tol)))
    outs = []
    for n in range(n_lo, n_hi + 1):
        keep = np.zeros(x.shape, bool)
        keep[order[:n]] = True
        outs.append(np.where(keep, x, NEG_INF))
    return outs


def ref_min_p(x, min_p):
    """(keep, ambiguous) with keep = prob >= min_p * max prob."""
    pr = np_softmax(x)
    ratio = pr / pr.max()
    return ratio >= min_p, np.abs(ratio - min_p) <= 1e-5


def ref_penalties(x, ctx, valid, rep=None, pres=None):
    x = np.array(x, np.float64)
    seen = {int(t) for t, ok in zip(ctx, valid) if ok and 0 <= t < x.shape[-1]}
    for t in seen:
        if rep is not None:
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        if pres is not None:
            x[t] = x[t] - pres
    return x


def ref_probs(x, ctx=None, valid=None, *, temperature=1.0, top_k=None, top_p=None, min_p=None,
              rep=None, pres=None):
    """Independent float64 composition; top-p/min-p boundaries assumed unambiguous."""
    x = np.asarray(x, np.float64)
    if rep is not None or pres is not None:
        x = ref_penalties(x, ctx, valid, rep, pres)
    if temperature == 0:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0
        return out
    x = x / temperature
    if top_k is not None:
        x = ref_top_k(x, top_k)
    if top_p is not None:
        order = np.argsort(-x, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(np_softmax(x)[order])[:-1]])
        keep = np.zeros(x.shape, bool)
        keep[order[before < top_p]] = True
        x = np.where(keep, x, NEG_INF)
    if min_p is not None:
        pr = np_softmax(x)
        x = np.where(pr >= min_p * pr.max(), x, NEG_INF)
    return np_softmax(x)


# --------------------------------------------------------------------------- #
# strategies
# --------------------------------------------------------------------------- #

# A small pool of values makes ties (and boundary ties) frequent.
_element = st.one_of(
    st.sampled_from([NEG_INF, -3.0, -1.0, 0.0, 0.5, 1.0, 2.0]),
    st.floats(-12, 12, width=32),
)


# A few vocabulary sizes only: each new shape compiles every function again.
VOCABS = st.sampled_from([1, 2, 3, 6])


def logits_rows(rows=2):
    return VOCABS.flatmap(
        lambda v: hnp.arrays(np.float32, (rows, v), elements=_element)
    )


def check_rows(x, fn):
    for row in x:
        fn(row)


# --------------------------------------------------------------------------- #
# Sampler validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=-0.5), ["temperature", ">= 0", "-0.5"]),
        (dict(temperature=float("nan")), ["temperature", "nan"]),
        (dict(temperature=float("inf")), ["temperature", "finite"]),
        (dict(temperature="hot"), ["temperature", "'hot'"]),
        (dict(temperature=jnp.float32(1.0)), ["temperature", "Python number"]),
        (dict(top_k=0), ["top_k", ">= 1", "got 0"]),
        (dict(top_k=-3), ["top_k", "got -3"]),
        (dict(top_k=2.5), ["top_k", "int", "2.5"]),
        (dict(top_k=True), ["top_k", "True"]),
        (dict(top_p=0.0), ["top_p", "(0, 1]", "got 0.0"]),
        (dict(top_p=1.5), ["top_p", "(0, 1]", "1.5"]),
        (dict(top_p=float("nan")), ["top_p", "nan"]),
        (dict(min_p=-0.1), ["min_p", "[0, 1]", "-0.1"]),
        (dict(min_p=1.01), ["min_p", "[0, 1]", "1.01"]),
        (dict(repetition_penalty=0.0), ["repetition_penalty", "> 0", "got 0.0"]),
        (dict(repetition_penalty=-1.2), ["repetition_penalty", "-1.2"]),
        (dict(repetition_penalty=float("inf")), ["repetition_penalty", "finite"]),
        (dict(presence_penalty=float("nan")), ["presence_penalty", "finite", "nan"]),
    ],
)
def test_make_sampler_rejects(kwargs, words):
    with pytest.raises(ValueError) as info:
        S.make_sampler(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_sampler_accepts_boundaries_and_is_hashable():
    a = S.make_sampler(temperature=0, top_k=np.int64(1), top_p=1.0, min_p=0.0,
                       repetition_penalty=1, presence_penalty=-2)
    assert a.temperature == 0.0 and isinstance(a.temperature, float)
    assert a.top_k == 1 and type(a.top_k) is int
    assert a.is_greedy and a.needs_context
    b = S.make_sampler(temperature=0.0, top_k=1, top_p=1, min_p=0, repetition_penalty=1.0,
                       presence_penalty=-2.0)
    assert a == b and hash(a) == hash(b)
    assert not S.make_sampler().needs_context
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.temperature = 2.0


def test_processor_and_process_argument_errors():
    x = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match="top_k"):
        S.top_k_mask(x, 0)
    with pytest.raises(ValueError, match="top_p"):
        S.top_p_mask(x, 0.0)
    with pytest.raises(ValueError, match="min_p"):
        S.min_p_mask(x, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        S.apply_temperature(x, -1.0)
    with pytest.raises(ValueError, match="needs context"):
        S.process(S.make_sampler(repetition_penalty=1.2), x)
    ctx = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="shape"):
        S.process(S.make_sampler(presence_penalty=1.0), x, ctx, jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="lengths"):
        S.process(S.make_sampler(presence_penalty=1.0), x, ctx, jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        S.seen_mask(jnp.zeros((2, 3)), None, 5)
    with pytest.raises(ValueError, match="Sampler"):
        S.process({"temperature": 1.0}, x)
    with pytest.raises(ValueError, match="PRNG key"):
        S.sample_with(S.make_sampler(), x, None)


# --------------------------------------------------------------------------- #
# Processors vs their definitions
# --------------------------------------------------------------------------- #


@SETTINGS
@given(x=logits_rows(), k=st.integers(1, 10))
def test_top_k_matches_definition_with_ties(x, k):
    out = np.asarray(S.top_k_mask(jnp.asarray(x), k))
    check_rows(range(len(x)), lambda i: np.testing.assert_array_equal(out[i], ref_top_k(x[i], k)))


def test_top_k_ties_at_boundary_are_all_kept():
    x = jnp.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    out = np.asarray(S.top_k_mask(x, 2))
    np.testing.assert_array_equal(out, [3.0, NEG_INF, 2.0, 2.0, 2.0, NEG_INF])
    np.testing.assert_array_equal(np.asarray(S.top_k_mask(x, 1)), [3.0] + [NEG_INF] * 5)
    np.testing.assert_array_equal(np.asarray(S.top_k_mask(x, 6)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(S.top_k_mask(x, 99)), np.asarray(x))


@SETTINGS
@given(x=logits_rows(), p=st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.25, 0.5, 0.75, 1.0])))
def test_top_p_is_smallest_set_with_mass_at_least_p(x, p):
    out = np.asarray(S.top_p_mask(jnp.asarray(x), p))
    for row, got in zip(x, out):
        if np.all(np.isneginf(row)):
            assert np.all(np.isneginf(got))
            continue
        cands = ref_top_p_candidates(row, p)
        assert any(np.array_equal(got, c) for c in cands), (row, p, got, cands)
        kept = np.isfinite(got)
        assert np.argmax(row) in np.flatnonzero(kept)  # the mode is always kept
        mass = np_softmax(row)[kept].sum()
        assert mass >= p - 1e-5


def test_top_p_ties_break_towards_lower_token_id():
    # Uniform over 4: masses 0.25, 0.5, 0.75, 1 are exact in any float order.
    u = jnp.zeros(4)
    keep = lambda x, p: np.isfinite(np.asarray(S.top_p_mask(x, p)))  # noqa: E731
    np.testing.assert_array_equal(keep(u, 0.5), [1, 1, 0, 0])  # mass exactly p: stop
    np.testing.assert_array_equal(keep(u, 0.3), [1, 1, 0, 0])
    np.testing.assert_array_equal(keep(u, 0.2), [1, 0, 0, 0])
    np.testing.assert_array_equal(keep(u, 0.76), [1, 1, 1, 1])
    np.testing.assert_array_equal(keep(u, 1.0), [1, 1, 1, 1])
    # A tie group straddling the boundary: probs [1/2, 1/8, 1/8, 1/8, 1/8] in id order 4,0,1,2,3.
    x = jnp.log(jnp.array([1.0, 1.0, 1.0, 1.0, 4.0]))
    np.testing.assert_array_equal(keep(x, 0.5), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(keep(x, 0.6), [1, 0, 0, 0, 1])
    np.testing.assert_array_equal(keep(x, 0.7), [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(keep(x[::-1], 0.7), [1, 1, 1, 0, 0])


@SETTINGS
@given(x=logits_rows(), m=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.1, 0.5, 1.0])))
def test_min_p_matches_definition(x, m):
    out = np.asarray(S.min_p_mask(jnp.asarray(x), m))
    for row, got in zip(x, out):
        if np.all(np.isneginf(row)):
            assert np.all(np.isneginf(got))
            continue
        keep, ambiguous = ref_min_p(row, m)
        kept = np.isfinite(got)
        np.testing.assert_array_equal(got[kept], row[kept])
        ok = (kept == (keep & np.isfinite(row))) | ambiguous
        assert ok.all(), (row, m, got)
        assert kept[np.argmax(row)]


@SETTINGS
@given(x=logits_rows(), t=st.floats(0.05, 20.0))
def test_temperature_matches_definition(x, t):
    got = np_softmax(np.asarray(S.apply_temperature(jnp.asarray(x), t)))
    for row, g in zip(x, got):
        if np.all(np.isneginf(row)):
            continue
        np.testing.assert_allclose(g, np_softmax(row.astype(np.float64) / t), atol=2e-6)


def test_temperature_zero_is_one_hot_at_first_argmax():
    x = jnp.array([[1.0, 3.0, 3.0, -2.0], [NEG_INF, -1.0, -5.0, NEG_INF]])
    out = np.asarray(S.apply_temperature(x, 0.0))
    np.testing.assert_array_equal(out, [[NEG_INF, 0, NEG_INF, NEG_INF], [NEG_INF, 0, NEG_INF, NEG_INF]])
    # a very small temperature neither overflows nor produces NaN
    tiny = np_softmax(np.asarray(S.apply_temperature(jnp.array([-1e37, -3e37, -2e37]), 1e-3)))
    np.testing.assert_array_equal(tiny, [1.0, 0.0, 0.0])


# --------------------------------------------------------------------------- #
# Penalties
# --------------------------------------------------------------------------- #


@SETTINGS
@given(
    data=st.data(),
    v=st.sampled_from([2, 6]),
    length=st.sampled_from([1, 5]),
    rep=st.one_of(st.none(), st.floats(0.2, 5.0)),
    pres=st.one_of(st.none(), st.floats(-3.0, 3.0)),
)
def test_penalties_match_definition(data, v, length, rep, pres):
    x = data.draw(hnp.arrays(np.float32, (2, v), elements=_element))
    ctx = data.draw(hnp.arrays(np.int32, (2, length), elements=st.integers(-1, v)))
    lengths = data.draw(hnp.arrays(np.int32, (2,), elements=st.integers(0, length)))
    valid = np.arange(length)[None] < lengths[:, None]
    got_lens = jnp.asarray(x)
    got_mask = jnp.asarray(x)
    if rep is not None:
        got_lens = S.repetition_penalty(got_lens, rep, ctx, lengths)
        got_mask = S.repetition_penalty(got_mask, rep, ctx, valid)
    if pres is not None:
        got_lens = S.presence_penalty(got_lens, pres, ctx, lengths)
        got_mask = S.presence_penalty(got_mask, pres, ctx, valid)
    np.testing.assert_array_equal(np.asarray(got_lens), np.asarray(got_mask))
    for b in range(2):
        want = ref_penalties(x[b], ctx[b], valid[b], rep, pres)
        np.testing.assert_allclose(np.asarray(got_mask[b]), want, rtol=1e-6, atol=1e-6)


def test_repetition_penalty_signs_padding_and_broadcast():
    x = jnp.array([2.0, -2.0, 0.0, 4.0, -1.0])
    ctx = jnp.array([0, 1, 2, 0, -1, 7])  # repeats count once; -1 and 7 (>= V) ignored
    out = np.asarray(S.repetition_penalty(x, 2.0, ctx))
    np.testing.assert_array_equal(out, [1.0, -4.0, 0.0, 4.0, -1.0])
    out = np.asarray(S.presence_penalty(x, 0.5, ctx, jnp.array(2)))  # only [0, 1] valid
    np.testing.assert_array_equal(out, [1.5, -2.5, 0.0, 4.0, -1.0])
    # context [B, 1, L] broadcasts over logits [B, K, V]
    xb = jnp.zeros((2, 3, 4)) + 1.0
    ctxb = jnp.array([[0, 1], [3, 3]])[:, None, :]
    out = np.asarray(S.repetition_penalty(xb, 4.0, ctxb))
    np.testing.assert_array_equal(out[0], np.tile([0.25, 0.25, 1.0, 1.0], (3, 1)))
    np.testing.assert_array_equal(out[1], np.tile([1.0, 1.0, 1.0, 0.25], (3, 1)))


# --------------------------------------------------------------------------- #
# process / probs / log_probs
# --------------------------------------------------------------------------- #

SAMPLERS = [
    dict(),
    dict(temperature=1.3, min_p=0.1),
    dict(top_p=0.8),
    dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
    dict(temperature=1.1, repetition_penalty=1.5, presence_penalty=0.4, top_k=8, top_p=0.95),
    dict(temperature=0.0, repetition_penalty=3.0),
]


@pytest.mark.parametrize("kw", SAMPLERS)
def test_probs_match_composed_reference(kw):
    rng = np.random.default_rng(0)
    v, b, length = 12, 6, 5
    x = (rng.standard_normal((b, v)) * 2).astype(np.float32)
    ctx = rng.integers(0, v, (b, length)).astype(np.int32)
    lengths = rng.integers(0, length + 1, (b,)).astype(np.int32)
    valid = np.arange(length)[None] < lengths[:, None]
    sampler = S.make_sampler(**kw)
    got = np.asarray(S.probs(sampler, x, ctx, lengths))
    got_log = np.asarray(S.log_probs(sampler, x, ctx, valid))
    ref_kw = dict(temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p,
                  min_p=sampler.min_p, rep=sampler.repetition_penalty, pres=sampler.presence_penalty)
    for i in range(b):
        want = ref_probs(x[i], ctx[i], valid[i], **ref_kw)
        np.testing.assert_allclose(got[i], want, atol=2e-6)
        np.testing.assert_array_equal(want == 0, np.isneginf(got_log[i]))
        np.testing.assert_allclose(np.exp(got_log[i]), want, atol=2e-6)


def test_process_arbitrary_batch_dims_and_dtype():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 7)), jnp.bfloat16)
    sampler = S.make_sampler(temperature=0.9, top_k=4, top_p=0.9, min_p=0.02)
    out = S.process(sampler, x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    flat = S.process(sampler, x.reshape(-1, 7)).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(flat))
    ids = jax.eval_shape(lambda x, k: S.sample_with(sampler, x, k), x, jax.random.key(1))
    assert ids.shape == (2, 3, 4) and ids.dtype == jnp.int32


# --------------------------------------------------------------------------- #
# Exact laws of sampling
# --------------------------------------------------------------------------- #

N_SAMPLES = 200_000


def _chi2_pvalue(ids, expected_probs):
    v = expected_probs.shape[-1]
    counts = np.bincount(np.asarray(ids).ravel(), minlength=v)
    assert counts.sum() == N_SAMPLES and counts.shape == (v,)
    zero = expected_probs == 0
    assert counts[zero].sum() == 0, "sampled a token of probability 0"
    exp = expected_probs[~zero] * N_SAMPLES
    return stats.chisquare(counts[~zero], exp * counts[~zero].sum() / exp.sum()).pvalue


def test_sample_follows_softmax_and_rejects_wrong_law():
    x = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -3.0], np.float32)
    ids = S.sample(jnp.broadcast_to(jnp.asarray(x), (N_SAMPLES, x.size)), jax.random.key(0))
    assert ids.dtype == jnp.int32
    assert _chi2_pvalue(ids, np_softmax(x)) > 1e-3
    # negative control: a slightly wrong law (temperature 1.1) must be rejected
    assert _chi2_pvalue(ids, np_softmax(x / 1.1)) < 1e-3


def test_sample_with_follows_processed_law_and_rejects_off_by_one():
    x = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -3.0, 1.5, 0.7], np.float32)
    ctx = np.array([3, 6, 6, 0], np.int32)
    kw = dict(temperature=0.8, top_k=5, top_p=0.95, repetition_penalty=1.3)
    sampler = S.make_sampler(**kw)
    xs = jnp.broadcast_to(jnp.asarray(x), (N_SAMPLES, x.size))
    ids = jax.jit(S.sample_with, static_argnums=0)(sampler, xs, rbg_key(1), ctx[None])
    want = ref_probs(x, ctx, np.ones(4, bool), temperature=0.8, top_k=5, top_p=0.95, rep=1.3)
    assert _chi2_pvalue(ids, want) > 1e-3
    # negative control: the same chain with the repetition penalty forgotten
    wrong = ref_probs(x, ctx, np.ones(4, bool), temperature=0.8, top_k=5, top_p=0.95)
    counts = np.bincount(np.asarray(ids), minlength=x.size)
    both = (want > 0) & (wrong > 0)
    exp = wrong[both] / wrong[both].sum() * counts[both].sum()
    assert stats.chisquare(counts[both], exp).pvalue < 1e-3


# --------------------------------------------------------------------------- #
# Greedy, NaN and infinities
# --------------------------------------------------------------------------- #


@SETTINGS
@given(x=VOCABS.flatmap(lambda v: hnp.arrays(
    np.float32, (3, v), elements=st.one_of(st.sampled_from([0.0, 1.0, np.inf, NEG_INF]),
                                           st.floats(-1e30, 1e30, allow_nan=False).map(np.float32)))))
def test_greedy_equals_jnp_argmax(x):
    got = S.sample_with(S.make_sampler(temperature=0.0), jnp.asarray(x), None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(x), -1)))


def test_nan_logits_never_give_out_of_range_ids():
    nan, inf = np.nan, np.inf
    x = jnp.array([
        [nan, 1.0, nan, 0.5, nan],      # finite tokens exist: only 1 or 3
        [nan, nan, nan, nan, nan],      # all NaN: fallback 0
        [NEG_INF] * 5,                  # all -inf: fallback 0
        [nan, NEG_INF, nan, -2.0, nan],  # only token 3
        [inf, nan, 0.0, inf, 1.0],      # +inf: uniform over {0, 3}
    ], jnp.float32)
    xs = jnp.broadcast_to(x, (2000,) + x.shape)
    composite = S.make_sampler(temperature=0.5, top_k=2, top_p=0.5, min_p=0.3)
    for sampler in [composite, S.make_sampler(temperature=0.0)]:
        ids = np.asarray(S.sample_with(sampler, xs, rbg_key(0)))
        assert ids.min() >= 0 and ids.max() < 5
        assert set(ids[:, 0]) <= {1, 3} and (ids[:, 1] == 0).all() and (ids[:, 2] == 0).all()
        assert (ids[:, 3] == 3).all() and set(ids[:, 4]) <= {0, 3}
    p = np.asarray(S.probs(composite, x))
    np.testing.assert_array_equal(p, [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0],
                                      [0, 0, 0, 1, 0], [1, 0, 0, 0, 0]])  # top-p 0.5: {0}
    ids = np.asarray(S.sample(xs, rbg_key(1)))
    assert ids.min() >= 0 and ids.max() < 5 and (ids[:, 1] == 0).all() and (ids[:, 3] == 3).all()
    assert set(ids[:, 4]) == {0, 3} and abs((ids[:, 4] == 0).mean() - 0.5) < 0.05
    assert set(ids[:, 0]) == {1, 3}


def test_all_masked_row_falls_back_to_raw_argmax():
    # A huge repetition penalty overflows every (negative) logit to -inf.
    x = jnp.array([[-50.0, -10.0, -30.0], [1.0, 2.0, 0.5]])
    ctx = jnp.array([[0, 1, 2], [0, 0, 0]])
    for t in [1.0, 0.0]:
        sampler = S.make_sampler(temperature=t, repetition_penalty=1e38)
        if t:
            out = np.asarray(S.process(sampler, x, ctx))
            assert np.isfinite(out[0]).sum() == 1 and np.argmax(out[0]) == 1
        ids = S.sample_with(sampler, jnp.broadcast_to(x, (50, 2, 3)), rbg_key(0), ctx)
        assert (np.asarray(ids)[:, 0] == 1).all()


# --------------------------------------------------------------------------- #
# jit and vmap
# --------------------------------------------------------------------------- #


def test_jit_and_vmap_agree_with_eager():
    sampler = S.make_sampler(temperature=0.7, top_k=5, top_p=0.9, min_p=0.02,
                             repetition_penalty=1.2, presence_penalty=0.3)
    b, v, length = 4, 11, 6
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, v)) * 3, jnp.float32)
    ctx = jnp.asarray(rng.integers(-1, v, (b, length)), jnp.int32)
    lengths = jnp.array([0, 2, 6, 4], jnp.int32)
    eager = S.process(sampler, x, ctx, lengths)
    vmapped = jax.vmap(lambda x, c, n: S.process(sampler, x, c, n))(x, ctx, lengths)
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(eager), rtol=1e-6)
    np.testing.assert_array_equal(np.isneginf(vmapped), np.isneginf(eager))
    keys = jax.random.split(jax.random.key(2), b)
    row_fn = jax.jit(lambda x, k, c, n: S.sample_with(sampler, x, k, c, n))
    per_row = np.array([row_fn(x[i], keys[i], ctx[i], lengths[i]) for i in range(b)])
    vm = jax.jit(jax.vmap(lambda x, k, c, n: S.sample_with(sampler, x, k, c, n)))(x, keys, ctx, lengths)
    np.testing.assert_array_equal(np.asarray(vm), per_row)
