"""Cautious next-token prediction (CNTP, Wang et al. 2025) on the tiny random model.

One compiled decoder serves every test (the entropy range travels in the params):

* with an entropy range inside the model's (~3.6 .. 4.2 nats) it equals a brute-force Python
  re-implementation (full forwards of every context and every trial, the same keys and
  categorical draws, perplexities in float64), with steps that branch into 2 or 3 trials and
  steps that sample one token;
* with an unreachable range it is plain sampling (one categorical draw per token with
  ``autoregressive``'s key schedule) token for token;
* deterministic given the key; ValueErrors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS, ROWS

from decodax.decoding import generate
from decodax.sampling import make_sampler, sample_with
from decodax.strategies import cautious
from decodax.strategies.cautious import TRIAL_STREAM, with_entropy_range

SAMPLER = make_sampler(temperature=1.0)
M, L = 3, 4  # max trials, max trial length
PUNCT = (3, 8, 17, 41, 52, 60, 66, 77, 88)
LOW, HIGH = 3.9, 4.15


@pytest.fixture(scope="module")
def decoder(tiny):
    return cautious(tiny[0], entropy_low=LOW, entropy_high=HIGH, max_trials=M, max_trial_len=L,
                    punctuation=PUNCT, sampler=SAMPLER)


def next_logps(forward, seqs):
    """The next-token log-probs (float64 [V]) after each sequence (chunks of the fixture's rows)."""
    out = []
    for i in range(0, len(seqs), ROWS):
        out += [lp[-1].astype(np.float64) for lp, _ in forward(seqs[i: i + ROWS])]
    return out


def draw(rows, key):
    """The decoder's categorical draw: one key over a [R, V] matrix of log-probs."""
    return np.asarray(sample_with(SAMPLER, jnp.asarray(np.stack(rows), jnp.float32), key))


def reference(forward, prompts, key, low, high):
    """Brute-force CNTP on the whole batch (the keys are per step, shared by the rows).
    Returns (outputs, branched steps, trial counts seen)."""
    b_n, v = len(prompts), None
    out = [[] for _ in prompts]
    done = [False] * b_n
    counts = []
    while not all(done):
        key, sub = jax.random.split(key)
        lps = next_logps(forward, [list(p) + o for p, o in zip(prompts, out)])
        v = lps[0].shape[0]
        h = [-(np.exp(lp) * lp).sum() for lp in lps]
        n = [1 if done[b] or not np.isfinite(low) else int(np.floor(1 + (M - 1) * np.clip((h[b] - low) / (high - low),
                                                                                            0, 1)))
             for b in range(b_n)]
        counts += [n[b] for b in range(b_n) if not done[b]]
        firsts = [draw(lps, sub)] + [draw(lps, jax.random.fold_in(sub, j)) for j in range(1, M)]
        new = [[int(firsts[0][b])] for b in range(b_n)]
        if any(n[b] > 1 for b in range(b_n)):
            stream = jax.random.fold_in(sub, TRIAL_STREAM)
            trials = {(b, j): ([int(firsts[j][b])], [lps[b][int(firsts[j][b])]])
                      for b in range(b_n) for j in range(n[b]) if n[b] > 1}
            ended = lambda t: t[0][-1] in PUNCT + (EOS,) or len(t[0]) == L  # noqa: E731
            for i in range(L - 1):
                going = [bj for bj, t in trials.items() if not ended(t)]
                if not going:
                    break
                logps = next_logps(forward, [list(prompts[b]) + out[b] + trials[b, j][0] for b, j in going])
                rows = [np.zeros(v)] * (b_n * M)
                for (b, j), lp in zip(going, logps):
                    rows[b * M + j] = lp
                nxt = draw(rows, jax.random.fold_in(stream, i + 1))
                for (b, j), lp in zip(going, logps):
                    tok = int(nxt[b * M + j])
                    trials[b, j][0].append(tok)
                    trials[b, j][1].append(lp[tok])
            for b in range(b_n):
                if n[b] > 1:
                    nll = [-np.mean(trials[b, j][1]) for j in range(n[b])]
                    new[b] = trials[b, int(np.argmin(nll))][0]
        for b in range(b_n):
            if done[b]:
                continue
            toks = new[b][: new[b].index(EOS) + 1] if EOS in new[b] else new[b]
            out[b] = (out[b] + toks)[:N]
            done[b] = EOS in toks or len(out[b]) >= N
    return out, counts


def test_equals_brute_force_cntp(tiny, forward, decoder):
    model, params = tiny
    p = with_entropy_range(params, LOW, HIGH)
    key = jax.random.key(3)
    got = generate(decoder, p, PROMPTS, max_new_tokens=N, key=key)
    ref, counts = reference(forward, PROMPTS, key, LOW, HIGH)
    assert got.rows() == ref
    assert {1, 2, 3} <= set(counts)  # steps that sample one token and steps that branch (2 and 3 trials)
    assert got.steps < max(len(r) for r in ref)  # some step emitted a whole trial
    # deterministic given its key
    again = generate(decoder, p, PROMPTS, max_new_tokens=N, key=key)
    assert again.rows() == got.rows() and np.array_equal(again.calls, got.calls)
    other = generate(decoder, p, PROMPTS, max_new_tokens=N, key=jax.random.key(4))
    assert other.rows() != got.rows()


def test_unreachable_threshold_is_plain_sampling(tiny, forward, decoder):
    """With ``entropy_low = inf`` no step branches: every token is one categorical draw with
    ``autoregressive``'s key schedule (the reference's one-trial path; compared with the brute
    force rather than a compiled ``autoregressive(model, SAMPLER)`` to save a compilation)."""
    model, params = tiny
    key = jax.random.key(11)
    got = generate(decoder, with_entropy_range(params, float("inf"), float("inf")), PROMPTS, max_new_tokens=N,
                   key=key)
    ref, counts = reference(forward, PROMPTS, key, float("inf"), float("inf"))
    assert got.rows() == ref and set(counts) == {1}
    assert got.calls.tolist() == [len(r) + 1 for r in got.rows()]  # the prefill, then one forward per token


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_trials=0), r"max_trials must be an int >= 1"),
    (dict(max_trial_len=0), r"max_trial_len must be an int"),
    (dict(entropy_low=-1.0), r"entropy_low must be a float >= 0"),
    (dict(entropy_low=2.0, entropy_high=1.0), r"entropy_high must be a float > entropy_low"),
    (dict(entropy_high=float("nan")), r"entropy_high must be"),
    (dict(punctuation=(97,)), r"token ids in \[0, 97\)"),
    (dict(sampler=make_sampler(repetition_penalty=1.2)), r"penalties are not supported"),
])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cautious(tiny[0], **kwargs)
    if "entropy_low" in kwargs or "entropy_high" in kwargs:
        with pytest.raises(ValueError, match=match):
            with_entropy_range(tiny[1], kwargs.get("entropy_low", 0.01), kwargs.get("entropy_high", 1.5))
