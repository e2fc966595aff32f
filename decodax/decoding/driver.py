"""The one jitted driver that runs any Decoder: prefill, then ``lax.while_loop``."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from decodax.decoding.state import Decoder, DecodeState


class GenerateOutput(NamedTuple):
    """Host-side result of ``generate``: tokens (padded), lengths and counters."""

    tokens: np.ndarray  # int32[B, max_new_tokens], valid up to lengths[b]
    lengths: np.ndarray  # int32[B]
    calls: np.ndarray  # int32[B] target forwards while the row was decoding (prefill included)
    steps: int  # decoder steps run by the loop (after the prefill)

    @property
    def tau(self) -> np.ndarray:
        """Mean emitted tokens per target forward, per row."""
        return self.lengths / np.maximum(self.calls, 1)

    def rows(self) -> list[list[int]]:
        return [self.tokens[b, : self.lengths[b]].tolist() for b in range(len(self.lengths))]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_prompts(
    prompts: Sequence[Sequence[int]] | np.ndarray, pad_to: int = 32, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged prompts to a bucketed width; return (int32[B, P], lengths int32[B])."""
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("expected at least one prompt, got an empty batch")
    lengths = np.array([len(r) for r in rows], np.int32)
    if lengths.min() < 1:
        raise ValueError(f"every prompt needs >= 1 token, got lengths {lengths.tolist()}")
    width = round_up(int(lengths.max()), pad_to)
    out = np.full((len(rows), width), pad_id, np.int32)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out, lengths


def _stop_table(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    if not stop_sequences:
        return np.full((0, 1), -1, np.int32)
    width = max(len(s) for s in stop_sequences)
    table = np.full((len(stop_sequences), width), -1, np.int32)
    for i, s in enumerate(stop_sequences):
        if len(s) < 1:
            raise ValueError("stop sequences must be non-empty")
        table[i, width - len(s):] = s  # right-aligned: the sequence ends at the last column
    return table


def _finish(state: DecodeState, before: DecodeState, eos: Array, stops: Array, n_max: int,
            window: int) -> DecodeState:
    """Per-row EOS / stop-sequence / length handling of the tokens one step appended.

    Rows the decoder marked ``done`` itself stay done (their tokens and length are
    the decoder's)."""
    was_done = before.done
    start = before.num_generated
    n_new = jnp.where(was_done, start, state.num_generated)
    rows = jnp.arange(state.tokens.shape[0])[:, None]
    idx = start[:, None] + jnp.arange(window)[None, :]  # [B, W] candidate positions
    fresh = idx < n_new[:, None]
    tok = state.tokens[rows, jnp.minimum(idx, state.tokens.shape[1] - 1)]
    hit = jnp.isin(tok, eos) if eos.shape[0] else jnp.zeros_like(fresh)
    if stops.shape[0]:
        width = stops.shape[1]
        back = idx[:, :, None] - (width - 1) + jnp.arange(width)[None, None, :]  # [B, W, L]
        seq = state.tokens[rows[:, :, None], jnp.clip(back, 0, state.tokens.shape[1] - 1)]
        ok = (stops[None, None] == seq[:, :, None, :]) | (stops[None, None] < 0)
        in_range = (back >= 0)[:, :, None, :] | (stops[None, None] < 0)
        hit = hit | jnp.any(jnp.all(ok & in_range, axis=-1), axis=-1)
    hit = hit & fresh
    first = jnp.argmax(hit, axis=1)
    stopped = jnp.any(hit, axis=1)
    n_new = jnp.where(stopped, start + first + 1, n_new)
    n_new = jnp.minimum(n_new, n_max)
    # A decoder may finish a row itself (beam search: the row's best hypothesis is final).
    done = was_done | state.done | stopped | (n_new >= n_max)
    return dataclasses.replace(state, num_generated=n_new, done=done)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "capacity"))
def _run(decoder: Decoder, params, prompt, prompt_len, key, eos, stops, budget, *,
         max_new_tokens, capacity):
    n_max = jnp.minimum(budget, max_new_tokens)
    state0 = decoder.init(params, prompt, prompt_len, key, max_new_tokens=max_new_tokens,
                          capacity=capacity)
    empty = dataclasses.replace(state0, num_generated=jnp.zeros_like(state0.num_generated),
                                done=jnp.zeros_like(state0.done))
    state = _finish(state0, empty, eos, stops, n_max, decoder.max_step_tokens)

    def body(s):
        nxt = decoder.step(params, s)
        nxt = dataclasses.replace(nxt, steps=s.steps + 1)
        return _finish(nxt, s, eos, stops, n_max, decoder.max_step_tokens)

    # Every step emits >= 1 token per active row, so max_new_tokens steps always
    # suffice; the bound only guards against a decoder that emits nothing.
    state = jax.lax.while_loop(
        lambda s: jnp.any(~s.done) & (s.steps < max_new_tokens), body, state
    )
    return state.tokens[:, :max_new_tokens], state.num_generated, state.calls, state.steps


def generate(
    decoder: Decoder,
    params,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int,
    key: PRNGKeyArray | None = None,
    eos_ids: Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    capacity: int | None = None,
    pad_to: int = 32,
    budget: int | None = None,
) -> GenerateOutput:
    """Run ``decoder`` on a batch of ragged prompts inside one jitted call.

    Prompts are right-padded to a bucketed width (``pad_to``) and the cache
    capacity is bucketed to a multiple of 128 above what the longest prompt
    needs, so similar calls reuse one compilation. The loop is a
    ``lax.while_loop``: no host round trip per token. A row stops at an EOS id
    (default: the model's), at the end of any stop sequence, or after
    ``max_new_tokens``; emitted stop tokens are included in the output.
    ``budget`` (<= max_new_tokens) stops rows earlier with the same compiled
    program, e.g. to warm up the compilation cache before timing.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    prompt, lengths = pad_prompts(prompts, pad_to=pad_to)
    model = decoder.model
    if model is not None:
        vocab = model.config.vocab_size
        bad = [(b, t) for b in range(len(lengths)) for t in prompt[b, : lengths[b]] if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"token ids must be in [0, {vocab}) for this model's vocabulary, got {bad[0][1]} "
                f"in prompt {bad[0][0]}"
            )
        if eos_ids is None:
            eos_ids = model.config.eos_ids
    needed = int(lengths.max()) + max_new_tokens + decoder.max_step_tokens
    if capacity is None:
        capacity = round_up(max(needed, prompt.shape[1]), 128)
    elif needed > capacity:
        raise ValueError(
            f"cache capacity {capacity} is too small: the longest prompt ({int(lengths.max())} "
            f"tokens) plus max_new_tokens ({max_new_tokens}) plus {decoder.max_step_tokens} "
            f"slack needs {needed} slots"
        )
    if model is not None and needed > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context length {model.config.max_seq_len}"
        )
    eos = jnp.asarray(np.array(list(eos_ids or ()), np.int32))
    stops = jnp.asarray(_stop_table(stop_sequences))
    key = jax.random.key(0) if key is None else key
    tokens, n, calls, steps = _run(
        decoder, params, jnp.asarray(prompt), jnp.asarray(lengths), key, eos, stops,
        jnp.int32(max_new_tokens if budget is None else budget), max_new_tokens=max_new_tokens, capacity=capacity,
    )
    return GenerateOutput(
        tokens=np.asarray(tokens), lengths=np.asarray(n), calls=np.asarray(calls), steps=int(steps)
    )
