"""Logits processors and sampling: pure, jit- and vmap-compatible, composable.

Every decoder and every speculative verifier obtains its token distribution
from one place, :func:`process` (and :func:`probs` / :func:`log_probs` built on
it), so that the target and draft distributions a verifier compares are exactly
the ones a plain decoder would sample from.

A :class:`Sampler` is a frozen, hashable description of the processing chain
(a static argument of ``jax.jit``). :func:`process` applies, in this order::

    sanitize -> repetition penalty -> presence penalty -> temperature
             -> top-k -> top-p -> min-p -> fallback

Conventions shared by every function here:

* Logits have shape ``[..., V]``: any number of leading batch dimensions.
* A masked token has logit ``-inf``; processors never revive a masked token.
* NaN logits are treated as ``-inf``. A row with a ``+inf`` logit means
  "certainly one of these": it becomes uniform over its ``+inf`` entries.
* A row that ends up with every logit ``-inf`` falls back to a one-hot at the
  argmax of the raw logits (NaN read as ``-inf``), so a sampled id is always in
  ``[0, V - 1]`` and :func:`probs` is always a distribution.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

__all__ = [
    "Sampler",
    "make_sampler",
    "apply_temperature",
    "top_k_mask",
    "top_p_mask",
    "min_p_mask",
    "repetition_penalty",
    "presence_penalty",
    "seen_mask",
    "sanitize",
    "process",
    "probs",
    "log_probs",
    "sample",
    "sample_with",
]


# --------------------------------------------------------------------------- #
# Validation (plain Python, runs before any tracing)
# --------------------------------------------------------------------------- #


def _real(name: str, value, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be {expected} (a Python number: the Sampler is static), "
            f"got {value!r} of type {type(value).__name__}"
        )
    return float(value)


def _check_temperature(temperature) -> float:
    expected = "a finite float >= 0 (0 means greedy)"
    t = _real("temperature", temperature, expected)
    if not (math.isfinite(t) and t >= 0.0):
        raise ValueError(f"temperature must be {expected}, got {temperature!r}")
    return t


def _check_top_k(top_k) -> int:
    expected = "an int >= 1"
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"top_k must be {expected}, got {top_k!r} of type {type(top_k).__name__}")
    k = int(top_k)
    if k < 1:
        raise ValueError(f"top_k must be {expected}, got {top_k!r}")
    return k


def _check_top_p(top_p) -> float:
    expected = "a float in (0, 1]"
    p = _real("top_p", top_p, expected)
    if not (0.0 < p <= 1.0):  # also rejects NaN
        raise ValueError(f"top_p must be {expected}, got {top_p!r}")
    return p


def _check_min_p(min_p) -> float:
    expected = "a float in [0, 1]"
    p = _real("min_p", min_p, expected)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"min_p must be {expected}, got {min_p!r}")
    return p


def _check_repetition_penalty(penalty) -> float:
    expected = "a finite float > 0 (1 = no penalty)"
    r = _real("repetition_penalty", penalty, expected)
    if not (math.isfinite(r) and r > 0.0):
        raise ValueError(f"repetition_penalty must be {expected}, got {penalty!r}")
    return r


def _check_presence_penalty(penalty) -> float:
    expected = "a finite float (0 = no penalty)"
    a = _real("presence_penalty", penalty, expected)
    if not math.isfinite(a):
        raise ValueError(f"presence_penalty must be {expected}, got {penalty!r}")
    return a


# --------------------------------------------------------------------------- #
# Sampler
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static description of a sampling chain; frozen and hashable.

    Fields (``None`` disables a stage):

    * ``temperature``: ``0`` means greedy (one-hot at the argmax).
    * ``top_k``: keep every token whose logit is >= the k-th largest.
    * ``top_p``: nucleus sampling (Holtzman et al., 2020).
    * ``min_p``: min-p sampling (Nguyen et al., 2024).
    * ``repetition_penalty``: CTRL penalty (Keskar et al., 2019).
    * ``presence_penalty``: OpenAI-style additive penalty on seen tokens.

    Construction validates every field and raises ``ValueError``; use
    :func:`make_sampler` for the keyword-only factory.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("temperature", _check_temperature(self.temperature))
        if self.top_k is not None:
            set_("top_k", _check_top_k(self.top_k))
        if self.top_p is not None:
            set_("top_p", _check_top_p(self.top_p))
        if self.min_p is not None:
            set_("min_p", _check_min_p(self.min_p))
        if self.repetition_penalty is not None:
            set_("repetition_penalty", _check_repetition_penalty(self.repetition_penalty))
        if self.presence_penalty is not None:
            set_("presence_penalty", _check_presence_penalty(self.presence_penalty))

    @property
    def is_greedy(self) -> bool:
        """True when ``temperature == 0``: decoding is a deterministic argmax."""
        return self.temperature == 0.0

    @property
    def needs_context(self) -> bool:
        """True when a penalty is active, so :func:`process` needs the context."""
        return (self.repetition_penalty is not None and self.repetition_penalty != 1.0) or (
            self.presence_penalty is not None and self.presence_penalty != 0.0
        )


def make_sampler(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
) -> Sampler:
    """Build and validate a :class:`Sampler` (raises ``ValueError`` before tracing).

    ``temperature`` finite and >= 0 (0 = greedy); ``top_k`` int >= 1; ``top_p``
    in (0, 1]; ``min_p`` in [0, 1]; ``repetition_penalty`` finite and > 0;
    ``presence_penalty`` finite. ``None`` disables a stage.
    """
    return Sampler(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
    )


# --------------------------------------------------------------------------- #
# Individual processors
# --------------------------------------------------------------------------- #


def _nan_to_neg_inf(logits: Float[Array, "*B V"]) -> Float[Array, "*B V"]:
    return jnp.where(jnp.isnan(logits), -jnp.inf, logits)


# The public functions below validate their static arguments in Python (so a
# bad value raises ValueError before any tracing) and then call a jitted
# implementation: eager calls compile one fused program instead of dozens of
# op-by-op kernels, and inside a caller's jit the inner jit is simply inlined.


_clean = jax.jit(_nan_to_neg_inf)


@jax.jit
def _sanitize(x):
    x = _nan_to_neg_inf(x)
    pos_inf = jnp.isposinf(x)
    has_pos_inf = jnp.any(pos_inf, axis=-1, keepdims=True)
    return jnp.where(has_pos_inf, jnp.where(pos_inf, jnp.zeros_like(x), -jnp.inf), x)


@jax.jit
def _greedy(x):
    x = _nan_to_neg_inf(x)
    hot = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=jnp.bool_)
    return jnp.where(hot, jnp.zeros_like(x), -jnp.inf)


@jax.jit
def _temperature(x, t):
    x = _nan_to_neg_inf(x)
    row_max = jnp.max(x, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, jnp.zeros_like(row_max))
    shifted = x - row_max  # <= 0 or -inf; a +inf entry gives NaN, re-read as -inf
    return _nan_to_neg_inf(shifted / t.astype(x.dtype))


@partial(jax.jit, static_argnums=1)
def _top_k(x, k):
    x = _nan_to_neg_inf(x)
    kth = jax.lax.top_k(x, k)[0][..., -1:]
    return jnp.where(x >= kth, x, -jnp.inf)


@jax.jit
def _top_p(x, p):
    x = _nan_to_neg_inf(x)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    # one stable sort: decreasing logits, ties by increasing token id
    neg_sorted, order = jax.lax.sort((-x, iota), dimension=x.ndim - 1, num_keys=1, is_stable=True)
    x_sorted = -neg_sorted
    pr = jax.nn.softmax(x_sorted.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=-1)
    cum = jnp.cumsum(pr, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    # n = length of the kept prefix (>= 1; an all -inf row has NaN mass after rank 0)
    n = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    # keep every token ranked at or before the last kept one (x_t, id i_t)
    x_t = jnp.take_along_axis(x_sorted, n - 1, axis=-1)
    i_t = jnp.take_along_axis(order, n - 1, axis=-1)
    keep = (x > x_t) | ((x == x_t) & (iota <= i_t))
    return jnp.where(keep, x, -jnp.inf)


@jax.jit
def _min_p(x, min_p):
    x = _nan_to_neg_inf(x)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    ratio = jnp.exp(xf - jnp.max(xf, axis=-1, keepdims=True))  # prob / max prob
    return jnp.where(ratio >= min_p, x, -jnp.inf)


@partial(jax.jit, static_argnums=2)
def _seen(context, valid, vocab_size):
    lead, length = context.shape[:-1], context.shape[-1]
    n = math.prod(lead)
    ids = jnp.where(valid & (context >= 0) & (context < vocab_size), context, vocab_size)
    rows = jnp.arange(n)[:, None]
    seen = jnp.zeros((n, vocab_size), jnp.bool_)
    seen = seen.at[rows, ids.reshape(n, length)].set(True, mode="drop")  # id V is dropped
    return seen.reshape(*lead, vocab_size)


@jax.jit
def _repetition(x, seen, penalty):
    x = _nan_to_neg_inf(x)
    pen = penalty.astype(x.dtype)
    return jnp.where(seen, jnp.where(x > 0, x / pen, x * pen), x)


@jax.jit
def _presence(x, seen, penalty):
    x = _nan_to_neg_inf(x)
    return jnp.where(seen, x - penalty.astype(x.dtype), x)


def _check_logits(logits) -> Array:
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a float array [..., V], got dtype {logits.dtype}")
    return logits


def _check_context(context, context_mask) -> tuple[Array, Array]:
    """(context, valid) with valid a bool mask of the context's shape."""
    context = jnp.asarray(context)
    if not jnp.issubdtype(context.dtype, jnp.integer):
        raise ValueError(f"context must be an integer array [..., L], got dtype {context.dtype}")
    if context.ndim < 1:
        raise ValueError(f"context must have shape [..., L], got shape {context.shape}")
    if context_mask is None:
        return context, jnp.ones(context.shape, jnp.bool_)
    m = jnp.asarray(context_mask)
    if m.dtype == jnp.bool_:
        if m.shape != context.shape:
            raise ValueError(
                f"context_mask (bool) must have the context's shape {context.shape}, got {m.shape}"
            )
        return context, m
    if jnp.issubdtype(m.dtype, jnp.integer):
        if m.shape != context.shape[:-1]:
            raise ValueError(
                "context_mask given as lengths (int) must have shape "
                f"{context.shape[:-1]}, got {m.shape}"
            )
        return context, jnp.arange(context.shape[-1]) < m[..., None]
    raise ValueError(
        f"context_mask must be bool [..., L] or integer lengths [...], got dtype {m.dtype}"
    )


