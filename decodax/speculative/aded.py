"""ADED (Liu et al. 2024, "Adaptive Draft-Verification for Efficient Large Language
Model Decoding"): a training-free tree drafter from an adaptive tri-gram matrix.

What is kept from the paper:

* **tri-gram matrix representation of the LLM**: next-token statistics given the
  last two tokens, updated *during decoding* from the target's own outputs (so
  it adapts to the model and the current text);
* **draft search balancing exploitation and exploration** with a PUCT score
  (the AlphaZero-style bound the paper's MCTS uses): for context ``s`` and
  candidate ``a``, ``score = P(s, a) * (1 + c * sqrt(N(s)) / (1 + n(s, a)))``
  with ``P`` the tri-gram probability (counts, normalised), ``n(s, a)`` how many
  times ``a`` was drafted in context ``s`` and ``N(s) = sum_a n(s, a)``; drafted
  but never confirmed continuations lose rank, rarely tried ones gain it;
* **tree verification** of the resulting drafts (via :func:`tree_speculative`).

Simplifications (stated honestly):

* no external corpus: the matrix starts from the prompt (its tri-grams, and the
  target's top-1 prediction after every prompt bigram from the prefill logits);
* the matrix is a fixed-size hashed table per batch row: ``H`` buckets, each
  owned by one context ``(t-2, t-1)`` (direct-mapped; a new context evicts the
  bucket) holding its top-``m`` next tokens with counts and visit counts;
  a full bucket replaces its lowest-count entry;
* updates per step: the emitted tri-grams (count + 1) and, for every tree node,
  the target's top-1 next token in that node's context (count + 1);
* instead of several MCTS simulations per step, one PUCT-ranked expansion of a
  static tree template: the child of rank ``r`` is the candidate with the
  ``r``-th highest score (a draft **tree**, not a chain); unknown contexts
  propose their parent token as filler;
* no adaptive draft length / tree-size control.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from decodax.decoding.state import DecodeState
from decodax.speculative import trees
from decodax.speculative.drafters import Drafter, Proposal, contiguous_context
from decodax.speculative.token_recycling import _TemplateKey, tr_template

__all__ = ["ADEDState", "aded", "aded_template"]


class ADEDState(NamedTuple):
    """Per-row hashed tri-gram table of ``H`` buckets with ``M`` entries each.

    ``ids[b, h] = (t-2, t-1, x_1 .. x_M)``: the context owning bucket ``h`` and its
    candidate next tokens (``-1``: empty); ``stats[b, h] = (counts[M], visits[M])``.
    """

    ids: Int[Array, "B H M+2"]
    stats: Float[Array, "B H 2 M"]

    @property
    def tok(self):
        return self.ids[..., 2:]

    @property
    def count(self):
        return self.stats[..., 0, :]

    @property
    def visits(self):
        return self.stats[..., 1, :]


def aded_template(num_nodes: int = 40, width: int = 4, max_depth: int = 6) -> trees.TreeTemplate:
    """Default ADED draft tree: :func:`tr_template` with ``num_nodes`` nodes and ``width`` ranks."""
    return tr_template(num_nodes=num_nodes, width=width, max_depth=max_depth)


def aded(*, buckets: int = 4096, top_m: int = 8, template: trees.TreeTemplate | None = None,
         explore: float = 1.0) -> Drafter:
    """ADED drafter (Liu et al. 2024) for :func:`tree_speculative`; see the module docstring.

    ``buckets`` (a power of 2) tri-gram contexts per row, ``top_m`` next tokens
    each; ``template`` defaults to :func:`aded_template` (40 nodes, ranks < 4;
    ranks must be ``< top_m``); ``explore`` is the PUCT constant ``c``.
    Deterministic drafts (``probs=None``).
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1 or buckets & (buckets - 1):
        raise ValueError(f"aded: buckets must be a power of 2, got {buckets!r}")
    if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1:
        raise ValueError(f"aded: top_m must be an int >= 1, got {top_m!r}")
    if not (isinstance(explore, (int, float)) and explore >= 0):
        raise ValueError(f"aded: explore must be a number >= 0, got {explore!r}")
    template = aded_template(width=min(4, top_m)) if template is None else template
    if not isinstance(template, trees.TreeTemplate):
        raise ValueError(f"aded: template must be a TreeTemplate, got {type(template).__name__}")
    trees.validate_parents(template.parents)
    if template.num_nodes < 2 or int(template.rank[1:].max()) >= top_m:
        raise ValueError(f"aded: template needs >= 2 nodes and ranks < top_m = {top_m}")
    return _aded(buckets, top_m, _TemplateKey(template), float(explore))


