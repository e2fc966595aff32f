"""Attention of T new tokens over the committed cache and over each other, by implementation.

``Model.apply(..., attention=)`` picks one:

* ``"xla"`` -- plain JAX. Float cache: the cache-in-place batched products of
  :mod:`decodax.kernels` (fast on CPU); compressed cache: its decoded float view
  (:func:`decodax.kvquant.cache.dequantized`, one layer at a time).
* ``"pallas"`` -- the Pallas kernels of ``pallas_kernels``: FlashAttention-2 for a
  prefill (no cache), flash-decoding split-K over a float cache, and the fused
  dequantize-and-attend kernel over a KIVI-coded cache (no float copy of the cache);
  the new tokens' own block joins the kernel's partials as one more split.
  Interpreted on CPU (slow: tests only), compiled on GPU / TPU.
* ``"auto"`` (default) -- the fastest correct one on the current backend: ``"xla"``
  everywhere for now (XLA beat these kernels on CPU and on an H100,
  ``experiments/results/kernels/gpu-h100.md``).

All share one softmax over [cache slots < length] + [new tokens allowed by the mask].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from decodax.kernels import bmm
from decodax.model.cache import KVCache

ATTENTION = ("auto", "xla", "pallas")
NEG_INF = -1e30


def resolve_attention(name: str) -> str:
    """``"auto"`` -> the implementation used on this backend; checks the name."""
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    return "xla" if name == "auto" else name


def attend(
    q: Float[Array, "B K M D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K D"],
    attn_mask: Bool[Array, "B T T"],
    cache,
    layer: int,
    impl: str,
) -> Float[Array, "B K M D"]:
    """Softmax attention of grouped, pre-scaled queries (row ``m = t * G + g``) over the cache
    (``None``: no committed entries) and the new keys/values."""
    b, kvh, m_rows, hd = q.shape
    g = m_rows // k.shape[1]
    sn = jnp.einsum("bkmd,bukd->bkmu", q, k)
    sn = jnp.where(jnp.repeat(attn_mask, g, axis=1)[:, None], sn, NEG_INF)
    if impl == "pallas":
        return _attend_pallas(q, k, v, sn, attn_mask, cache, layer)
    if cache is None:
        pn = jnp.exp(sn - sn.max(-1, keepdims=True))
        return jnp.einsum("bkmu,bukd->bkmd", pn / pn.sum(-1, keepdims=True), v)
    if isinstance(cache, KVCache):
        # The whole [L, B, K, S, hd] cache, layer ``layer`` read in place.
        s_len = cache.capacity
        stacked = lambda c: c.reshape(c.shape[0], b * kvh, s_len, hd)  # noqa: E731
        sc = bmm(q.reshape(b * kvh, m_rows, hd), stacked(cache.k), transposed=True,
                 w_index=layer, lengths=cache.length).reshape(b, kvh, m_rows, s_len)
        read_v = lambda p: bmm(p.reshape(b * kvh, m_rows, s_len), stacked(cache.v),  # noqa: E731
                               transposed=False, w_index=layer, lengths=cache.length)
    else:
        from decodax.kvquant.cache import dequantized

        kc, vc = dequantized(cache, layer)
        s_len = cache.capacity
        sc = jnp.einsum("bkmd,bksd->bkms", q, kc)
        read_v = lambda p: jnp.einsum("bkms,bksd->bkmd", p, vc)  # noqa: E731
    live = jnp.arange(s_len)[None, :] < cache.length[:, None]
    sc = jnp.where(live[:, None, None, :], sc, NEG_INF)
    mx = jnp.maximum(sc.max(-1, keepdims=True), sn.max(-1, keepdims=True))
    pc, pn = jnp.exp(sc - mx), jnp.exp(sn - mx)
    denom = pc.sum(-1, keepdims=True) + pn.sum(-1, keepdims=True)
    return read_v(pc / denom).reshape(b, kvh, m_rows, hd) + jnp.einsum("bkmu,bukd->bkmd", pn / denom, v)


def _attend_pallas(q, k, v, sn, attn_mask, cache, layer):
    from pallas_kernels import combine_partials
    from pallas_kernels.decode_attention import decode_partials

    if cache is None:  # a prefill: FlashAttention-2 is the whole attention
        from pallas_kernels import flash_attention

        b, kvh, m_rows, hd = q.shape
        t = k.shape[1]
        g = m_rows // t
        qh = q.reshape(b, kvh, t, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, kvh * g, hd)
        o = flash_attention(qh, k, v, attn_mask, scale=1.0)
        return o.reshape(b, t, kvh, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kvh, m_rows, hd)
    if isinstance(cache, KVCache):
        parts = decode_partials(q, cache.k[layer], cache.v[layer], cache.length, scale=1.0)
    else:
        parts = _kivi_partials(q, cache, layer)
    mn = sn.max(-1)
    pn = jnp.exp(sn - mn[..., None])
    own = (jnp.einsum("bkmu,bukd->bkmd", pn, v)[:, :, None], mn[:, :, None], pn.sum(-1)[:, :, None])
    return combine_partials(*(jnp.concatenate([p, o], axis=2) for p, o in zip(parts, own)))


def _kivi_partials(q, cache, layer):
    """The fused kernel's partials over a KIVI-coded compressed cache and its float window."""
    from decodax.kvquant.cache import quantized_length
    from decodax.kvquant.codecs import KiviCodec
    from pallas_kernels.quant_attention import quant_decode_partials

    if not isinstance(cache.codec, KiviCodec) or cache.n_sink:
        raise ValueError(
            f"attention='pallas' over a compressed cache needs a KIVI codec without sink tokens, "
            f"got {cache.codec} with sink={cache.n_sink} (use attention='xla')"
        )
    b, s, w = cache.batch, cache.capacity, cache.window
    blk = jax.tree.map(lambda x: x[layer], cache.blocks)
    kvh = blk.k_codes.shape[1]
    flat = lambda x: x.reshape(b, kvh, s, x.shape[-1])  # noqa: E731
    packed = (flat(blk.k_codes), blk.k_scale[..., 0, :], blk.k_zero[..., 0, :],
              flat(blk.v_codes), flat(blk.v_scale), flat(blk.v_zero))
    n_quant = quantized_length(cache)
    at = (n_quant[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]) % w  # window in slot order
    window = lambda ring: jnp.take_along_axis(ring[layer], at[:, None, :, None], axis=2)  # noqa: E731
    recent = (window(cache.ring_k), window(cache.ring_v), cache.length - n_quant)
    return quant_decode_partials(q, packed, n_quant, recent, bits=cache.codec.bits,
                                 group=cache.codec.group, scale=1.0)
