"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation",
NeurIPS) as a Decoder.

At every step, with ``p`` the model's next-token distribution and ``V_k`` its
``k`` most likely tokens, the next token is

    argmax_{v in V_k}  (1 - alpha) * p(v)  -  alpha * max_j cos(h_v, h_j)

where ``h_v`` is the last-layer hidden state of ``v`` fed after the context and
``h_j`` those of every context token (prompt included): the *degeneration
penalty* (``alpha`` in [0, 1]; ``alpha = 0`` is greedy decoding). Hidden states
are taken after the final RMSNorm, as HF transformers' ``hidden_states[-1]``.

One forward per step: the ``k`` candidates are fed together (``T = k``) at the
same position, each attending to the committed cache and itself only (a
diagonal ``attn_mask``: k sibling leaves of a token tree), which gives their
hidden states and the next distributions at once; the chosen candidate's KV
entry is moved into place and committed with ``KVCache.gather``. The context's
hidden states live in the state (static capacity: prompt width +
``max_new_tokens``). The prefill's distribution picks the first token the same
way: ``init`` only prefills and emits nothing (so a row makes ``n + 1``
forwards for ``n`` tokens, and the driver's ``max_new_tokens`` steps still
suffice). Deterministic: the ``key`` is unused and
logits processors (``Sampler``) are not applied.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax.decoding.autoregressive import emit, initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.model import cache as kv
from decodax.model.transformer import rms_norm

__all__ = ["ContrastiveState", "contrastive_search", "degeneration_penalty"]


class ContrastiveState(NamedTuple):
    """``logits[b]``: the next-token logits after row b's context; ``hidden[b, :count[b]]``:
    unit-norm hidden states of its context. Unlike the other decoders, the last emitted
    token is already in the cache (it was fed as a candidate)."""

    logits: Float[Array, "B V"]
    hidden: Float[Array, "B C D"]
    count: Int[Array, " B"]


def contrastive_search(model, *, k: int = 4, alpha: float = 0.6) -> Decoder:
    """Contrastive search (module docstring) with ``k`` candidates (``top_k``) and
    degeneration penalty ``alpha`` in [0, 1] (``penalty_alpha``); HF's example values
    are the defaults. Memoised on its arguments. Raises ``ValueError`` on bad ones."""
    vocab = model.config.vocab_size
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
        raise ValueError(f"contrastive_search: k must be an int in [1, {vocab}] (the vocabulary), got {k!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"contrastive_search: alpha must be a float in [0, 1], got {alpha!r}")
    if k > model.config.max_seq_len:
        raise ValueError(f"contrastive_search: k = {k} exceeds the model's context")
    return _contrastive(model, int(k), float(alpha))


def _unit(x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def degeneration_penalty(cand: Float[Array, "B K D"], context: Float[Array, "B C D"],
                         count: Int[Array, " B"]) -> Float[Array, "B K"]:
    """``max_j cos(cand[b, i], context[b, j])`` over the first ``count[b]`` context states
    (both given as unit vectors)."""
    cos = jnp.einsum("bkd,bcd->bkc", cand, context)
    valid = jnp.arange(context.shape[1])[None, None, :] < count[:, None, None]
    return jnp.max(jnp.where(valid, cos, -2.0), axis=-1)


@functools.lru_cache(maxsize=32)
def _contrastive(model, k: int, alpha: float) -> Decoder:
    eps = model.config.norm_eps

    def states(params, hidden):
        return _unit(rms_norm(hidden, params["final_norm"], eps))

    def step(params, state: DecodeState) -> DecodeState:
        cs: ContrastiveState = state.extra
        active = ~state.done
        b = state.tokens.shape[0]
        rows = jnp.arange(b)
        probs = jax.nn.softmax(cs.logits.astype(jnp.float32), axis=-1)
        top_p, top_ids = jax.lax.top_k(probs, k)  # [B, k]
        cache = state.cache
        positions = jnp.broadcast_to(cache.length[:, None], (b, k))
        alone = jnp.broadcast_to(jnp.eye(k, dtype=bool), (b, k, k))  # each candidate sees the cache and itself
        out = model.apply(params, top_ids.astype(jnp.int32), positions, cache, alone)
        h = states(params, out.hidden)  # [B, k, D]
        score = (1.0 - alpha) * top_p - alpha * degeneration_penalty(h, cs.hidden, cs.count)
        choice = jnp.argmax(score, axis=-1)
        tok = top_ids[rows, choice].astype(jnp.int32)
        slot = jnp.where(active, cs.count, cs.hidden.shape[1])  # done rows write nothing
        extra = ContrastiveState(
            logits=jnp.where(active[:, None], out.logits[rows, choice], cs.logits),
            hidden=cs.hidden.at[rows, slot].set(h[rows, choice], mode="drop"),
            count=cs.count + active,
        )
        state = dataclasses.replace(
            state,
            cache=kv.gather(out.cache, choice[:, None].astype(jnp.int32), active.astype(jnp.int32)),
            extra=extra,
            calls=state.calls + active,
        )
        return emit(state, tok[:, None], jnp.ones((b,), jnp.int32))

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        b, p = prompt.shape
        out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
        hidden = jnp.zeros((b, p + max_new_tokens, model.config.dim), jnp.float32)
        state = initial_state(
            prompt, prompt_len, cache, key, width=max_new_tokens + k,
            extra=ContrastiveState(logits=out.logits[:, 0],
                                   hidden=hidden.at[:, :p].set(states(params, out.hidden)),
                                   count=prompt_len),
        )
        return state  # emits nothing: the first step picks the first token from the prefill's logits

    # A step writes k cache entries past the committed length (one kept): k slots of slack.
    return Decoder(init=init, step=step, model=model, max_step_tokens=k, name=f"contrastive{k}")
