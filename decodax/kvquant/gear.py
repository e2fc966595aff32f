"""GEAR: quantization + low-rank residual + sparse outliers (Kang et al., 2024).

"GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
Inference of LLM". A ``[..., S, D]`` block (one head's keys or values) is
approximated as ``X ~ D + L + S``:

1. **S (sparse):** the ``outlier_frac`` entries of largest magnitude (a static
   count per block) are kept exactly as ``(flat index, value)`` pairs and left
   out of the quantization range;
2. **D (dense):** uniform asymmetric low-bit quantization of the rest
   (:func:`decodax.kvquant.uniform.quantize_asymmetric`; per token with
   ``axis=-1``, or KIVI-style per channel grouped along tokens with
   ``axis=-2, group=G``), codes packed as in :mod:`decodax.kvquant.packing`;
3. **L (low rank):** a rank-``r`` approximation ``A @ B.T`` of the
   quantization residual ``X - D`` (zero at the outliers), by power (subspace)
   iteration from a Gaussian start drawn with an explicit PRNG key.

Dequantize: ``D + A @ B.T`` with the sparse entries written back exactly
(the same as adding the sparse correction ``S = X - D - L`` there).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int32, PRNGKeyArray, UInt8

from decodax.kvquant import kivi, packing, uniform

__all__ = ["GEAR_BITS", "GearBlock", "bytes_per_token", "compress", "decompress", "low_rank"]

GEAR_BITS = packing.PACK_BITS
_HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class GearBlock:
    """A GEAR-compressed ``[..., S, D]`` block: packed codes, low-rank factors, sparse outliers."""

    codes: UInt8[Array, "*batch S Dp"]
    scale: Float[Array, "*batch Gs Gd"]
    zero: Float[Array, "*batch Gs Gd"]
    a: Float[Array, "*batch S r"]
    b: Float[Array, "*batch D r"]
    outlier_idx: Int32[Array, "*batch n"]
    outlier_val: Float[Array, "*batch n"]
    bits: int = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)


def _check_rank(s: int, d: int, rank: int, iters: int) -> None:
    if not 0 <= rank <= min(s, d):
        raise ValueError(f"GEAR: rank must be in [0, min(S, D) = {min(s, d)}], got {rank}")
    if iters < 1:
        raise ValueError(f"GEAR: power iterations must be >= 1, got {iters}")


def low_rank(
    r: Float[Array, "*batch S D"], rank: int, key: PRNGKeyArray, iters: int = 3
) -> tuple[Float[Array, "*batch S rank"], Float[Array, "*batch D rank"]]:
    """``(A, B)`` with ``r ~ A @ B.T``: power (subspace) iteration from a Gaussian start.

    The start is the first ``rank`` columns of one Gaussian ``[D, D]`` draw, so
    the ranks of a sweep start from nested subspaces. Each iteration
    ``A = orth(r @ B)``, ``B = r.T @ A``; ``A`` is orthonormal, so ``A @ B.T``
    is ``r`` projected onto ``A``'s columns.
    """
    s, d = r.shape[-2:]
    _check_rank(s, d, rank, iters)
    start = jax.random.normal(key, (*r.shape[:-2], d, d), jnp.float32)
    return _power_iteration(jnp.asarray(r, jnp.float32), start, rank, iters)


@partial(jax.jit, static_argnames=("rank", "iters"))
def _power_iteration(r: Array, start: Array, rank: int, iters: int) -> tuple[Array, Array]:
    b = start[..., :rank]
    a = jnp.zeros((*r.shape[:-1], rank), jnp.float32)
    rt = jnp.swapaxes(r, -1, -2)
    for _ in range(iters if rank else 0):
        a = jnp.linalg.qr(jnp.matmul(r, b, precision=_HIGHEST))[0]
        b = jnp.matmul(rt, a, precision=_HIGHEST)
    return a, b


@partial(jax.jit, static_argnames="count")
def _outliers(x: Array, count: int) -> tuple[Array, Array, Array]:
    """Flat indices, exact values and a mask of the ``count`` largest-magnitude entries."""
    s, d = x.shape[-2:]
    flat = x.reshape(*x.shape[:-2], s * d)
    _, idx = jax.lax.top_k(jnp.abs(flat), count)
    val = jnp.take_along_axis(flat, idx, axis=-1)
    mask = jnp.put_along_axis(jnp.zeros(flat.shape, bool), idx, True, axis=-1, inplace=False)
    return idx.astype(jnp.int32), val, mask.reshape(x.shape)


@partial(jax.jit, static_argnames="axis")
def _residual(x: Array, q: uniform.AsymQuant, mask: Array, axis: int) -> Array:
    """The quantization residual ``X - D``, zero at the outliers (they are restored exactly)."""
    return jnp.where(mask, 0.0, x - uniform.dequantize_asymmetric(*q, axis=axis))


def compress(
    x: Float[Array, "*batch S D"],
    key: PRNGKeyArray,
    *,
    bits: int,
    rank: int,
    outlier_frac: float = 0.01,
    axis: int = -1,
    group: int | None = None,
    iters: int = 3,
) -> GearBlock:
    """GEAR-compress a block: sparse outliers, ``bits``-bit dense codes, rank-``rank`` residual.

    The outlier count is ``ceil(outlier_frac * S * D)`` per block (static).
    ``axis``/``group`` choose the quantization groups (see the module docstring).
    """
    packing.check_bits(bits, GEAR_BITS, "GEAR")
    if not 0.0 <= outlier_frac < 1.0:
        raise ValueError(f"GEAR: outlier_frac must be in [0, 1), got {outlier_frac}")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"GEAR: expected [..., S, D], got shape {x.shape}")
    if axis not in (-2, -1):
        raise ValueError(f"GEAR: axis must be -2 (per channel) or -1 (per token), got {axis}")
    s, d = x.shape[-2:]
    packing.packed_length(d, bits)  # D must pack
    n = x.shape[axis]
    if group is not None and (group < 1 or n % group):
        raise ValueError(f"GEAR: group size {group} does not divide the quantized axis ({n})")
    _check_rank(s, d, rank, iters)
    idx, val, mask = _outliers(x, math.ceil(outlier_frac * s * d))
    q = uniform.quantize_asymmetric(x, bits, axis=axis, group=group, exclude=mask)
    a, b = low_rank(_residual(x, q, mask, axis), rank, key, iters)
    return GearBlock(packing.pack(q.codes, bits), q.scale, q.zero, a, b, idx, val, bits, axis)


@jax.jit
def decompress(g: GearBlock) -> Float[Array, "*batch S D"]:
    """``D + A @ B.T``, the outliers written back exactly."""
    dense = uniform.dequantize_asymmetric(packing.unpack(g.codes, g.bits), g.scale, g.zero, axis=g.axis)
    x = dense + jnp.matmul(g.a, jnp.swapaxes(g.b, -1, -2), precision=_HIGHEST)
    s, d = x.shape[-2:]
    flat = x.reshape(*x.shape[:-2], s * d)
    flat = jnp.put_along_axis(flat, g.outlier_idx, g.outlier_val, axis=-1, inplace=False)
    return flat.reshape(x.shape)


def bytes_per_token(
    head_dim: int,
    bits: int,
    rank: int,
    context: int,
    *,
    group: int,
    outlier_frac: float = 0.01,
    float_bytes: int = 4,
    index_bytes: int = 4,
    kv_heads: int = 1,
    layers: int = 1,
) -> float:
    """KV bytes per token of GEAR over ``context``-token blocks (keys and values).

    Dense part as KIVI (keys per channel with ``group`` tokens, values per
    token); per block and per K/V, low-rank factors ``(context + D) * rank``
    floats and ``ceil(outlier_frac * context * D)`` ``(index, value)`` pairs,
    amortised over ``context`` tokens.
    """
    if context < 1:
        raise ValueError(f"GEAR: context must be >= 1, got {context}")
    dense = kivi.bytes_per_token(head_dim, bits, group)
    factors = (context + head_dim) * rank * float_bytes
    sparse = math.ceil(outlier_frac * context * head_dim) * (float_bytes + index_bytes)
    return float((dense + 2 * (factors + sparse) / context) * kv_heads * layers)
