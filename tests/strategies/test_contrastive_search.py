"""Contrastive search on a tiny random model.

* with alpha = 0 it is greedy decoding (EOS rows stop early);
* with alpha = 0.6 it equals a brute-force re-implementation of Su et al.'s rule
  (a full forward of the context for p, one per candidate for its hidden state, the
  degeneration penalty against every context position, prompt included), with each
  row's forward count;
* deterministic given the key; ValueErrors.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS

from decodax.decoding import autoregressive, generate
from decodax.strategies import contrastive_search

K = 4


def reference(forward, prompt, k, alpha, eos, max_new):
    """Brute-force contrastive search; returns (tokens, forwards as the decoder counts them)."""
    seq, out = list(prompt), []
    while len(out) < max_new:
        (logp, ctx), = forward([seq])
        p = np.exp(logp[-1].astype(np.float64))
        top = np.argsort(-p, kind="stable")[:k]
        cands = forward([seq + [int(v)] for v in top])
        score = [(1 - alpha) * p[v] - alpha * float(np.max(ctx @ h[-1])) for v, (_, h) in zip(top, cands)]
        tok = int(top[int(np.argmax(score))])
        out.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    return out, len(out) + 1  # the prefill, then one forward of the k candidates per token


def test_alpha_zero_is_greedy(tiny):
    model, params = tiny
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    out = generate(contrastive_search(model, k=K, alpha=0.0), params, PROMPTS, max_new_tokens=N)
    assert out.rows() == greedy.rows()
    assert any(r[-1] == EOS and len(r) < N for r in greedy.rows())


def test_equals_brute_force_contrastive_search(tiny, forward):
    model, params = tiny
    dec = contrastive_search(model, k=K, alpha=0.6)
    out = generate(dec, params, PROMPTS, max_new_tokens=N)
    for b, prompt in enumerate(PROMPTS):
        ref, calls = reference(forward, prompt, K, 0.6, (EOS,), N)
        assert out.rows()[b] == ref, b
        assert int(out.calls[b]) == calls, b
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    assert out.rows() != greedy.rows()  # the penalty changed the continuation
    again = generate(dec, params, PROMPTS, max_new_tokens=N, key=jax.random.key(7))
    assert again.rows() == out.rows()  # deterministic given the key (the key is unused)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), r"k must be an int in \[1, 97\]"),
    (dict(k=98), r"k must be an int in \[1, 97\]"),
    (dict(alpha=-0.1), r"alpha must be a float in \[0, 1\]"),
    (dict(alpha=1.5), r"alpha must be a float in \[0, 1\]"),
    (dict(alpha=float("nan")), r"alpha must be a float in \[0, 1\]"),
])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_search(tiny[0], **kwargs)
