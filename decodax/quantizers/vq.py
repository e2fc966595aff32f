"""VQ-VAE vector quantization (van den Oord et al. 2017, "Neural Discrete Representation
Learning") and the training aids that grew around it.

* :func:`quantize` -- nearest-code assignment with squared distances computed as
  ``||x||^2 - 2 x.c + ||c||^2``, the straight-through estimator, and the VQ-VAE loss
  ``||sg[x] - q||^2 + beta ||x - sg[q]||^2`` (codebook loss + commitment loss, beta = 0.25
  in the paper);
* :func:`rotation_trick` -- Fifty et al. 2024, "Restructuring Vector Quantization with the
  Rotation Trick": the gradient reaches the encoder output ``e`` through the rotation and
  rescaling that map ``e`` onto its code ``q`` (treated as constants) instead of the
  identity;
* EMA codebook (:class:`EMAState`, :func:`ema_update`; VQ-VAE's appendix, Razavi et al.
  2019): cluster sizes and sums of assigned vectors as exponential moving averages, the
  sizes Laplace-smoothed ``(n_i + eps) / (n + K eps) * n`` as in the reference (Sonnet)
  implementation, codes ``= sums / sizes``;
* :func:`kmeans_plusplus` -- k-means++ seeding (Arthur & Vassilvitskii 2007) from data,
  optionally refined by Lloyd iterations; :func:`kmeans_plusplus_init` wraps it as a Flax
  initializer (SoundStream and Encodec initialise codebooks with k-means of a batch);
* dead-code restart (Jukebox, Dhariwal et al. 2020; Encodec): :func:`update_unused` counts
  the steps since each code was last used and :func:`restart_dead_codes` replaces codes
  unused for ``patience`` steps by random vectors of the current batch;
* :class:`VectorQuantizer` -- the Flax module combining them.

Codes are ``int32`` of the input's batch shape. The EMA state and the unused-step counters
live in the ``"vq_stats"`` collection and change only when the module is called with
``train=True`` (and that collection is mutable); with ``train=False`` nothing changes.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from decodax.quantizers import metrics
from decodax.quantizers.base import Quantized, check_codebook_size, masked_mean, straight_through, take_codes

__all__ = [
    "EMAState", "VectorQuantizer", "codes_to_vectors", "ema_init", "ema_update", "kmeans_plusplus",
    "kmeans_plusplus_init", "nearest_code", "quantize", "restart_dead_codes",
    "rotation_trick", "squared_distances", "update_unused", "vqgan_uniform_init",
]


def squared_distances(x: Float[Array, "*batch D"], codebook: Float[Array, "K D"]) -> Float[Array, "*batch K"]:
    """``||x - c_k||^2`` for every code, expanded as ``||x||^2 - 2 x.c_k + ||c_k||^2``
    (one matrix product instead of a ``[*batch, K, D]`` difference tensor)."""
    x2 = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    c2 = jnp.sum(jnp.square(codebook), axis=-1)
    return x2 - 2.0 * (x @ codebook.T) + c2


@jax.jit
def nearest_code(x: Float[Array, "*batch D"], codebook: Float[Array, "K D"]) -> Int[Array, "*batch"]:
    """Index of the nearest code (Euclidean; ties go to the lowest index)."""
    return jnp.argmin(squared_distances(x, codebook), axis=-1).astype(jnp.int32)


def codes_to_vectors(codebook: Float[Array, "K D"], codes: Int[Array, "*batch"]) -> Float[Array, "*batch D"]:
    """``codebook[codes]``: ``ValueError`` for concrete out-of-range ids, NaN rows under jit."""
    return take_codes(codebook, codes, "VQ codes_to_vectors")


def rotation_trick(
    e: Float[Array, "*batch D"], q: Float[Array, "*batch D"], eps: float = 1e-8
) -> Float[Array, "*batch D"]:
    """The rotation trick (Fifty et al. 2024): forward value ``q``, gradient through ``e``
    by ``lambda R`` with ``lambda = ||q|| / ||e||`` and the rotation ``R`` taking ``e/||e||``
    to ``q/||q||``, both held constant (stop-gradient).

    ``R = I - 2 w w^T + 2 q^ e^^T`` with ``w = (e^ + q^) / ||e^ + q^||`` (two Householder
    reflections), applied without forming a ``D x D`` matrix:
    ``R e = e - 2 w (w.e) + 2 q^ (e^.e)``. Since ``R`` is orthogonal the encoder gradient is the
    decoder gradient rotated back and scaled by ``lambda``; no gradient reaches ``q`` here
    (the codebook learns from the codebook loss or EMA).
    """
    sg = jax.lax.stop_gradient
    e_norm = jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)
    q_norm = jnp.linalg.norm(q, axis=-1, keepdims=True)
    u = sg(e / e_norm)
    v = sg(q / jnp.maximum(q_norm, eps))
    w = u + v
    w = sg(w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), eps))
    rotated = e - 2.0 * w * jnp.sum(w * e, -1, keepdims=True) + 2.0 * v * jnp.sum(u * e, -1, keepdims=True)
    rotated = sg(q_norm / e_norm) * rotated
    return sg(q - rotated) + rotated  # forward value exactly q


def quantize(
    codebook: Float[Array, "K D"],
    x: Float[Array, "*batch D"],
    *,
    beta: float = 0.25,
    rotation: bool = False,
    codebook_loss: bool = True,
    mask: Bool[Array, "*batch"] | None = None,
    with_stats: bool = True,
) -> Quantized:
    """VQ-VAE quantization of ``x`` with ``codebook``.

    ``losses``: ``"codebook"`` ``mean ||sg[x] - q||^2`` (only with ``codebook_loss``, i.e.
    not for EMA codebooks) and ``"commitment"`` ``mean ||x - sg[q]||^2``; ``loss`` =
    codebook + ``beta`` * commitment. Means are over the ``mask``-ed positions and the
    feature axis. ``quantized`` uses the straight-through estimator, or the rotation trick
    with ``rotation=True``. ``stats``: code ``perplexity`` and ``utilization`` of the batch
    (empty with ``with_stats=False``).
    """
    k = codebook.shape[0]
    check_codebook_size(k, "VQ")
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"VQ: input dim {x.shape[-1]} != codebook dim {codebook.shape[-1]}")
    codes = nearest_code(jax.lax.stop_gradient(x), jax.lax.stop_gradient(codebook))
    q = jnp.take(codebook, codes, axis=0)  # differentiable w.r.t. the codebook
    sg = jax.lax.stop_gradient
    losses = {"commitment": masked_mean(jnp.mean(jnp.square(x - sg(q)), -1), mask)}
    loss = beta * losses["commitment"]
    if codebook_loss:
        losses["codebook"] = masked_mean(jnp.mean(jnp.square(sg(x) - q), -1), mask)
        loss = loss + losses["codebook"]
    out = rotation_trick(x, q) if rotation else straight_through(x, q)
    stats = metrics.code_stats(codes, k, mask) if with_stats else {}
    return Quantized(out, codes, loss, losses, stats)


# --------------------------------------------------------------------------- k-means++


def _lloyd_step(data: Float[Array, "N D"], centers: Float[Array, "K D"]) -> Float[Array, "K D"]:
    onehot = jax.nn.one_hot(nearest_code(data, centers), centers.shape[0], dtype=data.dtype)
    counts = onehot.sum(0)
    sums = onehot.T @ data
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)  # empty: keep


@partial(jax.jit, static_argnames=("k", "iters"))
def kmeans_plusplus(key: PRNGKeyArray, data: Float[Array, "N D"], k: int, iters: int = 0) -> Float[Array, "k D"]:
    """k-means++ (Arthur & Vassilvitskii 2007): the first center uniformly from ``data``,
    each next one with probability proportional to its squared distance to the nearest
    chosen center; then ``iters`` Lloyd iterations (empty clusters keep their center)."""
    check_codebook_size(k, "kmeans_plusplus")
    data = jnp.asarray(data, jnp.float32).reshape(-1, data.shape[-1])
    n = data.shape[0]
    if k > n:
        raise ValueError(f"kmeans_plusplus: need at least k={k} data vectors, got {n}")
    u = jax.random.uniform(key, (k,))  # one uniform per draw; D^2 sampling by inverting the CDF
    c0 = data[jnp.minimum((u[0] * n).astype(jnp.int32), n - 1)]
    centers = jnp.zeros((k, data.shape[-1]), data.dtype).at[0].set(c0)
    d2 = jnp.sum(jnp.square(data - c0), -1)

    def seed(i, carry):
        centers, d2 = carry
        cdf = jnp.cumsum(d2)
        c = data[jnp.minimum(jnp.searchsorted(cdf, u[i] * cdf[-1], side="right"), n - 1)]
        return centers.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(data - c), -1))

    centers, _ = jax.lax.fori_loop(1, k, seed, (centers, d2))
    return jax.lax.fori_loop(0, iters, lambda _, c: _lloyd_step(data, c), centers)


def kmeans_plusplus_init(data: Float[Array, "N D"], iters: int = 10) -> Callable:
    """A Flax initializer ``(key, shape, dtype)`` returning :func:`kmeans_plusplus` of ``data``
    with ``k = shape[0]`` (the key is the one Flax gives at ``init``)."""

    def init(key, shape, dtype=jnp.float32):
        if shape[-1] != data.shape[-1]:
            raise ValueError(f"kmeans_plusplus_init: data dim {data.shape[-1]} != codebook dim {shape[-1]}")
        return kmeans_plusplus(key, data, shape[0], iters).astype(dtype)

    return init


def vqgan_uniform_init(key, shape, dtype=jnp.float32):
    """``U(-1/K, 1/K)``: the codebook initialisation of the VQ-VAE/VQGAN reference code."""
    return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])


# --------------------------------------------------------------------------- EMA codebook


class EMAState(NamedTuple):
    """EMA codebook: ``codebook = embed_sum / smoothed(cluster_size)``."""

    codebook: Float[Array, "K D"]
    cluster_size: Float[Array, "K"]
    embed_sum: Float[Array, "K D"]


def ema_init(codebook: Float[Array, "K D"]) -> EMAState:
    """Start with unit cluster sizes and sums equal to the codes (so the codes are unchanged)."""
    return EMAState(codebook, jnp.ones(codebook.shape[:1], codebook.dtype), codebook)


def ema_update(
    state: EMAState,
    x: Float[Array, "*batch D"],
    codes: Int[Array, "*batch"],
    *,
    decay: float = 0.99,
    eps: float = 1e-5,
    mask: Bool[Array, "*batch"] | None = None,
) -> EMAState:
    """One EMA step (VQ-VAE's appendix): ``N_i <- decay N_i + (1 - decay) n_i``,
    ``m_i <- decay m_i + (1 - decay) sum_{x -> i} x``, Laplace smoothing
    ``N_i' = (N_i + eps) / (N + K eps) N`` and ``e_i = m_i / N_i'``. Masked-out vectors
    are not counted."""
    k = state.codebook.shape[0]
    x = jax.lax.stop_gradient(x).reshape(-1, x.shape[-1])
    w = jnp.ones(x.shape[:1], x.dtype)
    if mask is not None:
        w = jnp.broadcast_to(mask, codes.shape).reshape(-1).astype(x.dtype)
    onehot = jax.nn.one_hot(codes.reshape(-1), k, dtype=x.dtype) * w[:, None]
    cluster_size = decay * state.cluster_size + (1.0 - decay) * onehot.sum(0)
    embed_sum = decay * state.embed_sum + (1.0 - decay) * (onehot.T @ x)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    return EMAState(embed_sum / smoothed[:, None], cluster_size, embed_sum)


# --------------------------------------------------------------------------- dead codes


def update_unused(
    unused_steps: Int[Array, "K"], codes: Int[Array, "*batch"], mask: Bool[Array, "*batch"] | None = None
) -> Int[Array, "K"]:
    """Steps since each code was last assigned: reset to 0 for codes used in this batch, +1 otherwise."""
    used = metrics.code_histogram(codes, unused_steps.shape[0], mask) > 0
    return jnp.where(used, 0, unused_steps + 1).astype(unused_steps.dtype)


def restart_dead_codes(
    key: PRNGKeyArray,
    codebook: Float[Array, "K D"],
    unused_steps: Int[Array, "K"],
    x: Float[Array, "*batch D"],
    patience: int,
    mask: Bool[Array, "*batch"] | None = None,
) -> tuple[Float[Array, "K D"], Bool[Array, "K"]]:
    """Replace every code unused for ``>= patience`` steps by a vector drawn uniformly
    (with replacement) from the batch ``x`` (masked-out vectors are never drawn).
    Returns the new codebook and which codes were restarted."""
    flat = jax.lax.stop_gradient(x).reshape(-1, x.shape[-1])
    k = codebook.shape[0]
    w = jnp.ones(flat.shape[:1])
    if mask is not None:
        w = jnp.broadcast_to(mask, x.shape[:-1]).reshape(-1).astype(jnp.float32)
    cdf = jnp.cumsum(w)  # uniform over the unmasked vectors, by inverting the CDF
    idx = jnp.minimum(jnp.searchsorted(cdf, jax.random.uniform(key, (k,)) * cdf[-1], side="right"), flat.shape[0] - 1)
    dead = unused_steps >= patience
    return jnp.where(dead[:, None], flat[idx].astype(codebook.dtype), codebook), dead


# --------------------------------------------------------------------------- Flax module


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer of ``[..., dim]`` vectors with ``num_codes`` codes.

    * ``use_ema=False``: the codebook is the param ``"codebook"``, learnt by the codebook
      loss; ``use_ema=True``: it lives in ``"vq_stats"`` with the EMA statistics and is
      updated by :func:`ema_update` (no codebook loss).
    * ``dead_code_patience > 0`` (EMA only, since it rewrites the codebook during the
      forward pass): codes unused for that many training steps are restarted from the
      batch with the ``"restart"`` PRNG stream (``apply(..., rngs={"restart": key})``).
    * ``rotation=True`` uses the rotation trick instead of the straight-through estimator.
    * ``codebook_init``: e.g. ``kmeans_plusplus_init(batch)`` (default ``U(-1/K, 1/K)``).

    ``__call__(x, train=True)`` must run with ``mutable=["vq_stats"]`` whenever it has state
    to update; with ``train=False`` the state is read only. ``decode(codes)`` is the inverse
    ``codes -> vectors``.
    """

    num_codes: int
    dim: int
    beta: float = 0.25
    use_ema: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    rotation: bool = False
    dead_code_patience: int = 0
    codebook_init: Callable = vqgan_uniform_init

    def setup(self):
        check_codebook_size(self.num_codes, "VectorQuantizer")
        shape = (self.num_codes, self.dim)
        if not self.use_ema:
            if self.dead_code_patience:
                raise ValueError("VectorQuantizer: dead_code_patience needs use_ema=True "
                                 "(use vq.restart_dead_codes on the codebook param otherwise)")
            self.codebook = self.param("codebook", self.codebook_init, shape)
            return
        cb = self.variable("vq_stats", "codebook", lambda: self.codebook_init(self.make_rng("params"), shape))
        self.ema_codebook = cb
        self.cluster_size = self.variable("vq_stats", "cluster_size", lambda: jnp.ones((self.num_codes,), jnp.float32))
        self.embed_sum = self.variable("vq_stats", "embed_sum", lambda: cb.value)
        if self.dead_code_patience:
            self.unused = self.variable("vq_stats", "unused_steps", lambda: jnp.zeros((self.num_codes,), jnp.int32))

    def current_codebook(self) -> Float[Array, "K D"]:
        """The codebook in use (EMA codes are constants for autodiff)."""
        return jax.lax.stop_gradient(self.ema_codebook.value) if self.use_ema else self.codebook

    def __call__(self, x: Float[Array, "*batch D"], *, train: bool = False,
                 mask: Bool[Array, "*batch"] | None = None) -> Quantized:
        codebook = self.current_codebook()
        out = quantize(codebook, x, beta=self.beta, rotation=self.rotation, codebook_loss=not self.use_ema, mask=mask)
        if not (train and self.use_ema) or self.is_initializing():
            return out
        if not self.is_mutable_collection("vq_stats"):
            raise ValueError("VectorQuantizer(train=True) updates the EMA codebook: call "
                             "apply(..., mutable=['vq_stats'])")
        state = ema_update(EMAState(codebook, self.cluster_size.value, self.embed_sum.value),
                           x, out.codes, decay=self.decay, eps=self.eps, mask=mask)
        if self.dead_code_patience:
            unused = update_unused(self.unused.value, out.codes, mask)
            new_cb, dead = restart_dead_codes(self.make_rng("restart"), state.codebook, unused, x,
                                              self.dead_code_patience, mask)
            # a restarted code starts a fresh average: size 1, sum = the new code
            state = EMAState(new_cb, jnp.where(dead, 1.0, state.cluster_size),
                             jnp.where(dead[:, None], new_cb, state.embed_sum))
            self.unused.value = jnp.where(dead, 0, unused)
        self.ema_codebook.value, self.cluster_size.value, self.embed_sum.value = state
        return out

    def decode(self, codes: Int[Array, "*batch"]) -> Float[Array, "*batch D"]:
        """``codes -> vectors`` with the current codebook."""
        return codes_to_vectors(self.current_codebook(), codes)
