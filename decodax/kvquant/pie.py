"""PIE: Positional Integrity Encoding (He et al., 2024, "Let the Code LLM Edit Itself When You
Edit the Code").

After a user edits the middle of a cached context -- slots ``[start, end)``
replaced by ``m`` new tokens -- every later token moves by ``delta = m - (end -
start)`` positions. Re-prefilling the suffix costs a forward over it; PIE keeps
the suffix's cached keys/values and only repairs their positions: RoPE
rotations compose, so ``R(p + delta) k_p = R(delta) (R(p) k_p)`` re-rotates each
cached key in place. The ``m`` new tokens are run once over the prefix. What PIE
does not repair is the suffix's *content* (its keys/values were computed seeing
the old text), which is the approximation measured against a full re-prefill.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from decodax.model import cache as kv
from decodax.model.rope import rotate

__all__ = ["pie_edit"]


def pie_edit(
    model,
    params,
    cache: kv.KVCache,
    new_tokens: Int[Array, "B M"],
    start: int,
    end: int,
    *,
    rerotate: bool = True,
) -> kv.KVCache:
    """The float cache after replacing slots ``[start, end)`` (every row) by ``new_tokens``.

    The suffix ``[end, length)`` moves to ``start + M`` with its keys re-rotated by
    ``delta`` (``rerotate=False`` leaves them at their stale positions: the
    baseline PIE fixes); the new tokens' keys/values come from one forward over
    the prefix. Lengths change by ``delta``. Requires ``start <= end <= length``
    (checked on the host when the lengths are concrete) and room for the growth.
    """
    if not isinstance(cache, kv.KVCache):
        raise ValueError("pie_edit needs a float KVCache")
    b, m = new_tokens.shape
    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}")
    delta = m - (end - start)
    if not isinstance(cache.length, jax.core.Tracer):
        if int(jnp.min(cache.length)) < end:
            raise ValueError(f"edit end {end} is past a row's cached length {int(jnp.min(cache.length))}")
        kv.check_capacity(cache.capacity, int(jnp.max(cache.length)) + delta, "the edited context")
    s = cache.capacity

    def move(buf, shift):
        suffix = buf[:, :, :, end:]
        if shift:
            suffix = rotate(suffix, jnp.full(suffix.shape[:-1], delta, jnp.int32), model.config.rope_theta)
        gap = jnp.zeros((*buf.shape[:3], m, buf.shape[-1]), buf.dtype)
        x = jnp.concatenate([buf[:, :, :, :start], gap, suffix], axis=3)  # s + delta slots
        return x[:, :, :, :s] if delta >= 0 else jnp.pad(x, ((0, 0),) * 3 + ((0, -delta), (0, 0)))

    moved = dataclasses.replace(cache, k=move(cache.k, rerotate), v=move(cache.v, False),
                                length=jnp.full_like(cache.length, start))
    pos = jnp.broadcast_to(start + jnp.arange(m, dtype=jnp.int32), (b, m))
    out = model.apply(params, new_tokens, pos, moved, compute_logits=False)
    return dataclasses.replace(out.cache, length=cache.length + delta)
