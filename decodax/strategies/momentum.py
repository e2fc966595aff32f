"""Momentum decoding (Lan et al. 2022, "Momentum Decoding: Open-ended Text Generation As Graph
Exploration") as a Decoder.

Generation is a walk on a directed graph whose nodes are the tokens of the context (prompt
and emitted tokens) and whose edges are the transitions taken so far; degeneration is the
walk going round a circular loop. Among the model's ``k`` most likely next tokens, a token
that is a new node is scored by its probability alone, and returning to an existing node is
resisted:

    x_t = argmax_{v in top-k}  p(v | x_<t) - alpha * f(d(v))

with ``d(v)`` the length of the loop the move would repeat: 0 when ``v`` is not in the
context, otherwise the longest ``n <= N`` such that the n-gram ``(x_{t-n+1} .. x_{t-1}, v)``
already occurs in the context (1 when ``v`` occurs but no longer n-gram does). ``f`` is the
resistance function, a table ``f(0) .. f(N)`` (``+inf`` blocks the move). Our reading follows
the authors' released code (gmftbyGMFTBY/MomentumDecoding, ``resistance_decoding`` /
``find_max_repetition_length``), whose defaults are the ones here: ``k = 5``,
``alpha = 0.2``, ``N = 5`` and f = (0, 0, 0, 0, 5, inf) ("ours": only repeated 4-grams are
resisted and repeated 5-grams blocked). When every candidate is blocked the most likely one
is taken. ``0 * inf`` counts as 0 (``alpha = 0`` is greedy decoding).

One forward per token, like greedy decoding (``init`` prefills and emits the first token);
deterministic, the ``key`` is unused and no ``Sampler`` applies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax.decoding.autoregressive import emit, initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.speculative.drafters import contiguous_context

__all__ = ["RESISTANCE", "momentum", "momentum_scores", "repetition_length"]

RESISTANCE = (0.0, 0.0, 0.0, 0.0, 5.0, math.inf)  # the authors' "ours" table, f(0) .. f(5)


def repetition_length(seq: Int[Array, "B L"], n: Int[Array, " B"], cand: Int[Array, "B K"],
                      max_len: int) -> Int[Array, "B K"]:
    """``d(v)`` for each candidate ``cand[b, i]`` after the context ``seq[b, :n[b]]``: 0 when it
    does not occur in the context, else the longest ``m <= max_len`` such that the m-gram
    ``seq[n-m+1 .. n-1] + (v,)`` occurs in the context (at least 1)."""
    length = seq.shape[1]
    j = jnp.arange(length)[None, :]  # where an occurrence of the candidate ends an m-gram
    run = jnp.ones(seq.shape, bool)
    match = jnp.zeros(seq.shape, jnp.int32)  # common suffix of seq[:j] and seq[:n], capped max_len - 1
    for t in range(1, max_len):
        before = jnp.take_along_axis(seq, jnp.clip(j - t, 0, length - 1), axis=1)
        tail = jnp.take_along_axis(seq, jnp.clip(n - t, 0, length - 1)[:, None], axis=1)
        run = run & (j - t >= 0) & (n - t >= 0)[:, None] & (before == tail)
        match = match + run
    occurs = (seq[:, None, :] == cand[:, :, None]) & (j < n[:, None])[:, None, :]  # [B, K, L]
    return jnp.max(jnp.where(occurs, 1 + match[:, None, :], 0), axis=-1).astype(jnp.int32)


def momentum_scores(logits: Float[Array, "B V"], seq: Int[Array, "B L"], n: Int[Array, " B"], *, k: int,
                    alpha: float, resistance: tuple[float, ...]) -> tuple[Int[Array, "B K"], Float[Array, "B K"]]:
    """The top-``k`` candidates (by logit) and their scores ``p(v) - alpha * f(d(v))``."""
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, top = jax.lax.top_k(p, k)
    d = repetition_length(seq, n, top.astype(jnp.int32), len(resistance) - 1)
    f = jnp.asarray(resistance, jnp.float32)[d]
    penalty = jnp.where(f == 0.0, 0.0, alpha * f) if alpha > 0 else jnp.zeros_like(f)
    return top.astype(jnp.int32), top_p - penalty


def _check(k, alpha, resistance):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"momentum: k must be an int >= 1, got {k!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"momentum: alpha must be a float in [0, 1], got {alpha!r}")
    try:
        table = tuple(float(x) for x in resistance)
    except (TypeError, ValueError) as e:
        raise ValueError(f"momentum: resistance must be a sequence of floats f(0) .. f(N), got {resistance!r}") \
            from e
    if len(table) < 2 or any(not (x >= 0.0) or x == -math.inf for x in table):
        raise ValueError(f"momentum: resistance must hold >= 2 values >= 0 (+inf blocks), got {resistance!r}")
    return int(k), float(alpha), table


def momentum(model, *, k: int = 5, alpha: float = 0.2, resistance: tuple[float, ...] = RESISTANCE) -> Decoder:
    """Momentum decoding (module docstring) over the top ``k`` candidates with resistance
    weight ``alpha`` in [0, 1] and resistance table ``resistance`` = f(0) .. f(N) (the
    longest loop looked for is N tokens). Memoised. Raises ``ValueError`` on bad arguments."""
    k, alpha, table = _check(k, alpha, resistance)
    if k > model.config.vocab_size:
        raise ValueError(f"momentum: k must be <= the vocabulary ({model.config.vocab_size}), got {k}")
    return _momentum(model, k, alpha, table)


@functools.lru_cache(maxsize=32)
def _momentum(model, k: int, alpha: float, table: tuple[float, ...]) -> Decoder:

    def pick(state: DecodeState, logits) -> Int[Array, " B"]:
        seq, n = contiguous_context(state)
        top, score = momentum_scores(logits, seq, n, k=k, alpha=alpha, resistance=table)
        return jnp.take_along_axis(top, jnp.argmax(score, axis=-1)[:, None], axis=1)[:, 0]

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
        state = initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + 1)
        first = pick(state, out.logits[:, 0])
        return emit(state, first[:, None], jnp.ones_like(prompt_len))

    def step(params, state: DecodeState) -> DecodeState:
        active = ~state.done
        out = model.apply(params, state.last_token[:, None], state.cache.length[:, None], state.cache)
        tok = pick(state, out.logits[:, 0])
        state = dataclasses.replace(state, cache=kv.commit(out.cache, active.astype(jnp.int32)),
                                    calls=state.calls + active)
        return emit(state, tok[:, None], jnp.ones_like(state.num_generated))

    return Decoder(init=init, step=step, model=model, max_step_tokens=1, name=f"momentum(k={k}, alpha={alpha:g})")
