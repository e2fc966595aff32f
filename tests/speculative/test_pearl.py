"""PEARL (pre-verify / post-verify), on tiny random models.

* greedy: token-identical to ``autoregressive`` on a ragged batch with a different
  draft, a noisy copy of the target (rows switch modes at different steps) and
  the target itself (after one pre-verify step every step is post-verify and
  emits k tokens), with a repetition penalty and with EOS;
* sampling: the law of the first four emitted tokens of a vocab-8 model
  (pre-verify, post-verify of the window, and the free pre-verify of the next
  window all take part) equals the exact target law (chi-square over 1e5 rows);
  an accept-all verifier fails;
* ValueErrors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative.draft_model import with_draft_params
from decodax.speculative.pearl import PearlState, pearl

from speculative.test_decoder import _accept_all
from speculative.test_draft_model import RAGGED, _noisy, tiny, tiny_draft, tiny8  # noqa: F401 (fixtures)
from speculative.test_tree_decoder import PROMPT, SAMPLER, V, chi2_p, exact_law


def _ar(model, params, n, sampler=None):
    return generate(autoregressive(model, sampler), params, RAGGED, max_new_tokens=n)


N = 21


def test_greedy_equals_autoregressive(tiny, tiny_draft):
    model, params = tiny
    draft, dparams = tiny_draft
    ref = _ar(model, params, N)
    for k in (2, 4):
        out = generate(pearl(model, draft, k=k), with_draft_params(params, dparams), RAGGED, max_new_tokens=N)
        assert out.rows() == ref.rows(), k


def test_draft_equal_to_target_stays_in_post_verify(tiny):
    """Prefill emits 1 token, the first (pre-verify) step 1, then every post-verify step k."""
    model, params = tiny
    k = 4
    dec = pearl(model, model, k=k)
    state_out = generate(dec, with_draft_params(params, params), RAGGED, max_new_tokens=N)
    assert state_out.rows() == _ar(model, params, N).rows()
    assert np.all(state_out.calls == 2 + math.ceil((N - 2) / k)), state_out.calls


def test_noisy_draft_switches_modes_per_row(tiny):
    model, params = tiny
    both = with_draft_params(params, _noisy(params))
    dec = pearl(model, model, k=4)
    out = generate(dec, both, RAGGED, max_new_tokens=N)
    assert out.rows() == _ar(model, params, N).rows()
    assert len(set(out.calls.tolist())) > 1, out.calls  # ragged acceptance across rows
    # the final state's mode counters: some rows spent steps in both modes
    from decodax.decoding.driver import pad_prompts

    prompt, plen = pad_prompts(RAGGED, pad_to=8)
    state = jax.jit(dec.init, static_argnames=("max_new_tokens", "capacity"))(
        both, jnp.asarray(prompt), jnp.asarray(plen), jax.random.key(0), max_new_tokens=32, capacity=128)
    step = jax.jit(dec.step)
    for _ in range(6):
        state = step(both, state)
    assert isinstance(state.extra, PearlState)
    posts = np.asarray(state.extra.post_steps)
    print(f"post-verify steps of 6: {posts.tolist()}")
    assert posts.max() > 0 and posts.min() < 6
    # EOS met at different steps; a repetition penalty (drafts see the window as context)
    eos = [out.rows()[0][5]]
    got = generate(dec, both, RAGGED, max_new_tokens=N, eos_ids=eos)
    assert got.rows() == generate(autoregressive(model), params, RAGGED, max_new_tokens=N, eos_ids=eos).rows()
    pen = sampling.make_sampler(temperature=0.0, repetition_penalty=1.3)
    got = generate(pearl(model, model, k=3, sampler=pen), both, RAGGED, max_new_tokens=N)
    assert got.rows() == _ar(model, params, N, pen).rows()


# --------------------------------------------------------------------------- sampling law

ROWS, RUNS, T = 20000, 5, 4


def counts4(dec, params, runs=RUNS, seed=200):
    """Counts of the first T tokens over ``runs`` x ROWS rows of PROMPT, and the last run's output."""
    counts = np.zeros((V,) * T, np.int64)
    for r in range(runs):
        out = generate(dec, params, [PROMPT] * ROWS, max_new_tokens=T, key=jax.random.key(seed + r), pad_to=8)
        assert np.all(out.lengths == T) and out.tokens.max() < V
        np.add.at(counts, tuple(out.tokens[:, :T].T), 1)
    print(f"{dec.name}: tau {out.tau.mean():.3f}")
    return counts, out


def test_sampling_law_of_first_tokens_is_the_target_law(tiny8):
    """The draft is a slightly noisy copy of the target, so that rows take every path: a
    pre-verify rejection, a window rejection, and the whole window plus y_1 accepted."""
    model, params, _, _ = tiny8
    law = exact_law(model, params, tokens=T)
    both = with_draft_params(params, _noisy(params, 0.01))
    counts, out = counts4(pearl(model, model, k=2, sampler=SAMPLER), both)
    paths = np.bincount(out.calls, minlength=T + 1)[T - 1:]
    print(f"rows done in 3 / 4 target forwards: {paths.tolist()}")
    assert paths.min() > ROWS // 10  # both the all-accepted and a rejecting path are frequent
    p = chi2_p(counts, law)
    print(f"pearl: chi-square p = {p:.3g}")
    assert p > 1e-3, p
    bad = pearl(model, model, k=2, sampler=SAMPLER, verifier=_accept_all)
    p_bad = chi2_p(counts4(bad, both, runs=1)[0], law)
    print(f"accept-all control: chi-square p = {p_bad:.3g}")
    assert p_bad < 1e-3, p_bad


def test_bad_arguments(tiny, tiny_draft):
    model, _ = tiny
    draft, _ = tiny_draft
    for k in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 2"):
            pearl(model, draft, k=k)
    other = Model(tiny_config(vocab_size=50, n_layers=1))
    with pytest.raises(ValueError, match="vocabulary"):
        pearl(model, other, k=3)
