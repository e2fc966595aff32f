"""Residual VQ with quantize dropout (Zeghidour et al. 2021, SoundStream, Algorithm 1; Défossez
et al. 2022, Encodec), and Language-Codec's masked-channel RVQ (Ji et al. 2024,
"Language-Codec: Bridging Discrete Codec Representations and Speech Language Models").

RVQ: stage ``s`` quantizes the residual ``r_s = x - sum_{t<s} q_t`` with its own codebook
(VQ-VAE nearest code, codebook + beta * commitment loss per stage, summed over stages); the
output is ``sum_s q_s`` with one straight-through estimator on the total, so the gradient
reaching ``x`` is the identity (summing per-stage straight-through outputs, as Encodec's
code does, would multiply it by the number of stages). Code ids are ``[..., S]``; decoding a
prefix ``codes[..., :n]`` gives the coarser ``n``-stage reconstruction (bitrate scalability).

Quantize dropout (SoundStream): in training each example uses only its first
``n_q`` stages, ``n_q`` uniform in ``[min_active, S]``, drawn per example (leading axis)
from an explicit key; dropped stages add nothing to the output and their losses, EMA
statistics and usage counts are masked out. Their code ids are still reported (what the
stage would have chosen).

MCRVQ, as read from the paper and its released code (``LanguageVectorQuantization``): the
first ``M`` stages (``M = 3`` in the paper) each see one contiguous slice of ``D / M``
channels of the *input* ``x`` with the other channels masked to zero -- they are parallel,
not residual, and together cover all channels, so the first code carries only a third of
the frame's information (the paper's motivation: a lighter first token for speech LMs).
Stage ``M`` then quantizes ``x - sum_{s<M} q_s`` and later stages continue as plain RVQ;
in training Language-Codec draws ``n_q`` from ``{3, ..., 8}``, i.e. quantize dropout with
``min_active = M``. One choice of ours: the released code masks only the stage inputs and
lets the full-width codewords learn zeros outside their slice (EMA on zero-masked inputs);
here the masked stages' codewords are masked too, so a masked stage is exactly a VQ of its
slice from the first step (the same fixed point, no leakage before it is reached). The
paper's wording ("restrict the quantizers of the first three channels to learn only ... in
the specified space") fits both; we require ``M`` to divide ``D`` (the released code uses
floor boundaries).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from decodax.quantizers import metrics, vq
from decodax.quantizers.base import (
    Quantized, check_codebook_size, check_codes, check_groups, straight_through,
)

__all__ = [
    "ResidualVQ", "channel_masks", "codes_to_vectors", "dropout_num_active", "kmeans_init", "quantize",
]


def channel_masks(dim: int, masked_stages: int) -> Float[Array, "M D"]:
    """0/1 masks of the MCRVQ stages: stage ``s`` keeps channels ``[s D/M, (s+1) D/M)``."""
    check_groups(dim, masked_stages, "MCRVQ masked stages")
    return jnp.asarray(np.repeat(np.eye(masked_stages, dtype=np.float32), dim // masked_stages, axis=1))


def _check(shape: tuple[int, ...], masked_stages: int, what: str) -> None:
    if len(shape) != 3:
        raise ValueError(f"{what}: codebooks must be [stages, K, D], got shape {shape}")
    check_codebook_size(shape[1], what)
    if masked_stages:
        if masked_stages > shape[0]:
            raise ValueError(f"{what}: {masked_stages} masked stages but only {shape[0]} stages")
        check_groups(shape[2], masked_stages, f"{what} masked stages")


def _stage_codebooks(codebooks: Float[Array, "S K D"], masked_stages: int) -> Float[Array, "S K D"]:
    if not masked_stages:
        return codebooks
    masks = channel_masks(codebooks.shape[-1], masked_stages)
    ones = jnp.ones((codebooks.shape[0] - masked_stages, codebooks.shape[-1]), codebooks.dtype)
    return codebooks * jnp.concatenate([masks, ones])[:, None, :]


def dropout_num_active(key: PRNGKeyArray, batch: int, num_stages: int, min_active: int = 1) -> Int[Array, "B"]:
    """Quantize dropout: per example, the number of stages used, uniform in ``[min_active, num_stages]``."""
    if not 1 <= min_active <= num_stages:
        raise ValueError(f"RVQ dropout: min_active must be in [1, {num_stages}], got {min_active}")
    u = jax.random.uniform(key, (batch,))
    return jnp.minimum(min_active + jnp.floor(u * (num_stages - min_active + 1)), num_stages).astype(jnp.int32)


def _quantize(codebooks, x, beta, num_active, masked_stages, codebook_loss, mask):
    """Quantized result plus each stage's input ``[*batch, S, D]`` and active mask ``[*batch, S]``."""
    s_total = codebooks.shape[0]
    cbs = _stage_codebooks(codebooks, masked_stages)
    masks = channel_masks(x.shape[-1], masked_stages) if masked_stages else None
    batch = x.shape[:-1]
    valid = jnp.ones(batch, bool) if mask is None else jnp.broadcast_to(mask, batch)
    if num_active is not None:
        num_active = jnp.asarray(num_active).reshape(jnp.shape(num_active) + (1,) * (len(batch) - jnp.ndim(num_active)))
    sg = jax.lax.stop_gradient
    residual, total, loss = x, jnp.zeros_like(x), jnp.zeros((), jnp.float32)
    codes, inputs, actives, losses = [], [], [], {}
    for s in range(s_total):
        inp = x * masks[s] if s < masked_stages else residual
        active = valid if num_active is None else valid & (s < num_active)
        r = vq.quantize(cbs[s], inp, beta=beta, codebook_loss=codebook_loss, mask=active, with_stats=False)
        q = sg(jnp.take(cbs[s], r.codes, axis=0))  # the code vectors, exactly
        total = total + jnp.where(active[..., None], q, 0.0)
        residual = residual - q  # masked stages: disjoint slices, so stage M sees x - sum_{s<M} q_s
        loss = loss + r.loss
        for name, v in r.losses.items():
            losses[name] = losses.get(name, 0.0) + v
        codes.append(r.codes)
        inputs.append(inp)
        actives.append(active)
    codes, actives = jnp.stack(codes, -1), jnp.stack(actives, -1)
    stats = metrics.code_stats(codes, codebooks.shape[1], actives, per_book=True)  # per stage
    if num_active is not None:  # stages used per example (quantize dropout)
        stats["num_active"] = jnp.broadcast_to(num_active, batch[:1] + (1,) * (len(batch) - 1)).reshape(batch[:1])
    out = Quantized(straight_through(x, total), codes, loss, losses, stats)
    return out, jnp.stack(inputs, -2), actives


