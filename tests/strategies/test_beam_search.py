"""Beam search on a tiny random model.

* width 1 is greedy decoding (with EOS rows stopping early);
* width 3 with a length penalty and an EOS equals a brute-force Python beam search
  (full re-forward of every hypothesis, HF ``BeamSearchScorer`` rules: top 2W
  candidates, an EOS among the first W ranks finishes a hypothesis, a row stops when
  W are finished and the best live beam, judged at the current length, cannot beat
  them), per row, including each row's forward count;
* the selection step under the exact stopping rule (``early_stopping="never"``) equals
  the brute force on random bigram tables (no model: one small compilation);
* deterministic given the key; ValueErrors.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS

from decodax.decoding import autoregressive, generate
from decodax.strategies import beam_search
from decodax.strategies.beam_search import NEG, BeamState, _advance

W, ALPHA = 3, 0.5


def reference(next_logps, prompt, width, alpha, eos, max_new, early_stopping=False):
    """Brute-force beam search; ``next_logps(seqs)`` gives each sequence's next-token
    log-probs. Returns (best hypothesis, forwards made)."""
    beams = [([], 0.0)]  # live (tokens, summed log-prob), best first
    pool = []  # finished (length-penalised score, tokens), best first
    calls = 0
    for new_len in range(1, max_new + 1):
        logps = next_logps([prompt + toks for toks, _ in beams])
        calls += 1
        cands = [(s + float(lp[v]), toks + [v]) for (toks, s), lp in zip(beams, logps) for v in range(len(lp))]
        cands.sort(key=lambda c: -c[0])
        beams = []
        for rank, (s, toks) in enumerate(cands[: max(2, 1 + len(eos)) * width]):
            if toks[-1] in eos or new_len == max_new:
                if rank < width:
                    pool.append((s / new_len**alpha, toks))
            elif len(beams) < width:
                beams.append((toks, s))
        pool = sorted(pool, key=lambda h: -h[0])[:width]
        if new_len == max_new or (early_stopping is True and len(pool) == width):
            break
        best_len = max_new if early_stopping == "never" and alpha > 0 else new_len
        if len(pool) == width and beams[0][1] / best_len**alpha <= pool[-1][0]:
            break
    return pool[0][1], calls


def model_logps(forward):
    return lambda seqs: [lp[-1] for lp, _ in forward(seqs)]


def test_width_one_is_greedy(tiny):
    model, params = tiny
    greedy = generate(autoregressive(model), params, PROMPTS, max_new_tokens=N)
    beam = generate(beam_search(model, 1), params, PROMPTS, max_new_tokens=N)
    assert beam.rows() == greedy.rows()
    assert beam.calls.tolist() == greedy.calls.tolist()
    assert any(r[-1] == EOS and len(r) < N for r in greedy.rows())  # an EOS row is covered


def test_equals_brute_force_beam_search(tiny, forward):
    model, params = tiny
    out = generate(beam_search(model, W, length_penalty=ALPHA), params, PROMPTS, max_new_tokens=N)
    for b, prompt in enumerate(PROMPTS):
        ref, calls = reference(model_logps(forward), prompt, W, ALPHA, (EOS,), N)
        assert out.rows()[b] == ref, b
        assert int(out.calls[b]) == calls, b
    rows = out.rows()
    assert any(r[-1] == EOS for r in rows) and any(len(r) == N and EOS not in r for r in rows)
    assert any(int(c) < N for c in out.calls)  # a row finished before max_new_tokens
    assert any(len(r) < int(c) for r, c in zip(rows, out.calls))  # a hypothesis kept while the search went on
    # deterministic given the key (beam search ignores it)
    again = generate(beam_search(model, W, length_penalty=ALPHA), params, PROMPTS, max_new_tokens=N,
                     key=jax.random.key(7))
    assert again.rows() == rows and np.array_equal(again.calls, out.calls)


def test_exact_stopping_rule_on_bigram_tables():
    """The selection step (``_advance``) with ``early_stopping="never"`` (stop only when no
    live beam can beat the pool, judged at ``max_new_tokens`` when ``length_penalty > 0``)
    against the brute force, on two rows whose next-token law is a random bigram table
    (no model: one small compilation). Both rows stop later than under HF's default
    heuristic (checked on the model above) and before the maximum length."""
    v, w, alpha, eos, max_new, prompt = 11, 3, 1.0, (3,), 8, [5]
    logits = 2.0 * np.stack([np.random.default_rng(s).normal(size=(v, v)) for s in (5, 8)])
    tables = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # numpy: no compilation
    advance = jax.jit(functools.partial(_advance, eos=eos, alpha=alpha, early_stopping="never"))
    scores = np.full((2, w), NEG, np.float32)
    scores[:, 0] = 0.0
    state = BeamState(seqs=np.zeros((2, w, max_new), np.int32), scores=scores,
                      fin_seqs=np.zeros((2, w, max_new), np.int32), fin_scores=np.full((2, w), NEG, np.float32),
                      fin_len=np.zeros((2, w), np.int32), fin_valid=np.zeros((2, w), bool), length=np.int32(0))
    logp = np.broadcast_to(tables[:, prompt[-1]][:, None], (2, w, v)).astype(np.float32)
    got = {}
    for calls in range(1, max_new + 1):
        state, _, finished = advance(state, logp)
        # to numpy before indexing (eager jax indexing would compile every slice)
        finished, fin_seqs, fin_len, seqs = map(np.asarray, (finished, state.fin_seqs, state.fin_len, state.seqs))
        for b in range(2):
            if finished[b] and b not in got:  # the decoder freezes a finished row
                got[b] = (fin_seqs[b, 0, : fin_len[b, 0]].tolist(), calls)
        logp = tables[np.arange(2)[:, None], seqs[:, :, calls - 1]].astype(np.float32)
    for b in range(2):
        next_logps = lambda seqs: [tables[b][s[-1]] for s in seqs]  # noqa: E731
        ref = reference(next_logps, prompt, w, alpha, eos, max_new, "never")
        assert got[b] == ref, b
        heuristic = reference(next_logps, prompt, w, alpha, eos, max_new, False)
        assert heuristic[1] < ref[1] < max_new, b  # later than the heuristic, before the maximum


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=0), "width must be an int >= 1"),
    (dict(width=2.0), "width must be an int >= 1"),
    (dict(width=2, length_penalty=float("nan")), "length_penalty must be a finite float"),
    (dict(width=2, early_stopping="sometimes"), "early_stopping"),
    (dict(width=2, eos_ids=(97,)), r"eos_ids must be token ids in \[0, 97\)"),
])
def test_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        beam_search(tiny[0], **kwargs)
