"""Lookahead decoding, on tiny random models.

* the static layout: positions and the attention mask of both branches;
* greedy: token-identical to ``autoregressive`` on a ragged batch for several
  (W, N, G), with EOS and with a repetition penalty; on a repetitive prompt the
  pooled n-grams are accepted (tau > 1);
* the pool holds prompt n-grams after prefill, without duplicates;
* sampling: the law of the first four tokens of a vocab-8 model equals the exact
  target law (chi-square over 1e5 rows); a verifier that accepts the first
  candidate chain outright fails;
* ValueErrors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.decoding.driver import pad_prompts
from decodax.jacobi.lookahead import LookaheadState, lookahead, lookahead_layout
from decodax.speculative.verify import TreeVerifyResult
from speculative.test_decoder import PROMPTS, REPETITIVE
from speculative.test_draft_model import tiny, tiny8  # noqa: F401 (fixtures)
from speculative.test_pearl import T, counts4
from speculative.test_tree_decoder import SAMPLER, chi2_p, exact_law

RAGGED = PROMPTS + REPETITIVE
N_NEW = 20


def test_layout_w5_n4_g2():
    """The reference example (W = 5, N = 4, G = 2): 1 + 2 * 3 + 4 + 2 * 5 = 21 tokens."""
    lay = lookahead_layout(5, 4, 2)
    assert lay.offsets.shape == (21,)
    assert lay.parents.tolist() == [-1, 0, 1, 2, 0, 4, 5]
    assert lay.offsets[:7].tolist() == [0, 1, 2, 3, 1, 2, 3]
    # level j column i sits at offset j + i
    for lvl in range(3):
        for i in range(5):
            assert lay.offsets[lay.look[lvl, i]] == lvl + i
    # level 2 column 3 sees: root, level 0 columns 1..3, levels 1..2 of column 3 -- a causal chain
    me = lay.look[2, 3]
    seen = sorted(lay.offsets[np.flatnonzero(lay.mask[me])].tolist())
    assert seen == list(range(0, 3 + 2 + 1))
    assert not lay.mask[lay.look[1, 2], lay.look[1, 1]]  # other columns of the same level are hidden
    assert not lay.mask[lay.look[0, 2]][1:7].any()  # the lookahead branch never sees the candidates
    assert not lay.mask[1:7, 7:].any()  # nor the candidates the lookahead branch


@pytest.mark.parametrize("wng", [(4, 3, 2), (3, 2, 3), (5, 4, 2)], ids=str)
def test_greedy_equals_autoregressive(tiny, wng):
    model, params = tiny
    w, n, g = wng
    ref = generate(autoregressive(model), params, RAGGED, max_new_tokens=N_NEW)
    out = generate(lookahead(model, window=w, ngram=n, guesses=g), params, RAGGED, max_new_tokens=N_NEW)
    assert out.rows() == ref.rows()
    print(f"lookahead {wng}: tau {np.round(out.tau, 2).tolist()}")
    assert out.tau.max() > 1.0  # the repetitive rows reuse pooled n-grams


def test_eos_and_penalty(tiny):
    model, params = tiny
    dec = lookahead(model, window=4, ngram=3, guesses=2)
    ref = generate(autoregressive(model), params, RAGGED, max_new_tokens=N_NEW)
    eos = [ref.rows()[0][5]]
    got = generate(dec, params, RAGGED, max_new_tokens=N_NEW, eos_ids=eos)
    assert got.rows() == generate(autoregressive(model), params, RAGGED, max_new_tokens=N_NEW, eos_ids=eos).rows()
    pen = sampling.make_sampler(temperature=0.0, repetition_penalty=1.3)
    got = generate(lookahead(model, window=4, ngram=3, guesses=2, sampler=pen), params, RAGGED, max_new_tokens=N_NEW)
    assert got.rows() == generate(autoregressive(model, pen), params, RAGGED, max_new_tokens=N_NEW).rows()


def test_pool_holds_prompt_ngrams(tiny):
    model, params = tiny
    dec = lookahead(model, window=3, ngram=3, guesses=2)
    prompt = [7, 8, 9, 7, 8, 10, 7, 8, 9]
    p, plen = pad_prompts([prompt], pad_to=16)
    state = dec.init(params, jnp.asarray(p), jnp.asarray(plen), jax.random.key(0), max_new_tokens=4, capacity=64)
    ls = state.extra
    assert isinstance(ls, LookaheadState)
    held = {int(t): [tuple(ls.pool[0, t, i].tolist()) for i in range(int(ls.count[0, t]))]
            for t in np.flatnonzero(np.asarray(ls.count[0]))}
    # distinct trigrams by first token (7 8 9 appears twice, kept once; G = 2 keeps both of 7's)
    assert sorted(held[7]) == [(8, 9), (8, 10)]
    assert held[8] == [(9, 7), (10, 7)] and held[9] == [(7, 8)] and held[10] == [(7, 8)]
    assert set(held) == {7, 8, 9, 10}  # padding never entered the pool


# --------------------------------------------------------------------------- sampling law


def accept_first_candidate(tokens, parents, draft_probs, target_probs, key):
    """Negative control: accept candidate chain 0 whole (when it exists), then sample from p."""
    b, nv = tokens.shape
    depth = nv - 1  # G = 1: one chain of nv - 1 candidates
    ok = tokens[:, 1] >= 0
    acc = jnp.where(ok, depth, 0).astype(jnp.int32)
    path = jnp.where(jnp.arange(depth + 1)[None, :] <= acc[:, None], jnp.arange(depth + 1)[None, :], -1)
    at = jnp.take_along_axis(target_probs, acc[:, None, None], axis=1)[:, 0]
    return TreeVerifyResult(path, acc, jax.random.categorical(key, jnp.log(at), axis=-1).astype(jnp.int32))


def test_sampling_law_of_first_tokens_is_the_target_law(tiny8):
    """PROMPT = 1 5 3 1 5 seeds the pool (1 -> 5 3, 5 -> 3 1, 3 -> 1 5), so candidates are
    verified from the first step on."""
    model, params, _, _ = tiny8
    law = exact_law(model, params, tokens=T)
    dec = lookahead(model, window=3, ngram=3, guesses=1, sampler=SAMPLER)
    p = chi2_p(counts4(dec, params, seed=400)[0], law)
    print(f"lookahead sampling: chi-square p = {p:.3g}")
    assert p > 1e-3, p
    bad = lookahead(model, window=3, ngram=3, guesses=1, sampler=SAMPLER, verifier=accept_first_candidate)
    p_bad = chi2_p(counts4(bad, params, runs=1, seed=400)[0], law)
    print(f"accept-first-candidate control: chi-square p = {p_bad:.3g}")
    assert p_bad < 1e-3, p_bad


def test_bad_arguments(tiny):
    model, params = tiny
    for kw, match in ((dict(window=0), "window W"), (dict(ngram=1), "ngram N"), (dict(guesses=0), "guesses G"),
                      (dict(window=2.0), "window W")):
        args = dict(window=3, ngram=3, guesses=2) | kw
        with pytest.raises(ValueError, match=match):
            lookahead(model, **args)
    with pytest.raises(ValueError, match="cache capacity"):
        generate(lookahead(model, window=8, ngram=4, guesses=4), params, [[1, 2, 3]], max_new_tokens=4,
                 capacity=16)