def quantize(
    codebooks: Float[Array, "S K D"],
    x: Float[Array, "*batch D"],
    *,
    beta: float = 0.25,
    num_active: Int[Array, "B"] | None = None,
    masked_stages: int = 0,
    codebook_loss: bool = True,
    mask: Bool[Array, "*batch"] | None = None,
) -> Quantized:
    """(MC)RVQ of ``x`` with ``codebooks[s]`` for stage ``s``.

    ``num_active`` (from :func:`dropout_num_active`, shape ``[B]`` for ``x`` ``[B, ...]``):
    stages used per example (``None``: all). ``masked_stages``: MCRVQ's ``M`` (0: plain RVQ).
    ``losses``: per-term sums over stages of :func:`decodax.quantizers.vq.quantize`'s terms;
    ``stats``: per-stage ``perplexity`` / ``utilization`` ``[S]`` (and ``num_active`` ``[B]``
    when given).
    """
    _check(codebooks.shape, masked_stages, "RVQ")
    return _quantize(codebooks, x, beta, num_active, masked_stages, codebook_loss, mask)[0]


def codes_to_vectors(
    codebooks: Float[Array, "S K D"], codes: Int[Array, "*batch n"], masked_stages: int = 0
) -> Float[Array, "*batch D"]:
    """``sum_{s<n} codebooks[s][codes[..., s]]`` for the first ``n = codes.shape[-1]`` stages;
    ``ValueError`` for concrete out-of-range ids, NaN under jit."""
    _check(codebooks.shape, masked_stages, "RVQ codes_to_vectors")
    n = np.shape(codes)[-1]
    if n > codebooks.shape[0]:
        raise ValueError(f"RVQ codes_to_vectors: codes for {n} stages, only {codebooks.shape[0]} codebooks")
    check_codes(codes, codebooks.shape[1], "RVQ codes_to_vectors")
    return _decode(codebooks, jnp.asarray(codes), masked_stages)


@partial(jax.jit, static_argnums=2)
def _decode(codebooks, codes, masked_stages):
    cbs = _stage_codebooks(codebooks, masked_stages)
    return sum(vq.codes_to_vectors(cbs[s], codes[..., s]) for s in range(codes.shape[-1]))


@partial(jax.jit, static_argnames=("num_stages", "num_codes", "masked_stages", "iters"))
def _kmeans_stages(key, data, num_stages, num_codes, masked_stages, iters):
    x = data.reshape(-1, data.shape[-1])
    masks = channel_masks(x.shape[-1], masked_stages) if masked_stages else None
    residual, cbs = x, []
    for s in range(num_stages):
        inp = x * masks[s] if s < masked_stages else residual
        cb = vq.kmeans_plusplus(jax.random.fold_in(key, s), inp, num_codes, iters)
        q = jnp.take(cb * (masks[s] if s < masked_stages else 1.0), vq.nearest_code(inp, cb), axis=0)
        residual = residual - q  # the masked stages' slices are disjoint: their sum is subtracted
        cbs.append(cb)
    return jnp.stack(cbs)


def kmeans_init(data: Float[Array, "N D"], masked_stages: int = 0, iters: int = 10) -> Callable:
    """Flax initializer ``(key, (S, K, D))``: k-means++ (+ Lloyd) of each stage on the residuals
    that stage sees on ``data`` after the earlier stages (greedy, as RVQ encodes)."""

    def init(key, shape, dtype=jnp.float32):
        s, k, d = shape
        if data.shape[-1] != d:
            raise ValueError(f"RVQ kmeans_init: data dim {data.shape[-1]} != codebook dim {d}")
        return _kmeans_stages(key, jnp.asarray(data, jnp.float32), s, k, masked_stages, iters).astype(dtype)

    return init


