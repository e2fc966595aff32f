"""Uniform quantizers: asymmetric min/max with groups, and the symmetric int8/int4 baseline.

*Asymmetric* (the quantizer of KIVI, Liu et al. 2024, and of GEAR's dense part,
Kang et al. 2024): over each group of ``group`` consecutive elements along
``axis``, ``zero = min``, ``scale = (max - min) / (2^b - 1)`` (a zero scale
becomes 1, so constant groups round-trip exactly),
``code = clip(round((x - zero) / scale), 0, 2^b - 1)`` as ``uint8`` and
``x_hat = code * scale + zero``; ``|x - x_hat| <= scale / 2`` up to float
rounding.

*Symmetric per token* (what MaxText ships for its int8 KV cache):
``scale = absmax / qmax`` with ``qmax = 2^(b-1) - 1``, ``code =
clip(round(x / scale), -qmax, qmax)`` as ``int8``. The absmax element maps to
exactly ``+-qmax``: the ``rint(x * 127.5 / absmax)`` variant found in public
int8 caches sends it to 128, which overflows int8 (a test guards this). For
storage, ``code + qmax`` lies in ``[0, 2^b - 2]`` and packs with
:func:`decodax.kvquant.packing.pack`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8, UInt8

from decodax.kvquant.packing import check_bits

__all__ = [
    "ASYMMETRIC_BITS", "SYMMETRIC_BITS", "AsymQuant", "SymQuant", "dequantize_asymmetric",
    "dequantize_symmetric", "float_bytes_per_token", "quantize_asymmetric", "quantize_symmetric",
    "symmetric_bytes_per_token",
]

ASYMMETRIC_BITS = tuple(range(1, 9))  # codes are uint8
SYMMETRIC_BITS = (4, 8)  # int4 / int8, as in MaxText


class AsymQuant(NamedTuple):
    """Asymmetric codes and their per-group ``scale``/``zero``.

    ``scale``/``zero`` have ``x``'s shape with ``axis`` shrunk to ``n // group``.
    """

    codes: UInt8[Array, "*shape"]
    scale: Float[Array, "*groups"]
    zero: Float[Array, "*groups"]


class SymQuant(NamedTuple):
    """Symmetric ``int8`` codes in ``[-qmax, qmax]`` and a scale with ``axis`` kept as 1."""

    codes: Int8[Array, "*shape"]
    scale: Float[Array, "*stats"]


def _axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def quantize_asymmetric(
    x: Float[Array, "*shape"],
    bits: int,
    axis: int = -1,
    group: int | None = None,
    exclude: Array | None = None,
) -> AsymQuant:
    """Asymmetric min/max quantization over groups of ``group`` elements along ``axis``.

    ``group=None`` takes the whole axis as one group. ``exclude`` (bool, ``x``'s
    shape) leaves elements out of the min/max (GEAR's outliers); they are still
    coded, clipped to their group's range. One compiled function serves every
    bit width (``2^bits - 1`` is an argument, not a constant).
    """
    check_bits(bits, ASYMMETRIC_BITS, "asymmetric quantization")
    x = jnp.asarray(x, jnp.float32)
    a = _axis(axis, x.ndim, "asymmetric quantization")
    n = x.shape[a]
    group = n if group is None else group
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or n % group:
        raise ValueError(
            f"asymmetric quantization: group size {group} does not divide the quantized axis ({n})"
        )
    if exclude is not None:
        exclude = jnp.broadcast_to(exclude, x.shape)
    return _asymmetric(x, float(2**bits - 1), a, group, exclude)


@partial(jax.jit, static_argnames=("axis", "group"))
def _asymmetric(x: Array, qmax: Array, axis: int, group: int, exclude: Array | None) -> AsymQuant:
    n = x.shape[axis]
    grouped = x.shape[:axis] + (n // group, group) + x.shape[axis + 1 :]
    xg = x.reshape(grouped)
    if exclude is None:
        lo = jnp.min(xg, axis=axis + 1, keepdims=True)
        hi = jnp.max(xg, axis=axis + 1, keepdims=True)
    else:
        ex = exclude.reshape(grouped)
        lo = jnp.min(jnp.where(ex, jnp.inf, xg), axis=axis + 1, keepdims=True)
        hi = jnp.max(jnp.where(ex, -jnp.inf, xg), axis=axis + 1, keepdims=True)
        empty = lo > hi  # every element of the group excluded
        lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
    scale = (hi - lo) / qmax
    scale = jnp.where(scale == 0, 1.0, scale)
    codes = jnp.clip(jnp.round((xg - lo) / scale), 0, qmax).astype(jnp.uint8)
    return AsymQuant(codes.reshape(x.shape), jnp.squeeze(scale, axis + 1), jnp.squeeze(lo, axis + 1))


@partial(jax.jit, static_argnames=("axis",))
def dequantize_asymmetric(
    codes: UInt8[Array, "*shape"],
    scale: Float[Array, "*groups"],
    zero: Float[Array, "*groups"],
    axis: int = -1,
) -> Float[Array, "*shape"]:
    """``code * scale + zero``, each group's ``scale``/``zero`` repeated along ``axis``."""
    a = _axis(axis, codes.ndim, "asymmetric dequantization")
    n, m = codes.shape[a], scale.shape[a]
    if m < 1 or n % m:
        raise ValueError(
            f"asymmetric dequantization: {m} groups do not divide the quantized axis ({n})"
        )
    scale = jnp.repeat(scale, n // m, axis=a)
    zero = jnp.repeat(zero, n // m, axis=a)
    return codes.astype(jnp.float32) * scale + zero


def quantize_symmetric(x: Float[Array, "*shape"], bits: int = 8, axis: int = -1) -> SymQuant:
    """Symmetric absmax quantization along ``axis`` (per token for ``axis=-1``), MaxText's int8/int4.

    ``scale = absmax / qmax``, ``qmax = 2^(bits-1) - 1``; codes in ``[-qmax, qmax]``.
    """
    check_bits(bits, SYMMETRIC_BITS, "symmetric quantization")
    x = jnp.asarray(x, jnp.float32)
    return _symmetric(x, float(2 ** (bits - 1) - 1), _axis(axis, x.ndim, "symmetric quantization"))


@partial(jax.jit, static_argnames="axis")
def _symmetric(x: Array, qmax: Array, axis: int) -> SymQuant:
    absmax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = jnp.where(absmax == 0, 1.0, absmax / qmax)
    codes = jnp.clip(jnp.round(x / scale), -qmax, qmax).astype(jnp.int8)
    return SymQuant(codes, scale)


def dequantize_symmetric(
    codes: Int8[Array, "*shape"], scale: Float[Array, "*stats"]
) -> Float[Array, "*shape"]:
    """``code * scale`` (``scale`` broadcasts along the quantized axis)."""
    return codes.astype(jnp.float32) * scale


def float_bytes_per_token(head_dim: int, dtype_bytes: int = 4, kv_heads: int = 1, layers: int = 1) -> float:
    """Bytes of one token's keys and values in a float cache (the reference for compression ratios)."""
    return float(2 * head_dim * dtype_bytes * kv_heads * layers)


def symmetric_bytes_per_token(
    head_dim: int, bits: int, scale_bytes: int = 4, kv_heads: int = 1, layers: int = 1
) -> float:
    """Bytes of one token's keys and values with symmetric per-token codes: codes + one scale each."""
    check_bits(bits, SYMMETRIC_BITS, "symmetric quantization")
    return float(2 * (head_dim * bits / 8 + scale_bytes) * kv_heads * layers)
