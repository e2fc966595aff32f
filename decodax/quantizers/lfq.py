"""LFQ: lookup-free quantization (Yu et al. 2023, MAGVIT-v2, "Language Model Beats
Diffusion -- Tokenizer is Key to Visual Generation"), and its group-wise form GQ (Zhuang
et al. 2025, WeTok, "Powerful Discrete Tokenization for High-Fidelity Visual
Reconstruction").

Each dimension is quantized to its sign, ``q_i = +1 if z_i > 0 else -1``, so the implicit
codebook is ``{-1, 1}^d`` (``2^d`` codes) and the code id is the binary number of the
``z_i > 0`` bits, dimension 0 least significant. Gradients pass straight through.

Entropy loss (MAGVIT-v2): with ``p(c | z) = softmax_c(-||z - c||^2 / tau)`` over all
codes, ``L_entropy = E_z[H(p(. | z))] - gamma * H(E_z[p(. | z)])``: confident per-sample
assignments, diverse codebook use over the batch. Since ``||c||^2 = d`` for every code,
``-||z - c||^2 = 2 z.c - ||z||^2 - d`` and the softmax is over ``2 z.c / tau`` (the constant
drops out), computed by enumerating the ``2^d`` codes as the reference code does. The
total loss is ``commitment_weight * ||z - sg[q]||^2 + entropy_weight * L_entropy``.

Group-wise LFQ (WeTok's GQ): the ``d`` dimensions are split into ``G`` contiguous groups of
``d / G`` bits, each quantized as above with its own code id (codes ``[..., G]``), and the
entropy loss is computed per group over that group's ``2^(d/G)`` codes and averaged over
the groups: memory ``G 2^(d/G)`` instead of ``2^d`` per vector. (WeTok's released code
pools the groups' batch distributions into one before taking the codebook entropy; here
each group's codebook entropy is its own, as the paper's description reads.)
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from decodax.quantizers import metrics
from decodax.quantizers.base import (
    Quantized, check_codes, check_groups, digits_to_index, index_to_digits, masked_mean, straight_through,
)

__all__ = ["LFQ", "MAX_ENUM_BITS", "codes_to_vectors", "entropy_terms", "group_codebook", "quantize"]

MAX_ENUM_BITS = 18  # the entropy enumerates 2^bits codes per vector and group (MAGVIT-v2 uses 18)


def group_codebook(bits: int) -> Float[Array, "K bits"]:
    """All ``2^bits`` codes in ``{-1, 1}^bits``, row ``i`` being code id ``i``."""
    ids = np.arange(2**bits)[:, None]
    return jnp.asarray(np.where((ids >> np.arange(bits)) & 1, 1.0, -1.0), jnp.float32)


def _batch_mean(v: Float[Array, "N ..."], w: Float[Array, "N"] | None) -> Array:
    """Mean over the flattened batch axis, weighted by ``w`` (0/1) when given."""
    if w is None:
        return v.mean(0)
    return jnp.tensordot(w, v, axes=1) / jnp.maximum(w.sum(), 1.0)


def entropy_terms(
    z: Float[Array, "*batch G b"], inv_temperature: float = 100.0, mask: Bool[Array, "*batch"] | None = None
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``(per-sample entropy, codebook entropy)`` in nats, each averaged over the ``G`` groups.

    Per group: ``p(c | z) = softmax(2 inv_temperature z.c)`` over the group's ``2^b`` codes,
    per-sample entropy ``E_z H(p(. | z))`` and codebook entropy ``H(E_z p(. | z))``, the
    expectation over the batch positions (minibatch estimate, masked positions excluded).
    """
    w = None if mask is None else jnp.broadcast_to(mask, z.shape[:-2]).reshape(-1).astype(z.dtype)
    z = z.reshape(-1, *z.shape[-2:])
    logits = 2.0 * inv_temperature * jnp.einsum("ngb,kb->ngk", z, group_codebook(z.shape[-1]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    per_sample = _batch_mean(-jnp.sum(p * logp, -1), w)  # [G]
    avg_p = _batch_mean(p, w)  # [G, K]
    return per_sample.mean(), metrics.entropy(avg_p).mean()


def quantize(
    z: Float[Array, "*batch d"],
    *,
    groups: int = 1,
    inv_temperature: float = 100.0,
    entropy_weight: float = 0.1,
    commitment_weight: float = 0.25,
    diversity_gamma: float = 1.0,
    mask: Bool[Array, "*batch"] | None = None,
) -> Quantized:
    """LFQ (``groups=1``, codes ``[*batch]``) or group-wise LFQ (codes ``[*batch, groups]``).

    ``losses``: ``"commitment"``, ``"per_sample_entropy"``, ``"codebook_entropy"`` and
    ``"entropy"`` (= per-sample - ``diversity_gamma`` * codebook); ``loss`` =
    ``commitment_weight`` * commitment + ``entropy_weight`` * entropy. Defaults follow
    MAGVIT-v2 / Open-MAGVIT2 (temperature 0.01, entropy weight 0.1, commitment 0.25).
    """
    d = z.shape[-1]
    check_groups(d, groups, "LFQ")
    bits = d // groups
    if bits > MAX_ENUM_BITS:
        raise ValueError(f"LFQ: {bits} bits per group would enumerate 2^{bits} codes for the entropy; "
                         f"use groups so that d / groups <= {MAX_ENUM_BITS}")
    q = jnp.where(z > 0, 1.0, -1.0).astype(z.dtype)
    zg = z.reshape(*z.shape[:-1], groups, bits)
    codes = digits_to_index((zg > 0).astype(jnp.int32), (2,) * bits)
    per_sample, cb_entropy = entropy_terms(zg, inv_temperature, mask)
    sg = jax.lax.stop_gradient
    commitment = masked_mean(jnp.mean(jnp.square(z - sg(q)), -1), mask)
    losses = {
        "commitment": commitment,
        "per_sample_entropy": per_sample,
        "codebook_entropy": cb_entropy,
        "entropy": per_sample - diversity_gamma * cb_entropy,
    }
    loss = commitment_weight * commitment + entropy_weight * losses["entropy"]
    stats = {k: v.mean() for k, v in metrics.code_stats(codes, 2**bits, mask, per_book=True).items()}  # group mean
    return Quantized(straight_through(z, q), codes[..., 0] if groups == 1 else codes, loss, losses, stats)


def codes_to_vectors(codes: Int[Array, "*batch ..."], dim: int, groups: int = 1) -> Float[Array, "*batch d"]:
    """``±1`` vectors of code ids (``[*batch]`` for ``groups=1``, ``[*batch, groups]`` otherwise);
    ``ValueError`` for concrete ids outside ``[0, 2^(dim/groups))``, NaN under jit."""
    check_groups(dim, groups, "LFQ codes_to_vectors")
    bits = dim // groups
    check_codes(codes, 2**bits, "LFQ codes_to_vectors")
    if groups > 1 and np.shape(codes)[-1] != groups:
        raise ValueError(f"LFQ codes_to_vectors: expected codes [..., {groups}], got shape {np.shape(codes)}")
    return _decode(jnp.asarray(codes), dim, groups)


@partial(jax.jit, static_argnums=(1, 2))
def _decode(codes, dim, groups):
    bits = dim // groups
    codes = codes[..., None] if groups == 1 else codes
    v = jnp.where(index_to_digits(codes, (2,) * bits) == 1, 1.0, -1.0)
    v = jnp.where(((codes >= 0) & (codes < 2**bits))[..., None], v, jnp.nan)
    return v.reshape(*codes.shape[:-1], dim)


class LFQ(nn.Module):
    """(Group-wise) LFQ as a parameter-free Flax module, same interface as the other quantizers."""

    dim: int
    groups: int = 1
    inv_temperature: float = 100.0
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    diversity_gamma: float = 1.0

    def __call__(self, z: Float[Array, "*batch d"], *, train: bool = False,
                 mask: Bool[Array, "*batch"] | None = None) -> Quantized:
        if z.shape[-1] != self.dim:
            raise ValueError(f"LFQ: input dim {z.shape[-1]} != {self.dim}")
        return quantize(z, groups=self.groups, inv_temperature=self.inv_temperature,
                        entropy_weight=self.entropy_weight, commitment_weight=self.commitment_weight,
                        diversity_gamma=self.diversity_gamma, mask=mask)

    def decode(self, codes: Int[Array, "*batch ..."]) -> Float[Array, "*batch d"]:
        return codes_to_vectors(codes, self.dim, self.groups)
