"""KV-cache quantization primitives: pure JAX functions over ``[..., S, D]`` blocks.

* :mod:`~decodax.kvquant.packing` -- 2/4/8-bit codes packed along the last axis (the KV format
  shared with the fused Pallas kernel);
* :mod:`~decodax.kvquant.uniform` -- asymmetric min/max groups; symmetric per-token int8/int4
  (MaxText's baseline);
* :mod:`~decodax.kvquant.kivi` -- KIVI: per-channel keys, per-token values, packed;
* :mod:`~decodax.kvquant.kvquant` -- KVQuant: pre-RoPE keys, k-means datatype, dense-and-sparse,
  attention sink;
* :mod:`~decodax.kvquant.gear` -- GEAR: quantization + low-rank residual + sparse outliers.

The compressed caches built on these (the ``KVCache`` interface) live elsewhere.
"""

from decodax.kvquant import gear, kivi, kvquant, packing, uniform
from decodax.kvquant.gear import GearBlock
from decodax.kvquant.kivi import KiviBlock
from decodax.kvquant.kvquant import KVQuantBlock
from decodax.kvquant.packing import pack, unpack
from decodax.kvquant.uniform import (
    AsymQuant,
    SymQuant,
    dequantize_asymmetric,
    dequantize_symmetric,
    quantize_asymmetric,
    quantize_symmetric,
)

__all__ = [
    "AsymQuant", "GearBlock", "KVQuantBlock", "KiviBlock", "SymQuant", "dequantize_asymmetric",
    "dequantize_symmetric", "gear", "kivi", "kvquant", "pack", "packing", "quantize_asymmetric",
    "quantize_symmetric", "uniform", "unpack",
]
