"""Constrained autoregressive decoding: automaton masks and ban lists inside the jitted loop.

Each step masks the logits with the tokens the constraint allows (the
automaton state's bitmask, see :mod:`decodax.constrained.automaton`, and the
ban list's mask), samples with the decoder's ``Sampler`` and advances the
automaton state, which lives in ``DecodeState.extra`` (int32 ``[B]``). So
``generate`` stays one ``lax.while_loop`` with no host round trip per token
(the masking scheme of outlines, Willard & Louf 2023, with the mask computed
on device instead of by a host-side guide).

Rules: EOS is allowed only in a final state (and then the model chooses
between EOS and continuing); a row with no allowed token (a dead end of the
automaton or everything banned) emits EOS instead of garbage; a row that
emits EOS is finished by the decoder itself, whatever the driver's
``eos_ids``. The automaton's arrays are traced arguments, not jit constants:
they travel in the params pytree (:func:`with_constraint`), as draft-model
weights do.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from decodax import sampling
from decodax.constrained.automaton import AutomatonTables, TokenAutomaton, advance, allowed_tokens
from decodax.constrained.banned import BanList, ban_mask
from decodax.decoding.autoregressive import context_of, emit, initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv

__all__ = ["constrained", "with_constraint", "PARAMS_KEY", "choose_token"]

PARAMS_KEY = "constraint"


def with_constraint(params: dict, constraint: TokenAutomaton) -> dict:
    """``params`` plus the constraint's device tables under ``"constraint"`` (what a
    :func:`constrained` decoder reads)."""
    if not isinstance(constraint, TokenAutomaton):
        raise ValueError(f"constraint must be a TokenAutomaton (compile_regex / compile_json_schema), "
                         f"got {type(constraint).__name__}")
    return {**params, PARAMS_KEY: constraint.tables}


def choose_token(
    logits: Float[Array, "B V"],
    allowed: Bool[Array, "B V"],
    eos_id: int,
    sampler: sampling.Sampler,
    key: PRNGKeyArray | None,
    context: Int[Array, "B L"] | None = None,
    context_mask: Bool[Array, "B L"] | None = None,
) -> Int[Array, " B"]:
    """Sample among the ``allowed`` tokens; a row with none allowed gets ``eos_id``."""
    dead = ~jnp.any(allowed, axis=-1)
    allowed = allowed.at[:, eos_id].set(allowed[:, eos_id] | dead)
    masked = jnp.where(allowed, logits, -jnp.inf)
    tok = sampling.sample_with(sampler, masked, None if sampler.is_greedy else key,
                               context=context, context_mask=context_mask)
    # sampling's all--inf fallback may pick a masked id (allowed tokens with -inf/NaN logits):
    # fall back to the first allowed token, never to a forbidden one.
    ok = jnp.take_along_axis(allowed, tok[:, None], axis=1)[:, 0]
    return jnp.where(ok, tok, jnp.argmax(allowed, axis=-1)).astype(jnp.int32)


def constrained(
    model,
    constraint: TokenAutomaton | None = None,
    *,
    banned: BanList | None = None,
    sampler: sampling.Sampler | None = None,
    eos_ids: tuple[int, ...] | None = None,
) -> Decoder:
    """Autoregressive decoding under a regex / JSON-schema automaton and/or a ban list.

    Run it with ``generate(dec, with_constraint(params, constraint), ...)`` (only
    ``params`` when there is no automaton). The decoder depends only on the
    constraint's EOS ids and vocabulary size, not its tables, so constraints of
    the same padded shape share one compilation. ``eos_ids`` default to the
    constraint vocabulary's, else the model's.
    """
    vocab = model.config.vocab_size
    if constraint is not None:
        if not isinstance(constraint, TokenAutomaton):
            raise ValueError(f"constraint must be a TokenAutomaton, got {type(constraint).__name__}")
        if constraint.vocab_size != vocab:
            raise ValueError(
                f"the constraint's vocabulary has {constraint.vocab_size} tokens but the model has "
                f"{vocab}: build it with TokenVocabulary.from_tokenizer(tok, vocab_size={vocab})"
            )
        eos_ids = constraint.vocabulary.eos_ids if eos_ids is None else eos_ids
    if banned is not None:
        if not isinstance(banned, BanList):
            raise ValueError(f"banned must be a BanList, got {type(banned).__name__}")
        banned.check(vocab)
    eos = tuple(int(e) for e in (model.config.eos_ids if eos_ids is None else eos_ids))
    if not eos:
        raise ValueError("constrained decoding needs an EOS id (to end rows), got none")
    if any(not 0 <= e < vocab for e in eos):
        raise ValueError(f"EOS ids must be in [0, {vocab}), got {list(eos)}")
    return _constrained(model, constraint is not None, banned, sampler or sampling.make_sampler(temperature=0.0), eos)


@functools.lru_cache(maxsize=64)
def _constrained(model, has_automaton: bool, banned: BanList | None, sampler: sampling.Sampler,
                 eos: tuple[int, ...]) -> Decoder:
    vocab = model.config.vocab_size
    eos_arr = jnp.asarray(eos, jnp.int32)

    def split(params):
        if not has_automaton:
            return params, None
        if not isinstance(params, dict) or PARAMS_KEY not in params:
            raise ValueError("this constrained decoder reads its automaton from params: pass "
                             "with_constraint(params, constraint) to generate")
        tables = params[PARAMS_KEY]
        if not isinstance(tables, AutomatonTables) or tables.token_class.shape[0] != vocab:
            raise ValueError(f"params[{PARAMS_KEY!r}] must be a TokenAutomaton's tables over {vocab} tokens")
        return {k: v for k, v in params.items() if k != PARAMS_KEY}, tables

    def pick(tables, state: DecodeState, logits, key):
        b = logits.shape[0]
        astate = state.extra
        allowed = jnp.ones((b, vocab), bool) if tables is None else allowed_tokens(tables, astate)
        if banned is not None:
            allowed = allowed & ~ban_mask(banned, vocab, state.prompt, state.prompt_len, state.tokens,
                                          state.num_generated)
        ctx, mask = context_of(state) if sampler.needs_context else (None, None)
        tok = choose_token(logits, allowed, eos[0], sampler, key, ctx, mask)
        is_eos = jnp.isin(tok, eos_arr)
        if tables is not None:
            astate = jnp.where(is_eos, astate, advance(tables, astate, tok))
        return tok, astate, is_eos

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        mparams, tables = split(params)
        b = prompt.shape[0]
        out, cache = run_prompt(model, mparams, prompt, prompt_len, capacity)
        key, sub = jax.random.split(key)
        extra = jnp.zeros((b,), jnp.int32) if has_automaton else None
        state = initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + 1, extra=extra)
        tok, astate, is_eos = pick(tables, state, out.logits[:, 0], sub)
        state = emit(state, tok[:, None], jnp.ones((b,), jnp.int32))
        return dataclasses.replace(state, extra=astate, done=state.done | is_eos)

    def step(params, state: DecodeState) -> DecodeState:
        mparams, tables = split(params)
        active = ~state.done
        key, sub = jax.random.split(state.key)
        out = model.apply(mparams, state.last_token[:, None], state.cache.length[:, None], state.cache)
        tok, astate, is_eos = pick(tables, state, out.logits[:, 0], sub)
        state = dataclasses.replace(
            state, cache=kv.commit(out.cache, active.astype(jnp.int32)), key=key, calls=state.calls + active,
            extra=None if tables is None else jnp.where(active, astate, state.extra),
        )
        state = emit(state, tok[:, None], jnp.ones_like(state.num_generated))
        return dataclasses.replace(state, done=state.done | (active & is_eos))

    return Decoder(init=init, step=step, model=model, max_step_tokens=1, name="constrained")
