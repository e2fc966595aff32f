"""Split-K decode attention over a long KV cache as a Pallas kernel.

Flash-decoding (Dao, Haziza, Massa, Sizov, 2023, "Flash-Decoding for
long-context inference"): with few query tokens the (batch x head) grid is too
small to fill the machine, so the cache axis S is split into chunks processed
by parallel grid cells. Each cell runs the FlashAttention-2 online softmax
(Dao, 2023, Algorithm 1) over its chunk and writes a partial
``(max m, sum l, unnormalised output acc)``; a pure-jnp combine rescales the
partials by ``exp(m_s - max_s m_s)`` and divides once.

* Per-row lengths: cell (b, kv head, split) reads only slots ``< lengths[b]``;
  splits past the length run zero iterations.
* GQA: the G query heads of one KV head (times the T query tokens) form the
  cell's query block ``[T*G, D]`` (padded to a power of two >= 16), so each K/V
  chunk is loaded once per KV head.
* Layout: decodax's cache ``[B, KV, S, D]`` is used as is; the wrapper pads S
  to a multiple of the chunk (and D to a power of two >= 16) only when needed,
  so a capacity that is a multiple of ``block_k * num_splits`` is never copied.

Semantics are those of ``pallas_kernels.reference.decode_attention_reference``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels.flash_attention import (
    _NN,
    _NT,
    _is_pow2,
    _next_pow2,
    compiler_params,
    default_interpret,
)
from pallas_kernels.reference import HIGHEST, NEG_INF


def split_attention(q, load_block, length, start_split, *, block_k, split_len, o_ref, m_ref, l_ref):
    """One split of flash-decoding: online softmax of the (pre-scaled) query block ``q``
    ``[M, D]`` over slots ``start_split .. start_split + split_len`` (those ``< length``),
    ``load_block(start) -> (k, v)`` giving float32 ``[block_k, D]`` blocks at offset
    ``start`` within the split. Writes the partial ``(acc, m, l)``. Shared by the float
    and the quantized decode kernels (only ``load_block`` differs)."""
    m_rows = q.shape[0]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        k, v = load_block(start)
        base = start_split + start
        slot_col = base + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        slot_row = base + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        # slots past the length may hold anything (stale drafts or codes, NaN padding or scales)
        v = jnp.where(slot_col < length, v, 0.0)
        s = jax.lax.dot_general(q, k, _NT, precision=HIGHEST, preferred_element_type=jnp.float32)
        s = jnp.where(slot_row < length, s, NEG_INF)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = alpha * l_prev + p.sum(axis=-1)
        pv = jax.lax.dot_general(p, v, _NN, precision=HIGHEST, preferred_element_type=jnp.float32)
        return alpha[:, None] * acc + pv, m_new, l_new

    init = (
        jnp.zeros((m_rows, q.shape[1]), jnp.float32),
        jnp.full((m_rows,), NEG_INF, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
    )
    # lax.div truncates toward 0, so a split past the length gets <= 0 -> clipped to 0 blocks
    n_blocks = jax.lax.div(length - start_split + block_k - 1, block_k)
    n_blocks = jnp.clip(n_blocks, 0, split_len // block_k)
    acc, m, l = jax.lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = acc
    m_ref[...] = m[:, None]
    l_ref[...] = l[:, None]


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, block_k, split_len):
    length = len_ref[pl.program_id(0), 0]  # whole [B, 1] block: legal on Triton and Mosaic
    q = q_ref[...].astype(jnp.float32) * scale  # [M, D]

    def load_block(start):
        return (k_ref[pl.ds(start, block_k), :].astype(jnp.float32),
                v_ref[pl.ds(start, block_k), :].astype(jnp.float32))

    split_attention(q, load_block, length, pl.program_id(2) * split_len, block_k=block_k, split_len=split_len,
                    o_ref=o_ref, m_ref=m_ref, l_ref=l_ref)


def combine_partials(
    o_part: Float[Array, "*lead N M D"],
    m_part: Float[Array, "*lead N M"],
    l_part: Float[Array, "*lead N M"],
) -> Float[Array, "*lead M D"]:
    """Merge split-K partials (flash-decoding's reduction step).

    ``out = sum_s exp(m_s - m) acc_s / sum_s exp(m_s - m) l_s`` with
    ``m = max_s m_s``; rows where every split was empty (length 0) give 0.
    """
    m = m_part.max(axis=-2, keepdims=True)
    w = jnp.exp(m_part - m)  # empty splits: exp(NEG_INF - m) = 0
    l = (w * l_part).sum(axis=-2)
    o = (w[..., None] * o_part).sum(axis=-3)
    safe = jnp.where(l > 0, l, 1.0)
    return jnp.where((l > 0)[..., None], o / safe[..., None], 0.0)


@functools.partial(
    jax.jit, static_argnames=("scale", "block_k", "split_len", "n_splits", "interpret")
)
def _decode_partials(q, k_cache, v_cache, lengths, *, scale, block_k, split_len, n_splits, interpret):
    """Grouped q ``[B, KV, M, D]`` -> partials o ``[B, KV, N, M, D]``, m, l ``[B, KV, N, M]``."""
    b, kvh, m_rows, d = q.shape
    s_cap = k_cache.shape[2]
    m_pad = max(16, _next_pow2(m_rows))
    d_pad = max(16, _next_pow2(d))
    s_pad = n_splits * split_len
    q = jnp.pad(q, ((0, 0), (0, 0), (0, m_pad - m_rows), (0, d_pad - d)))
    if s_pad != s_cap or d_pad != d:  # copies the cache: avoid by choosing the capacity
        pads = ((0, 0), (0, 0), (0, s_pad - s_cap), (0, d_pad - d))
        k_cache, v_cache = jnp.pad(k_cache, pads), jnp.pad(v_cache, pads)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_cap).reshape(b, 1)

    kernel = functools.partial(_decode_kernel, scale=scale, block_k=block_k, split_len=split_len)
    kv_spec = pl.BlockSpec((None, None, split_len, d_pad), lambda bi, hi, si: (bi, hi, si, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, n_splits),
        in_specs=[
            pl.BlockSpec((b, 1), lambda bi, hi, si: (0, 0)),
            pl.BlockSpec((None, None, m_pad, d_pad), lambda bi, hi, si: (bi, hi, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, m_pad, d_pad), lambda bi, hi, si: (bi, hi, si, 0, 0)),
            pl.BlockSpec((None, None, None, m_pad, 1), lambda bi, hi, si: (bi, hi, si, 0, 0)),
            pl.BlockSpec((None, None, None, m_pad, 1), lambda bi, hi, si: (bi, hi, si, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kvh, n_splits, m_pad, d_pad), jnp.float32),
            jax.ShapeDtypeStruct((b, kvh, n_splits, m_pad, 1), jnp.float32),
            jax.ShapeDtypeStruct((b, kvh, n_splits, m_pad, 1), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="decodax_decode_attention",
    )(lengths, q, k_cache, v_cache)
    return o[..., :m_rows, :d], m[..., :m_rows, 0], l[..., :m_rows, 0]


def decode_partials(
    q: Float[Array, "B KV M D"],
    k_cache: Float[Array, "B KV S D"],
    v_cache: Float[Array, "B KV S D"],
    lengths: Int[Array, " B"],
    *,
    scale: float,
    block_k: int = 128,
    num_splits: int = 8,
    interpret: bool | None = None,
) -> tuple[Float[Array, "B KV N M D"], Float[Array, "B KV N M"], Float[Array, "B KV N M"]]:
    """Flash-decoding's split-K partials ``(acc, m, l)`` for queries already grouped by KV head
    (row ``m = t * G + g``), to be merged with other partials by :func:`combine_partials`
    (``Model.apply`` adds the new tokens' own block as one more partial)."""
    block_k, split_len, n_splits = _split_plan(k_cache.shape[2], block_k, num_splits)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _decode_partials(q, k_cache, v_cache, lengths, scale=float(scale), block_k=block_k,
                            split_len=split_len, n_splits=n_splits, interpret=interpret)


def _split_plan(s_cap: int, block_k: int, num_splits: int) -> tuple[int, int, int]:
    block_k = max(16, min(block_k, _next_pow2(s_cap)))
    n_kblocks = -(-s_cap // block_k)
    per_split = -(-n_kblocks // num_splits)
    split_len = per_split * block_k
    n_splits = -(-n_kblocks // per_split)
    return block_k, split_len, n_splits


def decode_attention(
    q: Float[Array, "B T H D"],
    k_cache: Float[Array, "B KV S D"],
    v_cache: Float[Array, "B KV S D"],
    lengths: Int[Array, " B"],
    *,
    scale: float | None = None,
    block_k: int = 128,
    num_splits: int = 8,
    interpret: bool | None = None,
) -> Float[Array, "B T H D"]:
    """Flash-decoding (Dao et al., 2023): split-K attention over cache slots ``< lengths[b]``.

    Args:
      q: ``[B, T, H, D]`` query tokens (T small, e.g. 1..16); every query row
        attends to all valid slots.
      k_cache, v_cache: ``[B, KV, S, D]`` (decodax's per-layer cache layout).
      lengths: ``int32[B]`` valid slots per row (clamped to ``[0, S]``; 0 gives zeros).
      scale: score scale, default ``D ** -0.5``.
      block_k: key block inside a split (power of two, clamped to >= 16).
      num_splits: at most this many parallel chunks along S.
      interpret: run the Pallas interpreter (None: True on CPU only).

    Returns ``[B, T, H, D]`` in q's dtype, equal to
    ``reference.decode_attention_reference(q, k_cache, v_cache, lengths, scale)``.
    """
    if q.ndim != 4 or k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(
            "expected q [B,T,H,D], caches [B,KV,S,D]; "
            f"got ranks {q.ndim}, {k_cache.ndim}, {v_cache.ndim}"
        )
    b, t, h, d = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"caches must be [B={b}, KV, S, D={d}], got {k_cache.shape}")
    kvh, s_cap = k_cache.shape[1], k_cache.shape[2]
    if kvh < 1 or h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({kvh})")
    if t < 1 or s_cap < 1:
        raise ValueError(f"need T >= 1 and S >= 1, got T={t}, S={s_cap}")
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must be [B] = ({b},), got {tuple(lengths.shape)}")
    if not _is_pow2(block_k):
        raise ValueError(f"block_k must be a positive power of two, got {block_k}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_k, split_len, n_splits = _split_plan(s_cap, block_k, num_splits)
    scale = float(d**-0.5 if scale is None else scale)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _decode_impl(
        q,
        k_cache,
        v_cache,
        lengths,
        scale=scale,
        block_k=block_k,
        split_len=split_len,
        n_splits=n_splits,
        interpret=interpret,
    )


@functools.partial(
    jax.jit, static_argnames=("scale", "block_k", "split_len", "n_splits", "interpret")
)
def _decode_impl(q, k_cache, v_cache, lengths, *, scale, block_k, split_len, n_splits, interpret):
    b, t, h, d = q.shape
    kvh = k_cache.shape[1]
    g = h // kvh
    # Group the G query heads of each KV head: row index m = t * G + g.
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
    o_part, m_part, l_part = _decode_partials(
        qg,
        k_cache,
        v_cache,
        lengths,
        scale=scale,
        block_k=block_k,
        split_len=split_len,
        n_splits=n_splits,
        interpret=interpret,
    )
    o = combine_partials(o_part, m_part, l_part)  # [B, KV, T*G, D]
    o = o.reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
    return o.astype(q.dtype)