# --------------------------------------------------------------------------- #
# Individual processors (public)
# --------------------------------------------------------------------------- #


def sanitize(logits: Float[Array, "*B V"]) -> Float[Array, "*B V"]:
    """NaN -> ``-inf``; a row holding ``+inf`` becomes uniform over its ``+inf`` entries.

    The result has no NaN and no ``+inf``; a row with ``+inf`` logits gets the
    limit of softmax (mass shared equally by its infinite entries).
    """
    return _sanitize(_check_logits(logits))


def apply_temperature(logits: Float[Array, "*B V"], temperature: float) -> Float[Array, "*B V"]:
    """Logits of ``softmax(logits / temperature)``, each row shifted so its max is 0.

    The shift leaves the distribution unchanged and avoids overflow at small
    temperatures. ``temperature == 0`` returns the greedy limit: ``0`` at the
    argmax (first index among ties) and ``-inf`` elsewhere. NaN is read as ``-inf``.
    """
    t = _check_temperature(temperature)
    x = _check_logits(logits)
    return _greedy(x) if t == 0.0 else _temperature(x, t)


def top_k_mask(logits: Float[Array, "*B V"], k: int) -> Float[Array, "*B V"]:
    """Top-k filtering (Fan et al., 2018): mask tokens below the k-th largest logit.

    Tie rule: every token whose logit is >= the k-th largest value is kept, so
    ties at the boundary are all kept and a row may keep more than ``k`` tokens
    (the rule of HF ``TopKLogitsWarper``). ``k >= V`` keeps everything. NaN is
    read as ``-inf``.
    """
    k = _check_top_k(k)
    x = _check_logits(logits)
    return _clean(x) if k >= x.shape[-1] else _top_k(x, k)


