"""Draft-model speculative decoding (a separate model with its own KV cache), on tiny random models.

* greedy: token-identical to ``autoregressive`` greedy on a ragged batch, with a
  different 1-layer draft, a noisy copy of the target (ragged acceptance) and
  the target itself as draft (everything accepted, k + 1 tokens per step);
* the draft cache invariant: after some steps it equals a fresh prefill of the
  draft on the context (positions < L - 1);
* sampling: the law of the first three emitted tokens of a vocab-8 model equals
  the exact target law (chi-square over 1e5 rows); an accept-all verifier fails;
* ValueErrors.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.decoding.driver import pad_prompts
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative.decoder import speculative
from decodax.speculative.draft_model import (
    DraftState,
    FirstLayers,
    draft_model_drafter,
    first_layers_model,
    with_draft_params,
)

from .test_decoder import PROMPTS, REPETITIVE, _accept_all
from .test_tree_decoder import PROMPT, SAMPLER, V, chi2_p, exact_law

RAGGED = PROMPTS + REPETITIVE  # prompt lengths 2 .. 25


@pytest.fixture(scope="module")
def tiny():
    """Untied head scaled x10: varied greedy continuations with clear margins (a tied random tiny
    model mostly repeats its last token, which any draft guesses)."""
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=(), tie_embeddings=False))
    params = model.init(jax.random.key(3))
    params["lm_head"] = params["lm_head"] * 10.0
    return model, params


@pytest.fixture(scope="module")
def tiny_draft():
    draft = Model(tiny_config(vocab_size=97, n_layers=1, eos_ids=(), tie_embeddings=False, name="tiny-draft"))
    dparams = draft.init(jax.random.key(4))
    dparams["lm_head"] = dparams["lm_head"] * 10.0
    return draft, dparams


def _ar(model, params, prompts, n, sampler=None):
    return generate(autoregressive(model, sampler), params, prompts, max_new_tokens=n)


# --------------------------------------------------------------------------- greedy


def test_greedy_separate_draft_equals_autoregressive(tiny, tiny_draft):
    model, params = tiny
    draft, dparams = tiny_draft
    both = with_draft_params(params, dparams)
    ref = _ar(model, params, RAGGED, 24)
    for k in (1, 3):
        dec = speculative(model, draft_model_drafter(model, draft), k=k)
        out = generate(dec, both, RAGGED, max_new_tokens=24)
        assert out.rows() == ref.rows(), k
        assert np.all(out.tau >= 1.0)


def _noisy(params, scale=0.01, seed=7):
    """The target's params plus N(0, scale^2) noise: a draft that agrees often but not always."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


K, N = 4, 21  # shared by the draft == target and noisy-draft tests (one compilation)


def test_draft_equal_to_target_accepts_everything(tiny):
    model, params = tiny
    dec = speculative(model, draft_model_drafter(model, model), k=K)
    out = generate(dec, with_draft_params(params, params), RAGGED, max_new_tokens=N)
    assert out.rows() == _ar(model, params, RAGGED, N).rows()
    # prefill emits 1 token, then every step emits k + 1
    assert np.all(out.calls == 1 + math.ceil((N - 1) / (K + 1))), out.calls
    print(f"draft == target, k={K}: tau {out.tau.tolist()}")
    assert np.all(out.tau > K)


def test_greedy_noisy_draft_ragged_acceptance(tiny):
    """A perturbed copy of the target as draft: rows accept different numbers of drafts per step."""
    model, params = tiny
    dec = speculative(model, draft_model_drafter(model, model), k=K)
    out = generate(dec, with_draft_params(params, _noisy(params)), RAGGED, max_new_tokens=N)
    assert out.rows() == _ar(model, params, RAGGED, N).rows()
    print(f"noisy draft, k={K}: calls {out.calls.tolist()}, tau {np.round(out.tau, 2).tolist()}")
    assert len(set(out.calls.tolist())) > 1  # ragged across rows
    assert out.calls.min() < N and out.calls.max() > 1 + math.ceil((N - 1) / (K + 1))
    # rows that stop early (an EOS id met at different steps) keep the others exact
    eos = [out.rows()[0][5]]
    got = generate(dec, with_draft_params(params, _noisy(params)), RAGGED, max_new_tokens=N, eos_ids=eos)
    ref = generate(autoregressive(model), params, RAGGED, max_new_tokens=N, eos_ids=eos)
    assert got.rows() == ref.rows() and len(set(ref.lengths.tolist())) > 1
    # with a penalty (drafts see the earlier drafts as context)
    pen = sampling.make_sampler(temperature=0.0, repetition_penalty=1.3)
    dec = speculative(model, draft_model_drafter(model, model), k=3, sampler=pen)
    out = generate(dec, with_draft_params(params, _noisy(params)), RAGGED, max_new_tokens=N)
    assert out.rows() == _ar(model, params, RAGGED, N, pen).rows()


