"""What every quantizer shares: the result type, straight-through rounding, code checks.

* :class:`Quantized` -- the result of every quantizer: straight-through vectors, integer
  codes, the weighted auxiliary loss, its named terms and batch statistics;
* :func:`straight_through` -- the straight-through estimator (Bengio et al. 2013, as used
  by VQ-VAE, van den Oord et al. 2017): the forward value of ``q``, the gradient of ``x``;
* :func:`check_codes` / :func:`take_codes` -- ``codes -> vectors`` with range checks;
* :func:`digits_to_index` / :func:`index_to_digits` -- mixed-radix packing of per-dimension
  digits into one code id (FSQ's and LFQ's implicit codebooks).

Code ids out of range: every ``codes -> vectors`` function raises ``ValueError`` when the
codes are concrete (eager calls, NumPy input). Under ``jax.jit`` the values are unknown at
trace time, so nothing is checked and out-of-range ids (negative ones included) decode to
NaN vectors, never silently to a wrong code.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "Quantized", "check_codebook_size", "check_codes", "check_groups", "digits_to_index",
    "index_to_digits", "masked_mean", "straight_through", "take_codes",
]


class Quantized(NamedTuple):
    """The result of a quantizer (a pytree).

    ``quantized`` has the forward value of the code vectors and the straight-through
    gradient of the input; ``codes`` are integer ids (their trailing shape depends on the
    quantizer: none for VQ/FSQ/LFQ, ``[G]`` for group LFQ, ``[D]`` for QLAE, ``[S]`` for
    RVQ); ``loss`` is the weighted sum of ``losses`` to add to the reconstruction loss;
    ``stats`` are batch statistics (code perplexity, utilization, ...).
    """

    quantized: Float[Array, "*batch D"]
    codes: Int[Array, "*batch ..."]
    loss: Float[Array, ""]
    losses: dict[str, Float[Array, ""]]
    stats: dict[str, Array]


def straight_through(x: Float[Array, "*s"], q: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """Straight-through estimator: the value of ``q`` with the identity gradient to ``x``
    (``x + stop_gradient(q - x)``; Bengio et al. 2013, VQ-VAE's copy of gradients)."""
    return x + jax.lax.stop_gradient(q - x)


def masked_mean(v: Float[Array, "*batch"], mask: Bool[Array, "*batch"] | None) -> Float[Array, ""]:
    """Mean of ``v`` over the positions where ``mask`` (broadcast to ``v``) is true; all when ``None``."""
    if mask is None:
        return jnp.mean(v)
    w = jnp.broadcast_to(mask, v.shape).astype(v.dtype)
    return jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0)


def check_codebook_size(size: int, what: str) -> None:
    """``ValueError`` unless ``size`` is an integer >= 2 (a one-entry codebook carries no bits)."""
    if int(size) != size or size < 2:
        raise ValueError(f"{what}: codebook size must be an integer >= 2, got {size}")


def check_groups(dim: int, groups: int, what: str) -> None:
    """``ValueError`` unless ``groups`` is a positive divisor of ``dim``."""
    if int(groups) != groups or groups < 1 or dim % groups:
        raise ValueError(f"{what}: group count {groups} does not divide the dimension {dim}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_codes(codes, num_codes: int | Sequence[int], what: str) -> None:
    """``ValueError`` if concrete ``codes`` lie outside ``[0, num_codes)``; a no-op under jit.

    ``num_codes`` may be a sequence: then it bounds the last axis of ``codes`` per position.
    """
    if not _is_concrete(codes):
        return
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{what}: codes must be integers, got dtype {c.dtype}")
    hi = np.asarray(num_codes)
    if c.size and (c.min() < 0 or np.any(c >= hi)):
        bad = c[(c < 0) | (c >= hi)]
        raise ValueError(f"{what}: code ids must lie in [0, {num_codes}), got {bad.ravel()[:8].tolist()}")


def take_codes(codebook: Float[Array, "K D"], codes: Int[Array, "*batch"], what: str) -> Float[Array, "*batch D"]:
    """``codebook[codes]``; out-of-range ids raise eagerly and give NaN rows under jit."""
    check_codes(codes, codebook.shape[0], what)
    return _take_or_nan(codebook, jnp.asarray(codes))


@jax.jit
def _take_or_nan(codebook, codes):
    k = codebook.shape[0]
    rows = jnp.take(codebook, jnp.clip(codes, 0, k - 1), axis=0)
    return jnp.where(((codes >= 0) & (codes < k))[..., None], rows, jnp.nan)


def digits_to_index(digits: Int[Array, "*batch n"], radices: Sequence[int]) -> Int[Array, "*batch"]:
    """Mixed-radix number of per-position digits, position 0 least significant
    (``index = sum_i digit_i * prod_{j<i} radix_j``)."""
    basis = np.cumprod([1, *radices[:-1]]).astype(np.int64)
    if int(np.prod(radices, dtype=np.float64)) > np.iinfo(np.int32).max:
        raise ValueError(f"codebook of size prod({list(radices)}) does not fit int32 code ids")
    return jnp.sum(jnp.asarray(digits, jnp.int32) * jnp.asarray(basis, jnp.int32), axis=-1)


def index_to_digits(index: Int[Array, "*batch"], radices: Sequence[int]) -> Int[Array, "*batch n"]:
    """Inverse of :func:`digits_to_index` for ids in ``[0, prod(radices))``."""
    basis = jnp.asarray(np.cumprod([1, *radices[:-1]]), jnp.int32)
    return (jnp.asarray(index, jnp.int32)[..., None] // basis) % jnp.asarray(radices, jnp.int32)
