"""FSQ: finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization:
VQ-VAE Made Simple").

Each of the ``d = len(levels)`` dimensions is bounded to ``L_i`` values and rounded; the
implicit codebook is the grid of ``prod(L_i)`` points, so there is no codebook to learn,
no auxiliary loss and no collapse.

Bound (the paper's code listing, with its shift fixed):
``bound(z) = tanh(z + shift) * half_l - offset`` with ``half_l = (L - 1)(1 + eps) / 2``,
``offset = 0.5`` for even ``L`` (0 for odd) and ``shift = arctanh(offset / half_l)``, so that
``bound(0) = 0`` exactly. Rounding then gives the ``L`` integers ``-(L//2) .. (L-1)//2``
(``{-1, 0, 1}`` for ``L = 3``, ``{-2, -1, 0, 1}`` for ``L = 4``); they are divided by
``L // 2`` so quantized values lie in ``[-1, 1]``. The straight-through estimator wraps the
rounding only (the listing's ``round_ste(bound(z))``): the gradient reaching ``z`` is the
bound's, ``tanh'`` times ``half_l / (L // 2)``, so a saturated dimension stops receiving
gradient instead of drifting further out.

Two deliberate differences from the published listing:

* the listing computes ``shift = tan(offset / half_l)``; ``tan`` is not the inverse of
  ``tanh``, so ``bound(0) != 0`` for even ``L`` (by 0.04 for ``L = 2``, ~4e-4 for ``L = 4``):
  a bias towards one side. The tests run that variant as a negative control;
* the listing scales ``half_l`` by ``(1 - eps)``; for ``L = 2`` that makes
  ``offset / half_l = 1 / (1 - eps) > 1`` and ``arctanh`` undefined (NaN). ``(1 + eps)`` keeps
  ``|offset / half_l| < 1`` for every ``L >= 2``, and since ``(L - 1) eps / 2 < 0.5`` the
  rounded range is still exactly the ``L`` levels (:func:`check_levels` requires ``(L - 1) eps < 1``).

Code ids are the mixed-radix number of the per-dimension digits ``round(bound) + L//2``,
dimension 0 least significant (the paper's ``codes_to_indexes``).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from decodax.quantizers import metrics
from decodax.quantizers.base import (
    Quantized, check_codes, digits_to_index, index_to_digits, straight_through,
)

__all__ = ["FSQ", "bound", "check_levels", "codebook_size", "codes_to_vectors", "implicit_codebook", "quantize"]

EPS = 1e-3


def check_levels(levels: Sequence[int], eps: float = EPS) -> tuple[int, ...]:
    """The levels as a tuple of ints; ``ValueError`` for an empty list, a level < 2 or > 1/eps."""
    levels = tuple(levels)
    if not levels:
        raise ValueError("FSQ: levels must be a non-empty list")
    for lv in levels:
        if int(lv) != lv or lv < 2:
            raise ValueError(f"FSQ: every level must be an integer >= 2, got {list(levels)}")
        if (lv - 1) * eps >= 1:
            raise ValueError(f"FSQ: level {lv} too large for eps={eps} (need (L-1)*eps < 1)")
    return tuple(int(lv) for lv in levels)


def codebook_size(levels: Sequence[int]) -> int:
    """``prod(levels)``: the size of the implicit codebook."""
    return int(np.prod(check_levels(levels)))


def _constants(levels: Sequence[int], eps: float):
    lv = np.asarray(check_levels(levels, eps), np.float64)
    half_l = (lv - 1) * (1 + eps) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half_l)
    return half_l, offset, shift


def bound(z: Float[Array, "*batch d"], levels: Sequence[int], eps: float = EPS) -> Float[Array, "*batch d"]:
    """``tanh(z + shift) * half_l - offset``: maps R onto ``(-(L//2) - delta, (L-1)//2 + delta)``,
    ``delta = (L - 1) eps / 2 < 1/2``, with ``bound(0) = 0`` (the arctanh shift)."""
    half_l, offset, shift = (jnp.asarray(a, jnp.float32) for a in _constants(levels, eps))
    if z.shape[-1] != half_l.shape[0]:
        raise ValueError(f"FSQ: input dim {z.shape[-1]} != len(levels) = {half_l.shape[0]}")
    return jnp.tanh(z + shift) * half_l - offset


def quantize(z: Float[Array, "*batch d"], levels: Sequence[int], eps: float = EPS) -> Quantized:
    """FSQ: ``round_ste(bound(z)) / (L // 2)``; no losses; code ids by mixed radix."""
    levels = check_levels(levels, eps)
    bounded = bound(z, levels, eps)
    rounded = jnp.round(bounded)
    half_width = jnp.asarray([lv // 2 for lv in levels], jnp.float32)
    q = straight_through(bounded / half_width, rounded / half_width)
    codes = digits_to_index((rounded + half_width).astype(jnp.int32), levels)
    k = int(np.prod(levels))
    stats = metrics.code_stats(codes, k)
    return Quantized(q, codes, jnp.zeros((), jnp.float32), {}, stats)


def codes_to_vectors(codes: Int[Array, "*batch"], levels: Sequence[int]) -> Float[Array, "*batch d"]:
    """Inverse of the code ids: ``ValueError`` for concrete ids outside ``[0, prod(L))``, NaN under jit."""
    levels = check_levels(levels)
    check_codes(codes, int(np.prod(levels)), "FSQ codes_to_vectors")
    return _decode(jnp.asarray(codes), levels)


@partial(jax.jit, static_argnums=1)
def _decode(codes, levels):
    half_width = jnp.asarray([lv // 2 for lv in levels], jnp.float32)
    v = (index_to_digits(codes, levels) - half_width) / half_width
    return jnp.where(((codes >= 0) & (codes < int(np.prod(levels))))[..., None], v, jnp.nan)


def implicit_codebook(levels: Sequence[int]) -> Float[Array, "K d"]:
    """All ``prod(L)`` code vectors, row ``i`` being code id ``i``."""
    return codes_to_vectors(jnp.arange(codebook_size(levels), dtype=jnp.int32), levels)


class FSQ(nn.Module):
    """FSQ as a (parameter-free) Flax module, same interface as the other quantizers."""

    levels: Sequence[int]
    eps: float = EPS

    def __call__(self, z: Float[Array, "*batch d"], *, train: bool = False) -> Quantized:
        return quantize(z, self.levels, self.eps)

    def decode(self, codes: Int[Array, "*batch"]) -> Float[Array, "*batch d"]:
        return codes_to_vectors(codes, self.levels)