def top_p_mask(logits: Float[Array, "*B V"], p: float) -> Float[Array, "*B V"]:
    """Nucleus (top-p) filtering, Holtzman et al. 2020 (ICLR), Sec. 3.1 / Eq. 2.

    Keeps the smallest set of tokens whose probability mass is >= ``p``.
    Definition used (deterministic with ties): order tokens by decreasing logit,
    ties broken by increasing token id; the token at rank ``r`` is kept iff the
    (float32) softmax mass of the ranks before it is ``< p``. The most likely
    token is always kept; ties straddling the boundary are cut towards the lower
    token ids, so the set is exactly minimal. ``p = 1`` keeps everything. NaN is
    read as ``-inf``.
    """
    p = _check_top_p(p)
    x = _check_logits(logits)
    return _clean(x) if p >= 1.0 else _top_p(x, p)


def min_p_mask(logits: Float[Array, "*B V"], min_p: float) -> Float[Array, "*B V"]:
    """Min-p filtering, Nguyen et al. 2024 ("Turning Up the Heat: Min-p Sampling").

    Keeps tokens with ``prob >= min_p * max_prob``, computed as
    ``exp(logit - max_logit) >= min_p``. The most likely tokens are always
    kept; ``min_p = 0`` keeps everything. NaN is read as ``-inf``.
    """
    min_p = _check_min_p(min_p)
    x = _check_logits(logits)
    return _clean(x) if min_p == 0.0 else _min_p(x, min_p)


