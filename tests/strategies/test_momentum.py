"""Momentum decoding (Lan et al. 2022) on the tiny random model.

* ``repetition_length`` equals the authors' graph-walk definition (their
  ``find_max_repetition_length``, re-written here over a Python dict of node occurrences);
* the decoder equals a brute-force re-implementation (a full forward per step, top-k,
  ``p - alpha * f(d)``) and the resistance changed the greedy continuation;
* alpha = 0 is greedy decoding; deterministic given the key; ValueErrors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS

from decodax.decoding import autoregressive, generate
from decodax.strategies import momentum, repetition_length

K, ALPHA = 5, 0.5
TABLE = (0.0, 0.5, 1.0, 2.0, math.inf)  # resists any revisit; blocks repeating a 4-gram


def graph_repetition_length(tokens, cand, max_len):
    """The authors' rule: 0 if ``cand`` is not a node of the graph (not in ``tokens``), else the
    longest n <= max_len whose n-gram ``tokens[-(n-1):] + [cand]`` ends at an occurrence of
    ``cand``, 1 at least."""
    occurrences = {}
    for i, t in enumerate(tokens):
        occurrences.setdefault(t, []).append(i)
    if cand not in occurrences:
        return 0
    grams = {tuple(tokens[max(i - n + 1, 0): i + 1]) for i in occurrences[cand] for n in range(1, max_len + 1)
             if i - n + 1 >= 0}
    for n in range(max_len, 1, -1):
        if n - 1 <= len(tokens) and tuple(tokens[len(tokens) - n + 1:] + [cand]) in grams:
            return n
    return 1


def reference(forward, prompt, k, alpha, table, max_new):
    seq, out = list(prompt), []
    while len(out) < max_new:
        (logp, _), = forward([seq])
        p = np.exp(logp[-1].astype(np.float64))
        top = np.argsort(-p, kind="stable")[:k]
        f = [table[graph_repetition_length(seq, int(v), len(table) - 1)] for v in top]
        score = [p[v] - (alpha * x if x > 0 else 0.0) for v, x in zip(top, f)]
        tok = int(top[int(np.argmax(score))])
        out.append(tok)
        seq.append(tok)
        if tok == EOS:
            break
    return out


def test_repetition_length_matches_the_graph_definition():
    rng = np.random.default_rng(0)
    b, length, k, max_len = 6, 24, 5, 5
    seq = rng.integers(0, 4, (b, length)).astype(np.int32)  # 4 symbols: many repeats
    n = rng.integers(1, length + 1, b).astype(np.int32)
    cand = rng.integers(0, 5, (b, k)).astype(np.int32)  # 4 never occurs
    seq[0], n[0] = np.tile([0, 1, 2], length // 3), 20  # a loop: its continuation repeats a long n-gram
    cand[0, 0] = seq[0, 20]
    got = np.asarray(jax.jit(repetition_length, static_argnums=3)(jnp.asarray(seq), jnp.asarray(n),
                                                                   jnp.asarray(cand), max_len))
    want = [[graph_repetition_length(seq[i, : n[i]].tolist(), int(c), max_len) for c in cand[i]] for i in range(b)]
    assert got.tolist() == want
    assert {0, 1, max_len} <= set(got.ravel().tolist())


def test_equals_brute_force_momentum(tiny, forward):
    model, params = tiny
    dec = momentum(model, k=K, alpha=ALPHA, resistance=TABLE)
    out = generate(dec, params, PROMPTS, max_new_tokens=N)
    for b, prompt in enumerate(PROMPTS):
        ref = reference(forward, prompt, K, ALPHA, TABLE, N)
        assert out.rows()[b] == ref, b
        assert int(out.calls[b]) == len(ref), b
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    assert out.rows() != greedy.rows()  # the resistance changed the walk
    again = generate(dec, params, PROMPTS, max_new_tokens=N, key=jax.random.key(9))
    assert again.rows() == out.rows()  # deterministic given the key (the key is unused)


def test_alpha_zero_is_greedy(tiny):
    model, params = tiny
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    out = generate(momentum(model, k=K, alpha=0.0, resistance=TABLE), params, PROMPTS, max_new_tokens=N)
    assert out.rows() == greedy.rows()


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), r"k must be an int >= 1"),
    (dict(k=98), r"k must be <= the vocabulary"),
    (dict(alpha=-0.1), r"alpha must be a float in \[0, 1\]"),
    (dict(alpha=1.5), r"alpha must be a float in \[0, 1\]"),
    (dict(resistance=(0.0,)), r"resistance must hold >= 2 values"),
    (dict(resistance=(0.0, -1.0)), r"resistance must hold >= 2 values"),
])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        momentum(tiny[0], **kwargs)
