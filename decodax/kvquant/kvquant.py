"""KVQuant: non-uniform, dense-and-sparse KV quantization (Hooper et al., 2024).

"KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache
Quantization". The pieces, each a pure function:

* **Pre-RoPE per-channel keys.** Keys are quantized per channel *before* the
  rotary embedding (RoPE mixes channel pairs with a position-dependent angle,
  which smears the per-channel outlier structure). These functions quantize
  whatever they are given: the caller passes pre-RoPE keys and applies RoPE
  after :func:`dequantize`. Values are quantized per token.
* **Non-uniform datatype (nuqX).** Each layer gets ``2^b`` centroids, a 1-D
  k-means (:func:`fit_centroids`, Lloyd iterations from weighted-quantile
  initial points, deterministic) on calibration values normalised to
  ``[-1, 1]`` by the outlier thresholds. With ``weights`` (a Fisher-information
  proxy such as squared gradients, supplied by the caller) it is KVQuant's
  sensitivity-weighted k-means, minimising ``sum w (x - c(x))^2``.
* **Dense-and-sparse.** Per channel (keys) or per token (values), values
  outside the ``[outlier_frac/2, 1 - outlier_frac/2]`` percentiles are kept in
  full precision in a sparse ``(flat index, value)`` list of static capacity;
  the others are normalised and coded as the nearest centroid.
* **Attention sink.** The first ``sink`` tokens are kept in full precision
  (and left out of the per-channel thresholds).

Calibration::

    lo, hi = thresholds(k_calib, axis=-2)                 # pre-RoPE keys of one layer
    inlier = jnp.abs(normalise(k_calib, lo, hi)) <= 1
    c = fit_centroids(normalise(k_calib, lo, hi), bits=3, weights=fisher * inlier)
    q = quantize_keys(k, c)                                 # thresholds from k, or bounds=(lo, hi)

Codes are stored unpacked (``uint8``, one per element): 3-bit codes do not fit
the byte-aligned packing of :mod:`decodax.kvquant.packing`;
:func:`bytes_per_token` counts ``b`` bits per code.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int32, UInt8

from decodax.kvquant.packing import check_bits

__all__ = [
    "NUQ_BITS", "KVQuantBlock", "assign", "bytes_per_token", "dequantize", "fit_centroids",
    "normalise", "quantize", "quantize_keys", "quantize_values", "thresholds",
]

NUQ_BITS = (2, 3, 4)


class KVQuantBlock(NamedTuple):
    """A dense-and-sparse quantized ``[..., S, D]`` block.

    ``lo``/``hi`` broadcast against the block (``[..., 1, D]`` per channel,
    ``[..., S, 1]`` per token); ``outlier_idx`` are flat indices into ``S*D``
    whose exact values are ``outlier_val``; ``sink`` are the first tokens, exact.
    """

    codes: UInt8[Array, "*batch S D"]
    lo: Float[Array, "*#batch #S #D"]
    hi: Float[Array, "*#batch #S #D"]
    outlier_idx: Int32[Array, "*batch cap"]
    outlier_val: Float[Array, "*batch cap"]
    sink: Float[Array, "*batch n_sink D"]
    centroids: Float[Array, " K"]


def _check_centroids(centroids: Array) -> None:
    if centroids.ndim != 1 or centroids.shape[0] not in {2**b for b in NUQ_BITS}:
        raise ValueError(
            f"KVQuant: expected 1-D centroids of length 2^b, b in {NUQ_BITS}, got shape {centroids.shape}"
        )


def _check_frac(outlier_frac: float) -> None:
    if not 0.0 <= outlier_frac < 1.0:
        raise ValueError(f"KVQuant: outlier_frac must be in [0, 1), got {outlier_frac}")


def _check_block(shape: tuple[int, ...], sink: int) -> None:
    if len(shape) < 2:
        raise ValueError(f"KVQuant: expected [..., S, D], got shape {shape}")
    if not 0 <= sink < shape[-2]:
        raise ValueError(f"KVQuant: sink ({sink}) must be in [0, S={shape[-2]})")


def _stats_axis(axis: int) -> int:
    if axis not in (-2, -1):
        raise ValueError(f"KVQuant: axis must be -2 (per channel, over tokens) or -1 (per token), got {axis}")
    return axis


@partial(jax.jit, static_argnames=("q", "axis", "sink"))
def _percentiles(x: Array, q: tuple[float, ...], axis: int, sink: int) -> list[Array]:
    """``np.quantile(x, q, axis, keepdims=True)`` (linear) past the sink: one sort, static positions."""
    x = jnp.asarray(x, jnp.float32)
    if axis == -2:
        x = x[..., sink:, :]
    axis = axis % x.ndim
    n = x.shape[axis]
    xs = jnp.sort(x, axis=axis)

    def take(i: int) -> Array:
        return jax.lax.slice_in_dim(xs, i, i + 1, axis=axis)

    out = []
    for p in q:
        pos = p * (n - 1)
        i = min(math.floor(pos), n - 1)
        j, f = min(i + 1, n - 1), pos - i
        out.append(take(i) * (1 - f) + take(j) * f if f else take(i))
    return out


def thresholds(
    x: Float[Array, "*batch S D"], axis: int = -2, outlier_frac: float = 0.01, sink: int = 1
) -> tuple[Float[Array, "*#batch #S #D"], Float[Array, "*#batch #S #D"]]:
    """Outlier thresholds ``(lo, hi)``: the ``outlier_frac/2`` and ``1 - outlier_frac/2`` percentiles.

    ``axis=-2``: per channel, over the tokens after the ``sink`` (keys);
    ``axis=-1``: per token, over the channels (values).
    """
    _check_frac(outlier_frac)
    _stats_axis(axis)
    _check_block(jnp.shape(x), sink)
    lo, hi = _percentiles(x, (outlier_frac / 2, 1 - outlier_frac / 2), axis, sink)
    return lo, hi


@jax.jit
def normalise(
    x: Float[Array, "*batch S D"], lo: Float[Array, "*#batch #S #D"], hi: Float[Array, "*#batch #S #D"]
) -> Float[Array, "*batch S D"]:
    """Map ``[lo, hi]`` onto ``[-1, 1]`` (outliers land outside; a zero range maps to 0)."""
    half = (hi - lo) / 2
    return (jnp.asarray(x, jnp.float32) - (hi + lo) / 2) / jnp.where(half == 0, 1.0, half)


@jax.jit
def assign(x: Float[Array, "*shape"], centroids: Float[Array, " K"]) -> UInt8[Array, "*shape"]:
    """Index of the nearest centroid (``centroids`` sorted ascending; ties go to the lower one)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return jnp.sum(jnp.asarray(x)[..., None] > mids, axis=-1, dtype=jnp.uint8)


