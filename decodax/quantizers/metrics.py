"""Codebook and reconstruction metrics shared by every quantizer.

* codebook utilization: the fraction of the ``K`` codes used at least once;
* code perplexity: ``exp(H(p))`` of the empirical code histogram ``p`` (``K`` when every
  code is equally used, 1 when one code takes everything; van den Oord et al. 2017 and
  most VQ papers since report it);
* reconstruction MSE and PSNR ``10 log10(range^2 / MSE)``.

All are pure, jittable functions; ``mask`` (optional, broadcast to the codes' shape)
excludes positions such as padding or dropped RVQ stages.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

__all__ = ["code_histogram", "code_perplexity", "code_stats", "entropy", "mse", "psnr", "utilization"]


def code_histogram(codes: Int[Array, "*n"], num_codes: int, mask: Bool[Array, "*n"] | None = None) -> Float[Array, "K"]:
    """How many times each of the ``num_codes`` ids occurs (ids outside the range are dropped)."""
    codes = jnp.asarray(codes)
    w = jnp.ones(codes.shape, jnp.float32) if mask is None else jnp.broadcast_to(mask, codes.shape).astype(jnp.float32)
    codes, w = codes.reshape(-1), w.reshape(-1)
    return jnp.zeros((num_codes,), jnp.float32).at[codes].add(w, mode="drop")


def entropy(p: Float[Array, "*b K"]) -> Float[Array, "*b"]:
    """Shannon entropy in nats of distributions along the last axis (``0 log 0 = 0``)."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def code_stats(
    codes: Int[Array, "*n"], num_codes: int, mask: Bool[Array, "*n"] | None = None, per_book: bool = False
) -> dict[str, Float[Array, "*books"]]:
    """``{"perplexity", "utilization"}`` from one histogram.

    With ``per_book=True`` the last axis of ``codes`` indexes separate codebooks (RVQ stages,
    LFQ groups, QLAE dimensions) and both statistics are per book ``[B]``; ``mask`` then has
    the shape of ``codes`` or of ``codes`` without that axis.
    """
    codes = jnp.asarray(codes)
    books = codes.shape[-1] if per_book else 1
    w = jnp.ones(codes.shape, jnp.float32)
    if mask is not None:
        mask = jnp.asarray(mask)
        w = jnp.broadcast_to(mask[..., None] if per_book and mask.ndim < codes.ndim else mask, codes.shape)
        w = w.astype(jnp.float32)
    valid = (codes >= 0) & (codes < num_codes)  # out-of-range ids must not land in another book
    ids = jnp.where(valid, codes, 0) + (jnp.arange(books) * num_codes if per_book else 0)
    hist = jnp.zeros((books * num_codes,), jnp.float32).at[ids.reshape(-1)].add(jnp.where(valid, w, 0.0).reshape(-1))
    hist = hist.reshape(books, num_codes)
    p = hist / jnp.maximum(hist.sum(-1, keepdims=True), 1.0)
    stats = {"perplexity": jnp.exp(entropy(p)), "utilization": jnp.mean(hist > 0, axis=-1)}
    return stats if per_book else {k: v[0] for k, v in stats.items()}


def utilization(codes: Int[Array, "*n"], num_codes: int, mask: Bool[Array, "*n"] | None = None) -> Float[Array, ""]:
    """Fraction of the ``num_codes`` codes used at least once."""
    return code_stats(codes, num_codes, mask)["utilization"]


def code_perplexity(codes: Int[Array, "*n"], num_codes: int, mask: Bool[Array, "*n"] | None = None) -> Float[Array, ""]:
    """``exp`` of the entropy of the code histogram: the effective number of codes in use."""
    return code_stats(codes, num_codes, mask)["perplexity"]


def mse(x: Float[Array, "*s"], y: Float[Array, "*s"]) -> Float[Array, ""]:
    """Mean squared error."""
    return jnp.mean(jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)))


def psnr(x: Float[Array, "*s"], y: Float[Array, "*s"], data_range: float = 1.0) -> Float[Array, ""]:
    """Peak signal-to-noise ratio in dB for signals spanning ``data_range`` (1 for [0, 1] images)."""
    return 10.0 * jnp.log10(data_range**2 / mse(x, y))
