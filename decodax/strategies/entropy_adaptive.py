"""Entropy-adaptive decoding (EAD; Simonds 2025, "Entropy Adaptive Decoding: Dynamic Model
Switching for Efficient Inference", arXiv 2502.06833) as a Decoder.

A small model generates while its predictions are confident; when the *rolling* entropy of its
next-token distributions is high, the large model produces the token. Here the small model is
the target's own early exit (its first ``exit_layer`` layers + final norm + LM head,
``Model.apply(..., exit_layer=)``, as the early-exit drafter's) and the large model the full
target. Every step:

1. the small model runs on the last token (``T = 1``, writing the first ``exit_layer`` layers'
   entries); the entropy ``H`` (nats) of its softmax joins a window of the row's last ``window``
   entropies (fewer at the start);
2. if the window's mean is ``>= threshold``, the large model gives this token's distribution,
   otherwise the small model's does; the token is drawn by the ``Sampler`` (default greedy).

The paper compares the rolling mean ``H_t`` of the last ``w`` entropies of "the model logit
distributions" with a threshold ``tau``; our reading takes the small model's entropy at every
step (it is computed every step, whichever model then produces the token), so the rule does not
depend on which model produced the earlier tokens.

``threshold = 0`` is the large model everywhere (plain decoding with the target); ``inf`` the
small model everywhere. The first token's decision uses the prefill's last-position entropy (the
prefill is a full forward, which also gives the early exit's logits as a tap).

Both models share one KV cache: the small model's entries are the first ``exit_layer`` layers
of the large model's, so the large model only lacks its deeper layers' entries for tokens that
only the small model processed. ``DecodeState.extra`` tracks per row ``deep_len``, the prefix
of slots whose deeper-layer entries are valid. A step that needs the large model (``lax.cond``:
any active row above its threshold) first *catches up* every row: a ``lax.while_loop`` of
full forwards over chunks of ``catchup`` context tokens from ``deep_len`` (the cache temporarily
rolled back to ``deep_len``, so those forwards attend only to valid entries and rewrite the
slots from there in every layer), then runs the full model on the last token, after which every
row's cache is complete. ``calls`` counts the row's large-model (full target) forwards: the
prefill, then one per token the large model produced (catch-up forwards are not counted);
``extra.large`` counts the tokens the large model produced, the first included
(:func:`large_fraction` divides it by the emitted tokens). :func:`with_threshold` sets the
threshold at run time (one compilation for a sweep).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax import sampling
from decodax.decoding.autoregressive import context_of, emit, initial_state
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.speculative.drafters import contiguous_context
from decodax.strategies.cautious import entropy

__all__ = ["THRESHOLD_KEY", "EADState", "entropy_adaptive", "large_fraction", "with_threshold"]

THRESHOLD_KEY = "ead_threshold"  # params entry overriding the threshold at run time


def _check_threshold(threshold, where: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise ValueError(f"{where}: threshold must be a float >= 0 (inf: never the large model), got {threshold!r}")
    return float(threshold)


def with_threshold(params: dict, threshold: float) -> dict:
    """``params`` plus a run-time threshold for :func:`entropy_adaptive` decoders (traced: one
    compilation serves a threshold sweep; without it the decoder's own applies)."""
    return {**params, THRESHOLD_KEY: jnp.float32(_check_threshold(threshold, "with_threshold"))}


class EADState(NamedTuple):
    """``window[b]``: the small model's last entropies (a ring, ``seen[b]`` pushed so far);
    ``deep_len[b]``: slots whose entries are valid in every layer; ``large[b]``: tokens the
    large model produced."""

    window: Float[Array, "B W"]
    seen: Int[Array, " B"]
    deep_len: Int[Array, " B"]
    large: Int[Array, " B"]


def large_fraction(state: DecodeState) -> Float[Array, " B"]:
    """Per row, the fraction of emitted tokens the large model produced."""
    return state.extra.large / jnp.maximum(state.num_generated, 1)


def _push(ead: EADState, h: Float[Array, " B"], active) -> tuple[EADState, Float[Array, " B"]]:
    w = ead.window.shape[1]
    slot = jnp.where(active, ead.seen % w, w)  # done rows push nothing
    window = ead.window.at[jnp.arange(h.shape[0]), slot].set(h, mode="drop")
    seen = ead.seen + active
    filled = jnp.arange(w)[None, :] < jnp.minimum(seen, w)[:, None]
    mean = jnp.sum(jnp.where(filled, window, 0.0), axis=1) / jnp.maximum(jnp.minimum(seen, w), 1)
    return ead._replace(window=window, seen=seen), mean


def entropy_adaptive(model, *, exit_layer: int, threshold: float, window: int = 4, catchup: int = 8,
                     sampler: sampling.Sampler | None = None) -> Decoder:
    """Entropy-adaptive decoding (module docstring) between the target's first ``exit_layer``
    layers (``1 <= exit_layer < n_layers``) and the full target: the large model produces a token
    when the mean entropy of the small model's last ``window >= 1`` distributions is ``>=
    threshold`` (nats, ``>= 0``; ``inf``: never; :func:`with_threshold` overrides it at run time).
    ``catchup >= 1`` is the chunk width of the deeper layers' catch-up forwards; ``sampler``
    (default greedy) draws every token. Memoised on its arguments. Raises ``ValueError`` on bad
    arguments."""
    n = model.config.n_layers
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, numbers.Integral) or not 1 <= exit_layer < n:
        raise ValueError(f"entropy_adaptive: exit_layer must be an int in [1, {n - 1}] (fewer layers than the "
                         f"target's {n}), got {exit_layer!r}")
    threshold = _check_threshold(threshold, "entropy_adaptive")
    for name, v in (("window", window), ("catchup", catchup)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"entropy_adaptive: {name} must be an int >= 1, got {v!r}")
    sampler = sampler or sampling.make_sampler(temperature=0.0)
    if not isinstance(sampler, sampling.Sampler):
        raise ValueError(f"entropy_adaptive: sampler must be a Sampler, got {type(sampler).__name__}")
    return _ead(model, int(exit_layer), float(threshold), int(window), int(catchup), sampler)