def seen_mask(
    context: Int[Array, "*C L"],
    context_mask: Bool[Array, "*C L"] | Int[Array, "*C"] | None,
    vocab_size: int,
) -> Bool[Array, "*C V"]:
    """``seen[..., v]``: token ``v`` occurs at a valid position of ``context``.

    ``context_mask`` is either a boolean validity mask ``[..., L]`` or integer
    lengths ``[...]`` (positions ``< length`` are valid); ``None`` means all
    valid. Ids outside ``[0, vocab_size)`` (padding such as ``-1``) are ignored.
    """
    context, valid = _check_context(context, context_mask)
    return _seen(context, valid, int(vocab_size))


def repetition_penalty(
    logits: Float[Array, "*B V"],
    penalty: float,
    context: Int[Array, "*C L"],
    context_mask: Bool[Array, "*C L"] | Int[Array, "*C"] | None = None,
) -> Float[Array, "*B V"]:
    """CTRL repetition penalty, Keskar et al. 2019, Sec. 4.1 (penalized sampling).

    For every token seen in the valid context, a positive logit is divided by
    ``penalty`` and a negative one multiplied by it (``penalty > 1`` discourages
    repetition). The context's leading dims must broadcast against the logits'
    (e.g. ``context [B, 1, L]`` for logits ``[B, K, V]``). NaN is read as ``-inf``.
    """
    penalty = _check_repetition_penalty(penalty)
    x = _check_logits(logits)
    return _repetition(x, seen_mask(context, context_mask, x.shape[-1]), penalty)


def presence_penalty(
    logits: Float[Array, "*B V"],
    penalty: float,
    context: Int[Array, "*C L"],
    context_mask: Bool[Array, "*C L"] | Int[Array, "*C"] | None = None,
) -> Float[Array, "*B V"]:
    """OpenAI-style presence penalty: subtract ``penalty`` from the logit of every
    token seen (at least once) in the valid context. Broadcasting as in
    :func:`repetition_penalty`. NaN is read as ``-inf``.
    """
    penalty = _check_presence_penalty(penalty)
    x = _check_logits(logits)
    return _presence(x, seen_mask(context, context_mask, x.shape[-1]), penalty)


# --------------------------------------------------------------------------- #
# The composed chain
# --------------------------------------------------------------------------- #


def _fallback(processed, raw_clean):
    """Rows that are entirely ``-inf`` become a one-hot at the raw argmax."""
    dead = jnp.all(jnp.isneginf(processed), axis=-1, keepdims=True)
    return jnp.where(dead, _greedy(raw_clean), processed)


@partial(jax.jit, static_argnums=0)
def _process(sampler: Sampler, logits, context, valid):
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    vocab = x.shape[-1]
    raw = _sanitize(x)
    x = raw
    if sampler.needs_context:
        seen = _seen(context, valid, vocab)
        if sampler.repetition_penalty is not None and sampler.repetition_penalty != 1.0:
            x = _repetition(x, seen, sampler.repetition_penalty)
        if sampler.presence_penalty is not None and sampler.presence_penalty != 0.0:
            x = _presence(x, seen, sampler.presence_penalty)
        x = _sanitize(x)  # a penalty may overflow to -inf (or +inf for negative presence)
    if sampler.is_greedy:
        return _greedy(_fallback(x, raw))
    if sampler.temperature != 1.0:
        x = _temperature(x, sampler.temperature)
    if sampler.top_k is not None and sampler.top_k < vocab:
        x = _top_k(x, sampler.top_k)
    if sampler.top_p is not None and sampler.top_p < 1.0:
        x = _top_p(x, sampler.top_p)
    if sampler.min_p is not None and sampler.min_p > 0.0:
        x = _min_p(x, sampler.min_p)
    return _fallback(x, raw)


def _check_process_args(sampler, logits, context, context_mask):
    if not isinstance(sampler, Sampler):
        raise ValueError(
            f"sampler must be a Sampler (see make_sampler), got {type(sampler).__name__}"
        )
    logits = _check_logits(logits)
    if not sampler.needs_context:
        return logits, None, None
    if context is None:
        raise ValueError(
            "sampler has an active penalty (repetition_penalty="
            f"{sampler.repetition_penalty}, presence_penalty={sampler.presence_penalty}) "
            "and needs context tokens [..., L], got context=None"
        )
    context, valid = _check_context(context, context_mask)
    return logits, context, valid