def _hash(a: Array, b: Array, h: int) -> Array:
    a = a.astype(jnp.uint32)
    b = b.astype(jnp.uint32)
    x = (a * jnp.uint32(73856093)) ^ (b * jnp.uint32(19349663)) ^ jnp.uint32(0x9E3779B9)
    x = x ^ (x >> 15)
    return (x & jnp.uint32(h - 1)).astype(jnp.int32)


def insert(st: ADEDState, a: Int[Array, "B E"], b: Int[Array, "B E"], x: Int[Array, "B E"],
           w: Float[Array, "B E"]) -> ADEDState:
    """Add ``w`` to the count of tri-gram ``(a, b) -> x``, one insertion at a time (a ``lax.scan``
    over ``E``; rows in parallel). A bucket owned by another context is evicted; a full
    bucket replaces its lowest-count entry. Entries with ``w == 0`` change nothing."""
    nb, h = st.ids.shape[:2]
    rows = jnp.arange(nb)

    def one(tab, e):
        ids, stats = tab
        ea, eb, ex, ew = e
        hh = _hash(ea, eb, h)
        row, srow = ids[rows, hh], stats[rows, hh]  # [B, M + 2], [B, 2, M]
        same = (row[:, 0] == ea) & (row[:, 1] == eb)
        t = jnp.where(same[:, None], row[:, 2:], -1)
        c = jnp.where(same[:, None], srow[:, 0], 0.0)
        v = jnp.where(same[:, None], srow[:, 1], 0.0)
        match = t == ex[:, None]
        has = match.any(-1)
        j = jnp.where(has, jnp.argmax(match, -1), jnp.argmin(c, -1))
        onehot = jnp.arange(t.shape[1])[None, :] == j[:, None]
        t = jnp.where(onehot, ex[:, None], t)
        c = jnp.where(onehot, c + ew[:, None], c)
        v = jnp.where(onehot & ~has[:, None], 0.0, v)
        hh = jnp.where(ew > 0, hh, h)  # out of range: dropped
        ids = ids.at[rows, hh].set(jnp.concatenate([ea[:, None], eb[:, None], t], 1), mode="drop")
        stats = stats.at[rows, hh].set(jnp.stack([c, v], 1), mode="drop")
        return (ids, stats), None

    xs = tuple(jnp.moveaxis(jnp.asarray(y), 1, 0) for y in (a.astype(jnp.int32), b.astype(jnp.int32),
                                                             x.astype(jnp.int32), w.astype(jnp.float32)))
    (ids, stats), _ = jax.lax.scan(one, (st.ids, st.stats), xs)
    return ADEDState(ids, stats)


def puct_ranking(st: ADEDState, a: Int[Array, "B n"], b: Int[Array, "B n"], explore: float):
    """Candidates of contexts ``(a, b)`` ordered by the PUCT score, best first.

    Returns ``(tokens [B, n, M], flat slot [B, n, M] = bucket * M + entry, valid [B, n, M])``."""
    nb, h, m = st.ids.shape[0], st.ids.shape[1], st.ids.shape[2] - 2
    rows = jnp.arange(nb)[:, None]
    hh = _hash(a, b, h)  # [B, n]
    row, srow = st.ids[rows, hh], st.stats[rows, hh]  # [B, n, M + 2], [B, n, 2, M]
    same = (row[..., 0] == a) & (row[..., 1] == b)
    t, c, v = row[..., 2:], srow[..., 0, :], srow[..., 1, :]
    valid = same[..., None] & (t >= 0) & (c > 0)
    c = jnp.where(valid, c, 0.0)
    prior = c / jnp.maximum(c.sum(-1, keepdims=True), 1e-9)
    n_s = jnp.where(valid, v, 0.0).sum(-1, keepdims=True)
    score = prior * (1.0 + explore * jnp.sqrt(n_s) / (1.0 + v))
    score = jnp.where(valid, score, -1.0)
    order = jax.lax.top_k(score, m)[1]  # best first (ties: lower entry first)
    take = lambda z: jnp.take_along_axis(z, order, axis=-1)  # noqa: E731
    slot = hh[..., None] * m + order
    return take(t), slot, take(valid)


