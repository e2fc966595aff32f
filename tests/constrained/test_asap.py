"""ASAp (grammar-aligned decoding, Park et al. 2024) against plain masking on an enumerable toy.

The toy: vocabulary {EOS, a, b, c}, the regex ``(a|bb|cb)[abc]{0,2}`` compiled with
decodax.constrained's automaton (39 strings of 1..4 tokens; the automaton's language is
checked equal to the regex's), and a context-dependent model: a fixed random trigram table
(next-token logits depend on the last two tokens). Its exact conditional law
``P(y | y in L)`` is enumerated. The model puts ~84% of its mass outside L, unevenly
across branches, so masking's law is far from the conditional one (TV ~ 0.5).

Statistical test. ASAp's samples are not i.i.d. (its law changes as it learns), so a
goodness-of-fit test on *all* samples would be unsound. But its EFG estimates are upper
bounds, and the root estimate equals P(L) iff every prefix of positive probability is
exact, i.e. iff the sampler's law *is* P(y | y in L) (module docstring of
decodax.constrained.asap). The first sample index ``k`` at which the root estimate equals
P(L) is a stopping time; given the history up to ``k``, the samples from ``k`` on are
i.i.d. from the target. So a Pearson chi-square goodness-of-fit test on ``samples[k:]``
is valid: cells with expected count < 5 are pooled into one (decided from the expected
counts only, so the pooling does not depend on the data), and a correct sampler fails
at p < 1e-3 with probability 1e-3. The same test applied to as many masked samples is
the negative control: it must reject (masking's bias gives p ~ 0).
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decodax.constrained import TokenVocabulary, compile_regex
from decodax.constrained.asap import EFGTrie, asap_sample, masked_sample, viable_states

TOKENS = ["<eos>", "a", "b", "c"]
EOS = 0
REGEX = "(a|bb|cb)[abc]{0,2}"
MAX_LEN = 4
N = 3000


@pytest.fixture(scope="module")
def vocab():
    return TokenVocabulary.from_strings(TOKENS, eos_ids=[EOS])


@pytest.fixture(scope="module")
def automaton(vocab):
    return compile_regex(REGEX, vocab)


def trigram_model(seed: int = 2, scale: float = 1.0):
    """logprob_fn of a random trigram table: the next token depends on the last two tokens."""
    table = np.random.default_rng(seed).normal(size=(5, 5, len(TOKENS))) * scale
    start = len(TOKENS)  # context padding id

    def logprob_fn(prefix):
        ctx = [start, start] + [int(t) for t in prefix]
        logits = table[ctx[-2], ctx[-1]]
        return logits - np.logaddexp.reduce(logits)

    return logprob_fn


def language(automaton, max_len: int):
    return [y for n in range(max_len + 1) for y in itertools.product(range(1, len(TOKENS)), repeat=n)
            if automaton.accepts(y)]


def string_prob(logprob_fn, y) -> float:
    """P(y EOS) under the model."""
    lp, prefix = 0.0, []
    for t in list(y) + [EOS]:
        lp += float(np.asarray(logprob_fn(np.asarray(prefix, np.int32)))[t])
        prefix.append(t)
    return float(np.exp(lp))


def conditional_law(logprob_fn, lang):
    p = np.array([string_prob(logprob_fn, y) for y in lang])
    return p / p.sum(), float(p.sum())


def chi_square_p(samples, lang, target) -> float:
    """Pearson goodness-of-fit p-value, cells with expected count < 5 pooled."""
    index = {y: i for i, y in enumerate(lang)}
    counts = np.bincount([index[s] for s in samples], minlength=len(lang)).astype(float)
    expected = target * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if not small.any():
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


def empirical(samples, lang):
    index = {y: i for i, y in enumerate(lang)}
    return np.bincount([index[s] for s in samples], minlength=len(lang)) / max(len(samples), 1)


def tv(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def test_toy_language_is_the_regex(automaton):
    lang = language(automaton, MAX_LEN)
    spelled = {y for n in range(MAX_LEN + 1) for y in itertools.product(range(1, 4), repeat=n)
               if re.fullmatch(REGEX, "".join(TOKENS[t] for t in y))}
    assert set(lang) == spelled and len(lang) == 39  # no outlines-core quirk on this regex


@pytest.mark.parametrize("key", [0, 1])
def test_asap_law_converges_and_masking_does_not(automaton, key):
    model = trigram_model()
    lang = language(automaton, MAX_LEN)
    target, p_lang = conditional_law(model, lang)

    # The negative control is meaningful: masking's exact law is far from the target.
    mask_law = np.array([EFGTrie(model, automaton, MAX_LEN).sequence_prob(y, adaptive=False) for y in lang])
    assert abs(mask_law.sum() - 1) < 1e-9
    assert tv(mask_law, target) > 0.4

    res = asap_sample(model, automaton, jax.random.key(key), N, MAX_LEN)
    assert all(automaton.accepts(y) and len(y) <= MAX_LEN for y in res.samples)
    # Upper bound, non-increasing, and certified exact after a burn-in.
    assert np.all(res.root_efg >= p_lang * (1 - 1e-9))
    assert np.all(np.diff(res.root_efg) <= 1e-12)
    assert res.root_efg[0] <= 1.0
    converged = res.root_efg <= p_lang * (1 + 1e-9)
    assert converged.any()
    k = int(np.argmax(converged))
    assert k <= N // 2, f"ASAp certified only after {k} samples"
    law = np.array([res.trie.sequence_prob(y) for y in lang])
    assert tv(law, target) < 1e-9

    late = res.samples[k:]
    p_asap = chi_square_p(late, lang, target)
    assert p_asap > 1e-3, f"ASAp's late samples fail the goodness-of-fit test (p = {p_asap:.3g})"
    assert tv(empirical(late, lang), target) < 0.08

    masked = masked_sample(model, automaton, jax.random.key(key), len(late), MAX_LEN)
    assert all(automaton.accepts(y) for y in masked.samples)
    p_mask = chi_square_p(masked.samples, lang, target)
    assert p_mask < 1e-3, f"the negative control passed: masking p = {p_mask:.3g}"
    assert tv(empirical(masked.samples, lang), target) > 0.3


def test_exact_law_tightens_across_calls(automaton):
    """The sampler's exact law (from the trie) starts at masking's and reaches the target;
    calls chained through ``trie=`` go on from the earlier estimates."""
    model = trigram_model()
    lang = language(automaton, MAX_LEN)
    target, _ = conditional_law(model, lang)
    res = asap_sample(model, automaton, jax.random.key(5), 0, MAX_LEN)
    tvs = [tv([res.trie.sequence_prob(y) for y in lang], target)]
    mask = tv([res.trie.sequence_prob(y, adaptive=False) for y in lang], target)
    assert tvs[0] == pytest.approx(mask)  # no estimate yet: ASAp's first sample is a masking sample
    for i, n in enumerate((30, 300, 2000)):
        res = asap_sample(model, automaton, jax.random.key(10 + i), n, MAX_LEN, trie=res.trie)
        tvs.append(tv([res.trie.sequence_prob(y) for y in lang], target))
    assert tvs[1] < tvs[0] and tvs[2] < tvs[0] and tvs[-1] < 1e-9, tvs


def test_deterministic_given_key(automaton):
    model = trigram_model()
    a = asap_sample(model, automaton, jax.random.key(3), 200, MAX_LEN)
    b = asap_sample(model, automaton, jax.random.key(3), 200, MAX_LEN)
    c = asap_sample(model, automaton, jax.random.key(4), 200, MAX_LEN)
    assert a.samples == b.samples and np.array_equal(a.root_efg, b.root_efg)
    assert a.samples != c.samples
    raw = asap_sample(model, automaton, jax.random.PRNGKey(3), 50, MAX_LEN)  # legacy uint32 keys work
    assert len(raw.samples) == 50


def test_max_len_conditions_on_length(automaton):
    """max_len = 2 conditions on y in L and |y| <= 2; tokens that cannot finish in time are
    never offered (the length-aware viability DP)."""
    model = trigram_model()
    v = viable_states(automaton, 2)
    assert v.shape == (3, automaton.next_class.shape[0]) and v[2, 0] and not v[0, 0]
    lang = language(automaton, 2)
    target, p_lang = conditional_law(model, lang)
    res = asap_sample(model, automaton, jax.random.key(0), 400, 2)
    assert all(len(y) <= 2 and automaton.accepts(y) for y in res.samples)
    assert res.trie.root_efg == pytest.approx(p_lang, rel=1e-9)
    assert tv([res.trie.sequence_prob(y) for y in lang], target) < 1e-9


def test_jitted_jax_model(automaton):
    """logprob_fn as a small jitted JAX forward returning a device array (one compilation:
    prefixes padded to a fixed shape) that reads the whole prefix, not only the last tokens.
    (A decodax ``Model`` forward plugs in the same way; its random init costs seconds on
    CPU, too much for this file's budget.)"""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    dim, pad = 8, len(TOKENS)
    emb = jax.random.normal(k1, (len(TOKENS) + 1, dim)).at[pad].set(0.0)
    pos = jax.random.normal(k2, (MAX_LEN, dim))
    head = jax.random.normal(k3, (dim, len(TOKENS)))

    @jax.jit
    def forward(tokens):
        h = jnp.tanh(jnp.sum(emb[tokens] * pos, axis=0) + 0.5)
        return jax.nn.log_softmax(h @ head)

    calls = []

    def logprob_fn(prefix):
        calls.append(len(prefix))
        toks = np.full(MAX_LEN, pad, np.int32)
        toks[:len(prefix)] = prefix
        return forward(jnp.asarray(toks))

    lang = language(automaton, MAX_LEN)
    memo = {}  # enumeration only: one forward per distinct prefix
    cached = lambda p: memo.setdefault(tuple(int(t) for t in p), np.asarray(logprob_fn(p)))  # noqa: E731
    target, p_lang = conditional_law(cached, lang)
    mask_tv = tv([EFGTrie(cached, automaton, MAX_LEN).sequence_prob(y, adaptive=False) for y in lang], target)
    calls.clear()
    res = asap_sample(logprob_fn, automaton, jax.random.key(1), 2000, MAX_LEN)
    assert all(automaton.accepts(y) for y in res.samples)
    viable_prefixes = {y[:i] for y in lang for i in range(len(y) + 1)}
    assert len(calls) == res.trie.n_expanded <= len(viable_prefixes)  # one forward per new prefix
    assert res.root_efg[-1] >= p_lang * (1 - 1e-6)
    # This model has strings of conditional probability ~1e-6 that 2000 samples need not
    # visit, so convergence is not certified; the sampler's exact law is still close.
    final_tv = tv([res.trie.sequence_prob(y) for y in lang], target)
    assert mask_tv > 0.5 and final_tv < 0.01, (mask_tv, final_tv)


def test_bad_input(vocab, automaton):
    model = trigram_model()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="vocabulary"):
        asap_sample(model, REGEX, key, 1, MAX_LEN)
    assert len(asap_sample(model, REGEX, key, 3, MAX_LEN, vocabulary=vocab).samples) == 3
    with pytest.raises(ValueError, match="n_samples"):
        asap_sample(model, automaton, key, -1, MAX_LEN)
    with pytest.raises(ValueError, match="max_len"):
        asap_sample(model, automaton, key, 1, -2)
    with pytest.raises(ValueError, match="no string of at most"):
        asap_sample(model, compile_regex("abc", vocab), key, 1, 2)
    with pytest.raises(ValueError, match="log-probs"):
        asap_sample(lambda p: np.zeros(7), automaton, key, 1, MAX_LEN)
    with pytest.raises(ValueError, match="another grammar or max_len"):
        asap_sample(model, automaton, key, 1, 3, trie=EFGTrie(model, automaton, MAX_LEN))

    def eos_only(prefix):  # grammar needs >= 1 token, the model only ever says EOS: P(L) = 0
        lp = np.full(len(TOKENS), -np.inf)
        lp[EOS] = 0.0
        return lp

    with pytest.raises(ValueError, match="zero probability"):
        asap_sample(eos_only, automaton, key, 1, MAX_LEN)
    with pytest.raises(ValueError, match="no probability"):
        masked_sample(eos_only, automaton, key, 1, MAX_LEN)
