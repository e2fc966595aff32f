"""Superposed Decoding (Shen et al. 2024) on the tiny random model.

* k = 1 without the n-gram term is greedy decoding (tokens and forward counts);
* with k = 3 and the n-gram interpolation on, all k drafts and their scores equal a brute-force
  re-implementation: a Python loop over full forwards fed explicit embeddings (the prompt's, then
  the superpositions sum_i gamma_i E[x_i]), n-gram probabilities from Python dict counts;
* one target forward per step (``calls``), deterministic given the inputs;
* the device n-gram table's counts equal Python dict counts;
* ValueErrors; the text-file table builder with the default tokenizer (skips without it).
"""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS

from decodax.decoding import autoregressive, generate
from decodax.model.cache import init_cache
from decodax.strategies import build_ngram_table, generate_drafts, ngram_table_from_text, superposed, with_ngram
from decodax.strategies.superposed import ngram_count

K, ALPHA, TEMP, PENALTY = 3, 0.5, 0.5, 3.0
WEIGHTS = (0.0, 0.3, 0.3, 0.2)  # no unigram: candidates without n-gram support exist
WIDTH = 24  # the reference forward's length


def corpus():
    """Documents over the tiny vocabulary: random text over a few ids plus the prompts, so that
    some drafts' contexts are seen and others are not."""
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 97, 400), rng.integers(0, 12, 300), np.array(PROMPTS[0] * 3), np.array(PROMPTS[1])]
    return [d.astype(np.int32) for d in docs]


def dict_counts(docs, order):
    grams, ctxs = Counter(), Counter()
    for d in docs:
        d = [int(t) for t in d]
        for n in range(1, order + 1):
            for i in range(len(d) - n + 1):
                grams[tuple(d[i: i + n])] += 1
                ctxs[tuple(d[i: i + n - 1])] += 1
    return grams, ctxs


@pytest.fixture(scope="module")
def embed_forward(tiny):
    """``call(embeds[T, D])`` -> float64 logits [T, V] of one full causal forward fed embeddings."""
    model, params = tiny

    @jax.jit
    def run(params, embeds):
        positions = jnp.arange(WIDTH)[None, :]
        out = model.apply(params, None, positions, init_cache(model.config, 1, WIDTH), embeds=embeds,
                          empty_cache=True)
        return out.logits[0]

    def call(embeds):
        x = np.zeros((1, WIDTH, embeds.shape[1]), np.float32)
        x[0, : len(embeds)] = embeds
        return np.asarray(run(params, jnp.asarray(x)), np.float64)[: len(embeds)]

    return call