def test_draft_cache_invariant_after_steps(tiny):
    """After each step the draft cache holds exactly the context positions < L - 1, equal to a fresh
    prefill of the draft on the emitted context (rows accept different counts per step)."""
    model, params = tiny
    dparams = _noisy(params)
    both = with_draft_params(params, dparams)
    dec = speculative(model, draft_model_drafter(model, model), k=3)
    prompt, plen = pad_prompts(RAGGED, pad_to=8)
    state = jax.jit(dec.init, static_argnames=("max_new_tokens", "capacity"))(
        both, jnp.asarray(prompt), jnp.asarray(plen), jax.random.key(0), max_new_tokens=32, capacity=128)
    step = jax.jit(dec.step)
    width = 64  # fresh prefill of a right-padded context (causal: the padding is never attended)
    ref_cache = jax.jit(lambda seq: model.apply(dparams, seq, jnp.arange(width)[None], kv.init_cache(
        model.config, 1, width), empty_cache=True, compute_logits=False).cache)
    emitted = set()
    for _ in range(5):
        before = np.asarray(state.num_generated)
        state = step(both, state)
        emitted |= set((np.asarray(state.num_generated) - before).tolist())
        dcache = state.extra.cache
        assert isinstance(state.extra, DraftState)
        assert np.array_equal(np.asarray(dcache.length), np.asarray(state.cache.length) - 1)
        for b in range(len(RAGGED)):
            n = int(state.num_generated[b])
            seq = list(prompt[b, : plen[b]]) + list(np.asarray(state.tokens[b, :n]))
            t = len(seq) - 1  # the last emitted token sits at position L = t; the cache holds < t - 1
            ref = ref_cache(jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32))
            for got, want in ((dcache.k, ref.k), (dcache.v, ref.v)):
                np.testing.assert_allclose(np.asarray(got[:, b, :, : t - 1]), np.asarray(want[:, 0, :, : t - 1]),
                                           atol=1e-5)
    assert len(emitted) >= 2 and 4 in emitted, emitted  # partial and all-accepted steps both ran


# --------------------------------------------------------------------------- sampling law


@pytest.fixture(scope="module")
def tiny8():
    model = Model(tiny_config(vocab_size=V, n_layers=2, n_kv_heads=1, eos_ids=(), tie_embeddings=False))
    params = model.init(jax.random.key(11))
    params["lm_head"] = params["lm_head"] * 15.0  # peaked, context-dependent laws
    draft = Model(tiny_config(vocab_size=V, n_layers=1, n_kv_heads=1, eos_ids=(), tie_embeddings=False,
                              name="draft8"))
    dparams = draft.init(jax.random.key(12))
    dparams["lm_head"] = dparams["lm_head"] * 10.0  # a confident but different draft
    return model, params, draft, dparams


ROWS, RUNS = 20000, 5


def _counts(dec, params, runs=RUNS):
    counts = np.zeros((V, V, V), np.int64)
    for r in range(runs):
        out = generate(dec, params, [PROMPT] * ROWS, max_new_tokens=3, key=jax.random.key(100 + r),
                       capacity=16, pad_to=8)
        assert np.all(out.lengths == 3) and out.tokens.max() < V
        np.add.at(counts, tuple(out.tokens[:, :3].T), 1)
    print(f"{dec.name}: tau {out.tau.mean():.3f}")
    return counts


