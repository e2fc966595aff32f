"""Block codecs: how a compressed KV cache stores each group of ``G`` consecutive tokens.

A codec is a frozen (hashable) dataclass with

* ``encode(aux, k, v, pos) -> blocks``: float keys/values ``[B, KV, n, G, D]``
  of ``n`` complete groups (post-RoPE keys, as the model writes them) and their
  RoPE positions ``pos[B, n, G]`` -> a pytree whose leaves are ``[B, KV, n, ...]``;
* ``decode(aux, blocks, pos) -> (k, v)``: the float approximation back;
* ``init_aux(n_layers, kv_heads, head_dim)``: per-layer codec state stacked on a
  leading layer axis (KVQuant's calibrated centroids and key thresholds; ``()`` otherwise);
* ``bytes_per_token(head_dim, context)``: KV bytes per token per KV head of the
  compressed groups (codes, scales and side data amortised; the float recent window
  and sink are the cache's, see :func:`decodax.kvquant.cache.kv_bytes_per_token`).

Codecs (``make_codec`` parses their names):

* ``int8`` / ``int4`` -- symmetric per-token absmax (MaxText's baseline), keys and values;
* ``kivi4`` / ``kivi2`` / ``kivi8`` -- KIVI (Liu et al., 2024): per-channel keys over the
  group's tokens, per-token values, packed (the fused Pallas kernel's format);
* ``kvquant4`` / ``3`` / ``2`` -- KVQuant (Hooper et al., 2024): *pre-RoPE* keys
  (un-rotated before coding, re-rotated after decoding), per-channel key thresholds
  and per-layer nuq centroids calibrated offline (:mod:`decodax.kvquant.calibrate`),
  per-token values (min/max range), dense-and-sparse key outliers (room for ``2 * outlier_frac``
  of each group, exact);
* ``gear4`` / ``gear2`` -- GEAR (Kang et al., 2024): KIVI-style dense codes + rank-``r``
  power-iteration residual + sparse outliers, per group.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from decodax.kvquant import gear, kivi, kvquant, packing, uniform
from decodax.model.rope import rotate

__all__ = ["CODEC_NAMES", "GearCodec", "KiviCodec", "KVQuantCodec", "SymmetricCodec", "make_codec"]

CODEC_NAMES = ("int8", "int4", "kivi8", "kivi4", "kivi2", "kvquant4", "kvquant3", "kvquant2", "gear4", "gear2")


def _check_group(group: int) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"codec group size must be a positive int, got {group!r}")


@dataclasses.dataclass(frozen=True)
class SymmetricCodec:
    """Symmetric per-token int8 / int4 keys and values (``scale = absmax / qmax``)."""

    bits: int = 8
    group: int = 32

    def __post_init__(self):
        packing.check_bits(self.bits, uniform.SYMMETRIC_BITS, "symmetric KV codec")
        _check_group(self.group)

    def init_aux(self, n_layers: int, kv_heads: int, head_dim: int) -> tuple:
        return ()

    def encode(self, aux, k, v, pos):
        qk, qv = uniform.quantize_symmetric(k, self.bits), uniform.quantize_symmetric(v, self.bits)
        return (qk.codes, qk.scale, qv.codes, qv.scale)

    def decode(self, aux, blocks, pos):
        kc, ks, vc, vs = blocks
        return uniform.dequantize_symmetric(kc, ks), uniform.dequantize_symmetric(vc, vs)

    def bytes_per_token(self, head_dim: int, context: int) -> float:
        return uniform.symmetric_bytes_per_token(head_dim, self.bits)


@dataclasses.dataclass(frozen=True)
class KiviCodec:
    """KIVI: keys per channel over the group's ``G`` tokens, values per token, packed codes."""

    bits: int = 4
    group: int = 32

    def __post_init__(self):
        packing.check_bits(self.bits, kivi.KIVI_BITS, "KIVI codec")
        _check_group(self.group)

    def init_aux(self, n_layers: int, kv_heads: int, head_dim: int) -> tuple:
        packing.packed_length(head_dim, self.bits)  # raises when D does not pack
        return ()

    def encode(self, aux, k, v, pos):
        return kivi.quantize(k, v, self.bits, self.group)

    def decode(self, aux, blocks, pos):
        return kivi.dequantize_keys(blocks), kivi.dequantize_values(blocks)

    def bytes_per_token(self, head_dim: int, context: int) -> float:
        return kivi.bytes_per_token(head_dim, self.bits, self.group)