def reference(embed_forward, embed, prompt, counts, max_new, alpha=ALPHA):
    """Brute-force Superposed Decoding of one prompt: (drafts best first, scores, forwards)."""
    grams, ctxs = counts

    def lm(logits):
        z = logits / TEMP
        logp = z - np.logaddexp.reduce(z)
        cand = np.argsort(-logp, kind="stable")[:K]
        top = logp[cand]
        return cand, top - np.logaddexp.reduce(top)

    def increments(ctx, cand, lp):
        png = []
        for v in cand:
            p = 0.0
            for n, lam in enumerate(WEIGHTS, start=1):
                c = tuple(ctx[len(ctx) - n + 1:]) if n > 1 else ()
                if lam and len(ctx) >= n - 1 and ctxs[c] > 0:
                    p += lam * grams[c + (int(v),)] / ctxs[c]
            png.append(p)
        png = np.array(png)
        if alpha == 0:
            return lp
        if not (png > 0).any():
            return (1 - alpha) * lp - PENALTY
        with np.errstate(divide="ignore"):
            return np.where(png > 0, (1 - alpha) * lp + alpha * np.log(png), -np.inf)

    def select(total, toks):
        """The K best; an EOS candidate only survives as the best of all."""
        total = np.array(total, np.float64)
        best = int(np.argmax(total))
        total = np.where([t == EOS and i != best for i, t in enumerate(toks)], -np.inf, total)
        pick = np.argsort(-total, kind="stable")[:K]
        return pick, [float(total[i]) for i in pick]

    seq = [embed[t] for t in prompt]
    cand, lp = lm(embed_forward(np.stack(seq))[-1])
    pick, scores = select(increments(list(prompt), cand, lp), cand)
    drafts = [[int(cand[j])] for j in pick]
    calls = 1
    while len(drafts[0]) < max_new and drafts[0][-1] != EOS:
        z = np.array(scores)
        gamma = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        seq.append(sum(g * embed[d[-1]] for g, d in zip(gamma, drafts)))
        cand, lp = lm(embed_forward(np.stack(seq))[-1])
        calls += 1
        total = [x for d, sc in zip(drafts, scores) for x in sc + increments(list(prompt) + d, cand, lp)]
        pick, scores = select(total, [int(t) for t in cand] * K)
        drafts = [drafts[i // K] + [int(cand[i % K])] for i in pick]
    return drafts, np.array(scores), calls


@pytest.fixture(scope="module")
def run_k3(tiny):
    model, params = tiny
    table = build_ngram_table(corpus(), len(WEIGHTS), vocab_size=97)
    dec = superposed(model, k=K, alpha=ALPHA, weights=WEIGHTS, temperature=TEMP, penalty=PENALTY)
    p = with_ngram(params, table)
    return p, dec, generate_drafts(dec, p, PROMPTS, max_new_tokens=N)


def test_k1_without_ngram_is_greedy(tiny):
    model, params = tiny
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    out = generate(superposed(model, k=1, alpha=0.0), params, PROMPTS, max_new_tokens=N)
    assert out.rows() == greedy.rows()
    assert out.calls.tolist() == greedy.calls.tolist()
    assert any(EOS in r for r in out.rows()) and any(len(r) == N for r in out.rows())


def test_equals_brute_force_superposed_decoding(tiny, embed_forward, run_k3):
    model, params = tiny
    out = run_k3[2]
    embed = np.asarray(params["embed"], np.float64)
    counts = dict_counts(corpus(), len(WEIGHTS))
    changed = False
    for b, prompt in enumerate(PROMPTS):
        drafts, scores, calls = reference(embed_forward, embed, prompt, counts, N)
        assert out.all_drafts()[b] == drafts, b
        np.testing.assert_allclose(out.scores[b], scores, rtol=1e-4, atol=1e-4)
        assert out.rows()[b] == drafts[0]
        assert int(out.calls[b]) == calls, b
        assert len({tuple(d) for d in drafts}) == K, b  # k distinct drafts
        changed |= reference(embed_forward, embed, prompt, counts, N, alpha=0.0)[0] != drafts
    assert changed  # the n-gram interpolation changed the drafts
    assert np.isneginf(out.scores).any() and np.isfinite(out.scores).all(axis=1).any()  # -inf paths taken


def test_one_forward_per_step(run_k3):
    out = run_k3[2]
    # the prefill gives every draft's first token, then one forward per further token of the
    # top draft: k drafts of n tokens for n forwards (k separate runs: k * n)
    for b in range(len(PROMPTS)):
        n = int(out.lengths[b])
        assert int(out.calls[b]) == n == int(out.draft_lengths[b]), b
    assert int(out.steps) == int(out.lengths.max()) - 1


def test_deterministic(run_k3):
    p, dec, out = run_k3
    again = generate_drafts(dec, p, PROMPTS, max_new_tokens=N, key=jax.random.key(9))
    for a, b in zip(out, again):
        np.testing.assert_array_equal(a, b)


def test_ngram_table_counts_equal_a_python_dict():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 4, 60), rng.integers(0, 6, 25), np.array([3, 3])]
    order = 4
    grams, ctxs = dict_counts(docs, order)
    table = build_ngram_table(docs, order)
    queries = {}
    for length in range(0, order + 1):
        seen = [g for g in grams if len(g) == length]
        rand = [tuple(rng.integers(0, 8, length)) for _ in range(30)]  # ids 6, 7 never occur
        queries[length] = np.array(seen + rand, np.int32).reshape(len(seen) + 30, length)

    @jax.jit  # one compilation for every query length
    def counts(table, queries):
        return ({n: ngram_count(table, q) for n, q in queries.items() if n >= 1},
                {n: ngram_count(table, q, context=True) for n, q in queries.items() if n < order})

    got_grams, got_ctxs = counts(table, queries)
    for n, q in queries.items():
        if n >= 1:
            assert np.asarray(got_grams[n]).tolist() == [grams[tuple(x)] for x in q.tolist()], n
        if n < order:
            assert np.asarray(got_ctxs[n]).tolist() == [ctxs[tuple(x)] for x in q.tolist()], n
    assert int(got_ctxs[0][0]) == sum(map(len, docs))  # the empty context: every token


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), r"k must be an int in \[1, 97\]"),
    (dict(k=2.0), r"k must be an int"),
    (dict(alpha=-0.1), r"alpha must be in \[0, 1\]"),
    (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(weights=(0.1, 1.2)), r"weights must be in \[0, 1\]"),
    (dict(weights=(-0.1,)), r"weights must be in \[0, 1\]"),
    (dict(weights=()), r"order \(len\(weights\)\) must be >= 1"),
    (dict(weights="ab"), r"weights must be a sequence of floats"),
    (dict(temperature=0.0), r"temperature must be a float > 0"),
    (dict(k=3, n_candidates=2), r"n_candidates must be an int in \[k, 97\]"),
    (dict(penalty=-1.0), r"penalty must be a finite float >= 0"),
])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        superposed(tiny[0], **kwargs)


