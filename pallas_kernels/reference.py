"""Pure-jnp reference attention with the exact semantics of the Pallas kernels.

Both functions compute in float32 with ``Precision.HIGHEST`` matmuls (so a GPU
comparison is not blurred by TF32) and return the query's dtype. They are the
oracles of ``flash_attention`` and ``decode_attention``; see those modules.

Semantics shared with the kernels:

* GQA: ``H = KV * G``; query head ``h`` reads KV head ``h // G``.
* Masked scores are set to ``NEG_INF = -1e30`` (finite, as in
  ``decodax.model.transformer``), so a query row whose mask is all False gets
  the uniform average over the (real) keys instead of NaN.
* ``decode_attention_reference``: ``lengths`` are clamped to ``[0, S]``; a row
  with length 0 attends to nothing and returns zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

NEG_INF = -1e30
HIGHEST = jax.lax.Precision.HIGHEST


def causal_mask(batch: int, t: int) -> Bool[Array, "B T T"]:
    """The causal chain mask ``mask[b, i, j] = j <= i``."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))


def attention_reference(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T KV D"],
    v: Float[Array, "B T KV D"],
    mask: Bool[Array, "B T T"] | None = None,
    scale: float | None = None,
) -> Float[Array, "B T H D"]:
    """Softmax attention among T new tokens (Vaswani et al., 2017, eq. 1), GQA.

    ``mask[b, i, j]``: query token i may attend to key token j (None: causal).
    ``scale`` defaults to ``D ** -0.5``.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    scale = d**-0.5 if scale is None else scale
    if mask is None:
        mask = causal_mask(b, t)
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    kf, vf = jnp.repeat(kf, g, axis=2), jnp.repeat(vf, g, axis=2)  # head h -> kv head h // g
    s = jnp.einsum("bqhd,bkhd->bhqk", qf * scale, kf, precision=HIGHEST)
    s = jnp.where(mask[:, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=HIGHEST).astype(q.dtype)


def decode_attention_reference(
    q: Float[Array, "B T H D"],
    k_cache: Float[Array, "B KV S D"],
    v_cache: Float[Array, "B KV S D"],
    lengths: Int[Array, " B"],
    scale: float | None = None,
) -> Float[Array, "B T H D"]:
    """Attention of T query tokens over the valid cache slots ``< lengths[b]``, GQA.

    Every query row attends to all valid slots (the new tokens are expected to
    be in the cache already). The cache layout is decodax's
    ``[B, kv_heads, S, head_dim]``. A row with ``lengths == 0`` returns zeros.
    """
    b, t, h, d = q.shape
    kvh, s_cap = k_cache.shape[1], k_cache.shape[2]
    g = h // kvh
    scale = d**-0.5 if scale is None else scale
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_cap)
    qg = q.astype(jnp.float32).reshape(b, t, kvh, g, d)
    s = jnp.einsum(
        "btkgd,bksd->btkgs", qg * scale, k_cache.astype(jnp.float32), precision=HIGHEST
    )
    valid = jnp.arange(s_cap)[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(valid[:, None, None, None, :], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("btkgs,bksd->btkgd", p, v_cache.astype(jnp.float32), precision=HIGHEST)
    o = jnp.where((lengths > 0)[:, None, None, None, None], o, 0.0)
    return o.reshape(b, t, h, d).astype(q.dtype)
