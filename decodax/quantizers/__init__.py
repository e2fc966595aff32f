"""Discrete bottlenecks for tokenizers: pure JAX functions plus small Flax modules.

Every quantizer returns a :class:`~decodax.quantizers.base.Quantized` (straight-through
vectors, integer codes, the weighted auxiliary loss, its named terms, batch statistics)
and has a ``codes -> vectors`` inverse (``codes_to_vectors`` / the module's ``decode``).
The modules share one call signature, ``module.apply(variables, x, train=...)``.

* :mod:`~decodax.quantizers.vq` -- VQ-VAE (codebook + commitment loss, EMA codebook,
  k-means++ init, dead-code restart, rotation trick): :class:`VectorQuantizer`;
* :mod:`~decodax.quantizers.simvq` -- SimVQ, frozen random codes through one linear layer;
* :mod:`~decodax.quantizers.fsq` -- FSQ (tanh bound with the arctanh shift, odd/even levels);
* :mod:`~decodax.quantizers.lfq` -- LFQ (MAGVIT-v2) with its entropy loss, group-wise LFQ
  (WeTok's GQ);
* :mod:`~decodax.quantizers.qlae` -- latent quantization (QLAE), per-dimension scalar
  codebooks and the weight-decay mask that spares them;
* :mod:`~decodax.quantizers.rvq` -- residual VQ with quantize dropout, Language-Codec's
  masked-channel RVQ;
* :mod:`~decodax.quantizers.vq_logits` -- VQ-Logits output layer (codebook logits scattered
  to the vocabulary);
* :mod:`~decodax.quantizers.metrics` -- utilization, code perplexity, MSE, PSNR;
* :mod:`~decodax.quantizers.images` -- digits (scikit-learn) and photo patches (scikit-image)
  shipped with the libraries;
* :mod:`~decodax.quantizers.autoencoder` -- image tokenizers: one conv autoencoder for every
  quantizer at an equal budget, train / tokenize / detokenize / save / load (imported on
  demand: it pulls in :mod:`decodax.train`).

Bad input raises ``ValueError``: codebook size < 2, FSQ level < 2, a group count that does
not divide the dimension, and out-of-range code ids in ``codes -> vectors`` (checked when
the codes are concrete; under ``jit`` they decode to NaN).
"""

from decodax.quantizers import base, fsq, lfq, metrics, qlae, rvq, simvq, vq, vq_logits
from decodax.quantizers.base import Quantized, straight_through
from decodax.quantizers.fsq import FSQ
from decodax.quantizers.lfq import LFQ
from decodax.quantizers.qlae import LatentQuantizer
from decodax.quantizers.rvq import ResidualVQ
from decodax.quantizers.simvq import SimVQ
from decodax.quantizers.vq import VectorQuantizer
from decodax.quantizers.vq_logits import VQLogits

__all__ = [
    "FSQ", "LFQ", "LatentQuantizer", "Quantized", "ResidualVQ", "SimVQ", "VQLogits", "VectorQuantizer",
    "base", "fsq", "lfq", "metrics", "qlae", "rvq", "simvq", "straight_through", "vq", "vq_logits",
]
