"""KV-cache quantization primitives: pure JAX functions over ``[..., S, D]`` blocks.

* :mod:`~decodax.kvquant.packing` -- 2/4/8-bit codes packed along the last axis (the KV format
  shared with the fused Pallas kernel);
* :mod:`~decodax.kvquant.uniform` -- asymmetric min/max groups; symmetric per-token int8/int4
  (MaxText's baseline);
* :mod:`~decodax.kvquant.kivi` -- KIVI: per-channel keys, per-token values, packed;
* :mod:`~decodax.kvquant.kvquant` -- KVQuant: pre-RoPE keys, k-means datatype, dense-and-sparse,
  attention sink;
* :mod:`~decodax.kvquant.gear` -- GEAR: quantization + low-rank residual + sparse outliers.

* :mod:`~decodax.kvquant.codecs` -- how each group of ``G`` cached tokens is coded (the above);
* :mod:`~decodax.kvquant.cache` -- the compressed cache with the ``KVCache`` interface
  (``Model(config, cache_spec=QuantCacheSpec(make_codec("kivi4")))`` puts every decoder on it);
* :mod:`~decodax.kvquant.calibrate` -- KVQuant's offline calibration from a model forward;
* :mod:`~decodax.kvquant.pie` -- PIE: re-rotate cached keys after an edit instead of re-prefilling.
"""

from decodax.kvquant import cache, codecs, gear, kivi, kvquant, packing, uniform
from decodax.kvquant.cache import QuantCacheSpec, QuantKVCache, init_quant_cache
from decodax.kvquant.codecs import CODEC_NAMES, make_codec
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
    "CODEC_NAMES", "QuantCacheSpec", "QuantKVCache", "cache", "codecs", "init_quant_cache", "make_codec",
    "AsymQuant", "GearBlock", "KVQuantBlock", "KiviBlock", "SymQuant", "dequantize_asymmetric",
    "dequantize_symmetric", "gear", "kivi", "kvquant", "pack", "packing", "quantize_asymmetric",
    "quantize_symmetric", "uniform", "unpack",
]
