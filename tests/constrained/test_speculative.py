"""Constrained speculative decoding on a tiny random-weight model.

Greedy: prompt-lookup speculation under a regex gives exactly the tokens of
the constrained autoregressive decoder. Sampling: the joint law of the first
two emitted tokens (prefill token, then the first speculative step) matches the
masked target law exactly computed from the model (chi-square over 16k rows),
and the negative control that skips the draft check fails. Few compilations.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from constrained.common import EOS, TOKENS, tiny_model, toy_vocab
from decodax import sampling
from decodax.constrained import compile_regex, constrained, with_constraint
from decodax.constrained.speculative import constrained_speculative, draft_states
from decodax.decoding import generate
from decodax.speculative.drafters import Drafter, Proposal, prompt_lookup

ID = {t: i for i, t in enumerate(TOKENS)}


@pytest.fixture(scope="module")
def vocab():
    return toy_vocab()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(4.0)


def test_draft_states_cut_at_the_first_invalid_draft(vocab):
    c = compile_regex("[abc]{1,4}x", vocab)
    drafts = jnp.asarray([[ID["a"], ID["cab"], ID["x"]],      # a|cab|x: all valid
                          [ID["x"], ID["a"], ID["a"]],        # x needs one letter first
                          [ID["ab"], ID["cab"], ID["x"]],     # ab + cab = 5 letters > 4
                          [ID["a"], EOS, ID["x"]]], jnp.int32)  # an EOS draft ends the prefix
    states, valid = jax.jit(draft_states)(c.tables, jnp.zeros((4,), jnp.int32), drafts, jnp.asarray([EOS]))
    assert valid.tolist() == [3, 0, 1, 1]
    assert states.shape == (4, 4) and int(states[1, 1]) == -1
    assert c.accepts([ID["a"], ID["cab"], ID["x"], EOS])


def test_greedy_equals_constrained_autoregressive(tiny, vocab):
    model, params = tiny
    rx = "([abc]|ab|bc|ca){2,14}(x|y)"
    c = compile_regex(rx, vocab)
    p = with_constraint(params, c)
    prompts = [[1, 2, 1, 2, 1, 2], [4, 4, 4, 4], [3, 8, 3, 8, 3], [7, 11, 7, 11, 5, 6, 5, 6], [9, 9, 10]]
    ref = generate(constrained(model, c), p, prompts, max_new_tokens=20)
    dec = constrained_speculative(model, prompt_lookup(ngram=2), c, k=4)
    out = generate(dec, p, prompts, max_new_tokens=20)
    assert out.rows() == ref.rows()
    assert np.any(out.calls < ref.calls)  # drafts were accepted: the speculative path ran
    for row in out.rows():
        assert row[-1] == EOS  # the regex is bounded: every row finishes
        assert re.fullmatch(rx, vocab.decode(row[:-1]).decode()), row
        assert c.accepts(row)


def _fixed_drafter(tokens: tuple[int, ...]) -> Drafter:
    """Deterministic drafts ``tokens`` every step (independent of the context)."""
    def propose(params, state, dstate, key, *, k, sampler=None):
        b = state.last_token.shape[0]
        d = jnp.broadcast_to(jnp.asarray(tokens[:k], jnp.int32), (b, k))
        return Proposal(d, None, jnp.full((b,), k, jnp.int32), dstate)

    return Drafter(init=lambda params, state: None, propose=propose, update=lambda d, s, a: d,
                   name="fixed", may_be_empty=False)


def _masked_law(model, params, c, prompt, temperature):
    """Exact joint law P(t1, t2) of constrained sampling: [V, V]."""
    v = len(TOKENS)
    seqs = jnp.asarray([prompt + [t] for t in range(v)], jnp.int32)  # [V, P+1]
    pos = jnp.broadcast_to(jnp.arange(seqs.shape[1], dtype=jnp.int32), seqs.shape)
    fwd = jax.jit(lambda prm, s, q: model.logits(prm, model.apply(prm, s, q, model.init_cache(v, 128),
                                                                   empty_cache=True).hidden))
    logits = np.asarray(fwd(params, seqs, pos), np.float64) / temperature  # [V, P+1, V]
    masks = np.unpackbits(np.asarray(c.tables.mask).view(np.uint8), axis=1, bitorder="little")[:, :v].astype(bool)

    def masked_softmax(lg, allowed):
        lg = np.where(allowed, lg, -np.inf)
        e = np.exp(lg - lg.max())
        return e / e.sum()

    p1 = masked_softmax(logits[0, -2], masks[0])
    law = np.zeros((v, v))
    for t1 in np.nonzero(p1)[0]:
        law[t1] = p1[t1] * masked_softmax(logits[t1, -1], masks[c.next_state(0, int(t1))])
    return law


def test_sampling_law_is_the_masked_target_and_the_draft_check_matters(tiny, vocab):
    model, params = tiny
    c = compile_regex("[abc]{1,4}x", vocab)
    p = with_constraint(params, c)
    prompt = [1, 5, 3, 2]
    # "cab" is valid after a one-letter token only; then "x" (valid), then "y" (never valid).
    drafter = _fixed_drafter((ID["cab"], ID["x"], ID["y"]))
    sampler = sampling.make_sampler(temperature=1.0)
    law = _masked_law(model, params, c, prompt, 1.0)
    n = 16_000
    v = len(TOKENS)

    def joint(check):
        dec = constrained_speculative(model, drafter, c, k=3, sampler=sampler, check_drafts=check,
                                      skip_empty=False)
        out = generate(dec, p, [prompt] * n, max_new_tokens=2, key=jax.random.key(7))
        assert np.all(out.lengths == 2)
        counts = np.zeros((v, v))
        np.add.at(counts, (out.tokens[:, 0], out.tokens[:, 1]), 1)
        return counts

    def chi2_pvalue(counts):
        if counts[law == 0].sum() > 0:  # a token the constraint forbids was emitted
            return 0.0
        exp = law * n
        big = exp >= 5
        obs_c = np.append(counts[big], counts[~big & (law > 0)].sum())
        exp_c = np.append(exp[big], exp[~big & (law > 0)].sum())
        keep = exp_c > 0
        return stats.chisquare(obs_c[keep], exp_c[keep]).pvalue

    good = joint(True)
    # the draft path mattered: "cab" after a one-letter token was often the second token
    assert law[ID["a"], ID["cab"]] + law[ID["b"], ID["cab"]] + law[ID["c"], ID["cab"]] > 0.01
    assert chi2_pvalue(good) > 1e-3
    bad = joint(False)  # negative control: drafts accepted against the unmasked target
    assert chi2_pvalue(bad) < 1e-6


def test_bad_arguments(tiny, vocab):
    model, _ = tiny
    c = compile_regex("a+", vocab)
    with pytest.raises(ValueError, match="k must be"):
        constrained_speculative(model, prompt_lookup(), c, k=0)
    with pytest.raises(ValueError, match="TokenAutomaton"):
        constrained_speculative(model, prompt_lookup(), "a+", k=2)
    with pytest.raises(ValueError, match="with_constraint"):
        generate(constrained_speculative(model, prompt_lookup(), c, k=2), {"embed": 0}, [[1]], max_new_tokens=2)
