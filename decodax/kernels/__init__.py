"""Host-side (XLA:CPU) kernels used by the model; Pallas kernels live in ``pallas_kernels``."""

from jaxtyping import Array, Float

from decodax.kernels import smallm
from decodax.kernels.packed import PackedWeight, dequantize, linear_packed, pack_q8_0, take_rows, unpack
from decodax.kernels.smallm import MAX_ROWS, available, bmm, linear_xla

__all__ = ["MAX_ROWS", "PackedWeight", "available", "bmm", "dequantize", "linear", "linear_xla", "pack_q8_0",
           "take_rows", "unpack"]


def linear(x: Float[Array, "... K"], w: Float[Array, "N K"] | PackedWeight) -> Float[Array, "... N"]:
    """``x @ w.T`` for a weight stored ``[out, in]``, float32 array or :class:`PackedWeight`
    (see :func:`decodax.kernels.smallm.linear` and :func:`decodax.kernels.packed.linear_packed`)."""
    if isinstance(w, PackedWeight):
        return linear_packed(x, w)
    return smallm.linear(x, w)
