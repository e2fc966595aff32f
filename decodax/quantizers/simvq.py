"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models
with One Linear Layer").

The codebook is re-parameterised as ``C W``: ``C`` is a random ``K x D`` matrix drawn once
from ``N(0, D^-1)`` (std ``D^-0.5``, the reference code's initialisation) and frozen; ``W``
is one learnable linear layer (``D -> D``, with bias as in the reference code's
``nn.Linear``). Nearest-code assignment, straight-through gradients and the VQ-VAE loss
``||sg[z] - q||^2 + beta ||z - sg[q]||^2`` are those of :func:`decodax.quantizers.vq.quantize`
with ``q`` a row of ``C W``: the codebook loss trains ``W``, which moves *every* code at
once, so no code is left behind (the paper's remedy for collapse). Implementations derived
from taming-transformers' ``VectorQuantizer2`` default to a ``legacy`` mode that puts beta on
the codebook term; this follows the VQ-VAE form of the loss (beta on the commitment term).

The frozen ``C`` lives in the ``"frozen"`` variable collection, outside ``"params"``, so
optimizers never see it; ``W`` is initialised as PyTorch's ``nn.Linear`` default
(``U(-1/sqrt(D), 1/sqrt(D))`` for weight and bias) to match the reference.

What "no code is left behind" needs in practice: the encoder's latents must start spread
wider than (or as wide as) the code cloud. A narrow off-centre cluster of latents is nearest
to a dozen codes, which a small ``W`` (D = 16: 272 parameters) can move on their own, and the
collapse stays (measured in ``experiments/vq_tokenizers.py``: 5.6% of 1024 codes used without
the tokenizer's ``latent_norm``, 78% with it after 300 steps, 100% after 1500).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from decodax.quantizers import vq
from decodax.quantizers.base import Quantized, check_codebook_size, take_codes

__all__ = ["SimVQ", "frozen_codebook", "projected_codebook"]


def frozen_codebook(key: PRNGKeyArray, num_codes: int, dim: int) -> Float[Array, "K D"]:
    """SimVQ's frozen random codes ``C ~ N(0, 1/D)``."""
    check_codebook_size(num_codes, "SimVQ")
    return jax.random.normal(key, (num_codes, dim), jnp.float32) * dim**-0.5


def projected_codebook(frozen: Float[Array, "K D"], kernel: Float[Array, "D D"],
                       bias: Float[Array, "D"] | None = None) -> Float[Array, "K D"]:
    """The effective codebook ``C W (+ b)``."""
    out = frozen @ kernel
    return out if bias is None else out + bias


def _torch_linear_bias_init(fan_in: int):
    def init(key, shape, dtype=jnp.float32):
        b = fan_in**-0.5
        return jax.random.uniform(key, shape, dtype, -b, b)

    return init


class SimVQ(nn.Module):
    """SimVQ quantizer of ``[..., dim]`` vectors with ``num_codes`` codes.

    Variables: ``"frozen"/"codebook"`` (``C``, never trained) and ``"params"/"proj"``
    (``W``, ``b``). ``decode(codes)`` is ``codes -> vectors`` through the current ``W``.
    """

    num_codes: int
    dim: int
    beta: float = 0.25
    use_bias: bool = True

    def setup(self):
        check_codebook_size(self.num_codes, "SimVQ")
        self.frozen = self.variable("frozen", "codebook",
                                    lambda: frozen_codebook(self.make_rng("params"), self.num_codes, self.dim))
        # variance_scaling(1/3, fan_in, uniform) is torch's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in))
        self.proj = nn.Dense(self.dim, use_bias=self.use_bias,
                             kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                             bias_init=_torch_linear_bias_init(self.dim))

    def codebook(self) -> Float[Array, "K D"]:
        """``C W + b``, differentiable w.r.t. ``W`` and ``b`` only."""
        return self.proj(jax.lax.stop_gradient(self.frozen.value))

    def __call__(self, x: Float[Array, "*batch D"], *, train: bool = False,
                 mask: Bool[Array, "*batch"] | None = None) -> Quantized:
        return vq.quantize(self.codebook(), x, beta=self.beta, mask=mask)

    def decode(self, codes: Int[Array, "*batch"]) -> Float[Array, "*batch D"]:
        return take_codes(self.codebook(), codes, "SimVQ decode")