@dataclasses.dataclass(frozen=True)
class KVQuantCodec:
    """KVQuant nuq``bits``: pre-RoPE per-channel keys with calibrated thresholds, per-token
    values, per-layer k-means centroids (``aux``), dense-and-sparse outliers."""

    bits: int = 4
    group: int = 64
    rope_theta: float = 10000.0
    outlier_frac: float = 0.01

    def __post_init__(self):
        packing.check_bits(self.bits, kvquant.NUQ_BITS, "KVQuant codec")
        _check_group(self.group)
        if not 0.0 <= self.outlier_frac < 1.0:
            raise ValueError(f"KVQuant codec: outlier_frac must be in [0, 1), got {self.outlier_frac}")

    def capacity(self, head_dim: int) -> int:
        """Exact (index, value) pairs kept per group of keys: room for twice ``outlier_frac``
        (the thresholds are calibrated offline, so a group may hold more than its share)."""
        return math.ceil(2 * self.outlier_frac * self.group * head_dim)

    def init_aux(self, n_layers: int, kv_heads: int, head_dim: int) -> dict:
        """Uncalibrated state (uniform centroids, thresholds +-1): calibrate before use."""
        c = jnp.linspace(-1.0, 1.0, 2**self.bits)
        lo = -jnp.ones((n_layers, kv_heads, head_dim))
        return {"k_centroids": jnp.tile(c, (n_layers, 1)), "v_centroids": jnp.tile(c, (n_layers, 1)),
                "k_lo": lo, "k_hi": -lo}

    def encode(self, aux, k, v, pos):
        cap = self.capacity(k.shape[-1])
        k_pre = rotate(k, -pos[:, None], self.rope_theta)
        bounds = (aux["k_lo"][None, :, None, None, :], aux["k_hi"][None, :, None, None, :])
        kq = kvquant.quantize(k_pre, aux["k_centroids"], axis=-2, sink=0, capacity=cap, bounds=bounds)
        # values: per-token thresholds = the token's own min / max (with D = 64 channels a 1%
        # tail is under one value a token), so no sparse part
        vq = kvquant.quantize(v, aux["v_centroids"], axis=-1, sink=0, capacity=0, outlier_frac=0.0)
        return (kq.codes, kq.outlier_idx, kq.outlier_val, vq.codes, vq.lo, vq.hi)

    def decode(self, aux, blocks, pos):
        kc, ki, kv_, vc, vlo, vhi = blocks
        b = kc.shape[0]
        empty = jnp.zeros((*kc.shape[:-2], 0, kc.shape[-1]), jnp.float32)
        klo = jnp.broadcast_to(aux["k_lo"][None, :, None, None, :], (b, *kc.shape[1:3], 1, kc.shape[-1]))
        kq = kvquant.KVQuantBlock(kc, klo, jnp.broadcast_to(aux["k_hi"][None, :, None, None, :], klo.shape),
                                  ki, kv_, empty, aux["k_centroids"])
        none = jnp.zeros((*vc.shape[:-2], 0), jnp.int32)
        vq = kvquant.KVQuantBlock(vc, vlo, vhi, none, none.astype(jnp.float32), empty, aux["v_centroids"])
        return rotate(kvquant.dequantize(kq), pos[:, None], self.rope_theta), kvquant.dequantize(vq)

    def bytes_per_token(self, head_dim: int, context: int) -> float:
        codes = 2 * head_dim * self.bits / 8
        sparse = self.capacity(head_dim) * 8 / self.group  # keys' int32 index + float32 value
        return codes + sparse + 2 * 4  # + the per-token value thresholds (lo, hi)


@dataclasses.dataclass(frozen=True)
class GearCodec:
    """GEAR per group: KIVI-style ``bits``-bit codes + rank-``rank`` residual + sparse outliers."""

    bits: int = 4
    group: int = 64
    rank: int = 2
    outlier_frac: float = 0.01
    iters: int = 3

    def __post_init__(self):
        packing.check_bits(self.bits, gear.GEAR_BITS, "GEAR codec")
        _check_group(self.group)
        if not 0 <= self.rank <= self.group:
            raise ValueError(f"GEAR codec: rank must be in [0, group={self.group}], got {self.rank}")

    def init_aux(self, n_layers: int, kv_heads: int, head_dim: int) -> tuple:
        packing.packed_length(head_dim, self.bits)
        return ()

    def encode(self, aux, k, v, pos):
        key = jax.random.PRNGKey(0)  # a fixed start: a group always codes the same way
        kw = dict(bits=self.bits, rank=self.rank, outlier_frac=self.outlier_frac, iters=self.iters)
        return (gear.compress(k, key, axis=-2, group=self.group, **kw), gear.compress(v, key, axis=-1, **kw))

    def decode(self, aux, blocks, pos):
        return gear.decompress(blocks[0]), gear.decompress(blocks[1])

    def bytes_per_token(self, head_dim: int, context: int) -> float:
        return gear.bytes_per_token(head_dim, self.bits, self.rank, self.group, group=self.group,
                                    outlier_frac=self.outlier_frac)


Codec = Any  # SymmetricCodec | KiviCodec | KVQuantCodec | GearCodec


def make_codec(name: str, *, group: int | None = None, rope_theta: float = 10000.0) -> Codec:
    """A codec by name (``CODEC_NAMES``): ``int8``, ``kivi4``, ``kvquant3``, ``gear2``, ..."""
    m = re.fullmatch(r"(int|kivi|kvquant|gear)(\d)", name)
    if m is None:
        raise ValueError(f"unknown KV codec {name!r}; expected one of {CODEC_NAMES}")
    kind, bits = m.group(1), int(m.group(2))
    kw = {} if group is None else {"group": group}
    if kind == "int":
        return SymmetricCodec(bits=bits, **kw)
    if kind == "kivi":
        return KiviCodec(bits=bits, **kw)
    if kind == "kvquant":
        return KVQuantCodec(bits=bits, rope_theta=rope_theta, **kw)
    return GearCodec(bits=bits, **kw)
