"""AdaDec (He et al. 2025, "Towards Better Code Generation: Adaptive Decoding with Uncertainty
Guidance", arXiv 2506.08980) as a Decoder, and its per-model entropy threshold.

Decoding is greedy, except at *uncertain* steps: when the Shannon entropy ``H`` (nats) of the
model's next-token distribution exceeds a learned, model-specific threshold, decoding *pauses*
and *reranks* the ``k`` most likely tokens by a lookahead: each candidate ``c`` is continued
greedily for ``L`` tokens and scored by the likelihood of the ``1 + L`` tokens,

    score(c) = mean over (c, g_1 .. g_L) of log p(token | context, earlier tokens)

(the mean, over the tokens up to and including an EOS when one occurs in the window; without
an EOS it ranks exactly as the summed log-likelihood). Only the best candidate is committed;
the lookahead tokens are discarded (the next step decides the next token afresh). Ties go to
the more likely candidate.

The threshold (:func:`fit_threshold`) follows the authors' procedure (``prepare_adadec.py`` in
their release): teacher-force reference solutions, record at every position the entropy and
whether the reference token is the model's top-1 (label 1) or not (0); fit a logistic regression
``P(top-1 | H) = sigmoid(w H + b)`` on a class-balanced subsample of a training split; choose the
probability cut-off ``p*`` in ``0.01 .. 0.99`` that maximises accuracy on the held-out split; the
entropy threshold is where the fitted curve crosses it, ``(logit(p*) - b) / w``.
:func:`entropy_labels` computes the (entropy, label) pairs of a batch of sequences.

On device, with static shapes: ``DecodeState.extra`` holds the next-token logits after the
context (the last emitted token is already in the cache, as in contrastive search), so ``init``
only prefills. A step with no pausing row (``lax.cond``) is one greedy ``T = 1`` forward. Otherwise
the cache rows are repeated ``k`` times (``take_rows``; row ``b * k + j`` holds candidate ``j``)
and ``L`` batched ``T = 1`` forwards feed ``c, g_1 .. g_{L-1}``; the chosen candidate's row is
gathered back with only its first entry (``c``) committed, and its first lookahead logits are the
next step's. A row that does not pause takes candidate 0 (the greedy token). Deterministic: the
``key`` is unused and no ``Sampler`` applies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from decodax.decoding.autoregressive import emit, initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.model.cache import init_cache
from decodax.strategies.cautious import entropy

__all__ = ["THRESHOLD_KEY", "AdaDecState", "adadec", "entropy_labels", "fit_threshold", "with_threshold"]

THRESHOLD_KEY = "adadec_threshold"  # params entry overriding the threshold at run time


def _check_threshold(threshold, where: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise ValueError(f"{where}: threshold must be a float >= 0 (inf: never pause), got {threshold!r}")
    return float(threshold)


def with_threshold(params: dict, threshold: float) -> dict:
    """``params`` plus a run-time entropy threshold for :func:`adadec` decoders (traced: one
    compilation serves every threshold, e.g. a learned one; without it the decoder's applies)."""
    return {**params, THRESHOLD_KEY: jnp.float32(_check_threshold(threshold, "with_threshold"))}


class AdaDecState(NamedTuple):
    """``logits[b]``: the next-token logits after row b's context (its last emitted token is
    already in the cache)."""

    logits: Float[Array, "B V"]


def fit_threshold(entropies: Float[np.ndarray, " N"], labels: Bool[np.ndarray, " N"], *, test_size: float = 0.2,
                  seed: int = 42) -> float:
    """AdaDec's learned entropy threshold (module docstring) from per-position ``entropies`` and
    ``labels`` (True where the reference token was the model's top-1). Host-side numpy;
    deterministic given ``seed`` (the split and the balanced subsample). Raises ``ValueError``
    when the data cannot define a threshold (one class only, no finite entropies, or a fitted
    slope of 0)."""
    h = np.asarray(entropies, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if h.shape != y.shape:
        raise ValueError(f"fit_threshold: {h.size} entropies but {y.size} labels")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"fit_threshold: test_size must be in (0, 1), got {test_size!r}")
    ok = np.isfinite(h)
    h, y = h[ok], y[ok]
    if h.size < 4 or y.all() or not y.any():
        raise ValueError("fit_threshold: need finite entropies of both labels (top-1 and not top-1), "
                         f"got {int(y.sum())} / {int((~y).sum())}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(h.size)
    n_test = max(1, int(round(test_size * h.size)))
    test, train = order[:n_test], order[n_test:]
    pos, neg = train[y[train]], train[~y[train]]
    if pos.size and neg.size:  # class-balanced training sample, as the authors'
        n = min(pos.size, neg.size)
        train = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
    w, b = _logistic_1d(h[train], y[train].astype(np.float64))
    if w == 0.0 or not math.isfinite(w):
        raise ValueError("fit_threshold: the fitted logistic slope is 0; entropy does not separate the labels")
    prob = 1.0 / (1.0 + np.exp(-(w * h[test] + b)))
    cuts = np.arange(1, 100) / 100.0
    acc = [np.mean((prob >= c) == y[test]) for c in cuts]
    p = float(cuts[int(np.argmax(acc))])
    return float((math.log(p / (1.0 - p)) - b) / w)


def _logistic_1d(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, iters: int = 100) -> tuple[float, float]:
    """Weakly L2-regularised logistic regression ``sigmoid(w x + b)`` by Newton's method."""
    mu, sd = x.mean(), x.std() or 1.0
    z = (x - mu) / sd
    theta = np.zeros(2)
    a = np.stack([z, np.ones_like(z)], axis=1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (p - y) + l2 * np.array([theta[0], 0.0])
        hess = (a * (p * (1 - p))[:, None]).T @ a + l2 * np.diag([1.0, 0.0]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    w = theta[0] / sd
    return float(w), float(theta[1] - w * mu)


def entropy_labels(model, params, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced (entropy, top-1) pairs for :func:`fit_threshold`: for every sequence
    (prompt followed by its reference solution) and every reference position ``t >=
    prompt_len``, the entropy of ``p(. | seq[:t])`` and whether ``seq[t]`` is its argmax.
    One full forward (no cache reuse) of the padded batch."""
    if len(sequences) != len(prompt_lens) or not sequences:
        raise ValueError("entropy_labels: give one prompt length per sequence (and >= 1 sequence)")
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    logits = np.asarray(_teacher_forced(model, params, jnp.asarray(tokens)), np.float64)
    hs, ys = [], []
    for i, (s, p) in enumerate(zip(sequences, prompt_lens)):
        if not 1 <= p < len(s):
            raise ValueError(f"entropy_labels: prompt length {p} of sequence {i} must be in [1, {len(s) - 1}]")
        lg = logits[i, p - 1: len(s) - 1]
        lp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
        hs.append(-np.sum(np.exp(lp) * lp, axis=-1))
        ys.append(np.argmax(lg, axis=-1) == np.asarray(s[p:]))
    return np.concatenate(hs), np.concatenate(ys)


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(model, params, tokens):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return model.apply(params, tokens, positions, init_cache(model.config, b, t), empty_cache=True).logits


def adadec(model, threshold: float, *, k: int = 3, lookahead: int = 5, eos_ids: Sequence[int] | None = None
           ) -> Decoder:
    """AdaDec (module docstring): greedy decoding that pauses where the next-token entropy
    exceeds ``threshold`` (nats, ``>= 0``; ``inf``: never, i.e. greedy decoding; learn it with
    :func:`fit_threshold`; :func:`with_threshold` overrides it at run time) and reranks the top
    ``k >= 1`` tokens by a greedy ``lookahead >= 1`` tokens deep; ``eos_ids`` (default: the
    model's) end a lookahead. Memoised on its arguments. Raises ``ValueError`` on bad arguments."""
    vocab = model.config.vocab_size
    threshold = _check_threshold(threshold, "adadec")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
        raise ValueError(f"adadec: k must be an int in [1, {vocab}] (the vocabulary), got {k!r}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, numbers.Integral) or not 1 <= lookahead \
            <= model.config.max_seq_len:
        raise ValueError(f"adadec: lookahead must be an int >= 1, got {lookahead!r}")
    eos = tuple(model.config.eos_ids if eos_ids is None else eos_ids)
    if any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < vocab for e in eos):
        raise ValueError(f"adadec: eos_ids must be token ids in [0, {vocab}), got {eos!r}")
    return _adadec(model, float(threshold), int(k), int(lookahead), tuple(int(e) for e in eos))


@functools.lru_cache(maxsize=32)
def _adadec(model, threshold: float, k: int, depth: int, eos: tuple[int, ...]) -> Decoder:
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
        return initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + depth,
                             extra=AdaDecState(out.logits[:, 0]))

    def step(params, state: DecodeState) -> DecodeState:
        active = ~state.done
        one = active.astype(jnp.int32)
        b = state.last_token.shape[0]
        logits = state.extra.logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        limit = params[THRESHOLD_KEY] if isinstance(params, dict) and THRESHOLD_KEY in params else threshold
        pause = active & (entropy(logp) > limit)
        cache = state.cache

        def plain(_):
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            out = model.apply(params, tok[:, None], cache.length[:, None], cache)
            return tok, kv.commit(out.cache, one), out.logits[:, 0], one

        def rerank(_):
            r = b * k
            top_lp, cand = jax.lax.top_k(logp, k)  # candidate 0 is the greedy token
            cand = cand.astype(jnp.int32).reshape(r)

            def body(i, c):
                cache_i, tok, total, n, live, first = c
                out = model.apply(params, tok[:, None], cache_i.length[:, None], cache_i)
                lg = out.logits[:, 0].astype(jnp.float32)
                lp = jax.nn.log_softmax(lg, axis=-1)
                live = live & ~jnp.isin(tok, eos_ids)  # an EOS ends the sequence: nothing follows it
                nxt = jnp.argmax(lg, axis=-1).astype(jnp.int32)
                total = total + jnp.where(live, jnp.max(lp, axis=-1), 0.0)
                first = jnp.where(i == 0, out.logits[:, 0], first)
                return kv.commit(out.cache, 1), nxt, total, n + live, live, first

            rows = jnp.repeat(jnp.arange(b), k)
            carry = (kv.take_rows(cache, rows), cand, top_lp.reshape(r), jnp.ones((r,), jnp.float32),
                     jnp.ones((r,), bool), jnp.zeros((r, logits.shape[-1]), state.extra.logits.dtype))
            looked, _, total, n, _, first = jax.lax.fori_loop(0, depth, body, carry)
            score = (total / n).reshape(b, k)
            best = jnp.where(pause, jnp.argmax(score, axis=1), 0)
            pick = jnp.arange(b) * k + best
            # keep the chosen candidate's own entry (slot length); its lookahead entries are dropped
            kept = kv.rollback(kv.take_rows(looked, pick), cache.length + one)
            return cand[pick], kept, first[pick], one * depth

        tok, new_cache, nxt, forwards = jax.lax.cond(jnp.any(pause), rerank, plain, None)
        state = dataclasses.replace(state, cache=new_cache, calls=state.calls + forwards,
                                    extra=AdaDecState(jnp.where(active[:, None], nxt, state.extra.logits)))
        return emit(state, tok[:, None], jnp.ones((b,), jnp.int32))

    return Decoder(init=init, step=step, model=model, max_step_tokens=depth,
                   name=f"adadec(H>{threshold:g}, k={k}, L={depth})")
