"""Plain autoregressive decoding, the baseline every other method is measured against."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from decodax import sampling
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv


def context_of(state: DecodeState):
    """Prompt plus emitted tokens of every row, with a validity mask (for penalties)."""
    ctx = jnp.concatenate([state.prompt, state.tokens], axis=1)
    p, n = state.prompt.shape[1], state.tokens.shape[1]
    mask = jnp.concatenate(
        [
            jnp.arange(p)[None, :] < state.prompt_len[:, None],
            jnp.arange(n)[None, :] < state.num_generated[:, None],
        ],
        axis=1,
    )
    return ctx, mask


def emit(state: DecodeState, new: jax.Array, count: jax.Array) -> DecodeState:
    """Append ``new[b, :count[b]]`` to each row's output (rows already done emit nothing)."""
    count = jnp.where(state.done, 0, count)
    k = new.shape[1]
    rows = jnp.arange(new.shape[0])[:, None]
    idx = state.num_generated[:, None] + jnp.arange(k)[None, :]
    idx = jnp.where(jnp.arange(k)[None, :] < count[:, None], idx, state.tokens.shape[1])
    tokens = state.tokens.at[rows, idx].set(new, mode="drop")
    last = jnp.take_along_axis(new, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    return dataclasses.replace(
        state,
        tokens=tokens,
        num_generated=state.num_generated + count,
        last_token=jnp.where(count > 0, last, state.last_token),
    )


def run_prompt(model, params, prompt, prompt_len, capacity):
    """Prefill the prompts into a fresh ``model.init_cache`` and commit them: ``(out, cache)``,
    ``out.logits[:, 0]`` the last prompt token's logits."""
    b, p = prompt.shape
    cache = model.init_cache(b, capacity)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = model.apply(params, prompt, positions, cache, logits_at=(prompt_len - 1)[:, None],
                      empty_cache=True)
    return out, kv.commit(out.cache, prompt_len)


def initial_state(prompt, prompt_len, cache, key, *, width: int, extra=None) -> DecodeState:
    """A ``DecodeState`` after the prefill: nothing emitted, one forward counted, an output
    buffer of ``width`` tokens."""
    b = prompt.shape[0]
    return DecodeState(
        tokens=jnp.zeros((b, width), jnp.int32),
        num_generated=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        cache=cache,
        key=key,
        last_token=jnp.zeros((b,), jnp.int32),
        prompt=prompt,
        prompt_len=prompt_len,
        calls=jnp.ones((b,), jnp.int32),
        steps=jnp.zeros((), jnp.int32),
        extra=extra,
    )


def prefill(model, params, prompt, prompt_len, key, *, sampler, max_new_tokens, capacity,
            max_step_tokens=1, extra=None, with_hidden=False):
    """Run the prompt through the model, commit it, and sample the first token.

    Returns the ``DecodeState``, or ``(state, hidden[B, P, D])`` with ``with_hidden``
    (drafters that learn from the prompt's logits use it)."""
    b = prompt.shape[0]
    out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
    key, sub = jax.random.split(key)
    state = initial_state(prompt, prompt_len, cache, key, width=max_new_tokens + max_step_tokens, extra=extra)
    ctx, mask = context_of(state)
    first = sampling.sample_with(sampler, out.logits[:, 0], sub, context=ctx, context_mask=mask)
    state = emit(state, first[:, None].astype(jnp.int32), jnp.ones((b,), jnp.int32))
    return (state, out.hidden) if with_hidden else state


def next_token(model, params, state: DecodeState, sampler: sampling.Sampler, key, *, taps: tuple[int, ...] = ()):
    """One T = 1 forward of ``last_token`` and the next token drawn by ``sampler``.

    Returns ``(token int32[B], ModelOutput)``; the output's cache holds the new
    entry uncommitted (``taps``: see ``Model.apply``).
    """
    out = model.apply(params, state.last_token[:, None], state.cache.length[:, None], state.cache, taps=taps)
    ctx, mask = context_of(state) if sampler.needs_context else (None, None)
    tok = sampling.sample_with(sampler, out.logits[:, 0], None if sampler.is_greedy else key,
                               context=ctx, context_mask=mask)
    return tok.astype(jnp.int32), out


def autoregressive(model, sampler: sampling.Sampler | None = None) -> Decoder:
    """Token-by-token decoding: one target forward per emitted token (τ = 1).

    Memoised on (model, sampler), both hashable, so repeated calls return the
    same Decoder and ``generate`` reuses its compilation.
    """
    return _autoregressive(model, sampler or sampling.make_sampler(temperature=0.0))


@functools.lru_cache(maxsize=64)
def _autoregressive(model, sampler: sampling.Sampler) -> Decoder:
    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        return prefill(model, params, prompt, prompt_len, key, sampler=sampler,
                       max_new_tokens=max_new_tokens, capacity=capacity)

    def step(params, state: DecodeState) -> DecodeState:
        active = ~state.done
        key, sub = jax.random.split(state.key)
        tok, out = next_token(model, params, state, sampler, sub)
        state = dataclasses.replace(
            state,
            cache=kv.commit(out.cache, active.astype(jnp.int32)),
            key=key,
            calls=state.calls + active,
        )
        return emit(state, tok[:, None].astype(jnp.int32), jnp.ones_like(state.num_generated))

    return Decoder(init=init, step=step, model=model, max_step_tokens=1, name="autoregressive")