def fit_centroids(
    values: Float[Array, "*shape"],
    bits: int,
    weights: Float[Array, "*shape"] | None = None,
    iters: int = 20,
) -> Float[Array, " K"]:
    """Sorted ``2^bits`` centroids of a (sensitivity-)weighted 1-D k-means (Lloyd).

    Initial centroids are the weighted ``(j + 1/2) / 2^bits`` quantiles; a
    cluster left empty keeps its centroid. Zero weights drop values (outliers).
    """
    check_bits(bits, NUQ_BITS, "KVQuant centroids")
    if iters < 1:
        raise ValueError(f"KVQuant centroids: iters must be >= 1, got {iters}")
    x = jnp.ravel(jnp.asarray(values, jnp.float32))
    w = jnp.ones_like(x) if weights is None else jnp.ravel(jnp.asarray(weights, jnp.float32))
    if w.shape != x.shape:
        raise ValueError(
            f"KVQuant centroids: weights {jnp.shape(weights)} do not match values {jnp.shape(values)}"
        )
    return _kmeans(x, w, 2**bits, iters)


@partial(jax.jit, static_argnames=("k", "iters"))
def _kmeans(x: Array, w: Array, k: int, iters: int) -> Array:
    order = jnp.argsort(x)
    cum = jnp.cumsum(w[order])
    targets = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k * cum[-1]
    first = jnp.sum(cum[None, :] < targets[:, None], axis=-1)  # first index reaching each target
    init = x[order][jnp.clip(first, 0, x.size - 1)]
    clusters = jnp.arange(k, dtype=jnp.uint8)

    def lloyd(c, _):
        onehot = (assign(x, c)[:, None] == clusters).astype(jnp.float32)
        num, den = (w * x) @ onehot, w @ onehot
        return jnp.sort(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), c)), None

    centroids, _ = jax.lax.scan(lloyd, init, None, length=iters)
    return centroids


def _default_capacity(shape: tuple[int, ...], axis: int, outlier_frac: float, sink: int) -> int:
    """Most values strictly outside the percentile thresholds computed from the block itself."""
    s, d = shape[-2], shape[-1]
    n, groups = (s - sink, d) if axis == -2 else (d, s - sink)
    return groups * 2 * math.ceil((n - 1) * outlier_frac / 2)


