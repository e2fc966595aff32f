"""Tree speculative decoding as a :class:`~decodax.decoding.Decoder` (SpecInfer-style).

Every step a tree drafter fills the ``N - 1`` non-root nodes of a static
:class:`~decodax.speculative.trees.TreeTemplate` (node 0 is ``last_token``),
one target forward scores all ``N`` nodes under the ancestor mask, the tree
verifier picks the accepted path, and ``KVCache.gather`` moves that path's
entries into place and commits them. See :mod:`decodax.speculative.trees`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from decodax import sampling
from decodax.decoding.autoregressive import context_of, emit, prefill
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.speculative import trees
from decodax.speculative.drafters import Drafter
from decodax.speculative.verify import verify_tree_greedy, verify_tree_sampling

__all__ = ["drafter_prefill", "drafter_update", "tree_speculative"]


# --------------------------------------------------------------------------- shared helpers


def drafter_prefill(model, drafter: Drafter, params, prompt: Int[Array, "B P"], prompt_len: Int[Array, " B"],
                    key: PRNGKeyArray, *, sampler: sampling.Sampler, max_new_tokens: int, capacity: int,
                    max_step_tokens: int) -> DecodeState:
    """``prefill`` then ``drafter.init``; a ``wants_logits`` drafter also gets the target's
    logits at every prompt position (``logits=[B, P, V]``), a ``wants_hidden`` one the
    last-layer hidden states (``hidden=[B, P, D]``)."""
    kwargs = dict(sampler=sampler, max_new_tokens=max_new_tokens, capacity=capacity, max_step_tokens=max_step_tokens)
    if not (drafter.wants_logits or drafter.wants_hidden):
        state = prefill(model, params, prompt, prompt_len, key, **kwargs)
        return dataclasses.replace(state, extra=drafter.init(params, state))
    state, hidden = prefill(model, params, prompt, prompt_len, key, with_hidden=True, **kwargs)
    extra = {}
    if drafter.wants_logits:
        extra["logits"] = model.logits(params, hidden)
    if drafter.wants_hidden:
        extra["hidden"] = hidden
    return dataclasses.replace(state, extra=drafter.init(params, state, **extra))


def drafter_update(drafter: Drafter, dstate: Any, state: DecodeState, accepted: Int[Array, " B"], *,
                   logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], path: Int[Array, "B P"],
                   hidden: Float[Array, "B T D"] | None = None, taps: Array | None = None) -> Any:
    """``drafter.update``, with the verify logits / fed tokens / accepted path / hidden states
    (last layer, or the tapped layers) when it wants them."""
    extra = {}
    if drafter.taps:
        extra.update(taps=taps, tokens=tokens, path=path)
    if drafter.wants_logits:
        extra.update(logits=logits, tokens=tokens, path=path)
    if drafter.wants_hidden:
        extra.update(hidden=hidden, path=path)
    return drafter.update(dstate, state, accepted, **extra)


def _is_chain(parents: np.ndarray) -> bool:
    return bool(np.array_equal(parents, np.arange(-1, parents.shape[0] - 1)))


# --------------------------------------------------------------------------- decoder


def tree_speculative(model, drafter: Drafter, *, template: trees.TreeTemplate | None = None,
                     sampler: sampling.Sampler | None = None, verifier=None) -> Decoder:
    """Tree speculative decoding (SpecInfer, Miao et al. 2024; the verify step of
    Medusa, EAGLE, Token Recycling and ADED).

    Each step the drafter proposes the tokens of nodes ``1 .. N - 1`` of the
    static ``template`` (node 0 = ``last_token``); one target forward of all
    ``N`` nodes at positions ``length + depth`` under the ancestor mask scores
    every node; :func:`verify_tree_greedy` (temperature 0: token-identical to
    greedy decoding) or :func:`verify_tree_sampling` on ``sampling.probs`` of
    target and draft alike (``probs=None``: deterministic drafts, point masses)
    picks the accepted path; the step emits ``accepted + 1`` tokens and commits
    the path with ``KVCache.gather``. ``verifier`` replaces the sampling
    verifier (``(tokens[B, N], parents[N], draft_probs[B, N, V] | None,
    target_probs[B, N, V], key) -> TreeVerifyResult``; tests use it for negative
    controls). ``template`` defaults to ``drafter.template``; a chain drafter
    (``template=None``) needs a chain template.

    ``Decoder.max_step_tokens`` is ``N`` (the cache slack the step writes), the
    output buffer holds ``depth + 1`` tokens per step; nodes whose cache slot
    would fall past the capacity are never accepted. Memoised on its (hashable)
    arguments, so ``generate`` reuses compilations.
    """
    if not isinstance(drafter, Drafter):
        raise ValueError(f"tree_speculative: drafter must be a Drafter (init, propose, update), "
                         f"got {type(drafter).__name__}")
    if drafter.taps:
        raise ValueError(f"tree_speculative: {drafter.name} reads layer taps, which only the chain decoder provides")
    own = None if drafter.template is None else trees.tree_from_paths(drafter.template)
    if template is None:
        template = own
    if template is None:
        raise ValueError("tree_speculative: needs a template (a TreeTemplate), the drafter has none")
    if not isinstance(template, trees.TreeTemplate):
        raise ValueError(f"tree_speculative: template must be a TreeTemplate, got {type(template).__name__}")
    parents = trees.validate_parents(template.parents)  # ValueError on a bad tree
    if parents.ndim != 1 or parents.shape[0] < 2:
        raise ValueError(f"tree_speculative: the template needs a root and >= 1 draft node, got parents "
                         f"{parents.tolist()}")
    if own is not None and not np.array_equal(own.parents, parents):
        raise ValueError(f"tree_speculative: template ({parents.shape[0]} nodes) differs from the drafter's "
                         f"own template ({own.num_nodes} nodes)")
    if own is None and not _is_chain(parents):
        raise ValueError("tree_speculative: a chain drafter (template=None) proposes a chain; give it "
                         "trees.chain_tree(k), or use a tree drafter")
    sampler = sampler or sampling.make_sampler(temperature=0.0)
    return _tree_speculative(model, drafter, _Static(parents), sampler, verifier)


class _Static:
    """Hashable wrapper of the template's parent array (a memoisation key)."""

    def __init__(self, parents: np.ndarray):
        self.parents = parents
        self._key = tuple(parents.tolist())

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _tree_context(ctx, mask, drafts, anc):
    """Context of node ``i`` = context + the drafts on the path root..i: ``[B, N, L + N - 1]``."""
    b, n1 = drafts.shape
    n, l = n1 + 1, ctx.shape[1]
    full = jnp.broadcast_to(jnp.concatenate([ctx, drafts], axis=1)[:, None], (b, n, l + n1))
    m = jnp.concatenate([jnp.broadcast_to(mask[:, None], (b, n, l)),
                         jnp.broadcast_to(jnp.asarray(anc[:, 1:])[None], (b, n, n1))], axis=2)
    return full, m


