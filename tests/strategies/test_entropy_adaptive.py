"""Entropy-adaptive decoding (EAD) on a 2-layer tiny random model (small = its first layer).

One compiled program (init + N - 1 steps, no EOS stop, returning the state) serves every test;
the threshold travels in the params:

* with a threshold inside the small model's rolling-entropy range it equals a brute-force
  re-implementation (full forwards of the context through the exit and the full model), with
  switches from the small to the large model after several small tokens (so the deeper layers'
  catch-up runs over more than one chunk) and back; its large-token counts match;
* threshold 0: every token from the large model (fraction 1), and the tokens are plain greedy
  decoding with the full model; threshold inf: fraction 0, the early exit's greedy decoding;
* deterministic given the key; ValueErrors.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategies.common import N, PROMPTS, ROWS, WIDTH, tiny_model

from decodax.decoding.driver import pad_prompts
from decodax.model.cache import init_cache
from decodax.strategies import entropy_adaptive, large_fraction
from decodax.strategies.entropy_adaptive import with_threshold

WINDOW, THRESHOLD = 2, 4.0


@pytest.fixture(scope="module")
def two_layers():
    return tiny_model(2, 4, "tiny2")


@pytest.fixture(scope="module")
def run(two_layers):
    """``run(params, key)`` -> (tokens [B, N], large-model tokens [B], fraction [B], calls [B])."""
    model, _ = two_layers
    dec = entropy_adaptive(model, exit_layer=1, threshold=THRESHOLD, window=WINDOW, catchup=2)
    prompt, lengths = pad_prompts(PROMPTS)

    @jax.jit
    def go(params, key):
        s = dec.init(params, jnp.asarray(prompt), jnp.asarray(lengths), key, max_new_tokens=N, capacity=128)
        s = jax.lax.fori_loop(0, N - 1, lambda i, s: dec.step(params, s), s)
        return s.tokens[:, :N], s.extra.large, large_fraction(s), s.calls

    return lambda params, key=jax.random.key(0): tuple(map(np.asarray, go(params, key)))


@pytest.fixture(scope="module")
def next_logps(two_layers):
    """``f(seqs)`` -> (exit-layer, full) next-token log-probs (float64 [V]) after each sequence."""
    model, params = two_layers

    @jax.jit
    def fwd(tokens):
        positions = jnp.broadcast_to(jnp.arange(WIDTH), (ROWS, WIDTH))
        cache = init_cache(model.config, ROWS, WIDTH)
        return tuple(jax.nn.log_softmax(model.apply(params, tokens, positions, cache, empty_cache=True,
                                                    exit_layer=e).logits, axis=-1) for e in (1, None))

    def call(seqs):
        tokens = np.zeros((ROWS, WIDTH), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        small, full = (np.asarray(x, np.float64) for x in fwd(jnp.asarray(tokens)))
        return [(small[i, len(s) - 1], full[i, len(s) - 1]) for i, s in enumerate(seqs)]

    return call


def reference(next_logps, threshold):
    """Brute-force EAD (greedy) on every prompt for N tokens: (tokens, large flags, margins)."""
    out = [[] for _ in PROMPTS]
    ents = [[] for _ in PROMPTS]
    flags = [[] for _ in PROMPTS]
    margins = []
    for _ in range(N):
        for b, (small, full) in enumerate(next_logps([list(p) + o for p, o in zip(PROMPTS, out)])):
            ents[b].append(-(np.exp(small) * small).sum())
            mean = np.mean(ents[b][-WINDOW:])
            margins.append(abs(mean - threshold))
            flags[b].append(bool(mean >= threshold))
            out[b].append(int(np.argmax(full if flags[b][-1] else small)))
    return out, flags, min(margins)


def test_equals_brute_force_ead(two_layers, run, next_logps):
    model, params = two_layers
    tokens, large, frac, calls = run(with_threshold(params, THRESHOLD))
    ref, flags, margin = reference(next_logps, THRESHOLD)
    assert margin > 1e-4  # no rolling mean within float noise of the threshold
    assert tokens.tolist() == ref
    assert large.tolist() == [sum(f) for f in flags]
    np.testing.assert_allclose(frac, [sum(f) / N for f in flags])
    assert calls.tolist() == [1 + sum(f[1:]) for f in flags]  # the prefill, then one full forward per large token
    assert 0 < large.sum() < large.size * N
    # a switch to the large model after >= 3 small tokens (a catch-up over two chunks of 2) and back
    runs = ["".join("L" if x else "s" for x in f) for f in flags]
    assert any("sssL" in r for r in runs) and any("Ls" in r for r in runs)
    again = run(with_threshold(params, THRESHOLD))
    assert all(np.array_equal(a, b) for a, b in zip(again, (tokens, large, frac, calls)))


def test_threshold_extremes(two_layers, run, next_logps):
    model, params = two_layers
    tokens, large, frac, calls = run(with_threshold(params, 0.0))
    greedy, flags, _ = reference(next_logps, 0.0)
    assert all(all(f) for f in flags)
    assert tokens.tolist() == greedy  # plain greedy decoding with the full model
    assert frac.tolist() == [1.0] * len(PROMPTS) and calls.tolist() == [N] * len(PROMPTS)
    tokens, large, frac, calls = run(with_threshold(params, float("inf")))
    small_greedy, flags, _ = reference(next_logps, float("inf"))
    assert not any(any(f) for f in flags)
    assert tokens.tolist() == small_greedy and tokens.tolist() != greedy
    assert frac.tolist() == [0.0] * len(PROMPTS) and calls.tolist() == [1] * len(PROMPTS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(exit_layer=0, threshold=1.0), r"exit_layer must be an int in \[1, 1\]"),
    (dict(exit_layer=2, threshold=1.0), r"exit_layer must be an int in \[1, 1\]"),
    (dict(exit_layer=1, threshold=-1.0), r"threshold must be a float >= 0"),
    (dict(exit_layer=1, threshold=float("nan")), r"threshold must be a float >= 0"),
    (dict(exit_layer=1, threshold=1.0, window=0), r"window must be an int >= 1"),
    (dict(exit_layer=1, threshold=1.0, catchup=0), r"catchup must be an int >= 1"),
])
def test_bad_arguments(two_layers, kwargs, match):
    with pytest.raises(ValueError, match=match):
        entropy_adaptive(two_layers[0], **kwargs)
    with pytest.raises(ValueError, match="threshold must be a float >= 0"):
        with_threshold(two_layers[1], -0.5)
