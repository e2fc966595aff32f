"""Jacobi decoding and Speculative Jacobi Decoding as :class:`~decodax.decoding.Decoder`\\ s.

Jacobi decoding (Santilli et al. 2023, "Accelerating Transformer Inference for
Translation via Parallel Decoding"; the form used by CLLM, Kou et al. 2024)
treats the next ``n`` tokens as unknowns of the fixed-point system
``y_i = argmax p(. | x, y_<i)`` and iterates on a window of guesses: one
forward of ``[last, g_1 .. g_n]`` (``T = n + 1``, causal) gives every position's
prediction given the *current* guesses before it. The longest prefix of guesses
equal to their predictions is fixed (plus the prediction after it, which
depends only on fixed tokens), so an iteration emits ``1 .. n + 1`` tokens and
the output is exactly greedy decoding's. The window then slides: the
predictions made after the fixed prefix become the next guesses (the Jacobi
update ``g <- f(g)``), and the positions that slid in are filled by a
:mod:`~decodax.jacobi.init` initialiser.

Speculative Jacobi Decoding (Teng et al. 2024, "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding")
carries this to sampling: each guess ``g_i`` is *sampled* from the previous
iteration's distribution ``p_prev`` at its position, and is accepted with
probability ``min(1, p_now(g_i) / p_prev(g_i))`` where ``p_now`` conditions on
the accepted prefix; the first rejection resamples from
``norm(max(0, p_now - p_prev))``. That is the speculative-sampling rule of
:func:`~decodax.speculative.verify.verify_sampling` with ``p_prev`` as the draft
law; guesses that come from an initialiser (no ``p_prev`` yet) are verified as
deterministic drafts (accepted with probability ``p_now(g)``), which is exact
for any guess drawn independently of the verification. The window's guesses are
drawn independently given the previous iteration, so the output law is the
target's (SJD, Theorem 1).

Both are a :class:`~decodax.speculative.drafters.Drafter` (the window is the
drafter's state, refreshed from the verify forward's logits) run by the chain
decoder :func:`~decodax.speculative.decoder.speculative`, so counters (``calls``
= iterations + prefill, ``τ`` = tokens per iteration), EOS handling and the
driver are shared with every other method.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from decodax import sampling
from decodax.decoding.autoregressive import context_of
from decodax.decoding.state import Decoder, DecodeState
from decodax.jacobi.early_exit import EarlyExit
from decodax.jacobi.init import RandomInit, WindowInit
from decodax.speculative.decoder import speculative
from decodax.speculative.drafters import Drafter, Proposal

__all__ = ["JacobiState", "fed_window", "jacobi", "jacobi_drafter"]


class JacobiState(NamedTuple):
    """The window carried between iterations: the previous forward's logits at each
    window position (``[B, n, V]``) and whether the position has one (``known``;
    ``False`` = take the initialiser's guess). Counters for relaxed convergence
    (:class:`~decodax.jacobi.early_exit.EarlyExit`): ``age``, the Jacobi updates the
    position's guess has had; ``prev``, the guess fed there at the previous
    iteration (``-1``: none); ``stable``, for how many consecutive iterations the
    guess has not changed (set by ``propose`` for the guesses it proposes)."""

    logits: Float[Array, "B n V"]
    known: Bool[Array, "B n"]
    age: Int[Array, "B n"]
    prev: Int[Array, "B n"]
    stable: Int[Array, "B n"]


def _check_window(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}: window size must be an int >= 1, got {n!r}")
    return n


def jacobi_drafter(window: int, init: WindowInit, vocab_size: int) -> Drafter:
    """The Jacobi window as a chain drafter: proposes the previous iteration's predictions
    (argmax when greedy; samples of ``p_prev`` with their probabilities otherwise, SJD),
    the initialiser's guesses where there are none."""
    _check_window("jacobi_drafter", window)
    if not isinstance(init, WindowInit):
        raise ValueError(f"jacobi_drafter: init must be a WindowInit (decodax.jacobi.init), got {init!r}")
    return _jacobi_drafter(window, init, int(vocab_size))


@functools.lru_cache(maxsize=64)
def _jacobi_drafter(n: int, init: WindowInit, vocab: int) -> Drafter:

    def start(params, state: DecodeState, **unused) -> JacobiState:
        b = state.last_token.shape[0]
        zero = jnp.zeros((b, n), jnp.int32)
        return JacobiState(jnp.zeros((b, n, vocab), jnp.float32), jnp.zeros((b, n), bool), zero, zero - 1, zero)

    def propose(params, state: DecodeState, js: JacobiState, key, *, k: int, sampler) -> Proposal:
        if k != n:
            raise ValueError(f"jacobi_drafter: the decoder's k ({k}) must equal the window size ({n})")
        k_init, k_draw = jax.random.split(key)
        guess = init(state, k_init, n)
        ctx = mask = None
        if sampler.needs_context:  # penalties see the context emitted so far
            ctx, mask = context_of(state)
            ctx, mask = ctx[:, None], mask[:, None]
        length = jnp.full(guess.shape[:1], n, jnp.int32)
        if sampler.is_greedy:
            pred = sampling.sample_with(sampler, js.logits, None, context=ctx, context_mask=mask)
            tokens = jnp.where(js.known, pred, guess).astype(jnp.int32)
            return Proposal(tokens, None, length, _stability(js, tokens))
        q = sampling.probs(sampler, js.logits, ctx, mask)
        drawn = sampling.sample(jnp.log(q), k_draw)
        tokens = jnp.where(js.known, drawn, guess).astype(jnp.int32)
        probs = jnp.where(js.known[..., None], q, 0.0)  # 0: a deterministic (initialiser) guess
        return Proposal(tokens, probs, length, _stability(js, tokens))

    def update(js: JacobiState, state: DecodeState, accepted, *, logits, tokens, path) -> JacobiState:
        """Slide: fed ``[last, g_1 .. g_n]``, ``accepted`` guesses fixed plus one; the logits at
        fed positions ``accepted + 1 .. n`` predict the new window's first ``n - accepted``
        positions (conditioned on the stale guesses: the Jacobi update)."""
        src = accepted[:, None] + 1 + jnp.arange(n, dtype=jnp.int32)[None, :]
        known = src <= n
        lg = jnp.take_along_axis(logits, jnp.clip(src, 0, n)[..., None], axis=1)
        carried = src < n  # the position held a fed guess (old window index src)
        old = jnp.clip(src, 0, n - 1)
        age = jnp.where(carried, jnp.take_along_axis(js.age, old, axis=1) + 1, known.astype(jnp.int32))
        prev = jnp.where(carried, jnp.take_along_axis(tokens, old + 1, axis=1), -1)
        stable = jnp.where(carried, jnp.take_along_axis(js.stable, old, axis=1), 0)
        return JacobiState(lg.astype(jnp.float32), known, age, prev, stable)

    return Drafter(init=start, propose=propose, update=update, name=f"jacobi(n={n}, {type(init).__name__})",
                   may_be_empty=False, wants_logits=True)


def _stability(js: JacobiState, tokens) -> JacobiState:
    """Count the iterations a refreshed guess has kept its value (initialiser guesses: 0)."""
    same = js.known & (tokens == js.prev)
    return js._replace(stable=jnp.where(same, js.stable + 1, 0).astype(jnp.int32))


def jacobi(model, *, window: int, init: WindowInit | None = None, sampler: sampling.Sampler | None = None,
           verifier=None, early_exit: EarlyExit | None = None) -> Decoder:
    """Jacobi decoding (greedy sampler; Santilli et al. 2023) or Speculative Jacobi
    Decoding (any other sampler; Teng et al. 2024) with a window of ``window``
    guesses (module docstring). ``init``: the :mod:`~decodax.jacobi.init`
    initialiser (default :class:`RandomInit` over the vocabulary). ``verifier``
    replaces the SJD acceptance rule (tests use it for negative controls).
    ``early_exit`` (greedy only): CEED-VLA's relaxed convergence
    (:class:`~decodax.jacobi.early_exit.EarlyExit`); *lossy*, the output is no longer
    greedy decoding's.

    Raises ``ValueError`` for a window < 1 or one that, with the last token, does not
    fit the model's context (``max_seq_len``); the driver rejects a cache capacity
    without room for ``window + 1`` tokens past the generation budget."""
    _check_window("jacobi", window)
    limit = model.config.max_seq_len
    if window + 1 > limit:
        raise ValueError(f"jacobi: window {window} + 1 exceeds the model's context ({limit} tokens)")
    init = init if init is not None else RandomInit(model.config.vocab_size)
    drafter = jacobi_drafter(window, init, model.config.vocab_size)
    if early_exit is not None and not isinstance(early_exit, EarlyExit):
        raise ValueError(f"jacobi: early_exit must be an EarlyExit, got {early_exit!r}")
    dec = speculative(model, drafter, k=window, sampler=sampler, verifier=verifier, skip_empty=False,
                      relaxed=early_exit)
    kind = "sjd" if sampler is not None and not sampler.is_greedy else "jacobi"
    exit_ = f", {early_exit}" if early_exit is not None else ""
    return dec._replace(name=f"{kind}[n={window}, {type(init).__name__}{exit_}]")


def fed_window(drafter: Drafter, params, state: DecodeState, *, window: int,
               sampler: sampling.Sampler) -> jax.Array:
    """The guesses the next :func:`jacobi` step will feed (``[B, window]``): the drafter's
    proposal under the chain decoder's own key split (for trajectory recording and
    consistency-distillation data)."""
    k_draft = jax.random.split(state.key, 3)[1]  # as speculative()'s step: (key, k_draft, k_verify)
    return drafter.propose(params, state, state.extra, k_draft, k=window, sampler=sampler).tokens