@pytest.mark.parametrize("corpus_, kwargs, match", [
    ([1, 2, 3], dict(order=0), r"order must be an int >= 1"),
    ("some text", dict(order=2), r"must be token ids, not text"),
    (np.array([0.5, 1.5]), dict(order=2), r"integer token ids"),
    ([[1, 2], [[3]]], dict(order=2), r"integer token ids"),
    ([1, -2, 3], dict(order=2), r"token ids must be in"),
    ([1, 97], dict(order=2, vocab_size=97), r"token ids must be in \[0, 97\)"),
    ([], dict(order=2), r"has no tokens"),
    (5, dict(order=2), r"1-D token array or a sequence"),
])
def test_bad_corpus(corpus_, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_ngram_table(corpus_, **kwargs)


def test_missing_or_small_table(tiny):
    model, params = tiny
    dec = superposed(model, k=2, weights=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"no n-gram table"):
        generate(dec, params, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"need an n-gram table of order >= 3, got 2"):
        generate(dec, with_ngram(params, build_ngram_table([1, 2, 3], 2)), PROMPTS, max_new_tokens=2)


def test_table_from_text_with_the_default_tokenizer(default_gguf_path, tmp_path):
    """The experiment's builder (WikiText-2 valid through the default tokenizer), on a small file."""
    from decodax.strategies.superposed import _default_tokenizer

    lines = ["The tower is 324 metres tall.", "", "The tower is the tallest structure in Paris."]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines))
    table = ngram_table_from_text(path, 3)
    tok = _default_tokenizer()  # memoised: the one the builder used
    docs = [tok.encode(line, add_special_tokens=False) for line in lines if line]
    grams, _ = dict_counts(docs, 3)
    queries = [g for g in grams if len(g) == 2] + [(docs[0][0], docs[1][-1])]
    got = np.asarray(ngram_count(table, jnp.asarray(np.array(queries, np.int32))))
    assert got.tolist() == [grams[q] for q in queries]
    assert max(got) >= 2  # "The tower is" repeats across lines
    with pytest.raises(FileNotFoundError):
        ngram_table_from_text(tmp_path / "missing.txt", 3, tokenizer=tok)
