"""Bit packing of low-bit codes along the last axis (the decodax packed KV format).

This is the byte layout shared with the fused dequantize-and-attend kernel
(``pallas_kernels/quant_attention.py``):

* codes are ``uint8`` values in ``[0, 2^b)`` with ``b`` in ``{2, 4, 8}``;
* with ``p = 8 // b`` codes per byte, byte ``i`` of the packed axis holds codes
  ``p*i + j`` for ``j in range(p)``, code ``p*i + j`` in bits ``[j*b, (j+1)*b)``
  of the byte (low bits first);
* ``b = 8`` is the identity (one code per byte).

So a ``[..., D]`` code array packs to ``uint8[..., D * b // 8]`` and ``D`` must
be a multiple of ``p``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Integer, UInt8

__all__ = ["PACK_BITS", "check_bits", "pack", "packed_length", "unpack"]

PACK_BITS = (2, 4, 8)


def check_bits(bits: int, supported: tuple[int, ...] = PACK_BITS, what: str = "packing") -> None:
    """Raise ``ValueError`` unless ``bits`` is one of ``supported``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in supported:
        raise ValueError(f"{what}: bits must be one of {supported}, got {bits!r}")


def packed_length(n: int, bits: int) -> int:
    """Bytes holding ``n`` codes of ``bits`` bits (``n`` must be a multiple of ``8 // bits``)."""
    check_bits(bits)
    per_byte = 8 // bits
    if n % per_byte:
        raise ValueError(
            f"packing: the last axis ({n}) must be a multiple of {per_byte} codes per byte at {bits} bits"
        )
    return n // per_byte


@partial(jax.jit, static_argnames="bits")
def pack(codes: Integer[Array, "*batch n"], bits: int) -> UInt8[Array, "*batch nbytes"]:
    """Pack ``b``-bit codes, ``8 // b`` per byte, low bits first (the KV format above).

    Codes are masked to their low ``bits`` bits, so an out-of-range code cannot
    corrupt its neighbours (it is the quantizer's job to clip).
    """
    n = codes.shape[-1]
    packed_length(n, bits)  # validates bits and n
    codes = jnp.asarray(codes).astype(jnp.uint8)
    if bits == 8:
        return codes
    per_byte = 8 // bits
    grouped = (codes & (2**bits - 1)).reshape(*codes.shape[:-1], n // per_byte, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    # The shifted codes occupy disjoint bits, so their sum is their bitwise OR.
    return jnp.sum(grouped << shifts, axis=-1, dtype=jnp.uint8)


@partial(jax.jit, static_argnames="bits")
def unpack(packed: UInt8[Array, "*batch nbytes"], bits: int) -> UInt8[Array, "*batch n"]:
    """Inverse of :func:`pack`: ``uint8[..., m]`` -> ``uint8[..., m * 8 // bits]`` codes."""
    check_bits(bits)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"unpack: expected uint8 packed codes, got {packed.dtype}")
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    codes = (packed[..., None] >> shifts) & jnp.uint8(2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