def test_sampling_law_of_first_tokens_is_the_target_law(tiny8):
    model, params, draft, dparams = tiny8
    law = exact_law(model, params)
    both = with_draft_params(params, dparams)
    drafter = draft_model_drafter(model, draft)
    k = 2
    dec = speculative(model, drafter, k=k, sampler=SAMPLER)
    p = chi2_p(_counts(dec, both), law)
    print(f"draft model: chi-square p = {p:.3g}")
    assert p > 1e-3, p
    bad = speculative(model, drafter, k=k, sampler=SAMPLER, verifier=_accept_all)
    p_bad = chi2_p(_counts(bad, both, runs=1), law)
    print(f"accept-all control: chi-square p = {p_bad:.3g}")
    assert p_bad < 1e-3, p_bad


def test_sampling_draft_equal_to_target_accepts_almost_everything(tiny8):
    model, params, _, _ = tiny8
    k, n = 3, 13
    dec = speculative(model, draft_model_drafter(model, model), k=k, sampler=SAMPLER)
    out = generate(dec, with_draft_params(params, params), [PROMPT, PROMPT[:2], PROMPT * 3] * 20,
                   max_new_tokens=n, key=jax.random.key(1))
    assert np.all(out.lengths == n)
    print(f"sampling, draft == target: tau {out.tau.mean():.3f}")
    assert out.tau.mean() > k  # q == p up to rounding: rejections are (almost) impossible


# --------------------------------------------------------------------------- errors


def test_bad_arguments(tiny):
    model, params = tiny
    other = Model(tiny_config(vocab_size=50))
    with pytest.raises(ValueError, match="vocabulary"):
        draft_model_drafter(model, other)
    with pytest.raises(ValueError, match="Model"):
        draft_model_drafter(model, "not a model")
    with pytest.raises(ValueError, match="hashable"):
        draft_model_drafter(model, model, draft_params=_Unhashable())
    with pytest.raises(ValueError, match="k must be"):
        speculative(model, draft_model_drafter(model, model), k=0)
    with pytest.raises(ValueError, match="n must be"):
        FirstLayers(0)
    with pytest.raises(ValueError, match="n must be"):
        first_layers_model(model, model.config.n_layers + 1)
    # k < 1 reaching the drafter directly, and missing draft params, fail at trace time
    drafter = draft_model_drafter(model, model)
    prompt, plen = pad_prompts(PROMPTS, pad_to=8)
    dec = speculative(model, drafter, k=2)
    state = dec.init(with_draft_params(params, params), jnp.asarray(prompt), jnp.asarray(plen),
                     jax.random.key(0), max_new_tokens=4, capacity=32)
    with pytest.raises(ValueError, match="k must be"):
        drafter.propose(params, state, state.extra, jax.random.key(0), k=0,
                        sampler=sampling.make_sampler(temperature=0.0))
    with pytest.raises(ValueError, match="no 'draft' entry"):
        generate(dec, params, PROMPTS, max_new_tokens=4)
    wrong = Model(tiny_config(vocab_size=97, dim=48, n_layers=1, eos_ids=()))
    dec = speculative(model, draft_model_drafter(model, wrong), k=2)
    with pytest.raises(ValueError, match="do not fit"):
        generate(dec, with_draft_params(params, params), PROMPTS, max_new_tokens=4)


class _Unhashable:
    __hash__ = None

    def __call__(self, params):
        return params


def test_factory_is_memoised(tiny):
    model, _ = tiny
    a = draft_model_drafter(model, first_layers_model(model, 1), draft_params=FirstLayers(1))
    b = draft_model_drafter(model, first_layers_model(model, 1), draft_params=FirstLayers(1))
    assert a is b
    assert speculative(model, a, k=3) is speculative(model, b, k=3)


def test_registered_bench_method(tiny):
    """The "draft" method (first 4 layers of the target, k = 4) on a 5-layer tiny model."""
    from decodax.methods import METHODS, make_decoder

    assert "draft" in METHODS
    model = Model(dataclasses.replace(tiny[0].config, n_layers=5))
    params = model.init(jax.random.key(5))
    params["lm_head"] = params["lm_head"] * 10.0
    dec = make_decoder("draft", model, params)
    assert dec.max_step_tokens == 5
    assert generate(dec, params, RAGGED, max_new_tokens=16).rows() == _ar(model, params, RAGGED, 16).rows()
