"""Jacobi decoding and Speculative Jacobi Decoding, on tiny random models.

* greedy Jacobi: token-identical to ``autoregressive`` on a ragged batch for every
  initialiser and several windows, with EOS and with a repetition penalty;
  a repetitive prompt fixes more than one token per iteration;
* SJD: the law of the first four emitted tokens of a vocab-8 model equals the
  exact target law (chi-square over 1e5 rows), for a random, an n-gram and a
  spatial-neighbour (image raster) initialiser; the negative control that
  accepts a guess with min(1, p_now) (ignoring p_prev) and resamples from
  p_now fails;
* ValueErrors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.jacobi import JacobiState, NgramInit, PadInit, RandomInit, RepeatLast, jacobi, jacobi_drafter
from decodax.jacobi.init import SpatialInit
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from speculative.test_decoder import PROMPTS, REPETITIVE
from speculative.test_draft_model import tiny, tiny8  # noqa: F401 (fixtures)
from speculative.test_pearl import T, counts4
from speculative.test_tree_decoder import SAMPLER, V, chi2_p, exact_law

RAGGED = PROMPTS + REPETITIVE
N = 20


def _ar(model, params, n=N, sampler=None, eos=None):
    return generate(autoregressive(model, sampler), params, RAGGED, max_new_tokens=n, eos_ids=eos)


@pytest.mark.parametrize("init", [RandomInit(97), RepeatLast(), PadInit(0), NgramInit(2)], ids=lambda i: type(i).__name__)
def test_greedy_jacobi_equals_autoregressive(tiny, init):
    model, params = tiny
    ref = _ar(model, params)
    for n in (1, 4) if isinstance(init, RandomInit) else (4,):
        out = generate(jacobi(model, window=n, init=init), params, RAGGED, max_new_tokens=N)
        assert out.rows() == ref.rows(), (init, n)
        assert np.all(out.tau >= 1.0)


def test_converged_guesses_fix_several_tokens_per_iteration():
    """A tied random tiny model mostly repeats its last token: with repeat-last guesses the
    window is (nearly) a fixed point, so an iteration fixes up to n + 1 tokens; random
    guesses condition the next predictions on noise and fix about one. (On trained LMs
    plain Jacobi fixes ~1 token per iteration too -- what consistency distillation fixes.)"""
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=()))
    params = model.init(jax.random.key(3))
    ref = generate(autoregressive(model), params, RAGGED, max_new_tokens=N)
    taus = {}
    for init in (RepeatLast(), RandomInit(97)):
        out = generate(jacobi(model, window=6, init=init), params, RAGGED, max_new_tokens=N)
        assert out.rows() == ref.rows()
        taus[type(init).__name__] = out.tau.mean()
    print(f"jacobi n=6 on a repeating model: tau {taus}")
    assert taus["RepeatLast"] > 3.0 and taus["RandomInit"] < taus["RepeatLast"]


def test_eos_and_penalty(tiny):
    model, params = tiny
    dec = jacobi(model, window=4, init=RepeatLast())
    eos = [_ar(model, params).rows()[0][5]]
    got = generate(dec, params, RAGGED, max_new_tokens=N, eos_ids=eos)
    assert got.rows() == _ar(model, params, eos=eos).rows()
    pen = sampling.make_sampler(temperature=0.0, repetition_penalty=1.3)
    got = generate(jacobi(model, window=3, sampler=pen), params, RAGGED, max_new_tokens=N)
    assert got.rows() == _ar(model, params, sampler=pen).rows()


def test_window_slides_with_the_stale_predictions(tiny):
    """After an iteration that fixed ``a`` guesses, the window holds the predictions of fed
    positions ``a + 1 .. n`` and initialiser guesses for the rest."""
    model, params = tiny
    from decodax.decoding.driver import pad_prompts

    n = 4
    dec = jacobi(model, window=n, init=RepeatLast())
    prompt, plen = pad_prompts(RAGGED, pad_to=8)
    state = dec.init(params, jnp.asarray(prompt), jnp.asarray(plen), jax.random.key(0), max_new_tokens=16,
                     capacity=64)
    assert isinstance(state.extra, JacobiState) and not bool(state.extra.known.any())
    before = np.asarray(state.num_generated)
    state = dec.step(params, state)
    fixed = np.asarray(state.num_generated) - before - 1  # accepted guesses per row
    known = np.asarray(state.extra.known)
    assert np.array_equal(known.sum(1), n - fixed)
    assert np.all(known[:, :1] | (fixed[:, None] == n))


# --------------------------------------------------------------------------- SJD law


def accept_with_p_now(draft_tokens, draft_probs, target_probs, key):
    """Negative control: accept guess i with probability min(1, p_now) -- p_prev ignored --
    and resample the first rejected position from p_now (not the residual)."""
    b, k = draft_tokens.shape
    u_key, s_key = jax.random.split(key)
    p = jnp.take_along_axis(target_probs[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
    ok = jax.random.uniform(u_key, (b, k)) < p
    accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    at = jnp.take_along_axis(target_probs, accepted[:, None, None], axis=1)[:, 0]
    return accepted, jax.random.categorical(s_key, jnp.log(at), axis=-1).astype(jnp.int32)


@pytest.mark.parametrize("init", [RandomInit(V), NgramInit(2), SpatialInit(2, V)], ids=lambda i: type(i).__name__)
def test_sjd_law_of_first_tokens_is_the_target_law(tiny8, init):
    model, params, _, _ = tiny8
    law = exact_law(model, params, tokens=T)
    dec = jacobi(model, window=3, init=init, sampler=SAMPLER)
    p = chi2_p(counts4(dec, params, seed=300)[0], law)
    print(f"sjd ({type(init).__name__}): chi-square p = {p:.3g}")
    assert p > 1e-3, p
    if isinstance(init, RandomInit):
        bad = jacobi(model, window=3, init=init, sampler=SAMPLER, verifier=accept_with_p_now)
        p_bad = chi2_p(counts4(bad, params, runs=1, seed=300)[0], law)
        print(f"min(1, p_now) control: chi-square p = {p_bad:.3g}")
        assert p_bad < 1e-3, p_bad


def test_bad_arguments(tiny):
    model, _ = tiny
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="window size must be an int >= 1"):
            jacobi(model, window=n)
    small = Model(tiny_config(vocab_size=97, n_layers=1, max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        jacobi(small, window=16)
    with pytest.raises(ValueError, match="WindowInit"):
        jacobi_drafter(4, "random", 97)
    for bad in (lambda: RandomInit(0), lambda: PadInit(-1), lambda: NgramInit(0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="cache capacity"):
        generate(jacobi(model, window=8), model.init(jax.random.key(0)), [[1, 2, 3]], max_new_tokens=4,
                 capacity=8)
