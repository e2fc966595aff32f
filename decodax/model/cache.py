"""Static-capacity KV cache with per-row lengths, commit, rollback and gather.

``write``, ``gather``, ``take_rows`` and ``first_layers`` also take a compressed cache
(:class:`decodax.kvquant.cache.QuantKVCache`), which implements them itself;
``commit`` and ``rollback`` only move ``length`` on either.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax.model.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, ``[layers, B, kv_heads, S, head_dim]``.

    Each (row, KV head) holds a contiguous ``[S, head_dim]`` block, so decode
    attention is one batched matrix-vector product per layer.

    ``length[b]`` is the number of committed entries of row ``b``. Writing new
    entries (``Model.apply``) puts them at slots ``length .. length + T`` but
    never moves ``length``: ``commit`` does, so a rejected draft is rolled back
    by not committing it (or by ``rollback``).
    """

    k: Float[Array, "L B K S D"]
    v: Float[Array, "L B K S D"]
    length: Int[Array, " B"]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def dtype(self):
        return self.k.dtype


def init_cache(
    config: ModelConfig, batch: int, capacity: int, dtype: Any = jnp.float32
) -> KVCache:
    """An empty cache of static ``capacity`` slots per row."""
    if batch < 1:
        raise ValueError(f"cache batch must be >= 1, got {batch}")
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1, got {capacity}")
    shape = (config.n_layers, batch, config.n_kv_heads, capacity, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((batch,), jnp.int32)
    )


def write(
    cache: KVCache,
    k_new: Float[Array, "L B T K D"],
    v_new: Float[Array, "L B T K D"],
) -> KVCache:
    """Write T new entries per row at slots ``length .. length + T`` (no commit).

    ``k_new, v_new`` are ``[layers_run, B, T, kv_heads, head_dim]`` (the model's
    token-major order). Layers beyond ``layers_run`` are left untouched
    (early-exit forwards write only the layers they ran). Slots past the
    capacity are dropped.
    """
    if not isinstance(cache, KVCache):  # a compressed cache (decodax.kvquant.cache)
        return cache.write(k_new, v_new)
    n_layers, _, t = k_new.shape[:3]
    slots = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    rows = jnp.arange(cache.batch, dtype=jnp.int32)[:, None]

    def put(buf, new):
        # buf[:, rows, :, slots] indexes as [B, T, L, K, D] (advanced indices first).
        new = new.astype(buf.dtype).transpose(1, 2, 0, 3, 4)
        head = buf[:n_layers].at[:, rows, :, slots].set(new, mode="drop")
        if n_layers == buf.shape[0]:
            return head
        return jax.lax.dynamic_update_slice_in_dim(buf, head, 0, axis=0)

    return dataclasses.replace(cache, k=put(cache.k, k_new), v=put(cache.v, v_new))


def commit(cache: KVCache, n: Int[Array, " B"]) -> KVCache:
    """Advance each row's length by its own ``n[b]`` (accept that many written entries)."""
    n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), cache.length.shape)
    return dataclasses.replace(cache, length=jnp.minimum(cache.length + n, cache.capacity))


def rollback(cache: KVCache, length: Int[Array, " B"]) -> KVCache:
    """Restore each row's committed length (entries past it become invisible)."""
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), cache.length.shape)
    return dataclasses.replace(cache, length=jnp.clip(length, 0, cache.capacity))


def gather(cache: KVCache, src: Int[Array, "B P"], count: Int[Array, " B"]) -> KVCache:
    """Move written-but-uncommitted entries of a token-tree path into place and commit them.

    ``src[b, i]`` is the slot offset (relative to ``length[b]``) of the i-th node
    of row b's accepted path; the first ``count[b]`` nodes are copied to slots
    ``length[b] + i`` and committed. Used after tree verification (SpecInfer,
    Medusa, EAGLE), where the accepted nodes are scattered among the tree slots.
    """
    if not isinstance(cache, KVCache):
        return cache.gather(src, count)
    p = src.shape[1]
    rows = jnp.arange(cache.batch, dtype=jnp.int32)[:, None]
    base = cache.length[:, None]
    src_slots = jnp.clip(base + src, 0, cache.capacity - 1)
    idx = jnp.arange(p, dtype=jnp.int32)[None, :]
    dst_slots = jnp.where(idx < count[:, None], base + idx, cache.capacity)  # out of range -> dropped

    def move(buf):
        picked = buf[:, rows, :, src_slots]  # [B, P, L, K, D]
        return buf.at[:, rows, :, dst_slots].set(picked, mode="drop")

    moved = dataclasses.replace(cache, k=move(cache.k), v=move(cache.v))
    return commit(moved, count)


def take_rows(cache: KVCache, rows: Int[Array, " R"]) -> KVCache:
    """Cache rows ``rows`` (a gather on the batch axis; beam search reorders beams with it)."""
    if not isinstance(cache, KVCache):
        return cache.take_rows(rows)
    return dataclasses.replace(cache, k=cache.k[:, rows], v=cache.v[:, rows], length=cache.length[rows])


def first_layers(cache: KVCache, n: int) -> KVCache:
    """The cache of the first ``n`` layers (an early-exit draft writes only those)."""
    if not isinstance(cache, KVCache):
        return cache.first_layers(n)
    return dataclasses.replace(cache, k=cache.k[:n], v=cache.v[:n])


def check_capacity(cache_capacity: int, needed: int, what: str = "sequence") -> None:
    """Raise ValueError (before tracing) when ``needed`` slots exceed the capacity."""
    if needed > cache_capacity:
        raise ValueError(
            f"{what} needs {needed} cache slots but the cache capacity is {cache_capacity}"
        )
