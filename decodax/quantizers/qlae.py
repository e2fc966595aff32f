"""Latent quantization, QLAE (Hsu et al. 2023, "Disentanglement via Latent Quantization").

Each latent dimension ``j`` has its own small learnable scalar codebook ``V_j`` of ``n``
values (initialised evenly spaced in ``[-0.5, 0.5]`` as in the reference code); ``z_j`` is
replaced by its nearest value in ``V_j`` (straight-through gradients). The joint codebook
is the grid ``V_1 x ... x V_d``, so codes are per-dimension value indices ``[..., d]``.

Losses: quantization loss ``||sg[z] - q||^2`` (moves the values) and commitment loss
``||z - sg[q]||^2`` (moves the encoder), weighted 0.01 / 0.01 in the reference configs.
The paper pairs them with *high weight decay* (0.1, ``lambdas.l2`` in the reference configs) on
the encoder and decoder weights but not on the codebook values: :func:`weight_decay_mask`
builds the ``optax.add_decayed_weights`` / ``optax.adamw`` mask that excludes every leaf
named ``"latent_values"`` (the :class:`LatentQuantizer` param), and :func:`adamw` wires it.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from decodax.quantizers import metrics
from decodax.quantizers.base import Quantized, check_codebook_size, check_codes, masked_mean, straight_through

__all__ = [
    "LatentQuantizer", "VALUES_NAME", "adamw", "codes_to_vectors", "init_values", "quantize", "weight_decay_mask",
]

VALUES_NAME = "latent_values"


def init_values(num_latents: int, values_per_latent: int) -> Float[Array, "d n"]:
    """``n`` values evenly spaced in ``[-0.5, 0.5]`` for each of the ``d`` latents."""
    check_codebook_size(values_per_latent, "QLAE values per latent")
    return jnp.tile(jnp.linspace(-0.5, 0.5, values_per_latent, dtype=jnp.float32), (num_latents, 1))


def quantize(
    values: Float[Array, "d n"],
    z: Float[Array, "*batch d"],
    *,
    quantization_weight: float = 0.01,
    commitment_weight: float = 0.01,
    mask: Bool[Array, "*batch"] | None = None,
) -> Quantized:
    """Per-dimension nearest value; ``loss`` = weighted quantization + commitment losses.

    ``stats``: ``utilization`` is the mean over dimensions of the fraction of that
    dimension's values used, ``perplexity`` the mean per-dimension value perplexity.
    """
    d, n = values.shape
    check_codebook_size(n, "QLAE values per latent")
    if z.shape[-1] != d:
        raise ValueError(f"QLAE: input dim {z.shape[-1]} != number of latents {d}")
    sg = jax.lax.stop_gradient
    codes = jnp.argmin(jnp.abs(sg(z)[..., None] - sg(values)), axis=-1).astype(jnp.int32)  # [*batch, d]
    q = jnp.take_along_axis(jnp.broadcast_to(values, (*z.shape, n)), codes[..., None], axis=-1)[..., 0]
    losses = {
        "quantization": masked_mean(jnp.mean(jnp.square(sg(z) - q), -1), mask),
        "commitment": masked_mean(jnp.mean(jnp.square(z - sg(q)), -1), mask),
    }
    loss = quantization_weight * losses["quantization"] + commitment_weight * losses["commitment"]
    stats = {k: v.mean() for k, v in metrics.code_stats(codes, n, mask, per_book=True).items()}  # mean over dims
    return Quantized(straight_through(z, q), codes, loss, losses, stats)


def codes_to_vectors(values: Float[Array, "d n"], codes: Int[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    """``q_j = values[j, codes_j]``; ``ValueError`` for concrete ids outside ``[0, n)``, NaN under jit."""
    d, n = values.shape
    check_codes(codes, n, "QLAE codes_to_vectors")
    if jnp.shape(codes)[-1] != d:
        raise ValueError(f"QLAE codes_to_vectors: expected codes [..., {d}], got shape {jnp.shape(codes)}")
    return _decode(values, jnp.asarray(codes))


@jax.jit
def _decode(values, codes):
    n = values.shape[1]
    idx = jnp.clip(codes, 0, n - 1)[..., None]
    q = jnp.take_along_axis(jnp.broadcast_to(values, (*codes.shape, n)), idx, -1)[..., 0]
    return jnp.where((codes >= 0) & (codes < n), q, jnp.nan)


def weight_decay_mask(params: Any, exclude: tuple[str, ...] = (VALUES_NAME,)) -> Any:
    """Pytree of bools like ``params``: ``False`` for leaves with a key in ``exclude`` on their
    path (the QLAE codebook values), ``True`` elsewhere. Pass as ``mask=`` to
    ``optax.add_decayed_weights`` or ``optax.adamw``."""

    def keep(path, _):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return not names.intersection(exclude)

    return jax.tree_util.tree_map_with_path(keep, params)


def adamw(learning_rate: float | Callable, weight_decay: float = 0.1, **kwargs) -> optax.GradientTransformation:
    """``optax.adamw`` with QLAE's high weight decay on everything but the codebook values."""
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask, **kwargs)


class LatentQuantizer(nn.Module):
    """QLAE quantizer of ``[..., num_latents]`` latents, ``values_per_latent`` values each
    (param ``"latent_values"`` ``[num_latents, values_per_latent]``)."""

    num_latents: int
    values_per_latent: int
    quantization_weight: float = 0.01
    commitment_weight: float = 0.01

    def setup(self):
        self.values = self.param(VALUES_NAME, lambda _key: init_values(self.num_latents, self.values_per_latent))

    def __call__(self, z: Float[Array, "*batch d"], *, train: bool = False,
                 mask: Bool[Array, "*batch"] | None = None) -> Quantized:
        return quantize(self.values, z, quantization_weight=self.quantization_weight,
                        commitment_weight=self.commitment_weight, mask=mask)

    def decode(self, codes: Int[Array, "*batch d"]) -> Float[Array, "*batch d"]:
        return codes_to_vectors(self.values, codes)