@functools.lru_cache(maxsize=32)
def _ead(model, exit_layer: int, threshold: float, w: int, chunk: int, sampler: sampling.Sampler) -> Decoder:

    def draw(state, logits, key):
        ctx, mask = context_of(state) if sampler.needs_context else (None, None)
        return sampling.sample_with(sampler, logits, None if sampler.is_greedy else key,
                                    context=ctx, context_mask=mask)

    def limit(params):
        return params[THRESHOLD_KEY] if isinstance(params, dict) and THRESHOLD_KEY in params else threshold

    def small_entropy(logits):
        return entropy(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        b, p = prompt.shape
        cache = model.init_cache(b, capacity)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        out = model.apply(params, prompt, positions, cache, logits_at=(prompt_len - 1)[:, None],
                          empty_cache=True, taps=(exit_layer,))
        tap = jnp.take_along_axis(out.taps[0], (prompt_len - 1)[:, None, None], axis=1)
        small = model.logits(params, tap)[:, 0]
        ead = EADState(window=jnp.zeros((b, w), jnp.float32), seen=jnp.zeros((b,), jnp.int32),
                       deep_len=prompt_len, large=jnp.zeros((b,), jnp.int32))
        ead, mean = _push(ead, small_entropy(small), jnp.ones((b,), bool))
        use_large = mean >= limit(params)
        key, sub = jax.random.split(key)  # as plain decoding's prefill
        state = initial_state(prompt, prompt_len, kv.commit(out.cache, prompt_len), key,
                              width=max_new_tokens + 1, extra=ead._replace(large=use_large.astype(jnp.int32)))
        first = draw(state, jnp.where(use_large[:, None], out.logits[:, 0], small), sub)
        return emit(state, first[:, None], jnp.ones((b,), jnp.int32))

    def catch_up(params, state: DecodeState, cache):
        """Full forwards over chunks of the context from ``deep_len`` until every row's deeper
        layers cover its committed slots."""
        seq, _ = contiguous_context(state)
        length = cache.length
        b = length.shape[0]

        def body(c):
            cache_c, deep = c
            pos = deep[:, None] + jnp.arange(chunk)[None, :]
            toks = jnp.take_along_axis(seq, jnp.clip(pos, 0, seq.shape[1] - 1), axis=1)
            out = model.apply(params, toks, pos, kv.rollback(cache_c, deep))
            return kv.rollback(out.cache, length), jnp.minimum(deep + chunk, length)

        return jax.lax.while_loop(lambda c: jnp.any(c[1] < length), body, (cache, state.extra.deep_len))[0]

    def step(params, state: DecodeState) -> DecodeState:
        active = ~state.done
        b = state.last_token.shape[0]
        key, sub = jax.random.split(state.key)
        cache = state.cache
        small_out = model.apply(params, state.last_token[:, None], cache.length[:, None], cache,
                                exit_layer=exit_layer)
        small = small_out.logits[:, 0]
        ead, mean = _push(state.extra, small_entropy(small), active)
        use_large = active & (mean >= limit(params))

        def large(c):
            c = catch_up(params, state, c)
            out = model.apply(params, state.last_token[:, None], c.length[:, None], c)
            return out.cache, out.logits[:, 0], jnp.broadcast_to(c.length + 1, (b,))

        def only_small(c):
            return c, small, ead.deep_len

        new_cache, big, deep = jax.lax.cond(jnp.any(use_large), large, only_small, small_out.cache)
        tok = draw(state, jnp.where(use_large[:, None], big, small), sub)
        one = active.astype(jnp.int32)
        ead = ead._replace(deep_len=jnp.where(active, deep, ead.deep_len), large=ead.large + use_large)
        state = dataclasses.replace(state, cache=kv.commit(new_cache, one), key=key,
                                    calls=state.calls + use_large, extra=ead)
        return emit(state, tok[:, None], jnp.ones((b,), jnp.int32))

    return Decoder(init=init, step=step, model=model, max_step_tokens=1,
                   name=f"ead(exit={exit_layer}, H>={threshold:g}, window={w})")