def _stacked_init(init: Callable) -> Callable:
    """Apply a ``(key, (K, D))`` codebook initializer to each of ``S`` stages."""

    def stacked(key, shape, dtype=jnp.float32):
        return jnp.stack([init(k, shape[1:], dtype) for k in jax.random.split(key, shape[0])])

    return stacked


class ResidualVQ(nn.Module):
    """(MC)RVQ with ``num_stages`` codebooks of ``num_codes`` codes, optional quantize dropout.

    * ``masked_stages = M > 0``: Language-Codec's MCRVQ (``M = 3`` in the paper);
    * ``quantize_dropout``: with ``train=True``, stages per example ~ U[``min_active``, S]
      (default ``min_active`` = max(1, M)) from the ``"dropout"`` PRNG stream;
    * ``use_ema`` / ``dead_code_patience``: as :class:`decodax.quantizers.vq.VectorQuantizer`,
      per stage, state in ``"vq_stats"`` (restarts use the ``"restart"`` stream);
    * ``codebook_init``: ``(key, (S, K, D))`` initializer, e.g. :func:`kmeans_init` (default:
      ``U(-1/K, 1/K)`` per stage).
    """

    num_stages: int
    num_codes: int
    dim: int
    beta: float = 0.25
    masked_stages: int = 0
    quantize_dropout: bool = False
    min_active: int | None = None
    use_ema: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    dead_code_patience: int = 0
    codebook_init: Callable = _stacked_init(vq.vqgan_uniform_init)

    def setup(self):
        shape = (self.num_stages, self.num_codes, self.dim)
        _check(shape, self.masked_stages, "ResidualVQ")
        if not self.use_ema:
            if self.dead_code_patience:
                raise ValueError("ResidualVQ: dead_code_patience needs use_ema=True")
            self.codebooks = self.param("codebooks", self.codebook_init, shape)
            return
        cb = self.variable("vq_stats", "codebooks", lambda: self.codebook_init(self.make_rng("params"), shape))
        self.ema_codebooks = cb
        self.cluster_size = self.variable("vq_stats", "cluster_size", lambda: jnp.ones(shape[:2], jnp.float32))
        self.embed_sum = self.variable("vq_stats", "embed_sum", lambda: cb.value)
        if self.dead_code_patience:
            self.unused = self.variable("vq_stats", "unused_steps", lambda: jnp.zeros(shape[:2], jnp.int32))

    def current_codebooks(self) -> Float[Array, "S K D"]:
        return jax.lax.stop_gradient(self.ema_codebooks.value) if self.use_ema else self.codebooks

    def __call__(self, x: Float[Array, "B ... D"], *, train: bool = False,
                 mask: Bool[Array, "B ..."] | None = None) -> Quantized:
        num_active = None
        if train and self.quantize_dropout and not self.is_initializing():
            min_active = self.min_active or max(1, self.masked_stages)
            num_active = dropout_num_active(self.make_rng("dropout"), x.shape[0], self.num_stages, min_active)
        cbs = self.current_codebooks()
        out, inputs, active = _quantize(cbs, x, self.beta, num_active, self.masked_stages, not self.use_ema, mask)
        if not (train and self.use_ema) or self.is_initializing():
            return out
        if not self.is_mutable_collection("vq_stats"):
            raise ValueError("ResidualVQ(train=True) updates the EMA codebooks: call apply(..., mutable=['vq_stats'])")
        d = x.shape[-1]
        inputs = inputs.reshape(-1, self.num_stages, d)
        codes, active = out.codes.reshape(-1, self.num_stages), active.reshape(-1, self.num_stages)
        update = jax.vmap(lambda st, xi, ci, mi: vq.ema_update(st, xi, ci, decay=self.decay, eps=self.eps, mask=mi),
                          in_axes=(0, 1, 1, 1))
        state = update(vq.EMAState(cbs, self.cluster_size.value, self.embed_sum.value), inputs, codes, active)
        if self.dead_code_patience:
            unused = jax.vmap(vq.update_unused, in_axes=(0, 1, 1))(self.unused.value, codes, active)
            keys = jax.random.split(self.make_rng("restart"), self.num_stages)
            restart = jax.vmap(vq.restart_dead_codes, in_axes=(0, 0, 0, 1, None, 1))
            new_cb, dead = restart(keys, state.codebook, unused, inputs, self.dead_code_patience, active)
            state = vq.EMAState(new_cb, jnp.where(dead, 1.0, state.cluster_size),
                                jnp.where(dead[..., None], new_cb, state.embed_sum))
            self.unused.value = jnp.where(dead, 0, unused)
        self.ema_codebooks.value, self.cluster_size.value, self.embed_sum.value = state
        return out

    def decode(self, codes: Int[Array, "*batch n"]) -> Float[Array, "*batch D"]:
        """``codes -> vectors`` (a prefix of the stages gives the coarser reconstruction)."""
        return codes_to_vectors(self.current_codebooks(), codes, self.masked_stages)
