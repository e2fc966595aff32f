"""KVQuant's offline calibration (Hooper et al., 2024) from a float forward of calibration text.

Per layer: the *pre-RoPE* keys' per-channel outlier thresholds (the
``outlier_frac/2`` percentiles over the calibration tokens, sink excluded) and a
``2^bits``-centroid 1-D k-means for the normalised inlier keys; for values, whose
range is per token (each token's min / max, computed online), a k-means on the
normalised values. Without ``sensitivity`` the k-means is unweighted; KVQuant's
sensitivity-weighted variant passes per-element Fisher weights (squared gradients
of the loss w.r.t. the keys / values) as ``sensitivity=(k_weights, v_weights)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from decodax.kvquant import kvquant
from decodax.model import cache as kv
from decodax.model.rope import rotate

__all__ = ["calibration_kv", "calibrate_kvquant"]


def calibration_kv(model, params, tokens: Int[Array, "B N"]) -> tuple[Array, Array]:
    """Pre-RoPE keys and values of ``tokens`` (a float forward): ``[L, B, KV, N, D]`` each."""
    b, n = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    out = jax.jit(model.apply, static_argnames=("compute_logits", "empty_cache"))(
        params, tokens, pos, kv.init_cache(model.config, b, n), compute_logits=False, empty_cache=True)
    k_pre = rotate(out.cache.k, -jnp.arange(n), model.config.rope_theta)
    return k_pre, out.cache.v


def calibrate_kvquant(
    model,
    params,
    tokens: Int[Array, "B N"],
    bits: int,
    *,
    outlier_frac: float = 0.01,
    sink: int = 1,
    iters: int = 20,
    sensitivity: tuple[Float[Array, "L B K N D"], Float[Array, "L B K N D"]] | None = None,
) -> dict:
    """The :class:`~decodax.kvquant.codecs.KVQuantCodec` state: ``k_centroids``, ``v_centroids``
    ``[L, 2^bits]``, ``k_lo``, ``k_hi`` ``[L, KV, D]``."""
    k_pre, v = calibration_kv(model, params, tokens)
    out = {"k_centroids": [], "v_centroids": [], "k_lo": [], "k_hi": []}
    heads_first = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, x.shape[-1])  # noqa: E731  [K, B*N, D]
    for layer in range(k_pre.shape[0]):
        k_l = heads_first(k_pre[layer])
        lo, hi = kvquant.thresholds(k_l, axis=-2, outlier_frac=outlier_frac, sink=sink)  # [K, 1, D]
        kn = kvquant.normalise(k_l, lo, hi)[:, sink:]
        vlo, vhi = kvquant.thresholds(v[layer], axis=-1, outlier_frac=0.0, sink=0)  # the codec's min / max
        vn = kvquant.normalise(v[layer], vlo, vhi)[..., sink:, :]
        kw = (jnp.abs(kn) <= 1).astype(jnp.float32)
        vw = (jnp.abs(vn) <= 1).astype(jnp.float32)
        if sensitivity is not None:
            kw = kw * heads_first(sensitivity[0][layer])[:, sink:]
            vw = vw * sensitivity[1][layer][..., sink:, :]
        out["k_centroids"].append(kvquant.fit_centroids(kn, bits, kw, iters))
        out["v_centroids"].append(kvquant.fit_centroids(vn, bits, vw, iters))
        out["k_lo"].append(lo[:, 0])
        out["k_hi"].append(hi[:, 0])
    return {name: jnp.stack(vals) for name, vals in out.items()}
