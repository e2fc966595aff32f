"""Host-side (XLA:CPU) kernels used by the model; Pallas kernels live in ``pallas_kernels``."""

from decodax.kernels.smallm import MAX_ROWS, available, bmm, linear, linear_xla

__all__ = ["MAX_ROWS", "available", "bmm", "linear", "linear_xla"]