@functools.lru_cache(maxsize=64)
def _tree_speculative(model, drafter: Drafter, static: _Static, sampler: sampling.Sampler, verifier) -> Decoder:
    parents = static.parents
    n = parents.shape[0]
    depth = np.asarray(trees.tree_depths(parents))
    max_depth = int(depth.max())
    anc = np.asarray(trees.ancestor_mask(parents))  # [N, N] bool
    greedy = sampler.is_greedy
    verify_fn = verifier or verify_tree_sampling
    vocab = model.config.vocab_size

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        kv.check_capacity(capacity, int(max_new_tokens) + n, what=f"a {n}-node token tree after "
                          f"{max_new_tokens} new tokens")
        return drafter_prefill(model, drafter, params, prompt, prompt_len, key, sampler=sampler,
                               max_new_tokens=max_new_tokens, capacity=capacity,
                               max_step_tokens=max_depth + 1)

    def target_of(logits, state, drafts):
        """Greedy: logits whose argmax is the greedy token; sampling: probabilities."""
        if not sampler.needs_context:
            return logits if greedy else sampling.probs(sampler, logits)
        ctx, mask = context_of(state)
        full, m = _tree_context(ctx, mask, drafts, anc)
        return (sampling.process if greedy else sampling.probs)(sampler, logits, full, m)

    def step(params, state: DecodeState) -> DecodeState:
        key, k_draft, k_verify = jax.random.split(state.key, 3)
        prop = drafter.propose(params, state, state.extra, k_draft, k=n - 1, sampler=sampler)
        drafts = jnp.clip(prop.tokens.astype(jnp.int32), 0, vocab - 1)
        b = drafts.shape[0]
        tokens = jnp.concatenate([state.last_token[:, None], drafts], axis=1)  # [B, N]
        cache = state.cache
        positions = cache.length[:, None] + jnp.asarray(depth)[None, :]
        mask = jnp.broadcast_to(jnp.asarray(anc), (b, n, n))
        out = model.apply(params, tokens, positions, cache, attn_mask=mask)
        target = target_of(out.logits, state, drafts)
        fits = cache.length[:, None] + jnp.arange(n)[None, :] < cache.capacity
        vtokens = jnp.where(fits, tokens, -1)  # a node without a cache slot never matches
        if greedy:
            res = verify_tree_greedy(vtokens, parents, target, max_depth=max_depth)
        else:
            q = prop.probs
            if q is not None:
                q = jnp.concatenate([jnp.zeros_like(q[:, :1]), q.astype(target.dtype)], axis=1)
            res = verify_fn(vtokens, parents, q, target, k_verify)
        path, accepted = res.path, res.accepted_len
        on_path = jnp.take_along_axis(tokens, jnp.maximum(path, 0), axis=1)  # [B, D + 1]
        new = jnp.concatenate([on_path[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        new = new.at[jnp.arange(b), accepted].set(res.next_token.astype(jnp.int32))
        count = accepted + 1
        active = ~state.done
        state = dataclasses.replace(
            state,
            cache=kv.gather(out.cache, path, jnp.where(active, count, 0)),
            key=key,
            calls=state.calls + active,
        )
        state = emit(state, new, count)
        extra = drafter_update(drafter, prop.dstate, state, accepted, logits=out.logits, tokens=tokens, path=path,
                               hidden=out.hidden)
        return dataclasses.replace(state, extra=extra)

    return Decoder(init=init, step=step, model=model, max_step_tokens=n,
                   name=f"tree_speculative[{drafter.name}, N={n}, depth={max_depth}]")
