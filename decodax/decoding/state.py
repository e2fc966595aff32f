"""The Decoder protocol and the decoding state every method carries."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from decodax.model.cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Pytree carried through ``lax.while_loop`` by the driver.

    ``tokens[b, :num_generated[b]]`` are row b's emitted tokens. ``last_token``
    is the newest emitted token, not yet written to the cache (its RoPE
    position is ``cache.length``). ``calls[b]`` counts target forwards made
    while row b was still decoding (the prefill counts as one, and produces the
    first token), so ``num_generated / calls`` is the row's τ. ``extra`` holds
    the method's own state (a drafter's state, an n-gram pool, a Jacobi window).
    """

    tokens: Int[Array, "B N"]
    num_generated: Int[Array, " B"]
    done: Bool[Array, " B"]
    cache: KVCache
    key: PRNGKeyArray
    last_token: Int[Array, " B"]
    prompt: Int[Array, "B P"]
    prompt_len: Int[Array, " B"]
    calls: Int[Array, " B"]
    steps: Int[Array, ""]
    extra: Any = None


class Decoder(NamedTuple):
    """A decoding method as a pair of pure functions (optax-style).

    init(params, prompt int32[B, P], prompt_len int32[B], key, *, max_new_tokens, capacity)
        -> DecodeState   (prefill; emits the first token)
    step(params, state) -> state   (emits >= 1 token for every row not done)

    ``init`` may also emit nothing (beam and contrastive search pick the first
    token in their first step: ``max_new_tokens`` steps still suffice). A
    decoder may finish a row itself by setting ``done[b]`` (beam search does
    when its best hypothesis is final; it then rewrites the row's tokens and
    length); the driver keeps such a row done.

    ``model`` (the target ``Model``) lets the driver validate inputs before
    tracing; ``max_step_tokens`` bounds the tokens one step may emit, which
    sizes the output buffer and the cache slack.
    """

    init: Callable[..., DecodeState]
    step: Callable[[Any, DecodeState], DecodeState]
    model: Any = None
    max_step_tokens: int = 1
    name: str = "decoder"
