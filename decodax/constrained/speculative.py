"""Constrained *speculative* decoding: regex / JSON-schema automata composed with chain drafts.

Chain speculative decoding (Leviathan et al. 2023, Algorithm 1; Chen et al.
2023) under a token automaton (the masking scheme of outlines, Willard & Louf
2023), entirely on device:

1. the drafter proposes ``d_1 .. d_k``; the automaton is run over the drafts
   from the state reached so far, ``s_0`` (after every emitted token), giving
   ``s_i = δ(s_{i-1}, d_i)``;
2. *draft check*: a draft token not allowed in ``s_{i-1}`` (or an EOS id) cuts
   the draft there, so only the valid prefix ``d_1 .. d_L`` is verified (with
   ``L = 0`` for every row the step is a plain ``T = 1`` forward);
3. the target's verify distribution at position ``i`` (``0 .. L``) is masked
   with ``s_i``'s bitmask (before temperature / top-k / top-p, as in
   :func:`~decodax.constrained.constrained`), then the lossless verifiers run
   on the masked distributions: :func:`~decodax.speculative.verify.verify_greedy`
   (temperature 0) or :func:`~decodax.speculative.verify.verify_sampling`;
4. the automaton state (kept in ``DecodeState.extra`` beside the drafter's
   state) is advanced over the accepted drafts and the target's token.

Since the verifiers are lossless for any target distribution, the output law
is that of constrained (masked) sampling from the target, and greedy output is
exactly constrained greedy decoding. Cutting the draft is lossless (the token
at the cut is drawn from the masked target whether it was a draft or a
correction); it saves verifying tokens that cannot be accepted. Rules as in the
autoregressive constrained decoder: EOS only in a final state, a dead row emits
EOS, a row that emits EOS is finished by the decoder.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from decodax import sampling
from decodax.constrained.automaton import AutomatonTables, TokenAutomaton, advance, allowed_tokens
from decodax.constrained.decoder import PARAMS_KEY, choose_token
from decodax.decoding.autoregressive import context_of, emit, initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.speculative.decoder import _draft_context
from decodax.speculative.drafters import Drafter
from decodax.speculative.tree_decoder import drafter_update
from decodax.speculative.verify import verify_greedy, verify_sampling

__all__ = ["constrained_speculative", "draft_states"]


def draft_states(tables: AutomatonTables, state: Int[Array, " B"], drafts: Int[Array, "B K"],
                 eos: Int[Array, " E"]) -> tuple[Int[Array, "B K1"], Int[Array, " B"]]:
    """Automaton states along the drafts and the length of their valid prefix.

    Returns ``states[:, i]`` = the state after ``d_1 .. d_i`` (``states[:, 0]`` =
    ``state``; ``-1`` once a draft is not allowed) and ``valid`` = the number of
    leading drafts that are allowed where they stand and are not EOS (an EOS
    draft ends the valid prefix: the target emits EOS itself if it wants to).
    """
    seq, oks, s = [state], [], state
    for i in range(drafts.shape[1]):  # k is small and static: unrolled gathers
        nxt = advance(tables, s, drafts[:, i])
        ok = (nxt >= 0) & ~jnp.isin(drafts[:, i], eos)
        s = jnp.where(ok, nxt, -1)
        seq.append(s)
        oks.append(ok)
    valid = jnp.sum(jnp.cumprod(jnp.stack(oks, axis=1).astype(jnp.int32), axis=1), axis=1)
    return jnp.stack(seq, axis=1), valid.astype(jnp.int32)


def _position_masks(tables: AutomatonTables, states: Int[Array, "B K1"], eos_id: int) -> Bool[Array, "B K1 V"]:
    """Allowed tokens at each verify position; a dead position allows only EOS (as ``choose_token``)."""
    b, t = states.shape
    allowed = allowed_tokens(tables, states.reshape(-1)).reshape(b, t, -1)
    dead = ~jnp.any(allowed, axis=-1)
    return allowed.at[:, :, eos_id].set(allowed[:, :, eos_id] | dead)


def constrained_speculative(model, drafter: Drafter, constraint: TokenAutomaton, *, k: int,
                            sampler: sampling.Sampler | None = None, eos_ids: tuple[int, ...] | None = None,
                            skip_empty: bool = True, check_drafts: bool = True) -> Decoder:
    """Chain speculative decoding under a regex / JSON-schema automaton (module docstring).

    Run it with ``generate(dec, with_constraint(params, constraint), ...)``; like
    :func:`~decodax.constrained.constrained` it depends on the constraint's EOS
    ids and vocabulary size only, not its tables. ``skip_empty``: when no active
    row has a valid draft, the step runs a plain ``T = 1`` forward.

    ``check_drafts=False`` is a *lossy negative control* for tests: drafts are
    neither checked nor masked -- they are accepted against the unmasked target
    and only the token the target emits itself is masked (what a masking logits
    processor bolted onto plain speculative decoding does), so invalid drafts leak.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"constrained_speculative: draft length k must be an int >= 1, got {k!r}")
    if not isinstance(drafter, Drafter):
        raise ValueError(f"constrained_speculative: drafter must be a Drafter, got {type(drafter).__name__}")
    if drafter.template is not None:
        raise ValueError(f"constrained_speculative: {drafter.name} is a tree drafter; chain drafters only")
    if not isinstance(constraint, TokenAutomaton):
        raise ValueError(f"constraint must be a TokenAutomaton, got {type(constraint).__name__}")
    vocab = model.config.vocab_size
    if constraint.vocab_size != vocab:
        raise ValueError(f"the constraint's vocabulary has {constraint.vocab_size} tokens but the model has {vocab}")
    eos = tuple(int(e) for e in (constraint.vocabulary.eos_ids if eos_ids is None else eos_ids))
    if not eos or any(not 0 <= e < vocab for e in eos):
        raise ValueError(f"constrained decoding needs EOS ids in [0, {vocab}), got {list(eos)}")
    sampler = sampler or sampling.make_sampler(temperature=0.0)
    return _constrained_speculative(model, drafter, k, sampler, eos, bool(skip_empty), bool(check_drafts))


