"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference
Using Lookahead Decoding") as a :class:`~decodax.decoding.Decoder`.

One forward per step carries two branches over the committed cache:

* the **lookahead branch**: a 2-D window of ``N - 1`` levels x ``W`` columns of
  Jacobi guesses. Level ``j``, column ``i`` sits at position ``L + j + i``
  (``L`` = the last token's position; level 0, column 0 *is* the last token) and
  attends to the last token, level 0 columns ``1 .. i`` and levels ``1 .. j`` of
  column ``i``: each column's diagonal is one Jacobi trajectory. The last
  level's predictions become the new last level (the older levels shift down),
  and every column yields an n-gram ``(level_0[i], .., level_{N-2}[i],
  prediction[i])`` for the pool;
* the **verification branch**: the (up to) ``G`` pooled n-grams whose first token
  is the last token, each as a chain of ``N - 1`` candidates at positions
  ``L + 1 .. L + N - 1`` attending only to the last token and its own chain.
  They form a token tree (root = the last token, ``G`` chains) verified by
  :func:`~decodax.speculative.verify.verify_tree_greedy` (greedy: output identical to
  greedy decoding) or, for sampling, by
  :func:`~decodax.speculative.verify.verify_tree_sampling` with deterministic drafts
  (SpecInfer's multi-candidate rule: the output law is the target's).

The n-gram pool is a ``[V, G, N - 1]`` table per row (the ``G`` most recent
distinct n-grams starting with each token, a ring buffer as in the reference
implementation), filled from the prompt at prefill and from the lookahead
trajectory every step. The lookahead branch's guesses are the argmax of its
logits in both modes (any guess is safe: only the verification branch emits).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from decodax import sampling
from decodax.decoding.autoregressive import context_of, emit, prefill
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.speculative.tree_decoder import _tree_context
from decodax.speculative.trees import ancestor_mask
from decodax.speculative.verify import verify_tree_greedy, verify_tree_sampling

__all__ = ["LookaheadState", "lookahead", "lookahead_layout"]


class LookaheadState(NamedTuple):
    """``window [B, N - 1, W]`` (level 0 column 0 is replaced by the last token when fed);
    the n-gram pool ``pool [B, V, G, N - 1]`` with ``count`` / ``head [B, V]`` (entries
    held / next slot to overwrite per first token); ``hits [B]``: steps that accepted a
    pooled candidate."""

    window: Int[Array, "B Nm1 W"]
    pool: Int[Array, "B V G Nm1"]
    count: Int[Array, "B V"]
    head: Int[Array, "B V"]
    hits: Int[Array, " B"]


class Layout(NamedTuple):
    """The static layout of one lookahead forward (numpy)."""

    parents: np.ndarray  # [1 + G (N - 1)] the verification tree (root first)
    offsets: np.ndarray  # [T] position offsets from L
    mask: np.ndarray  # [T, T] bool, who attends to whom
    look: np.ndarray  # [N - 1, W] index into T of each window cell (level 0 column 0 = the root, 0)


@functools.lru_cache(maxsize=32)
def lookahead_layout(w: int, n: int, g: int) -> Layout:
    """Node order: root (the last token), the ``G`` verification chains (``g``-major), then
    the lookahead cells level 0 columns ``1 .. W - 1`` and levels ``1 .. N - 2``, row-major."""
    parents = [-1]
    offsets = [0]
    for c in range(g):
        for j in range(n - 1):
            parents.append(0 if j == 0 else len(parents) - 1)
            offsets.append(j + 1)
    nv = len(parents)
    look = np.zeros((n - 1, w), np.int32)
    for lvl in range(n - 1):
        for i in range(w):
            if lvl == 0 and i == 0:
                continue
            look[lvl, i] = len(offsets)
            offsets.append(lvl + i)
    t = len(offsets)
    mask = np.zeros((t, t), bool)
    mask[:nv, :nv] = ancestor_mask(np.asarray(parents, np.int32))
    for lvl in range(n - 1):
        for i in range(w):
            me = look[lvl, i]
            mask[me, look[0, : i + 1]] = True  # the last token and level 0 columns 1 .. i
            mask[me, look[1 : lvl + 1, i]] = True  # this column's cells on levels 1 .. lvl
    return Layout(np.asarray(parents, np.int32), np.asarray(offsets, np.int32), mask, look)


def _insert(pool, count, head, first, rest, valid):
    """Add the n-gram ``(first, rest)`` to each row's pool where ``valid`` and not already held."""
    b = first.shape[0]
    rows = jnp.arange(b)
    held = pool[rows, first]  # [B, G, N - 1]
    g = held.shape[1]
    dup = jnp.any((jnp.arange(g)[None, :] < count[rows, first][:, None]) & jnp.all(held == rest[:, None], -1), -1)
    do = valid & ~dup
    h = head[rows, first]
    pool = pool.at[rows, first, h].set(jnp.where(do[:, None], rest, held[rows, h]))
    count = count.at[rows, first].set(jnp.minimum(count[rows, first] + do, g))
    head = head.at[rows, first].set(jnp.where(do, (h + 1) % g, h))
    return pool, count, head


def lookahead(model, *, window: int, ngram: int, guesses: int, sampler: sampling.Sampler | None = None,
              verifier=None) -> Decoder:
    """Lookahead decoding (Fu et al. 2024) with window ``W = window``, n-gram size
    ``N = ngram`` and at most ``G = guesses`` verified candidates per step (module
    docstring). Greedy samplers give greedy decoding's tokens; other samplers keep
    the target's law (deterministic-candidate tree verification). ``verifier``
    replaces :func:`verify_tree_sampling` (negative controls in tests).

    Raises ``ValueError`` for ``W < 1``, ``N < 2``, ``G < 1``; ``generate`` raises when
    the cache has no room for the step's ``1 + G (N - 1) + (W - 1) + (N - 2) W``
    tokens after the prompt and the generation budget."""
    for name, value, low in (("window W", window, 1), ("ngram N", ngram, 2), ("guesses G", guesses, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"lookahead: {name} must be an int >= {low}, got {value!r}")
    return _lookahead(model, window, ngram, guesses, sampler or sampling.make_sampler(temperature=0.0), verifier)


@functools.lru_cache(maxsize=32)
def _lookahead(model, w: int, n: int, g: int, sampler: sampling.Sampler, verifier) -> Decoder:
    lay = lookahead_layout(w, n, g)
    t = lay.offsets.shape[0]
    nv = lay.parents.shape[0]
    anc = np.asarray(ancestor_mask(lay.parents))
    vocab = model.config.vocab_size
    greedy = sampler.is_greedy
    verify_fn = verifier or verify_tree_sampling

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        # (generate checks the longest prompt + max_new_tokens + t; slots past the capacity are dropped
        # and a candidate without a slot never matches)
        kv.check_capacity(capacity, int(max_new_tokens) + t,
                          what=f"lookahead (W={w}, N={n}, G={g}: {t} tokens per step) after {max_new_tokens} new tokens")
        key, k_win = jax.random.split(key)
        state = prefill(model, params, prompt, prompt_len, key, sampler=sampler, max_new_tokens=max_new_tokens,
                        capacity=capacity, max_step_tokens=t)
        b, p = prompt.shape
        # the window starts as tokens drawn from the row's prompt (as the reference code does)
        at = jax.random.randint(k_win, (b, n - 1, w), 0, jnp.maximum(prompt_len, 1)[:, None, None])
        win = jnp.take_along_axis(prompt, at.reshape(b, -1), axis=1).reshape(b, n - 1, w)
        pool = jnp.zeros((b, vocab, g, n - 1), jnp.int32)
        count = jnp.zeros((b, vocab), jnp.int32)
        head = jnp.zeros((b, vocab), jnp.int32)

        def add(i, carry):  # the prompt's n-grams, oldest first
            idx = i + jnp.arange(n)
            gram = jnp.take(prompt, jnp.clip(idx, 0, p - 1), axis=1)  # [B, N]
            return _insert(*carry, gram[:, 0], gram[:, 1:], i + n - 1 < prompt_len)

        pool, count, head = jax.lax.fori_loop(0, max(p - n + 1, 0), add, (pool, count, head))
        return dataclasses.replace(state, extra=LookaheadState(win.astype(jnp.int32), pool, count, head,
                                                               jnp.zeros((b,), jnp.int32)))

    def step(params, state: DecodeState) -> DecodeState:
        key, k_verify = jax.random.split(state.key)
        ls: LookaheadState = state.extra
        b = state.last_token.shape[0]
        rows = jnp.arange(b)
        last = state.last_token
        cand = ls.pool[rows, last]  # [B, G, N - 1]
        live = jnp.arange(g)[None, :] < ls.count[rows, last][:, None]
        cand = jnp.where(live[..., None], cand, -1).reshape(b, g * (n - 1))  # -1: never matches
        win = ls.window.at[:, 0, 0].set(last)
        look_tokens = win.reshape(b, -1)[:, 1:]  # level 0 columns 1.., then levels 1..
        tokens = jnp.concatenate([last[:, None], jnp.maximum(cand, 0), look_tokens], axis=1)  # [B, T]
        positions = state.cache.length[:, None] + jnp.asarray(lay.offsets)[None, :]
        out = model.apply(params, tokens, positions, state.cache, attn_mask=jnp.broadcast_to(lay.mask, (b, t, t)))
        logits = out.logits[:, :nv]
        vtokens = jnp.concatenate([last[:, None], cand], axis=1)
        fits = state.cache.length[:, None] + jnp.arange(nv)[None, :] < state.cache.capacity
        vtokens = jnp.where(fits, vtokens, -1)
        if sampler.needs_context:
            ctx, mask = context_of(state)
            full, m = _tree_context(ctx, mask, jnp.maximum(cand, 0), anc)
            target = (sampling.process if greedy else sampling.probs)(sampler, logits, full, m)
        else:
            target = logits if greedy else sampling.probs(sampler, logits)
        if greedy:
            res = verify_tree_greedy(vtokens, lay.parents, target, max_depth=n - 1)
        else:
            res = verify_fn(vtokens, lay.parents, None, target, k_verify)
        path, accepted = res.path, res.accepted_len
        on_path = jnp.take_along_axis(vtokens, jnp.maximum(path, 0), axis=1)
        new = jnp.concatenate([on_path[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        new = new.at[rows, accepted].set(res.next_token.astype(jnp.int32))
        count = accepted + 1
        active = ~state.done

        # lookahead branch: new last level, n-grams along each column's diagonal
        pred = jnp.argmax(out.logits[:, lay.look[n - 2]], axis=-1).astype(jnp.int32)  # [B, W]
        grams = jnp.concatenate([win, pred[:, None]], axis=1)  # [B, N, W]: column i is one n-gram
        pool, cnt, head = ls.pool, ls.count, ls.head
        for i in range(w):
            pool, cnt, head = _insert(pool, cnt, head, grams[:, 0, i], grams[:, 1:, i], active)
        window = jnp.concatenate([win[:, 1:], pred[:, None]], axis=1)

        state = dataclasses.replace(state, cache=kv.gather(out.cache, path, jnp.where(active, count, 0)), key=key,
                                    calls=state.calls + active)
        state = emit(state, new, count)
        extra = LookaheadState(window, pool, cnt, head, ls.hits + (active & (accepted > 0)))
        return dataclasses.replace(state, extra=extra)

    # max_step_tokens sizes the cache slack: a step emits <= N tokens but writes T slots
    return Decoder(init=init, step=step, model=model, max_step_tokens=t,
                   name=f"lookahead[W={w}, N={n}, G={g}]")
