"""Chain speculative decoding end to end: exactness against plain decoding.

* greedy: token-identical to ``autoregressive`` greedy (ragged batch, both
  drafters, several k, with a repetition penalty too);
* sampling: the law of the first three emitted tokens of a tiny model (vocab 8)
  equals the exact target law (enumerated from full forwards), chi-square over
  1e5 rows, for both drafters; a verifier that accepts every draft must fail;
* the default model: greedy prompt lookup equals greedy decoding on 2 chat prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speculative.test_tree_decoder import SAMPLER, chi2_p, counts_of, exact_law, tiny8  # noqa: F401 (fixture)

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative.decoder import speculative
from decodax.speculative.drafters import early_exit_drafter, prompt_lookup

PROMPTS = [[5, 17, 3, 88, 41, 5, 17], [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7], [42, 42]]
REPETITIVE = [[7, 8, 9, 10, 11] * 5, [20, 21, 22, 23] * 4, [30, 31, 30, 31, 30, 31]]


@pytest.fixture(scope="module")
def tiny():
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=()))
    return model, model.init(jax.random.key(3))


def _ar(model, params, prompts, n, sampler=None):
    return generate(autoregressive(model, sampler), params, prompts, max_new_tokens=n)


def test_greedy_prompt_lookup_equals_autoregressive(tiny):
    model, params = tiny
    k = 5  # (other k: 4 with a penalty below, 3 and 2 in the sampling tests)
    dec = speculative(model, prompt_lookup(ngram=3), k=k)
    for prompts in (PROMPTS, REPETITIVE):
        ref = _ar(model, params, prompts, 24)
        out = generate(dec, params, prompts, max_new_tokens=24)
        assert out.rows() == ref.rows()
        assert np.all(out.tau >= 1.0)
    # the repetitive prompts (and greedy loops of a random model) are copyable
    print(f"prompt lookup k={k}: tau {out.tau.tolist()}")
    assert out.tau.mean() > 1.2, out.tau


def test_greedy_early_exit_equals_autoregressive(tiny):
    model, params = tiny
    k = 3
    dec = speculative(model, early_exit_drafter(model, 1), k=k)
    out = generate(dec, params, PROMPTS, max_new_tokens=20)
    assert out.rows() == _ar(model, params, PROMPTS, 20).rows()
    assert np.all(out.tau >= 1.0)


def test_greedy_with_repetition_penalty(tiny):
    """Penalties see the drafts as context: position i of the verify forward uses context + d_1..d_i."""
    model, params = tiny
    pen = sampling.make_sampler(temperature=0.0, repetition_penalty=1.5)
    dec = speculative(model, prompt_lookup(ngram=3), k=4, sampler=pen)
    assert (generate(dec, params, REPETITIVE, max_new_tokens=16).rows()
            == _ar(model, params, REPETITIVE, 16, pen).rows())


def test_bad_arguments():
    model = Model(tiny_config())
    with pytest.raises(ValueError, match="k must be"):
        speculative(model, prompt_lookup(), k=0)
    with pytest.raises(ValueError, match="exit_layer"):
        early_exit_drafter(model, 0)
    with pytest.raises(ValueError, match="ngram"):
        prompt_lookup(ngram=0)


def test_factories_are_memoised(tiny):
    model, _ = tiny
    assert speculative(model, prompt_lookup(3), k=4) is speculative(model, prompt_lookup(3), k=4)
    assert early_exit_drafter(model, 1) is early_exit_drafter(model, 1)


# --------------------------------------------------------------------------- sampling law

def _accept_all(draft_tokens, draft_probs, target_probs, key):
    """Negative control: a 'verifier' that accepts every draft."""
    b, k = draft_tokens.shape
    nxt = jax.random.categorical(key, jnp.log(target_probs[:, k]), axis=-1).astype(jnp.int32)
    return jnp.full((b,), k, jnp.int32), nxt


@pytest.mark.parametrize("which", ["early_exit", "prompt_lookup"])
def test_sampling_law_of_first_tokens_is_the_target_law(tiny8, which):
    model, params = tiny8
    law = exact_law(model, params)
    assert (law.max() > 0.05) and (np.count_nonzero(law) > 50)  # non-trivial target
    drafter = early_exit_drafter(model, 1) if which == "early_exit" else prompt_lookup(ngram=2)
    k = 2 if which == "early_exit" else 3
    dec = speculative(model, drafter, k=k, sampler=SAMPLER)
    p = chi2_p(counts_of(dec, params), law)
    print(f"{which}: chi-square p = {p:.3g}")
    assert p > 1e-3, p
    if which == "early_exit":  # negative control (for copied drafts it fails even more plainly)
        bad = speculative(model, drafter, k=k, sampler=SAMPLER, verifier=_accept_all)
        p_bad = chi2_p(counts_of(bad, params, runs=1), law)
        print(f"accept-all control: chi-square p = {p_bad:.3g}")
        assert p_bad < 1e-3, p_bad


# --------------------------------------------------------------------------- default model


@pytest.mark.parametrize("name", ["pld", "jacobi", "lookahead"])
def test_default_model_greedy_registered_method_equals_greedy(default_model, name):
    from decodax.bench.runner import encode_prompt
    from decodax.methods import make_decoder

    model, config, params, tok = default_model
    texts = ["Repeat this list exactly: apples, pears, plums, apples, pears, plums.",
             "What is the capital of France?"]
    prompts = [encode_prompt(tok, t) for t in texts]
    n = 32
    ref = generate(autoregressive(model), params, prompts, max_new_tokens=n)
    out = generate(make_decoder(name, model, params), params, prompts, max_new_tokens=n)
    print(f"{name} tau on the default model: {out.tau.tolist()}")
    assert np.all(out.tau >= 1.0)
    for ids, mine, theirs in zip(prompts, out.rows(), ref.rows()):
        if mine == theirs:
            continue
        i = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        seq = jnp.asarray([ids + theirs[:i]], jnp.int32)
        t = seq.shape[1]
        logits = model.apply(params, seq, jnp.arange(t)[None], kv.init_cache(config, 1, t),
                             empty_cache=True, logits_at=jnp.array([[t - 1]])).logits[0, 0]
        top = np.sort(np.asarray(logits, np.float64))[-2:]
        gap = float(top[1] - top[0])
        print(f"first difference at token {i}: top-2 logit gap {gap:.3g}")
        assert gap < 1e-4, f"{name} differs from greedy at token {i} with a top-2 logit gap of {gap}"