@functools.lru_cache(maxsize=64)
def _constrained_speculative(model, drafter: Drafter, k: int, sampler: sampling.Sampler, eos: tuple[int, ...],
                             skip_empty: bool, check_drafts: bool) -> Decoder:
    vocab = model.config.vocab_size
    eos_arr = jnp.asarray(eos, jnp.int32)
    greedy = sampler.is_greedy

    def split(params):
        if not isinstance(params, dict) or PARAMS_KEY not in params:
            raise ValueError("constrained_speculative reads its automaton from params: pass "
                             "with_constraint(params, constraint) to generate")
        tables = params[PARAMS_KEY]
        if not isinstance(tables, AutomatonTables) or tables.token_class.shape[0] != vocab:
            raise ValueError(f"params[{PARAMS_KEY!r}] must be a TokenAutomaton's tables over {vocab} tokens")
        return {kk: v for kk, v in params.items() if kk != PARAMS_KEY}, tables

    def view(state: DecodeState) -> DecodeState:
        """The state as the drafter sees it (its own state in ``extra``)."""
        return dataclasses.replace(state, extra=state.extra[0])

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        mparams, tables = split(params)
        b = prompt.shape[0]
        out, cache = run_prompt(model, mparams, prompt, prompt_len, capacity)
        key, sub = jax.random.split(key)
        astate = jnp.zeros((b,), jnp.int32)
        state = initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + k + 1)
        ctx, mask = context_of(state) if sampler.needs_context else (None, None)
        tok = choose_token(out.logits[:, 0], allowed_tokens(tables, astate), eos[0], sampler, sub, ctx, mask)
        is_eos = jnp.isin(tok, eos_arr)
        astate = jnp.where(is_eos, astate, advance(tables, astate, tok))
        state = emit(state, tok[:, None], jnp.ones((b,), jnp.int32))
        kwargs = {}
        if drafter.wants_logits:  # as drafter_prefill: the target's logits at every prompt position
            kwargs["logits"] = model.logits(mparams, out.hidden)
        if drafter.wants_hidden:
            kwargs["hidden"] = out.hidden
        dstate = drafter.init(mparams, state, **kwargs)
        return dataclasses.replace(state, extra=(dstate, astate), done=state.done | is_eos)

    def target_scores(logits, state, drafts, allowed):
        """Masked logits (greedy) or masked probabilities (sampling) at every verify position."""
        masked = jnp.where(allowed, logits, -jnp.inf)
        if not sampler.needs_context:
            return masked if greedy else sampling.probs(sampler, masked)
        ctx, m = context_of(state)
        full, fm = _draft_context(ctx, m, drafts)
        return (sampling.process if greedy else sampling.probs)(sampler, masked, full, fm)

    def finish(state, out, new, count, key, dstate, accepted, fed, astate, is_eos):
        active = ~state.done
        state = dataclasses.replace(state, cache=kv.commit(out.cache, jnp.where(active, count, 0)), key=key,
                                    calls=state.calls + active)
        state = emit(state, new, count)
        path = jnp.arange(fed.shape[1], dtype=jnp.int32)[None, :]
        path = jnp.where(path <= accepted[:, None], path, -1)
        dview = dataclasses.replace(state, extra=dstate)
        dstate = drafter_update(drafter, dstate, dview, accepted, logits=out.logits, tokens=fed, path=path,
                                hidden=out.hidden, taps=out.taps)
        astate = jnp.where(active, astate, state.extra[1])
        return dataclasses.replace(state, extra=(dstate, astate), done=state.done | (active & is_eos))

    def close(tables, states, accepted, nxt):
        """Automaton state after the accepted drafts and the target's token ``nxt``."""
        s = jnp.take_along_axis(states, accepted[:, None], axis=1)[:, 0]
        is_eos = jnp.isin(nxt, eos_arr)
        return jnp.where(is_eos, s, advance(tables, s, nxt)), is_eos

    def spec_step(params, state, prop, key, k_verify, tables, states, valid):
        drafts = prop.tokens
        b = drafts.shape[0]
        fed = jnp.concatenate([state.last_token[:, None], drafts], axis=1)
        positions = state.cache.length[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
        out = model.apply(params, fed, positions, state.cache, taps=drafter.taps)
        allowed = _position_masks(tables, states, eos[0])  # [B, K+1, V]
        scores = target_scores(out.logits, view(state), drafts, allowed)
        q = None if prop.probs is None else prop.probs
        if check_drafts:
            if greedy:
                accepted, _ = verify_greedy(drafts, scores)
                accepted = jnp.minimum(accepted, valid)
                nxt = jnp.argmax(jnp.take_along_axis(scores, accepted[:, None, None], axis=1)[:, 0], axis=-1)
            else:
                accepted, nxt = verify_sampling(drafts, q, scores, k_verify)
                # An automaton-invalid draft has masked probability 0 and is never accepted, so
                # the verifier only runs past `valid` over the drafter's own length or an EOS
                # draft; cut there, the token at `valid` (the accepted draft) has the masked
                # target's law either way (accepted draft or correction), as in speculative().
                cut = accepted > valid
                nxt = jnp.where(cut, jnp.take_along_axis(drafts, jnp.minimum(valid, k - 1)[:, None], axis=1)[:, 0],
                                nxt)
                accepted = jnp.minimum(accepted, valid)
        else:  # negative control: drafts accepted against the unmasked target
            raw = target_scores(out.logits, view(state), drafts, jnp.ones_like(allowed))
            k_acc, k_tok = jax.random.split(k_verify)
            accepted, _ = verify_greedy(drafts, raw) if greedy else verify_sampling(drafts, q, raw, k_acc)
            accepted = jnp.minimum(accepted, valid)
            row = jnp.take_along_axis(scores, accepted[:, None, None], axis=1)[:, 0]
            if greedy:
                nxt = jnp.argmax(row, axis=-1)
            else:  # the masked residual after rejecting the draft at `accepted` (bonus: no draft)
                rej = jnp.take_along_axis(drafts, jnp.minimum(accepted, k - 1)[:, None], axis=1)[:, 0]
                hit = (jnp.arange(vocab)[None] == rej[:, None]) & (accepted < valid)[:, None]
                res = jnp.where(hit, 0.0, row)
                res = jnp.where(jnp.sum(res, -1, keepdims=True) > 0, res, row)
                nxt = jax.random.categorical(k_tok, jnp.log(res), axis=-1)
        nxt = nxt.astype(jnp.int32)
        new = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        new = new.at[jnp.arange(b), accepted].set(nxt)
        astate, is_eos = close(tables, states, accepted, nxt)
        return finish(state, out, new, accepted + 1, key, prop.dstate, accepted, fed, astate, is_eos)

    def plain_step(params, state, prop, key, k_verify, tables, states, valid):
        b = state.last_token.shape[0]
        out = model.apply(params, state.last_token[:, None], state.cache.length[:, None], state.cache,
                          taps=drafter.taps)
        ctx, mask = context_of(state) if sampler.needs_context else (None, None)
        allowed = allowed_tokens(tables, states[:, 0])
        tok = choose_token(out.logits[:, 0], allowed, eos[0], sampler, k_verify, ctx, mask)
        zero = jnp.zeros((b,), jnp.int32)
        astate, is_eos = close(tables, states, zero, tok)
        new = jnp.zeros((b, k + 1), jnp.int32).at[:, 0].set(tok)
        return finish(state, out, new, zero + 1, key, prop.dstate, zero, state.last_token[:, None], astate, is_eos)

    def step(params, state: DecodeState) -> DecodeState:
        mparams, tables = split(params)
        key, k_draft, k_verify = jax.random.split(state.key, 3)
        dstate, astate = state.extra
        prop = drafter.propose(mparams, view(state), dstate, k_draft, k=k, sampler=sampler)
        states, valid = draft_states(tables, astate, prop.tokens, eos_arr)
        length = jnp.clip(prop.length, 0, k)
        valid = jnp.minimum(valid, length) if check_drafts else length
        args = (mparams, state, prop, key, k_verify, tables, states, valid)
        if not (skip_empty and (drafter.may_be_empty or check_drafts)):
            return spec_step(*args)
        any_draft = jnp.any(~state.done & (valid > 0))
        return jax.lax.cond(any_draft, spec_step, plain_step, *args)

    return Decoder(init=init, step=step, model=model, max_step_tokens=k + 1,
                   name=f"constrained_speculative[{drafter.name}, k={k}]")