@partial(jax.jit, static_argnames=("axis", "outlier_frac", "sink", "capacity"))
def quantize(
    x: Float[Array, "*batch S D"],
    centroids: Float[Array, " K"],
    *,
    axis: int = -2,
    outlier_frac: float = 0.01,
    sink: int = 1,
    capacity: int | None = None,
    bounds: tuple[Array, Array] | None = None,
) -> KVQuantBlock:
    """Dense-and-sparse non-uniform quantization of a ``[..., S, D]`` block.

    ``axis=-2``: per-channel thresholds (keys), ``axis=-1``: per token (values).
    ``bounds=(lo, hi)`` (e.g. :func:`thresholds` of calibration data) replaces the block's own
    percentiles. ``capacity`` (static) is the number of sparse full-precision
    entries per block; by default enough for every outlier of the block's own
    percentiles. Entries are chosen by distance outside ``[lo, hi]``; surplus
    slots hold the next largest values, also exact.
    """
    _check_centroids(centroids)
    _stats_axis(axis)
    _check_frac(outlier_frac)
    x = jnp.asarray(x, jnp.float32)
    _check_block(x.shape, sink)
    lo, hi = thresholds(x, axis, outlier_frac, sink) if bounds is None else bounds
    s, d = x.shape[-2:]
    cap = _default_capacity(x.shape, axis, outlier_frac, sink) if capacity is None else capacity
    if not 0 <= cap <= (s - sink) * d:
        raise ValueError(f"KVQuant: capacity {cap} must be in [0, {(s - sink) * d}]")
    xn = normalise(x, lo, hi)
    codes = assign(jnp.clip(xn, -1.0, 1.0), centroids)
    score = jnp.where(jnp.arange(s)[:, None] < sink, -1.0, jnp.abs(xn)).reshape(*x.shape[:-2], s * d)
    _, idx = jax.lax.top_k(score, cap)
    val = jnp.take_along_axis(x.reshape(*x.shape[:-2], s * d), idx, axis=-1)
    return KVQuantBlock(codes, lo, hi, idx.astype(jnp.int32), val, x[..., :sink, :], centroids)


def quantize_keys(k: Float[Array, "*batch S D"], centroids: Float[Array, " K"], **kw) -> KVQuantBlock:
    """Per-channel KVQuant of *pre-RoPE* keys (apply RoPE after dequantizing)."""
    return quantize(k, centroids, axis=-2, **kw)


def quantize_values(v: Float[Array, "*batch S D"], centroids: Float[Array, " K"], **kw) -> KVQuantBlock:
    """Per-token KVQuant of values."""
    return quantize(v, centroids, axis=-1, **kw)


@jax.jit
def dequantize(q: KVQuantBlock) -> Float[Array, "*batch S D"]:
    """Centroids scaled back to ``[lo, hi]``, then the sparse outliers and the sink, exact."""
    x = q.centroids[q.codes] * ((q.hi - q.lo) / 2) + (q.hi + q.lo) / 2
    *batch, s, d = x.shape
    flat = x.reshape(-1, s * d)
    n, cap = flat.shape[0], q.outlier_idx.shape[-1]
    rows = jnp.arange(n)[:, None]
    flat = flat.at[rows, q.outlier_idx.reshape(n, cap)].set(q.outlier_val.reshape(n, cap))
    x = flat.reshape(*batch, s, d)
    return x.at[..., : q.sink.shape[-2], :].set(q.sink)


def bytes_per_token(
    head_dim: int,
    bits: int,
    context: int,
    *,
    outlier_frac: float = 0.01,
    sink: int = 1,
    float_bytes: int = 4,
    index_bytes: int = 4,
    kv_heads: int = 1,
    layers: int = 1,
) -> float:
    """KV bytes per token of a KVQuant cache (keys and values), over a ``context``-token block.

    Codes ``b`` bits each; key thresholds ``2*D`` floats per block, value
    thresholds 2 floats per token; ``outlier_frac`` of the entries as
    ``(index, value)`` pairs; the ``sink`` tokens in float. The per-layer
    centroids (``2^b`` floats) are negligible and not counted.
    """
    check_bits(bits, NUQ_BITS, "KVQuant")
    _check_frac(outlier_frac)
    if context < 1:
        raise ValueError(f"KVQuant: context must be >= 1, got {context}")
    codes = 2 * head_dim * bits / 8
    stats = 2 * head_dim * float_bytes / context + 2 * float_bytes
    sparse = 2 * outlier_frac * head_dim * (float_bytes + index_bytes)
    sinks = 2 * sink * head_dim * float_bytes / context
    return float((codes + stats + sparse + sinks) * kv_heads * layers)