def process(
    sampler: Sampler,
    logits: Float[Array, "*B V"],
    context: Int[Array, "*C L"] | None = None,
    context_mask: Bool[Array, "*C L"] | Int[Array, "*C"] | None = None,
) -> Float[Array, "*B V"]:
    """Apply ``sampler``'s chain: penalties, temperature, top-k, top-p, min-p.

    The single source of every decoder's and verifier's distribution:
    ``softmax(process(...))`` is what :func:`sample_with` samples. The result is
    at least float32, never NaN or ``+inf``, and never an all ``-inf`` row
    (such a row falls back to a one-hot at the argmax of the raw logits, NaN
    read as ``-inf``). With ``temperature == 0`` it is the greedy one-hot
    (``0`` at the argmax of the penalized logits, ``-inf`` elsewhere).
    ``context`` (int ``[..., L]``) and ``context_mask`` (bool ``[..., L]`` or
    int lengths ``[...]``) are needed only when a penalty is active; the
    context's leading dims must broadcast against the logits'.
    """
    logits, context, valid = _check_process_args(sampler, logits, context, context_mask)
    return _process(sampler, logits, context, valid)


_softmax = jax.jit(partial(jax.nn.softmax, axis=-1))
_log_softmax = jax.jit(partial(jax.nn.log_softmax, axis=-1))


def probs(
    sampler: Sampler,
    logits: Float[Array, "*B V"],
    context: Int[Array, "*C L"] | None = None,
    context_mask: Bool[Array, "*C L"] | Int[Array, "*C"] | None = None,
) -> Float[Array, "*B V"]:
    """The sampling distribution ``softmax(process(...))``; one-hot when greedy."""
    return _softmax(process(sampler, logits, context, context_mask))


def log_probs(
    sampler: Sampler,
    logits: Float[Array, "*B V"],
    context: Int[Array, "*C L"] | None = None,
    context_mask: Bool[Array, "*C L"] | Int[Array, "*C"] | None = None,
) -> Float[Array, "*B V"]:
    """``log_softmax(process(...))``: ``-inf`` on masked tokens."""
    return _log_softmax(process(sampler, logits, context, context_mask))


@jax.jit
def _sample(x, key):
    x = _sanitize(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    drawn = jax.random.categorical(key, x, axis=-1)
    dead = jnp.all(jnp.isneginf(x), axis=-1)
    ids = jnp.where(dead, jnp.argmax(x, axis=-1), drawn)
    return jnp.clip(ids, 0, x.shape[-1] - 1).astype(jnp.int32)


def sample(logits: Float[Array, "*B V"], key: PRNGKeyArray) -> Int[Array, "*B"]:
    """One categorical draw per row from ``softmax(logits)`` (Gumbel-max).

    ``logits`` are taken as already processed. NaN is read as ``-inf``; a row
    that is all ``-inf``/NaN returns the argmax of its sanitized logits (0), so
    the id is always in ``[0, V - 1]``. Returns int32 ``[...]``.
    """
    return _sample(_check_logits(logits), key)


@partial(jax.jit, static_argnums=0)
def _sample_with(sampler, logits, key, context, valid):
    x = _process(sampler, logits, context, valid)
    if sampler.is_greedy:
        return jnp.clip(jnp.argmax(x, axis=-1), 0, x.shape[-1] - 1).astype(jnp.int32)
    return _sample(x, key)


def sample_with(
    sampler: Sampler,
    logits: Float[Array, "*B V"],
    key: PRNGKeyArray | None,
    context: Int[Array, "*C L"] | None = None,
    context_mask: Bool[Array, "*C L"] | Int[Array, "*C"] | None = None,
) -> Int[Array, "*B"]:
    """Draw token ids with ``sampler``: the greedy argmax when ``temperature == 0``
    (equal to ``jnp.argmax`` on NaN-free logits without penalties; ``key`` is
    unused and may be None), otherwise :func:`sample` of :func:`process`.
    Returns int32 ``[...]``.
    """
    logits, context, valid = _check_process_args(sampler, logits, context, context_mask)
    if key is None and not sampler.is_greedy:
        raise ValueError(f"sampling at temperature {sampler.temperature} needs a PRNG key, got None")
    return _sample_with(sampler, logits, None if sampler.is_greedy else key, context, valid)
