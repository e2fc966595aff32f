"""Rotary position embedding (Su et al., 2021, "RoFormer"), rotate-half (HF/NeoX) layout."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rotate(x: Float[Array, "... D"], pos: Int[Array, "..."], theta: float) -> Float[Array, "... D"]:
    """Rotate each channel pair ``(i, i + D/2)`` of ``x`` by ``pos * theta^(-2i/D)``.

    ``pos`` broadcasts against ``x[..., 0]``. Rotations compose additively, so
    ``rotate(rotate(x, a), b) == rotate(x, a + b)`` and ``-pos`` undoes ``pos``
    (KVQuant's pre-RoPE keys, PIE's re-rotation after an edit).
    """
    half = x.shape[-1] // 2
    freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = pos.astype(jnp.float32)[..., None] * freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
