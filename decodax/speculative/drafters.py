"""Training-free drafters for chain speculative decoding, optax-style ``(init, propose, update)``.

A :class:`Drafter` is a triple of pure functions over pytrees:

* ``init(params, state) -> dstate`` -- the drafter's own state (kept in
  ``DecodeState.extra``), built after the prefill;
* ``propose(params, state, dstate, key, *, k, sampler) -> Proposal`` -- ``k``
  draft tokens per row (``k`` and ``sampler`` are static), with the draft
  distributions when the drafter samples (``probs=None``: deterministic
  drafts, q is a point mass) and ``length int32[B]``, the number of drafts the
  drafter believes in (``0``: nothing to propose; the decoder may then skip the
  verification of a useless draft);
* ``update(dstate, state, accepted) -> dstate`` -- after verification.

Drafters that learn from the target (Token Recycling, ADED) set
``wants_logits=True``: the decoders then call ``init(params, state,
logits=prompt_logits[B, P, V])`` (the target's logits at every prompt
position) and ``update(dstate, state, accepted, logits=[B, T, V],
tokens=[B, T], path=[B, P'])`` with the verify forward's logits at its ``T``
fed tokens (root first) and the accepted node indices (root first, ``-1``
padded; a chain's path is ``0 .. accepted``). Drafters on the target's
features (Medusa/Hydra heads) set ``wants_hidden=True`` and get
``hidden=[B, P, D]`` / ``hidden=[B, T, D]`` (pre-norm last-layer states) the
same way, with ``path``; chain drafters that name layers in ``taps`` (DEL)
get ``taps=[N, B, T, D]``, those layers' states in the verify forward, with
``tokens`` and ``path``. A chain decoder never accepts a draft past
``Proposal.length`` (filler is verified but cut off). Tree drafters also carry their
static tree as ``template``, the hashable rank paths of a
:class:`~decodax.speculative.trees.TreeTemplate` (``trees.tree_from_paths``); their
``Proposal.tokens`` are the tokens of nodes ``1 .. N - 1`` (node 0 is
``state.last_token``) and ``probs`` is ``[B, N - 1, V]`` or ``None``.

Factories are memoised (``functools.lru_cache``) so equal arguments return the
same (hashable) drafter and the decoders built on it share one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax import sampling
from decodax.decoding.autoregressive import context_of
from decodax.decoding.state import DecodeState
from decodax.model import cache as kv

__all__ = ["Drafter", "Proposal", "contiguous_context", "early_exit_drafter", "exit_layer_drafts", "prompt_lookup"]


class Proposal(NamedTuple):
    tokens: Int[Array, "B K"]
    probs: Float[Array, "B K V"] | None  # None: deterministic drafts
    length: Int[Array, " B"]  # drafts worth verifying (0..K); tokens past it are filler
    dstate: Any = None


class Drafter(NamedTuple):
    init: Callable[..., Any]
    propose: Callable[..., Proposal]
    update: Callable[..., Any]
    name: str = "drafter"
    may_be_empty: bool = True  # False: ``length`` is always k (no T = 1 fallback branch is compiled)
    template: Any = None  # a tree drafter's static tree as hashable rank paths (TreeTemplate.paths); None: chain
    wants_logits: bool = False  # True: init / update receive the target's logits (keywords above)
    wants_hidden: bool = False  # True: init / update receive the target's last hidden states (hidden=)
    taps: tuple[int, ...] = ()  # chain drafters: update receives the verify forward's hidden states after
    # these layers (taps=[N, B, T, D], Model.apply's ``taps``), with tokens= and path=


def _no_state(params, state):
    return None


def _keep(dstate, state, accepted):
    return dstate


def contiguous_context(state: DecodeState) -> tuple[Int[Array, "B L"], Int[Array, " B"]]:
    """Prompt and emitted tokens of every row as one left-aligned sequence ``[B, P + N]``
    and its valid length ``prompt_len + num_generated`` (the last valid token is
    ``state.last_token``)."""
    ctx, _ = context_of(state)
    p = state.prompt.shape[1]
    j = jnp.arange(ctx.shape[1])[None, :]
    pl = state.prompt_len[:, None]
    idx = jnp.where(j < pl, j, p + j - pl)
    idx = jnp.clip(idx, 0, ctx.shape[1] - 1)
    seq = jnp.take_along_axis(ctx, idx, axis=1)
    return seq, state.prompt_len + state.num_generated


# --------------------------------------------------------------------------- prompt lookup


def prompt_lookup(ngram: int = 3, k: int | None = None) -> Drafter:
    """Prompt lookup decoding (Saxena 2023; n-gram copy, as in Input-guided
    Aggressive Decoding, Sun et al. 2021): match the last ``n`` tokens of the
    context (``n = ngram .. 1``, longest first) against earlier context and
    propose the tokens that followed the most recent longest match.

    When the copied continuation runs into the end of the context it is
    extended periodically (the match is a repeat with period
    ``end - match``), which is what a repetitive continuation does. Rows with no
    match propose their last token repeated (``length = 0``). Deterministic
    drafts (``probs=None``). ``k`` (optional) caps the reported ``length``
    (the decoder's own ``k`` sets the static draft width).
    """
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"prompt_lookup: ngram must be an int >= 1, got {ngram!r}")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"prompt_lookup: draft length k must be an int >= 1 or None, got {k!r}")
    return _prompt_lookup(ngram, k)


@functools.lru_cache(maxsize=64)
def _prompt_lookup(ngram: int, cap: int | None) -> Drafter:

    def propose(params, state, dstate, key, *, k, sampler=None):
        seq, n = contiguous_context(state)  # [B, L], [B]
        b, length = seq.shape
        j = jnp.arange(length)[None, :]  # candidate match end
        tail = jnp.take_along_axis(seq, jnp.clip(n[:, None] - 1 - jnp.arange(ngram)[None, :], 0, length - 1), axis=1)
        run = jnp.ones((b, length), jnp.int32)
        match_len = jnp.zeros((b, length), jnp.int32)
        for t in range(ngram):  # match_len = longest common suffix ending at j, capped at ngram
            back = j - t
            tok = jnp.take_along_axis(seq, jnp.clip(back, 0, length - 1), axis=1)
            ok = (back >= 0) & (tok == tail[:, t : t + 1]) & (t < n[:, None])
            run = run * ok
            match_len = match_len + run
        valid = (j < n[:, None] - 1) & (match_len > 0)
        score = jnp.where(valid, match_len * length + j, -1)
        best = jnp.argmax(score, axis=1)
        found = jnp.max(score, axis=1) >= 0
        period = jnp.maximum(n - 1 - best, 1)
        m = jnp.arange(k)[None, :]
        src = best[:, None] + 1 + m % period[:, None]
        drafts = jnp.take_along_axis(seq, jnp.clip(src, 0, length - 1), axis=1)
        drafts = jnp.where(found[:, None], drafts, state.last_token[:, None]).astype(jnp.int32)
        kk = k if cap is None else min(k, cap)
        return Proposal(drafts, None, jnp.where(found, kk, 0).astype(jnp.int32), dstate)

    return Drafter(init=_no_state, propose=propose, update=_keep, name=f"prompt_lookup(ngram={ngram})")


# --------------------------------------------------------------------------- early exit


def early_exit_drafter(model, exit_layer: int) -> Drafter:
    """Self-speculative draft model: the target's first ``exit_layer`` layers, its
    final norm and LM head (early exit as in LayerSkip, Elhoushi et al. 2024,
    and Draft & Verify, Zhang et al. 2023, with the skipped layers being the
    last ones). Drafts ``k`` tokens autoregressively (a ``lax.fori_loop``).

    The draft forwards write their keys/values for layers ``< exit_layer`` at
    slots ``length .. length + k - 1`` of a copy of those layers' cache (never
    committed). The verify forward attends to committed slots only plus its
    own new tokens, and rewrites those slots for every layer, so the draft
    entries are never read by the target. Greedy samplers give deterministic
    drafts (``probs=None``); otherwise each draft is sampled from
    ``sampling.probs(sampler, exit_logits)`` and those probabilities are returned.
    """
    n_layers = model.config.n_layers
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= n_layers:
        raise ValueError(f"early_exit_drafter: exit_layer must be an int in [1, {n_layers}], got {exit_layer!r}")
    return _early_exit_drafter(model, exit_layer)


def exit_layer_drafts(model, params, state: DecodeState, key, *, k: int, sampler, exit_layer: int,
                      count: Int[Array, ""] | None = None) -> tuple[Int[Array, "B K"], Float[Array, "B K V"] | None]:
    """``count`` (default ``k``; may be traced) tokens drafted autoregressively by the
    target's first ``exit_layer`` layers + final norm + LM head, writing those layers'
    keys/values into a copy of the cache at slots ``length ..`` (never committed).

    Returns ``(drafts[B, k], probs[B, k, V] | None)``; drafts past ``count`` are
    filler (the last draft repeated) with point-mass probabilities.
    """
    cache = state.cache
    base = cache.length
    sub = kv.first_layers(cache, exit_layer)
    b = base.shape[0]
    v = model.config.vocab_size
    greedy = sampler.is_greedy
    ctx, mask = (context_of(state) if sampler.needs_context else (None, None))
    keys = jax.random.split(key, k)

    def body(i, carry):
        sub, tok, drafts, probs = carry
        c = dataclasses.replace(sub, length=base + i)
        out = model.apply(params, tok[:, None], (base + i)[:, None], c, exit_layer=exit_layer)
        logits = out.logits[:, 0]
        if greedy:
            x = sampling.sample_with(sampler, logits, None, context=ctx, context_mask=mask)
        else:
            q = sampling.probs(sampler, logits, ctx, mask)
            x = sampling.sample(jnp.log(q), keys[i])
            probs = probs.at[:, i].set(q)
        drafts = drafts.at[:, i].set(x)
        return dataclasses.replace(out.cache, length=base), x.astype(jnp.int32), drafts, probs

    probs0 = None if greedy else jnp.zeros((b, k, v), jnp.float32)
    init = (sub, state.last_token, jnp.zeros((b, k), jnp.int32), probs0)
    _, last, drafts, probs = jax.lax.fori_loop(0, k if count is None else count, body, init)
    if count is not None:
        past = jnp.arange(k)[None, :] >= count
        drafts = jnp.where(past, last[:, None], drafts)
        if probs is not None:
            probs = jnp.where(past[..., None], jax.nn.one_hot(drafts, v, dtype=probs.dtype), probs)
    return drafts, probs


@functools.lru_cache(maxsize=64)
def _early_exit_drafter(model, exit_layer: int) -> Drafter:

    def propose(params, state, dstate, key, *, k, sampler):
        drafts, probs = exit_layer_drafts(model, params, state, key, k=k, sampler=sampler, exit_layer=exit_layer)
        return Proposal(drafts, probs, jnp.full((drafts.shape[0],), k, jnp.int32), dstate)

    return Drafter(init=_no_state, propose=propose, update=_keep, name=f"early_exit({exit_layer})",
                   may_be_empty=False)
