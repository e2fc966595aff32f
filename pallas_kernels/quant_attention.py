"""Fused dequantize-and-attend split-K decode attention over a KIVI-packed cache.

KIVI (Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu, 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache"): keys are quantized per channel
(one ``(scale, zero)`` per channel and per ``group`` consecutive slots), values
per token (one ``(scale, zero)`` per slot and head), and the most recent tokens
stay in full precision (the residual window). The attention is flash-decoding
(Dao, Haziza, Massa, Sizov, 2023) exactly as in ``decode_attention``: the
quantized slots are split into chunks processed by parallel grid cells, each
running the FlashAttention-2 online softmax and writing a partial
``(m, l, acc)``; the recent window adds its own partials (computed by
``decode_attention``'s kernel) and ``combine_partials`` merges them all by
log-sum-exp.

Packed format (shared with ``decodax/kvquant``; b bits, p = 8 // b codes a byte,
``x_hat = code * scale + zero``):

* ``k_codes, v_codes``: uint8 ``[B, KV, S, D * b // 8]``; byte i holds the codes
  of channels ``p*i .. p*i + p - 1``, channel ``p*i + j`` in bits
  ``[j*b, (j+1)*b)`` (low bits first; b = 8 is one code a byte).
* ``k_scale, k_zero``: float32 ``[B, KV, S // group, D]`` (slot s uses row
  ``s // group``).
* ``v_scale, v_zero``: float32 ``[B, KV, S, 1]``.
* ``k_recent, v_recent``: float ``[B, KV, R, D]``. Row b attends to quantized
  slots ``[0, n_quant[b])`` followed by recent slots ``[0, n_recent[b])``.

Dequantization happens in the kernel on each loaded block; no float copy of the
cache is ever made. A packed ``[block_k, D/p]`` byte block is widened to
``[block_k, D]`` without a lane reshape (neither Triton nor Mosaic lowers an
interleaving reshape): a 0/1 matmul repeats byte i into columns ``p*i .. p*i+p-1``
(exact: the bytes are integers < 256, exact in bfloat16), then column d is
shifted right by ``(d % p) * b`` and masked. Key scales of a block are one row
(``group`` a multiple of the block) or a few rows selected by slot
(the block a multiple of ``group``).

Layout and padding: the wrapper views every per-slot array as
``[B, KV, N, split_len, X]`` (a free reshape when ``S == N * split_len``) so each
grid cell's block spans the full last two dims (Mosaic's rule) and every loaded
value has power-of-two size (Triton). It pads S up to ``N * split_len`` and D to
a power of two ``>= 16 * p`` (Triton's dot needs the packed width >= 16) only when
needed: a capacity S that is a multiple of ``num_splits * max(block_k, group)``
with a head dim of 64 or 128 is never copied. The recent window goes through
``decode_attention``'s partials (padded to its block when R is not a multiple).

Semantics are those of ``quant_decode_attention_reference`` (dequantize with
plain jnp, put the recent slots right after the quantized ones, then
``reference.decode_attention_reference``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, UInt8

from pallas_kernels.decode_attention import _decode_partials, _split_plan, combine_partials, split_attention
from pallas_kernels.flash_attention import (
    _NN,
    _is_pow2,
    _next_pow2,
    compiler_params,
    default_interpret,
)
from pallas_kernels.reference import decode_attention_reference

SUPPORTED_BITS = (2, 4, 8)


# ----------------------------------------------------------------------------
# pure-jnp format helpers (the oracle's dequantization; also used by the tests)
# ----------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 8 // bits


def pack_codes(codes: UInt8[Array, "*lead D"], bits: int) -> UInt8[Array, "*lead P"]:
    """Pack b-bit codes along the last axis, ``p = 8 // b`` a byte, low bits first."""
    p = _check_bits(bits)
    d = codes.shape[-1]
    if d % p:
        raise ValueError(f"last dim ({d}) must be divisible by 8 // bits = {p}")
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], d // p, p)
    c = c & jnp.uint8((1 << bits) - 1)
    shifts = (jnp.arange(p, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    return jnp.bitwise_or.reduce(c << shifts, axis=-1).astype(jnp.uint8)


def unpack_codes(packed: UInt8[Array, "*lead P"], bits: int) -> UInt8[Array, "*lead D"]:
    """Inverse of ``pack_codes``: ``[..., D * b // 8]`` bytes -> ``[..., D]`` codes."""
    p = _check_bits(bits)
    if p == 1:
        return packed.astype(jnp.uint8)
    shifts = (jnp.arange(p, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    c = (packed.astype(jnp.uint8)[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * p)


def dequantize_keys(
    k_codes: UInt8[Array, "B KV S P"],
    k_scale: Float[Array, "B KV NG D"],
    k_zero: Float[Array, "B KV NG D"],
    *,
    bits: int,
    group: int,
) -> Float[Array, "B KV S D"]:
    """KIVI keys: ``code * scale[s // group] + zero[s // group]`` per channel (float32)."""
    codes = unpack_codes(k_codes, bits).astype(jnp.float32)
    sc = jnp.repeat(k_scale.astype(jnp.float32), group, axis=2)
    z = jnp.repeat(k_zero.astype(jnp.float32), group, axis=2)
    return codes * sc + z


def dequantize_values(
    v_codes: UInt8[Array, "B KV S P"],
    v_scale: Float[Array, "B KV S 1"],
    v_zero: Float[Array, "B KV S 1"],
    *,
    bits: int,
) -> Float[Array, "B KV S D"]:
    """KIVI values: ``code * scale[s] + zero[s]`` per token (float32)."""
    codes = unpack_codes(v_codes, bits).astype(jnp.float32)
    return codes * v_scale.astype(jnp.float32) + v_zero.astype(jnp.float32)


def _check_inputs(q, packed, n_quant, recent, bits, group):
    """Validate shapes against the packed format; returns ``(p, S, R)``."""
    p = _check_bits(bits)
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = packed
    k_recent, v_recent, n_recent = recent
    arrays = (q, *packed)
    if any(x.ndim != 4 for x in arrays):
        raise ValueError(
            "expected q [B,T,H,D] and 4-d packed cache arrays [B,KV,...]; "
            f"got ranks {tuple(x.ndim for x in arrays)}"
        )
    b, t, h, d = q.shape
    if d % p:
        raise ValueError(f"head dim ({d}) must be divisible by 8 // bits = {p}")
    if k_codes.shape != v_codes.shape:
        raise ValueError(f"k_codes {k_codes.shape} and v_codes {v_codes.shape} differ")
    if k_codes.dtype != jnp.uint8 or v_codes.dtype != jnp.uint8:
        raise ValueError(f"codes must be uint8, got {k_codes.dtype}, {v_codes.dtype}")
    kvh, s_cap = k_codes.shape[1], k_codes.shape[2]
    if k_codes.shape != (b, kvh, s_cap, d // p):
        raise ValueError(
            f"codes must be [B={b}, KV, S, D*bits//8={d // p}] for {bits}-bit codes, "
            f"got {k_codes.shape}"
        )
    if kvh < 1 or h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({kvh})")
    if t < 1 or s_cap < 1:
        raise ValueError(f"need T >= 1 and S >= 1, got T={t}, S={s_cap}")
    if not isinstance(group, int) or group < 1 or s_cap % group:
        raise ValueError(f"group ({group}) must be a positive divisor of the slot count S={s_cap}")
    ks_shape = (b, kvh, s_cap // group, d)
    if k_scale.shape != ks_shape or k_zero.shape != ks_shape:
        raise ValueError(f"k_scale/k_zero must be {ks_shape}, got {k_scale.shape}, {k_zero.shape}")
    vs_shape = (b, kvh, s_cap, 1)
    if v_scale.shape != vs_shape or v_zero.shape != vs_shape:
        raise ValueError(f"v_scale/v_zero must be {vs_shape}, got {v_scale.shape}, {v_zero.shape}")
    if tuple(n_quant.shape) != (b,):
        raise ValueError(f"n_quant must be [B] = ({b},), got {tuple(n_quant.shape)}")
    given = (k_recent is not None, v_recent is not None, n_recent is not None)
    if any(given) and not all(given):
        raise ValueError("pass k_recent, v_recent and n_recent together (or none of them)")
    r = 0
    if all(given):
        if k_recent.ndim != 4 or k_recent.shape != v_recent.shape:
            raise ValueError(
                f"k_recent {k_recent.shape} and v_recent {v_recent.shape} must be equal and 4-d"
            )
        r = k_recent.shape[2]
        if k_recent.shape != (b, kvh, r, d):
            raise ValueError(
                f"recent window must be [B={b}, KV={kvh}, R, D={d}], got {k_recent.shape}"
            )
        if tuple(n_recent.shape) != (b,):
            raise ValueError(f"n_recent must be [B] = ({b},), got {tuple(n_recent.shape)}")
    return p, s_cap, r


def quant_decode_attention_reference(
    q: Float[Array, "B T H D"],
    k_codes: UInt8[Array, "B KV S P"],
    k_scale: Float[Array, "B KV NG D"],
    k_zero: Float[Array, "B KV NG D"],
    v_codes: UInt8[Array, "B KV S P"],
    v_scale: Float[Array, "B KV S 1"],
    v_zero: Float[Array, "B KV S 1"],
    n_quant: Int[Array, " B"],
    k_recent: Float[Array, "B KV R D"] | None = None,
    v_recent: Float[Array, "B KV R D"] | None = None,
    n_recent: Int[Array, " B"] | None = None,
    *,
    bits: int,
    group: int,
    scale: float | None = None,
) -> Float[Array, "B T H D"]:
    """Oracle: dequantize with plain jnp, then ``decode_attention_reference``.

    Row b's keys are the dequantized slots ``[0, n_quant[b])`` followed by the
    recent slots ``[0, n_recent[b])`` (counts clamped to ``[0, S]`` / ``[0, R]``);
    invalid slots are zeroed so garbage past the counts never leaks in.
    """
    packed = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    _, s_cap, r = _check_inputs(q, packed, n_quant, (k_recent, v_recent, n_recent), bits, group)
    k = dequantize_keys(k_codes, k_scale, k_zero, bits=bits, group=group)
    v = dequantize_values(v_codes, v_scale, v_zero, bits=bits)
    nq = jnp.clip(n_quant.astype(jnp.int32), 0, s_cap)
    if r:
        nr = jnp.clip(n_recent.astype(jnp.int32), 0, r)
        k = jnp.concatenate([k, k_recent.astype(jnp.float32)], axis=2)
        v = jnp.concatenate([v, v_recent.astype(jnp.float32)], axis=2)
    else:
        nr = jnp.zeros_like(nq)
    j = jnp.arange(s_cap + r)[None, :]  # compacted slot -> source slot in [quant | recent]
    src = jnp.where(j < nq[:, None], j, s_cap + j - nq[:, None])
    src = jnp.clip(src, 0, s_cap + r - 1)[:, None, :, None]
    lengths = nq + nr
    valid = (j < lengths[:, None])[:, None, :, None]
    k = jnp.where(valid, jnp.take_along_axis(k, src, axis=2), 0.0)
    v = jnp.where(valid, jnp.take_along_axis(v, src, axis=2), 0.0)
    return decode_attention_reference(q, k, v, lengths, scale)


# ----------------------------------------------------------------------------
# in-kernel dequantization (shared by the attention kernel and the test kernel)
# ----------------------------------------------------------------------------


def _unpack_block(packed, *, bits, d_pad):
    """uint8 ``[bk, d_pad // p]`` -> float32 codes ``[bk, d_pad]`` (no lane reshape)."""
    p = 8 // bits
    if p == 1:
        return packed.astype(jnp.int32).astype(jnp.float32)
    bk, n_bytes = packed.shape
    row = jax.lax.broadcasted_iota(jnp.int32, (n_bytes, d_pad), 0) * p
    col = jax.lax.broadcasted_iota(jnp.int32, (n_bytes, d_pad), 1)
    expand = ((col >= row) & (col < row + p)).astype(jnp.bfloat16)  # byte i -> cols p*i..p*i+p-1
    byte_vals = packed.astype(jnp.int32).astype(jnp.float32).astype(jnp.bfloat16)  # < 256: exact
    rep = jax.lax.dot_general(byte_vals, expand, _NN, preferred_element_type=jnp.float32)
    shift = (jax.lax.broadcasted_iota(jnp.int32, (bk, d_pad), 1) & (p - 1)) * bits
    codes = jax.lax.shift_right_logical(rep.astype(jnp.int32), shift) & ((1 << bits) - 1)
    return codes.astype(jnp.float32)


def _dequant_keys_block(kc_ref, ks_ref, kz_ref, start, *, bits, group, block_k, d_pad):
    """Keys of slots ``[start, start + block_k)`` of the cell's split (start % block_k == 0)."""
    codes = _unpack_block(kc_ref[pl.ds(start, block_k), :], bits=bits, d_pad=d_pad)
    row0 = jax.lax.div(start, group)  # the split starts on a group boundary
    sc = ks_ref[pl.ds(row0, 1), :]
    z = kz_ref[pl.ds(row0, 1), :]
    if group < block_k:  # block_k // group groups in the block: select the row by slot
        slot = jax.lax.broadcasted_iota(jnp.int32, (block_k, d_pad), 0)
        sc, z = jnp.broadcast_to(sc, (block_k, d_pad)), jnp.broadcast_to(z, (block_k, d_pad))
        for r in range(1, block_k // group):
            later = slot >= r * group
            sc = jnp.where(later, ks_ref[pl.ds(row0 + r, 1), :], sc)
            z = jnp.where(later, kz_ref[pl.ds(row0 + r, 1), :], z)
    return codes * sc + z


def _dequant_values_block(vc_ref, vs_ref, vz_ref, start, *, bits, block_k, d_pad):
    codes = _unpack_block(vc_ref[pl.ds(start, block_k), :], bits=bits, d_pad=d_pad)
    return codes * vs_ref[pl.ds(start, block_k), :] + vz_ref[pl.ds(start, block_k), :]


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


def _quant_decode_kernel(
    len_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, o_ref, m_ref, l_ref,
    *, scale, bits, group, block_k, split_len,
):  # fmt: skip
    length = len_ref[pl.program_id(0), 0]  # whole [B, 1] block: legal on Triton and Mosaic
    q = q_ref[...].astype(jnp.float32) * scale  # [M, D]
    deq = dict(bits=bits, block_k=block_k, d_pad=q.shape[1])

    def load_block(start):  # dequantized in the kernel, never a float cache in memory
        return (_dequant_keys_block(kc_ref, ks_ref, kz_ref, start, group=group, **deq),
                _dequant_values_block(vc_ref, vs_ref, vz_ref, start, **deq))

    split_attention(q, load_block, length, pl.program_id(2) * split_len, block_k=block_k, split_len=split_len,
                    o_ref=o_ref, m_ref=m_ref, l_ref=l_ref)


def _dequant_kernel(
    kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, k_ref, v_ref, *, bits, group, block_k, split_len
):
    """Writes the attention kernel's in-kernel dequantization of a split (test hook)."""
    deq = dict(bits=bits, block_k=block_k, d_pad=k_ref.shape[-1])

    def body(j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        k = _dequant_keys_block(kc_ref, ks_ref, kz_ref, start, group=group, **deq)
        v = _dequant_values_block(vc_ref, vs_ref, vz_ref, start, **deq)
        k_ref[pl.ds(start, block_k), :] = k
        v_ref[pl.ds(start, block_k), :] = v
        return carry

    jax.lax.fori_loop(0, split_len // block_k, body, 0)


def _quant_split_plan(s_cap: int, group: int, block_k: int, num_splits: int):
    """``(block, split_len, n_splits)``: the key block is a power of two >= 16 that divides
    ``group`` or is a multiple of it (at most 8 groups a block, except for groups < 2); the
    split length is a multiple of the block and of ``group``."""
    bk = max(16, min(block_k, _next_pow2(s_cap)))
    if group < bk:
        bk = max(16, min(bk, 8 * group)) if bk % group == 0 else bk
    if bk % group and group % bk:  # e.g. group 48 with a 64 block: use the pow2 part of the group
        bk = group & -group
        if bk < 16:
            raise ValueError(
                f"group ({group}) must be a multiple of a power-of-two key block >= 16 or divide "
                f"one (block_k={block_k})"
            )
    unit = max(bk, group)  # one is a multiple of the other
    n_units = -(-s_cap // unit)
    per_split = -(-n_units // num_splits)
    return bk, per_split * unit, -(-n_units // per_split)


def _prep_packed(packed, *, p, group, split_len, n_splits):
    """Pad (only when needed) and view per-slot arrays as ``[B, KV, N, split_len, X]``."""
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = packed
    b, kvh = k_codes.shape[:2]
    d = k_scale.shape[-1]
    d_pad = max(16 * p, _next_pow2(d))
    s_pad = n_splits * split_len

    def fit(x, rows, cols):  # copies x: avoid by choosing the capacity (and head dim)
        if x.shape[2:] != (rows, cols):
            x = jnp.pad(x, ((0, 0), (0, 0), (0, rows - x.shape[2]), (0, cols - x.shape[3])))
        return x.reshape(b, kvh, n_splits, rows // n_splits, cols)

    codes = [fit(x, s_pad, d_pad // p) for x in (k_codes, v_codes)]
    kscales = [fit(x.astype(jnp.float32), s_pad // group, d_pad) for x in (k_scale, k_zero)]
    vscales = [fit(x.astype(jnp.float32), s_pad, 1) for x in (v_scale, v_zero)]
    return (codes[0], *kscales, codes[1], *vscales), d_pad


def _packed_specs(split_len, group, d_pad, p):
    def spec(rows, cols):
        return pl.BlockSpec((None, None, None, rows, cols), lambda bi, hi, si: (bi, hi, si, 0, 0))

    codes = spec(split_len, d_pad // p)
    kscale = spec(split_len // group, d_pad)
    vscale = spec(split_len, 1)
    return [codes, kscale, kscale, codes, vscale, vscale]


@functools.partial(
    jax.jit,
    static_argnames=("scale", "bits", "group", "block_k", "split_len", "n_splits", "interpret"),
)
def _quant_partials(
    q, packed, n_quant, *, scale, bits, group, block_k, split_len, n_splits, interpret
):
    """Grouped q ``[B, KV, M, D]`` -> partials o ``[B, KV, N, M, D]``, m, l ``[B, KV, N, M]``."""
    b, kvh, m_rows, d = q.shape
    s_cap = packed[0].shape[2]
    p = 8 // bits
    views, d_pad = _prep_packed(packed, p=p, group=group, split_len=split_len, n_splits=n_splits)
    m_pad = max(16, _next_pow2(m_rows))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, m_pad - m_rows), (0, d_pad - d)))
    lengths = jnp.clip(n_quant.astype(jnp.int32), 0, s_cap).reshape(b, 1)

    kernel = functools.partial(
        _quant_decode_kernel,
        scale=scale,
        bits=bits,
        group=group,
        block_k=block_k,
        split_len=split_len,
    )
    cell = lambda bi, hi, si: (bi, hi, si, 0, 0)  # noqa: E731
    out_spec = pl.BlockSpec((None, None, None, m_pad, d_pad), cell)
    stat_spec = pl.BlockSpec((None, None, None, m_pad, 1), cell)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, n_splits),
        in_specs=[
            pl.BlockSpec((b, 1), lambda bi, hi, si: (0, 0)),
            pl.BlockSpec((None, None, m_pad, d_pad), lambda bi, hi, si: (bi, hi, 0, 0)),
            *_packed_specs(split_len, group, d_pad, p),
        ],
        out_specs=[out_spec, stat_spec, stat_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, kvh, n_splits, m_pad, d_pad), jnp.float32),
            jax.ShapeDtypeStruct((b, kvh, n_splits, m_pad, 1), jnp.float32),
            jax.ShapeDtypeStruct((b, kvh, n_splits, m_pad, 1), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="decodax_quant_decode_attention",
    )(lengths, q, *views)
    return o[..., :m_rows, :d], m[..., :m_rows, 0], l[..., :m_rows, 0]


@functools.partial(jax.jit, static_argnames=("bits", "group", "block_k", "num_splits", "interpret"))
def _pallas_dequantize(
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
    *, bits, group, block_k=128, num_splits=8, interpret=True,
):  # fmt: skip
    """Test hook: the attention kernel's in-kernel dequantization, written out as float32
    ``(k_hat, v_hat)`` ``[B, KV, S, D]`` (same plan, padding and block code). Materialises
    the float cache: never use it on the decode path."""
    packed = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    b, kvh, s_cap, _ = k_codes.shape
    d = k_scale.shape[-1]
    p = 8 // bits
    bk, split_len, n_splits = _quant_split_plan(s_cap, group, block_k, num_splits)
    views, d_pad = _prep_packed(packed, p=p, group=group, split_len=split_len, n_splits=n_splits)
    kernel = functools.partial(
        _dequant_kernel, bits=bits, group=group, block_k=bk, split_len=split_len
    )
    cell = lambda bi, hi, si: (bi, hi, si, 0, 0)  # noqa: E731
    out_spec = pl.BlockSpec((None, None, None, split_len, d_pad), cell)
    shape = jax.ShapeDtypeStruct((b, kvh, n_splits, split_len, d_pad), jnp.float32)
    k_hat, v_hat = pl.pallas_call(
        kernel,
        grid=(b, kvh, n_splits),
        in_specs=_packed_specs(split_len, group, d_pad, p),
        out_specs=[out_spec, out_spec],
        out_shape=[shape, shape],
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="decodax_quant_dequantize",
    )(*views)
    k_hat, v_hat = (x.reshape(b, kvh, n_splits * split_len, d_pad) for x in (k_hat, v_hat))
    return k_hat[:, :, :s_cap, :d], v_hat[:, :, :s_cap, :d]


def quant_decode_attention(
    q: Float[Array, "B T H D"],
    k_codes: UInt8[Array, "B KV S P"],
    k_scale: Float[Array, "B KV NG D"],
    k_zero: Float[Array, "B KV NG D"],
    v_codes: UInt8[Array, "B KV S P"],
    v_scale: Float[Array, "B KV S 1"],
    v_zero: Float[Array, "B KV S 1"],
    n_quant: Int[Array, " B"],
    k_recent: Float[Array, "B KV R D"] | None = None,
    v_recent: Float[Array, "B KV R D"] | None = None,
    n_recent: Int[Array, " B"] | None = None,
    *,
    bits: int,
    group: int,
    scale: float | None = None,
    block_k: int = 64,
    num_splits: int = 8,
    interpret: bool | None = None,
) -> Float[Array, "B T H D"]:
    """Fused dequantize-and-attend flash-decoding over a KIVI-packed cache plus its recent window.

    Args:
      q: ``[B, T, H, D]`` query tokens (T small); every query row attends to all
        valid slots (quantized and recent).
      k_codes, v_codes: uint8 ``[B, KV, S, D * bits // 8]`` packed codes (module docstring).
      k_scale, k_zero: ``[B, KV, S // group, D]`` per-channel key scale / zero.
      v_scale, v_zero: ``[B, KV, S, 1]`` per-token value scale / zero.
      n_quant: ``int32[B]`` valid quantized slots per row (clamped to ``[0, S]``).
      k_recent, v_recent: ``[B, KV, R, D]`` full-precision recent window, or None.
      n_recent: ``int32[B]`` valid recent slots per row (clamped to ``[0, R]``).
      bits: code width, one of 2, 4, 8.
      group: key quantization group along the slots; divides S.
      scale: score scale, default ``D ** -0.5``.
      block_k: key block inside a split (power of two, clamped to >= 16 and
        adjusted to align with ``group``). 64 measured best on an H100 (128
        spills registers with 4 warps: about 2x slower for int4 / int2).
      num_splits: at most this many parallel chunks along S (the recent window
        adds its own split).
      interpret: run the Pallas interpreter (None: True on CPU only).

    Returns ``[B, T, H, D]`` in q's dtype, equal to ``quant_decode_attention_reference``
    with the same arguments. A row with no valid slot returns zeros.
    """
    packed = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    recent = (k_recent, v_recent, n_recent)
    _, s_cap, r = _check_inputs(q, packed, n_quant, recent, bits, group)
    if not _is_pow2(block_k):
        raise ValueError(f"block_k must be a positive power of two, got {block_k}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    bk, split_len, n_splits = _quant_split_plan(s_cap, group, block_k, num_splits)
    recent_plan = _split_plan(r, block_k, 1) if r else None
    d = q.shape[-1]
    scale = float(d**-0.5 if scale is None else scale)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _quant_impl(
        q,
        packed,
        n_quant,
        recent,
        scale=scale,
        bits=bits,
        group=group,
        block_k=bk,
        split_len=split_len,
        n_splits=n_splits,
        recent_plan=recent_plan,
        interpret=interpret,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "bits", "group", "block_k", "split_len", "n_splits", "recent_plan", "interpret"
    ),
)
def _quant_impl(
    q, packed, n_quant, recent, *, scale, bits, group, block_k, split_len, n_splits, recent_plan,
    interpret,
):  # fmt: skip
    b, t, h, d = q.shape
    kvh = packed[0].shape[1]
    g = h // kvh
    # Group the G query heads of each KV head: row index m = t * G + g.
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
    o = combine_partials(*_all_partials(
        qg, packed, n_quant, recent, scale=scale, bits=bits, group=group, block_k=block_k,
        split_len=split_len, n_splits=n_splits, recent_plan=recent_plan, interpret=interpret,
    ))  # [B, KV, T*G, D]
    o = o.reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
    return o.astype(q.dtype)


def _all_partials(
    qg, packed, n_quant, recent, *, scale, bits, group, block_k, split_len, n_splits, recent_plan,
    interpret,
):  # fmt: skip
    """Partials of the quantized splits, then of the recent window's own split(s)."""
    o_part, m_part, l_part = _quant_partials(
        qg, packed, n_quant, scale=scale, bits=bits, group=group, block_k=block_k,
        split_len=split_len, n_splits=n_splits, interpret=interpret,
    )
    if recent_plan is not None:  # the full-precision window: decode_attention's own partials
        rk, r_split, r_n = recent_plan
        k_recent, v_recent, n_recent = recent
        o_r, m_r, l_r = _decode_partials(
            qg, k_recent, v_recent, n_recent, scale=scale, block_k=rk, split_len=r_split,
            n_splits=r_n, interpret=interpret,
        )
        o_part = jnp.concatenate([o_part, o_r], axis=2)
        m_part = jnp.concatenate([m_part, m_r], axis=2)
        l_part = jnp.concatenate([l_part, l_r], axis=2)
    return o_part, m_part, l_part


def quant_decode_partials(
    qg: Float[Array, "B KV M D"],
    packed: tuple[Array, ...],
    n_quant: Int[Array, " B"],
    recent: tuple[Array, Array, Array],
    *,
    bits: int,
    group: int,
    scale: float,
    block_k: int = 64,
    num_splits: int = 8,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array]:
    """:func:`quant_decode_attention`'s split-K partials ``(acc, m, l)`` for queries already
    grouped by KV head, ``packed = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)``,
    ``recent = (k_recent, v_recent, n_recent)``; merge with :func:`combine_partials`."""
    b, kvh, m_rows, d = qg.shape
    _, s_cap, r = _check_inputs(qg.reshape(b, m_rows, kvh, d), packed, n_quant, recent, bits, group)
    bk, split_len, n_splits = _quant_split_plan(s_cap, group, block_k, num_splits)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _all_partials(
        qg, packed, n_quant, recent, scale=float(scale), bits=bits, group=group, block_k=bk,
        split_len=split_len, n_splits=n_splits, recent_plan=_split_plan(r, block_k, 1) if r else None,
        interpret=interpret,
    )
