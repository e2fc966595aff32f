"""Pallas kernels with a pure-jnp reference beside each.

Every kernel runs with ``interpret=True`` on CPU (tests) and is written to
lower to Triton (GPU) and Mosaic (TPU); ``interpret=None`` picks the
interpreter on CPU only.

* ``flash_attention`` -- FlashAttention-2 over prefill / verify blocks
  (causal or arbitrary mask, GQA); oracle ``attention_reference``.
* ``decode_attention`` -- flash-decoding split-K over a ``[B, KV, S, D]``
  cache with per-row lengths (GQA); oracle ``decode_attention_reference``.
* ``quant_decode_attention`` -- the same split-K decode over a KIVI-packed
  int8 / int4 / int2 cache (dequantized inside the kernel) plus its
  full-precision recent window; oracle ``quant_decode_attention_reference``.
"""

from pallas_kernels.decode_attention import combine_partials, decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.quant_attention import quant_decode_attention, quant_decode_attention_reference
from pallas_kernels.reference import attention_reference, causal_mask, decode_attention_reference

__all__ = [
    "attention_reference",
    "causal_mask",
    "combine_partials",
    "decode_attention",
    "decode_attention_reference",
    "flash_attention",
    "quant_decode_attention",
    "quant_decode_attention_reference",
]
