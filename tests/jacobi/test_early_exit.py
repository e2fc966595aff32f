"""CEED-VLA early exit (relaxed convergence) on the sliding Jacobi window.

* the decoder equals a from-scratch Python re-implementation of the rule (full
  forward per iteration, no cache): accept ``max(verified, leading guesses with
  age >= max_iters)`` plus the target's token after them;
* it takes fewer iterations than exact Jacobi and its output departs from greedy
  (it is lossy), while a budget it never reaches gives greedy back exactly;
* counters: ages never increase along the window; ``stable`` counts repeats;
* ValueErrors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.jacobi import EarlyExit, JacobiState, PadInit, jacobi
from decodax.model.cache import init_cache
from speculative.test_decoder import PROMPTS
from speculative.test_draft_model import tiny  # noqa: F401 (fixture)

N = 24


def reference(model, params, prompt, n, max_iters, new_tokens):
    """Sliding-window Jacobi with PadInit(0) and the step-budget early exit, by brute force."""
    width = len(prompt) + new_tokens + 2 * n + 2  # right padding never reaches earlier positions (causal)
    forward = jax.jit(lambda seq: jnp.argmax(model.apply(
        params, seq[None], jnp.arange(width)[None], init_cache(model.config, 1, width), empty_cache=True).logits[0], -1))

    def preds(seq, start, count):
        return np.asarray(forward(jnp.asarray(seq + [0] * (width - len(seq)))))[start:start + count].tolist()

    out = preds(prompt, len(prompt) - 1, 1)  # the prefill's token
    guess, age, calls = [0] * n, [0] * n, 1
    while len(out) < new_tokens:
        seq = prompt + out + guess
        pred = preds(seq, len(prompt) + len(out) - 1, n + 1)  # after last, g_1 .. g_n
        calls += 1
        verified = next((j for j in range(n) if guess[j] != pred[j]), n)
        relaxed = next((j for j in range(n) if age[j] < max_iters), n)
        acc = max(verified, relaxed)
        out += guess[:acc] + [pred[acc]]
        new_guess, new_age = [], []
        for i in range(n):
            src = acc + 1 + i
            new_guess.append(pred[src] if src <= n else 0)
            new_age.append(age[src] + 1 if src < n else (1 if src == n else 0))
        guess, age = new_guess, new_age
    return out[:new_tokens], calls


@pytest.mark.parametrize("max_iters", [1, 2])
def test_early_exit_equals_the_brute_force_rule(tiny, max_iters):
    model, params = tiny
    n = 4
    dec = jacobi(model, window=n, init=PadInit(0), early_exit=EarlyExit(max_iters=max_iters))
    got = generate(dec, params, PROMPTS[:2], max_new_tokens=N)
    for b, prompt in enumerate(PROMPTS[:2]):
        ref, calls = reference(model, params, prompt, n, max_iters, N)
        assert got.rows()[b] == ref, (b, max_iters)
        assert int(got.calls[b]) == calls


def test_early_exit_is_faster_and_lossy_and_exact_when_never_reached(tiny):
    model, params = tiny
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N).rows()
    plain = generate(jacobi(model, window=4, init=PadInit(0)), params, PROMPTS, max_new_tokens=N)
    fast = generate(jacobi(model, window=4, init=PadInit(0), early_exit=EarlyExit(max_iters=1)), params, PROMPTS,
                    max_new_tokens=N)
    never = generate(jacobi(model, window=4, init=PadInit(0), early_exit=EarlyExit(max_iters=99)), params, PROMPTS,
                     max_new_tokens=N)
    assert plain.rows() == greedy and never.rows() == greedy
    assert fast.calls.sum() < plain.calls.sum()
    agree = np.mean([np.mean(np.asarray(a) == np.asarray(g)) for a, g in zip(fast.rows(), greedy)])
    print(f"early exit (max_iters=1): calls {fast.calls.sum()} vs {plain.calls.sum()}, agreement {agree:.2f}")
    assert agree < 1.0


def test_window_counters(tiny):
    model, params = tiny
    from decodax.decoding.driver import pad_prompts

    dec = jacobi(model, window=5, init=PadInit(0), early_exit=EarlyExit(stable_iters=2))
    prompt, plen = pad_prompts(PROMPTS, pad_to=8)
    state = dec.init(params, jnp.asarray(prompt), jnp.asarray(plen), jax.random.key(0), max_new_tokens=16,
                     capacity=64)
    step = jax.jit(dec.step)
    for _ in range(6):
        state = step(params, state)
        js = state.extra
        assert isinstance(js, JacobiState)
        age, known = np.asarray(js.age), np.asarray(js.known)
        assert np.all(np.diff(age, axis=1) <= 0) and np.all(age[~known] == 0) and np.all(age[known] >= 1)
        assert np.all(np.asarray(js.stable)[~known] == 0)


def test_relaxed_count_is_a_prefix():
    js = JacobiState(jnp.zeros((2, 4, 3)), jnp.ones((2, 4), bool), jnp.asarray([[3, 2, 1, 0], [0, 0, 0, 0]]),
                     jnp.zeros((2, 4), jnp.int32), jnp.asarray([[0, 0, 0, 0], [1, 1, 0, 1]]))
    assert EarlyExit(max_iters=2)(js, 4).tolist() == [2, 0]
    assert EarlyExit(max_iters=2)(js, 1).tolist() == [1, 0]
    assert EarlyExit(stable_iters=1)(js, 4).tolist() == [0, 2]
    assert EarlyExit(max_iters=3, stable_iters=1)(js, 4).tolist() == [1, 2]


def test_bad_arguments(tiny):
    model, _ = tiny
    for bad in (lambda: EarlyExit(), lambda: EarlyExit(max_iters=0), lambda: EarlyExit(stable_iters=1.5)):
        with pytest.raises(ValueError, match="EarlyExit"):
            bad()
    with pytest.raises(ValueError, match="greedy decoding only"):
        jacobi(model, window=4, early_exit=EarlyExit(max_iters=2), sampler=sampling.make_sampler(temperature=1.0))
    with pytest.raises(ValueError, match="must be an EarlyExit"):
        jacobi(model, window=4, early_exit=2)
