"""KIVI: tuning-free asymmetric low-bit KV quantization (Liu et al., 2024).

"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache". Key caches
have a few channels with large magnitudes, so keys are quantized *per channel*
(each channel's scale/zero over a group of ``group`` consecutive tokens);
value errors mix across channels in ``attn @ V``, so values are quantized
*per token*. Both use the asymmetric min/max quantizer of
:mod:`decodax.kvquant.uniform`.

Packed format (shared with the fused Pallas kernel ``pallas_kernels/quant_attention.py``;
cache blocks are ``[B, KV, S, D]``, any leading axes are accepted here):

* ``code = clip(round((x - zero) / scale), 0, 2^b - 1)`` (uint8),
  ``x_hat = code * scale + zero``; ``scale = (max - min) / (2^b - 1)`` (a zero
  scale is replaced by 1), ``zero = min``; ``b`` in ``{2, 4, 8}``;
* keys:   ``k_codes uint8 [B, KV, S, D*b//8]``, ``k_scale``/``k_zero float32 [B, KV, S//group, D]``;
* values: ``v_codes uint8 [B, KV, S, D*b//8]``, ``v_scale``/``v_zero float32 [B, KV, S, 1]``;
* codes are packed along ``D`` with ``p = 8 // b`` per byte, code ``p*i + j``
  in bits ``[j*b, (j+1)*b)`` of byte ``i`` (:mod:`decodax.kvquant.packing`).

KIVI's full-precision window of the last ``R`` tokens (``k_recent``/``v_recent``
``[B, KV, R, D]``) belongs to the cache, not to this module; :func:`bytes_per_token`
accounts for it.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Array, Float, UInt8

from decodax.kvquant import packing, uniform

__all__ = [
    "KIVI_BITS", "KiviBlock", "bytes_per_token", "dequantize_keys", "dequantize_values",
    "quantize", "quantize_keys", "quantize_values",
]

KIVI_BITS = packing.PACK_BITS


class KiviBlock(NamedTuple):
    """Packed KIVI keys and values of a ``[..., S, D]`` block (the format above)."""

    k_codes: UInt8[Array, "*batch S Dp"]
    k_scale: Float[Array, "*batch G D"]
    k_zero: Float[Array, "*batch G D"]
    v_codes: UInt8[Array, "*batch S Dp"]
    v_scale: Float[Array, "*batch S 1"]
    v_zero: Float[Array, "*batch S 1"]

    @property
    def head_dim(self) -> int:
        return self.k_scale.shape[-1]

    @property
    def bits(self) -> int:
        return 8 * self.k_codes.shape[-1] // self.head_dim

    @property
    def group(self) -> int:
        return self.k_codes.shape[-2] // self.k_scale.shape[-2]


def _check_block(x: Array, bits: int, what: str) -> None:
    packing.check_bits(bits, KIVI_BITS, f"KIVI {what}")
    if x.ndim < 2:
        raise ValueError(f"KIVI {what}: expected [..., S, D], got shape {x.shape}")
    if x.shape[-1] % (8 // bits):
        raise ValueError(
            f"KIVI {what}: head_dim {x.shape[-1]} must be a multiple of {8 // bits} to pack {bits}-bit codes"
        )


def quantize_keys(
    k: Float[Array, "*batch S D"], bits: int, group: int
) -> tuple[UInt8[Array, "*batch S Dp"], Float[Array, "*batch G D"], Float[Array, "*batch G D"]]:
    """Per-channel key quantization, grouped along tokens: ``(k_codes, k_scale, k_zero)``."""
    _check_block(k, bits, "keys")
    if group < 1 or k.shape[-2] % group:
        raise ValueError(
            f"KIVI keys: group size {group} does not divide the number of tokens ({k.shape[-2]})"
        )
    q = uniform.quantize_asymmetric(k, bits, axis=-2, group=group)
    return packing.pack(q.codes, bits), q.scale, q.zero


def quantize_values(
    v: Float[Array, "*batch S D"], bits: int
) -> tuple[UInt8[Array, "*batch S Dp"], Float[Array, "*batch S 1"], Float[Array, "*batch S 1"]]:
    """Per-token value quantization over the ``D`` channels: ``(v_codes, v_scale, v_zero)``."""
    _check_block(v, bits, "values")
    q = uniform.quantize_asymmetric(v, bits, axis=-1)
    return packing.pack(q.codes, bits), q.scale, q.zero


def quantize(
    k: Float[Array, "*batch S D"], v: Float[Array, "*batch S D"], bits: int, group: int
) -> KiviBlock:
    """KIVI-quantize a block of keys (per channel, ``group`` tokens) and values (per token)."""
    if k.shape != v.shape:
        raise ValueError(f"KIVI: keys {k.shape} and values {v.shape} must have the same shape")
    return KiviBlock(*quantize_keys(k, bits, group), *quantize_values(v, bits))


def dequantize_keys(q: KiviBlock) -> Float[Array, "*batch S D"]:
    """Float keys of a :class:`KiviBlock`."""
    return uniform.dequantize_asymmetric(packing.unpack(q.k_codes, q.bits), q.k_scale, q.k_zero, axis=-2)


def dequantize_values(q: KiviBlock) -> Float[Array, "*batch S D"]:
    """Float values of a :class:`KiviBlock`."""
    return uniform.dequantize_asymmetric(packing.unpack(q.v_codes, q.bits), q.v_scale, q.v_zero, axis=-1)


def bytes_per_token(
    head_dim: int,
    bits: int,
    group: int,
    *,
    residual: int = 0,
    context: int | None = None,
    scale_bytes: int = 4,
    float_bytes: int = 4,
    kv_heads: int = 1,
    layers: int = 1,
) -> float:
    """KV bytes per token of a KIVI cache, keys and values, scales/zeros amortised.

    Keys: ``D*b/8`` code bytes + ``2*D`` scale/zero floats shared by ``group``
    tokens; values: ``D*b/8`` + 2 floats. With a full-precision window of
    ``residual`` tokens, its ``2*D`` floats per token are amortised over
    ``context`` tokens (required then).
    """
    packing.check_bits(bits, KIVI_BITS, "KIVI")
    if group < 1:
        raise ValueError(f"KIVI: group size must be >= 1, got {group}")
    codes = head_dim * bits / 8
    per_token = (codes + 2 * head_dim * scale_bytes / group) + (codes + 2 * scale_bytes)
    if residual:
        if context is None or context < residual:
            raise ValueError(f"KIVI: a residual window of {residual} needs a context >= it, got {context}")
        window = 2 * head_dim * float_bytes
        per_token = (per_token * (context - residual) + window * residual) / context
    return float(per_token * kv_heads * layers)
