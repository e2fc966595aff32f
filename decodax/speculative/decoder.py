"""Chain speculative decoding as a :class:`~decodax.decoding.Decoder`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from decodax import sampling
from decodax.decoding.autoregressive import context_of, emit, next_token
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.speculative.drafters import Drafter
from decodax.speculative.tree_decoder import drafter_prefill, drafter_update
from decodax.speculative.verify import verify_greedy, verify_sampling

__all__ = ["speculative"]


def speculative(model, drafter: Drafter, *, k: int, sampler: sampling.Sampler | None = None,
                verifier=None, skip_empty: bool = True, widths: tuple[int, ...] | None = None,
                relaxed=None) -> Decoder:
    """Chain speculative decoding (Leviathan et al. 2023, Algorithm 1; Chen et al.
    2023, Algorithm 2): every step the drafter proposes ``k`` tokens per row, one
    target forward scores ``[last_token, d_1 .. d_k]`` (``T = k + 1``) and the
    verifier keeps the longest acceptable prefix plus one target token, so a
    step emits ``1 .. k + 1`` tokens and the output law is the target's.

    Greedy samplers (temperature 0) use :func:`verify_greedy` (output identical
    to greedy decoding); otherwise :func:`verify_sampling` on
    ``sampling.probs(sampler, .)`` applied alike to target and draft (penalties
    see the drafts as context). ``verifier`` replaces the sampling verifier
    (``(draft_tokens, draft_probs, target_probs, key) -> (accepted, next)``;
    tests use it for negative controls). ``skip_empty``: when no row has a
    draft (``Proposal.length == 0`` everywhere, e.g. prompt lookup found no
    match) the step runs a plain ``T = 1`` forward instead of verifying filler.

    A row never accepts a draft past its ``Proposal.length`` (the verifier's
    output is cut there: the token at that position is distributed as the
    target's whether it was an accepted filler or a correction, so the cut is
    lossless). ``widths`` (for drafters whose length varies, e.g. DEL, SpecDec++):
    static verify widths ``w <= k``, ``k`` included; each step verifies the
    smallest width covering the longest active draft (``lax.switch``, one
    compiled forward per width) instead of always ``T = k + 1``.

    ``relaxed`` (greedy only; *lossy*): ``relaxed(dstate, w) -> int32[B]``, a number
    of leading drafts a row accepts whatever the verifier says (e.g. CEED-VLA's
    early exit, :class:`~decodax.jacobi.EarlyExit`); the row keeps
    ``max(verified, relaxed)`` drafts plus the target's token after them, so every
    emitted token was fed and the KV cache stays consistent.

    Memoised on its (hashable) arguments, so ``generate`` reuses compilations.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"speculative: draft length k must be an int >= 1, got {k!r}")
    if not isinstance(drafter, Drafter):
        raise ValueError(f"speculative: drafter must be a Drafter (init, propose, update), got {type(drafter).__name__}")
    if drafter.template is not None:
        raise ValueError(f"speculative: {drafter.name} is a tree drafter; use tree_speculative")
    if widths is None:
        widths = (k,)
    try:
        widths = tuple(sorted({int(w) for w in widths}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"speculative: widths must be ints, got {widths!r}") from e
    if widths[0] < 1 or widths[-1] != k:
        raise ValueError(f"speculative: widths must lie in [1, k] and include k = {k}, got {widths}")
    sampler = sampler or sampling.make_sampler(temperature=0.0)
    if relaxed is not None and not sampler.is_greedy:
        raise ValueError("speculative: a relaxed (lossy) acceptance is defined for greedy decoding only")
    return _speculative(model, drafter, k, sampler, verifier, bool(skip_empty), widths, relaxed)


def _draft_context(ctx, mask, drafts):
    """Context of target position ``i`` (0..K) = context + d_1..d_i: ``[B, K+1, L+K]`` and its mask."""
    b, k = drafts.shape
    l = ctx.shape[1]
    full = jnp.concatenate([ctx, drafts], axis=1)
    full = jnp.broadcast_to(full[:, None], (b, k + 1, l + k))
    tri = jnp.arange(k)[None, :] < jnp.arange(k + 1)[:, None]  # [K+1, K]
    m = jnp.concatenate([jnp.broadcast_to(mask[:, None], (b, k + 1, l)),
                         jnp.broadcast_to(tri[None], (b, k + 1, k))], axis=2)
    return full, m


@functools.lru_cache(maxsize=64)
def _speculative(model, drafter: Drafter, k: int, sampler: sampling.Sampler, verifier, skip_empty: bool,
                 widths: tuple[int, ...], relaxed=None) -> Decoder:
    greedy = sampler.is_greedy
    verify_fn = verifier or verify_sampling

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        return drafter_prefill(model, drafter, params, prompt, prompt_len, key, sampler=sampler,
                               max_new_tokens=max_new_tokens, capacity=capacity, max_step_tokens=k + 1)

    def target_probs_or_logits(logits, state, drafts):
        """Greedy: logits whose argmax is the greedy token; sampling: probabilities."""
        if not sampler.needs_context:
            return logits if greedy else sampling.probs(sampler, logits)
        ctx, mask = context_of(state)
        full, m = _draft_context(ctx, mask, drafts)
        fn = sampling.process if greedy else sampling.probs
        return fn(sampler, logits, full, m)

    def finish(state, out, new, count, key, dstate, accepted, fed):
        active = ~state.done
        state = dataclasses.replace(
            state,
            cache=kv.commit(out.cache, jnp.where(active, count, 0)),
            key=key,
            calls=state.calls + active,
        )
        state = emit(state, new, count)
        path = jnp.arange(fed.shape[1], dtype=jnp.int32)[None, :]
        path = jnp.where(path <= accepted[:, None], path, -1)  # a chain's accepted path
        extra = drafter_update(drafter, dstate, state, accepted, logits=out.logits, tokens=fed, path=path,
                               hidden=out.hidden, taps=out.taps)
        return dataclasses.replace(state, extra=extra)

    def spec_step(w, params, state, prop, key, k_verify):
        """Verify the first ``w`` drafts (``T = w + 1``)."""
        drafts = prop.tokens[:, :w]
        b = drafts.shape[0]
        tokens = jnp.concatenate([state.last_token[:, None], drafts], axis=1)
        positions = state.cache.length[:, None] + jnp.arange(w + 1, dtype=jnp.int32)[None, :]
        out = model.apply(params, tokens, positions, state.cache, taps=drafter.taps)
        target = target_probs_or_logits(out.logits, state, drafts)
        if greedy:
            accepted, nxt = verify_greedy(drafts, target)
            if relaxed is not None:
                accepted = jnp.clip(jnp.maximum(accepted, relaxed(prop.dstate, w)), 0, w)
                nxt = jnp.take_along_axis(jnp.argmax(target, axis=-1), accepted[:, None], axis=1)[:, 0]
        else:
            accepted, nxt = verify_fn(drafts, None if prop.probs is None else prop.probs[:, :w], target, k_verify)
        new = jnp.concatenate([drafts, jnp.zeros((b, k + 1 - w), jnp.int32)], axis=1)
        new = new.at[jnp.arange(b), accepted].set(nxt.astype(jnp.int32))
        accepted = jnp.minimum(accepted, jnp.clip(prop.length, 0, w))  # never past the row's own drafts
        return finish(state, out, new, accepted + 1, key, prop.dstate, accepted, tokens)

    def plain_step(params, state, prop, key, k_verify):
        tok, out = next_token(model, params, state, sampler, k_verify, taps=drafter.taps)
        b = tok.shape[0]
        new = jnp.zeros((b, k + 1), jnp.int32).at[:, 0].set(tok)
        zero = jnp.zeros((b,), jnp.int32)
        return finish(state, out, new, zero + 1, key, prop.dstate, zero, state.last_token[:, None])

    branches = [functools.partial(spec_step, w) for w in widths]
    if skip_empty and drafter.may_be_empty:
        branches = [plain_step] + branches
    sizes = jnp.asarray(([0] if len(branches) > len(widths) else []) + list(widths), jnp.int32)

    def step(params, state: DecodeState) -> DecodeState:
        key, k_draft, k_verify = jax.random.split(state.key, 3)
        prop = drafter.propose(params, state, state.extra, k_draft, k=k, sampler=sampler)
        if len(branches) == 1:
            return branches[0](params, state, prop, key, k_verify)
        longest = jnp.max(jnp.where(state.done, 0, jnp.clip(prop.length, 0, k)))
        index = jnp.minimum(jnp.sum(sizes < longest), len(branches) - 1)  # the smallest width covering it
        return jax.lax.switch(index, branches, params, state, prop, key, k_verify)

    return Decoder(init=init, step=step, model=model, max_step_tokens=k + 1,
                   name=f"speculative[{drafter.name}, k={k}]")
