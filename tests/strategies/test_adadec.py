"""AdaDec (He et al. 2025) on the tiny random model.

One compiled decoder serves the decoding tests (the threshold travels in the params):

* with a threshold inside the model's entropy range (~3.6 .. 4.2 nats) it equals a brute-force
  re-implementation (full forwards of every context and lookahead, scores in float64), with
  steps that pause and steps that do not, and a rerank that changed the greedy choice;
* with an unreachable threshold it is greedy decoding (token for token, EOS rows included);
* deterministic given the key;
* ``fit_threshold`` recovers the entropy where a known logistic law crosses its accuracy-optimal
  cut-off, and ``entropy_labels`` matches full forwards; ValueErrors.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS

from decodax.decoding import autoregressive, generate
from decodax.strategies import adadec, entropy_labels, fit_threshold
from decodax.strategies.adadec import with_threshold

K, DEPTH, THRESHOLD = 3, 3, 4.0


@pytest.fixture(scope="module")
def decoder(tiny):
    return adadec(tiny[0], THRESHOLD, k=K, lookahead=DEPTH)


def next_logp(forward, seq):
    (lp, _), = forward([seq])
    return lp[-1].astype(np.float64)


def reference(forward, prompt, threshold):
    """Brute-force AdaDec; returns (tokens, per step: paused, reranked away from greedy)."""
    out, trace = [], []
    while len(out) < N:
        lp = next_logp(forward, list(prompt) + out)
        h = -(np.exp(lp) * lp).sum()
        tok = int(np.argmax(lp))
        if h > threshold:
            cands = np.argsort(-lp, kind="stable")[:K]
            scores = []
            for c in cands:
                seq, total, live = [int(c)], [lp[c]], c != EOS
                for _ in range(DEPTH):
                    if not live:
                        break
                    lpn = next_logp(forward, list(prompt) + out + seq)
                    g = int(np.argmax(lpn))
                    seq.append(g)
                    total.append(lpn[g])
                    live = g != EOS
                scores.append(np.mean(total))
            best = int(cands[int(np.argmax(scores))])
            trace.append((True, best != tok))
            tok = best
        else:
            trace.append((False, False))
        out.append(tok)
        if tok == EOS:
            break
    return out, trace


def test_equals_brute_force_adadec(tiny, forward, decoder):
    model, params = tiny
    p = with_threshold(params, THRESHOLD)
    got = generate(decoder, p, PROMPTS, max_new_tokens=N)
    trace = []
    for b, prompt in enumerate(PROMPTS):
        ref, t = reference(forward, prompt, THRESHOLD)
        assert got.rows()[b] == ref, b
        trace += t
    paused = [t[0] for t in trace]
    assert any(paused) and not all(paused)  # both branches taken
    assert any(t[1] for t in trace)  # a rerank changed the greedy choice
    again = generate(decoder, p, PROMPTS, max_new_tokens=N, key=jax.random.key(9))
    assert again.rows() == got.rows()  # deterministic given the key (the key is unused)


def test_unreachable_threshold_is_greedy(tiny, decoder):
    model, params = tiny
    got = generate(decoder, with_threshold(params, float("inf")), PROMPTS, max_new_tokens=N)
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    assert got.rows() == greedy.rows()
    assert any(r[-1] == EOS and len(r) < N for r in greedy.rows())


def test_fit_threshold_recovers_the_crossing():
    rng = np.random.default_rng(0)
    h = rng.uniform(0.0, 3.0, 6000)
    right = rng.random(h.size) < 1.0 / (1.0 + np.exp(4.0 * (h - 1.2)))  # P(top-1) = 1/2 at H = 1.2
    t = fit_threshold(h, right)
    assert abs(t - 1.2) < 0.2
    assert fit_threshold(h, right) == t  # deterministic given the seed
    with pytest.raises(ValueError, match="both labels"):
        fit_threshold(h, np.ones_like(right))
    with pytest.raises(ValueError, match="6000 entropies but 5 labels"):
        fit_threshold(h, right[:5])


def test_entropy_labels_match_full_forwards(tiny, forward):
    model, params = tiny
    seqs = [PROMPTS[0] + [9, 8, 9], PROMPTS[1] + [24, 66, 5, 63]]  # greedy tokens, then non-greedy 5
    h, top1 = entropy_labels(model, params, seqs, [len(PROMPTS[0]), len(PROMPTS[1])])
    want_h, want_top = [], []
    for s, p in zip(seqs, (len(PROMPTS[0]), len(PROMPTS[1]))):
        (lp, _), = forward([s])
        lp = lp.astype(np.float64)[p - 1: len(s) - 1]
        want_h += list(-(np.exp(lp) * lp).sum(-1))
        want_top += list(np.argmax(lp, -1) == np.asarray(s[p:]))
    np.testing.assert_allclose(h, want_h, rtol=1e-4)
    assert top1.tolist() == want_top
    assert top1.tolist()[:6] == [True] * 5 + [False]  # the greedy tokens, then the non-greedy 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=-1.0), r"threshold must be a float >= 0"),
    (dict(threshold=float("nan")), r"threshold must be a float >= 0"),
    (dict(threshold=1.0, k=0), r"k must be an int in \[1, 97\]"),
    (dict(threshold=1.0, k=98), r"k must be an int in \[1, 97\]"),
    (dict(threshold=1.0, lookahead=0), r"lookahead must be an int >= 1"),
    (dict(threshold=1.0, eos_ids=(97,)), r"eos_ids must be token ids"),
])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        adadec(tiny[0], **kwargs)
    if "k" not in kwargs and "lookahead" not in kwargs and "eos_ids" not in kwargs:
        with pytest.raises(ValueError, match=match):
            with_threshold(tiny[1], kwargs["threshold"])