@functools.lru_cache(maxsize=64)
def _aded(buckets: int, m: int, tkey: _TemplateKey, explore: float) -> Drafter:
    template = tkey.template
    n = template.num_nodes
    parents = template.parents

    def empty(b):
        return ADEDState(jnp.full((b, buckets, m + 2), -1, jnp.int32), jnp.zeros((b, buckets, 2, m)))

    def init(params, state: DecodeState, *, logits=None) -> ADEDState:
        b = state.prompt.shape[0]
        st = empty(b)
        seq, length = contiguous_context(state)  # prompt + first emitted token
        pos = jnp.arange(2, seq.shape[1])[None, :]
        ok = (pos < length[:, None]).astype(jnp.float32)
        parts = [(seq[:, :-2], seq[:, 1:-1], seq[:, 2:], jnp.broadcast_to(ok, seq[:, 2:].shape))]
        if logits is not None:  # the target's top-1 after every prompt bigram
            p = state.prompt
            ok = ((jnp.arange(1, p.shape[1])[None, :] < state.prompt_len[:, None])).astype(jnp.float32)
            parts.append((p[:, :-1], p[:, 1:], jnp.argmax(logits[:, 1:], -1), ok))
        return insert(st, *(jnp.concatenate([q[i].astype(parts[0][i].dtype) for q in parts], 1)
                            for i in range(4)))

    def propose(params, state: DecodeState, dstate: ADEDState, key, *, k, sampler=None) -> Proposal:
        if k != n - 1:
            raise ValueError(f"aded: template has {n - 1} draft nodes, asked for k = {k}")
        seq, length = contiguous_context(state)
        before = jnp.take_along_axis(seq, jnp.maximum(length - 2, 0)[:, None], axis=1)[:, 0]
        nb = seq.shape[0]
        prev = jnp.zeros((nb, n), jnp.int32).at[:, 0].set(before)  # token before each node's token
        tok = jnp.zeros((nb, n), jnp.int32).at[:, 0].set(state.last_token)
        slots = jnp.full((nb, n), -1, jnp.int32)
        for d in range(1, template.max_depth + 1):  # BFS expansion, PUCT-ranked children
            idx = np.nonzero(template.depth == d)[0]
            par = parents[idx]
            cand, slot, valid = puct_ranking(dstate, prev[:, par], tok[:, par], explore)
            r = jnp.asarray(template.rank[idx])[None, :, None]
            pick = lambda z: jnp.take_along_axis(z, jnp.broadcast_to(r, z.shape[:2] + (1,)), -1)[..., 0]  # noqa
            ok = pick(valid)
            tok = tok.at[:, idx].set(jnp.where(ok, pick(cand), tok[:, par]))
            prev = prev.at[:, idx].set(tok[:, par])
            slots = slots.at[:, idx].set(jnp.where(ok, pick(slot), -1))
        h = dstate.ids.shape[1]
        bucket, entry = slots // m, slots % m
        bucket = jnp.where(slots >= 0, bucket, h)  # out of range: dropped
        stats = dstate.stats.at[jnp.arange(nb)[:, None], bucket, 1, entry].add(1.0, mode="drop")
        dstate = dstate._replace(stats=stats)
        return Proposal(tok[:, 1:], None, jnp.full((nb,), n - 1, jnp.int32), dstate)

    def update(dstate: ADEDState, state: DecodeState, accepted, *, logits=None, tokens=None, path=None):
        if logits is None or tokens is None or tokens.shape[1] != n:
            return dstate
        seq, length = contiguous_context(state)  # after emit
        nb = seq.shape[0]
        live = (~state.done).astype(jnp.float32)
        # the target's top-1 after every tree node, in the node's tri-gram context
        emitted_before = length - jnp.where(state.done, 0, accepted + 1)
        before_root = jnp.take_along_axis(seq, jnp.maximum(emitted_before - 2, 0)[:, None], axis=1)
        par_tok = jnp.concatenate([before_root, tokens[:, jnp.maximum(jnp.asarray(parents[1:]), 0)]], axis=1)
        node_w = jnp.broadcast_to(live[:, None], (nb, n))
        # the emitted tri-grams (accepted path + next token)
        e = template.max_depth + 1
        j = jnp.arange(e)[None, :]
        pos = emitted_before[:, None] + j  # positions in seq of the emitted tokens
        at = lambda q: jnp.take_along_axis(seq, jnp.clip(q, 0, seq.shape[1] - 1), axis=1)  # noqa: E731
        emit_w = ((j <= accepted[:, None]) & (pos >= 2)).astype(jnp.float32) * live[:, None]
        a = jnp.concatenate([par_tok, at(pos - 2)], axis=1)
        b = jnp.concatenate([tokens, at(pos - 1)], axis=1)
        x = jnp.concatenate([jnp.argmax(logits, -1).astype(jnp.int32), at(pos)], axis=1)
        return insert(dstate, a, b, x, jnp.concatenate([node_w, emit_w], axis=1))

    return Drafter(init=init, propose=propose, update=update, name=f"aded(N={n}, H={buckets}, m={m})",
                   may_be_empty=False, template=template.paths, wants_logits=True)
