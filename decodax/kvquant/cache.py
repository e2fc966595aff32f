"""A compressed KV cache with the ``KVCache`` interface (write, commit, rollback, gather).

Tokens are stored in groups of ``G`` slots (the codec's ``group``): complete
groups older than the recent window as codec blocks (:mod:`decodax.kvquant.codecs`),
the newest tokens in a float ring buffer, the first ``sink`` tokens (attention
sinks, KVQuant) in float. At committed length ``n`` a row sees

* slots ``< sink``: the float sink;
* slots ``< q(n) = G * floor((n - residual) / G)``: the decoded groups;
* slots ``q(n) .. n``: the ring (``residual <= n - q(n) < residual + G`` tokens, KIVI's
  full-precision window).

``write`` puts new float entries in the ring (slot ``s`` at ring index ``s % W``)
and *eagerly* encodes every group the write completes, reading the group's older
slots from the ring; ``commit`` / ``rollback`` only move ``length``. So the
visible state is a deterministic function of the committed tokens' floats and a
rollback restores exactly the committed state, with one condition on the ring
``W = residual + G + slack``: no write reaches more than ``slack`` slots past the
length the cache is later rolled back to or committed at (the tokens a decoder
step writes beyond what it keeps: draft / tree size + 1). ``init_quant_cache``
takes ``slack``; a prefill (written and committed together) may be any length.

Every decoder runs on it unchanged: ``decodax.model.cache.write`` / ``gather`` /
``first_layers`` dispatch here, and ``Model.apply`` attends over
:func:`dequantized` (XLA) or, for KIVI codecs, the fused Pallas kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax.kvquant.codecs import Codec

__all__ = ["QuantCacheSpec", "QuantKVCache", "dequantized", "init_quant_cache", "kv_bytes_per_token", "quantized_length"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantKVCache:
    """Codec blocks ``[L, B, KV, S/G, ...]``, float ring ``[L, B, KV, W, D]``, float sink
    ``[L, B, KV, sink, D]``, per-layer codec state ``aux`` and committed ``length[B]``."""

    blocks: Any
    ring_k: Float[Array, "L B K W D"]
    ring_v: Float[Array, "L B K W D"]
    sink_k: Float[Array, "L B K N D"]
    sink_v: Float[Array, "L B K N D"]
    aux: Any
    length: Int[Array, " B"]
    codec: Codec = dataclasses.field(metadata=dict(static=True))
    residual: int = dataclasses.field(metadata=dict(static=True))
    slots: int = dataclasses.field(metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.slots

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    @property
    def num_layers(self) -> int:
        return self.ring_k.shape[0]

    @property
    def dtype(self):
        return self.ring_k.dtype

    @property
    def window(self) -> int:
        return self.ring_k.shape[3]

    @property
    def n_sink(self) -> int:
        return self.sink_k.shape[3]

    def write(self, k_new: Float[Array, "L B T K D"], v_new: Float[Array, "L B T K D"]) -> QuantKVCache:
        return _write(self, k_new, v_new)

    def gather(self, src: Int[Array, "B P"], count: Int[Array, " B"]) -> QuantKVCache:
        return _gather(self, src, count)

    def take_rows(self, rows: Int[Array, " R"]) -> QuantKVCache:
        pick = lambda x: x[:, rows]  # noqa: E731
        return dataclasses.replace(
            self, blocks=jax.tree.map(pick, self.blocks), ring_k=pick(self.ring_k), ring_v=pick(self.ring_v),
            sink_k=pick(self.sink_k), sink_v=pick(self.sink_v), length=self.length[rows],
        )

    def first_layers(self, n: int) -> QuantKVCache:
        cut = lambda x: x[:n]  # noqa: E731
        return dataclasses.replace(
            self, blocks=jax.tree.map(cut, self.blocks), aux=jax.tree.map(cut, self.aux),
            ring_k=cut(self.ring_k), ring_v=cut(self.ring_v), sink_k=cut(self.sink_k), sink_v=cut(self.sink_v),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class QuantCacheSpec:
    """What ``Model.init_cache`` builds when set as ``Model.cache_spec`` (hashed by identity,
    so a model carrying one stays a valid static argument)."""

    codec: Codec
    residual: int = 32
    sink: int = 0
    slack: int = 64
    aux: Any = None

    def init(self, config, batch: int, capacity: int) -> QuantKVCache:
        g = self.codec.group
        return init_quant_cache(config, batch, -(-capacity // g) * g, self.codec, residual=self.residual,
                                sink=self.sink, slack=self.slack, aux=self.aux)


def init_quant_cache(
    config,
    batch: int,
    capacity: int,
    codec: Codec,
    *,
    residual: int = 32,
    sink: int = 0,
    slack: int = 64,
    aux: Any = None,
) -> QuantKVCache:
    """An empty compressed cache of ``capacity`` slots per row (a multiple of the codec's group).

    ``residual``: tokens always kept in float (KIVI's R); ``sink``: first tokens kept in
    float (KVQuant's attention sink, ``< group``); ``slack``: see the module docstring;
    ``aux``: the codec state (KVQuant: from :func:`decodax.kvquant.calibrate.calibrate_kvquant`).
    """
    g = codec.group
    if batch < 1:
        raise ValueError(f"cache batch must be >= 1, got {batch}")
    if capacity < g or capacity % g:
        raise ValueError(f"cache capacity {capacity} must be a positive multiple of the codec group {g}")
    if residual < 0 or slack < 1:
        raise ValueError(f"need residual >= 0 and slack >= 1, got residual={residual}, slack={slack}")
    if not 0 <= sink < g:
        raise ValueError(f"sink must be in [0, group={g}), got {sink}")
    n_l, kvh, d = config.n_layers, config.n_kv_heads, config.head_dim
    aux = codec.init_aux(n_l, kvh, d) if aux is None else aux
    groups = capacity // g
    zeros = jnp.zeros((batch, kvh, groups, g, d), jnp.float32)
    pos = jnp.zeros((batch, groups, g), jnp.int32)
    aux0 = jax.tree.map(lambda x: x[0], aux)
    shapes = jax.eval_shape(codec.encode, aux0, zeros, zeros, pos)
    blocks = jax.tree.map(lambda s: jnp.zeros((n_l, *s.shape), s.dtype), shapes)
    ring = jnp.zeros((n_l, batch, kvh, residual + g + slack, d), jnp.float32)
    sinks = jnp.zeros((n_l, batch, kvh, sink, d), jnp.float32)
    return QuantKVCache(blocks, ring, ring, sinks, sinks, aux, jnp.zeros((batch,), jnp.int32),
                        codec, residual, capacity)


def quantized_length(cache: QuantKVCache, length: Int[Array, " B"] | None = None) -> Int[Array, " B"]:
    """``q(n)``: slots served by decoded groups (the rest of ``[0, n)`` is float)."""
    n = cache.length if length is None else length
    g = cache.codec.group
    return jnp.maximum((n - cache.residual) // g * g, 0)


def _take_slots(buf: Array, idx: Int[Array, "B N"]) -> Array:
    """``buf[L, B, K, W, D]`` at per-row indices -> ``[L, B, K, N, D]``."""
    return jnp.take_along_axis(buf, idx[None, :, None, :, None], axis=3)


def _write(cache: QuantKVCache, k_new: Array, v_new: Array) -> QuantKVCache:
    n_l, b, t = k_new.shape[:3]
    codec, g, w, cap = cache.codec, cache.codec.group, cache.window, cache.slots
    kn = k_new.astype(jnp.float32).transpose(0, 1, 3, 2, 4)  # [Lr, B, K, T, D]
    vn = v_new.astype(jnp.float32).transpose(0, 1, 3, 2, 4)
    start = cache.length
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]

    # 1. Encode the groups this write completes (at most ceil(T / G), from start's group on).
    n_g = min(math.ceil(t / g), cap // g)
    gidx = start[:, None] // g + jnp.arange(n_g, dtype=jnp.int32)[None, :]  # [B, n]
    slots = gidx[..., None] * g + jnp.arange(g, dtype=jnp.int32)  # [B, n, G]
    flat = slots.reshape(b, n_g * g)
    from_new = (flat >= start[:, None])[None, :, None, :, None]
    new_at = jnp.clip(flat - start[:, None], 0, t - 1)

    def group_values(new, ring):
        vals = jnp.where(from_new, _take_slots(new, new_at), _take_slots(ring[:n_l], flat % w))
        vals = vals.reshape(n_l, b, vals.shape[2], n_g, g, vals.shape[-1])
        if cache.n_sink:  # sink tokens are served in float: keep them out of the group's statistics
            vals = jnp.where((slots < cache.n_sink)[None, :, None, :, :, None], vals[..., cache.n_sink:cache.n_sink + 1, :], vals)
        return vals

    aux = jax.tree.map(lambda x: x[:n_l], cache.aux)
    layers = jax.vmap(codec.encode, in_axes=(0, 0, 0, None))

    def one_group(args):  # one group per call: a group codes the same whichever write completes it
        gk, gv, gpos = args
        return layers(aux, gk[:, :, :, None], gv[:, :, :, None], gpos[:, None])

    per_group = jax.lax.map(one_group, (jnp.moveaxis(group_values(kn, cache.ring_k), 3, 0),
                                        jnp.moveaxis(group_values(vn, cache.ring_v), 3, 0),
                                        jnp.moveaxis(slots, 1, 0)))
    enc = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 4)[:, :, :, 0], per_group)  # [Lr, B, K, n, ...]
    done = (gidx * g + g <= start[:, None] + t) & (gidx < cap // g)
    gi = jnp.where(done, gidx, cap // g)  # incomplete -> out of range -> dropped

    def put_group(buf, new):  # new [Lr, B, K, n, ...]; buf[:Lr, rows, :, gi] is [B, n, Lr, K, ...]
        return buf.at[:n_l, rows, :, gi].set(new.transpose(1, 3, 0, 2, *range(4, new.ndim)), mode="drop")

    blocks = jax.tree.map(put_group, cache.blocks, enc)

    # 2. The ring keeps the last min(T, W) written tokens; slots past the capacity are dropped.
    tw = min(t, w)
    ring_slots = start[:, None] + (t - tw) + jnp.arange(tw, dtype=jnp.int32)[None, :]
    ridx = jnp.where(ring_slots < cap, ring_slots % w, w)

    def put_slots(buf, new, idx):  # new [Lr, B, K, n, D] -> [B, n, Lr, K, D]
        return buf.at[:n_l, rows, :, idx].set(new.transpose(1, 3, 0, 2, 4), mode="drop")

    ring_k = put_slots(cache.ring_k, kn[:, :, :, t - tw:], ridx)
    ring_v = put_slots(cache.ring_v, vn[:, :, :, t - tw:], ridx)
    sink_k, sink_v = cache.sink_k, cache.sink_v
    if cache.n_sink:
        ns = min(t, cache.n_sink)
        s_slots = start[:, None] + jnp.arange(ns, dtype=jnp.int32)[None, :]
        sidx = jnp.where(s_slots < cache.n_sink, s_slots, cache.n_sink)
        sink_k = put_slots(sink_k, kn[:, :, :, :ns], sidx)
        sink_v = put_slots(sink_v, vn[:, :, :, :ns], sidx)
    return dataclasses.replace(cache, blocks=blocks, ring_k=ring_k, ring_v=ring_v, sink_k=sink_k, sink_v=sink_v)


def _gather(cache: QuantKVCache, src: Array, count: Array) -> QuantKVCache:
    """Tree acceptance: re-write the accepted path's ring entries at ``length + i``, commit ``count``."""
    slots = jnp.clip(cache.length[:, None] + src, 0, cache.slots - 1) % cache.window
    pick = lambda ring: _take_slots(ring, slots).transpose(0, 1, 3, 2, 4)  # [L, B, P, K, D]  # noqa: E731
    moved = _write(cache, pick(cache.ring_k), pick(cache.ring_v))
    n = jnp.broadcast_to(jnp.asarray(count, jnp.int32), cache.length.shape)
    return dataclasses.replace(moved, length=jnp.minimum(cache.length + n, cache.slots))


def dequantized(cache: QuantKVCache, layer: int) -> tuple[Float[Array, "B K S D"], Float[Array, "B K S D"]]:
    """Layer ``layer``'s keys and values as the row sees them (float ``[B, KV, S, D]``; slots
    ``>= length`` hold stale values: mask them)."""
    codec, g, s = cache.codec, cache.codec.group, cache.slots
    b = cache.batch
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32).reshape(s // g, g), (b, s // g, g))
    pick = lambda x: x[layer]  # noqa: E731
    kq, vq = codec.decode(jax.tree.map(pick, cache.aux), jax.tree.map(pick, cache.blocks), pos)
    at = jnp.arange(s, dtype=jnp.int32)
    quant = (at[None, :] < quantized_length(cache)[:, None])[:, None, :, None]
    ring_at = jnp.broadcast_to(at % cache.window, (b, s))

    def merge(q, ring, sink):
        x = jnp.where(quant, q.reshape(b, q.shape[1], s, -1), _take_slots(ring[layer][None], ring_at)[0])
        if cache.n_sink:
            x = x.at[:, :, : cache.n_sink].set(sink[layer])
        return x

    return merge(kq, cache.ring_k, cache.sink_k), merge(vq, cache.ring_v, cache.sink_v)


def kv_bytes_per_token(cache: QuantKVCache, context: int, head_dim: int) -> float:
    """Bytes per token (keys + values, every layer and KV head) at ``context`` committed tokens:
    the codec's groups below ``q(context)``, float for the recent window and the sink."""
    g = cache.codec.group
    quant = max((context - cache.residual) // g * g, 0)
    n_float = context - quant + (cache.n_sink if quant else 0)
    per = quant * cache.codec.bytes_per_token(head_dim, context) + n_float * 2 * head_dim * 4
    return per / context * cache.num_layers * cache.ring_k.shape[2]
