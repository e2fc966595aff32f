"""Weights kept in GGUF's block formats (Q4_1, Q8_0), dequantized inside the matmul.

A decode step of a small model is bound by the bytes of weights it streams:
SmolLM2-135M as float32 is ~540 MB per token, in its GGUF blocks ~5x less.
:class:`PackedWeight` holds a ``[N, K]`` weight as GGUF stores it -- blocks of
32 along ``K`` with 4-bit codes, a scale ``d`` and a minimum ``m`` (Q4_1:
``w = d * q + m``) or 8-bit codes and a scale (Q8_0: ``w = d * q``) -- and
:func:`linear_packed` multiplies by it without ever materialising the float
matrix (``packed_gemm.cc`` dequantizes four rows at a time into L1 and runs
the float32 small-M micro-kernel on them). ``d * q`` is exact in float32, so
the dequantized values are bit for bit those of ``gguf.quants.dequantize``
and the product is bitwise the float32 small-M product on those values:
packing changes speed, never results.

Above ``MAX_ROWS`` rows (prefill), on GPU/TPU, and for gradients, the XLA path
dequantizes (:func:`dequantize`) and uses one dot. Packed weights are for
inference with a checkpoint as shipped; call :func:`unpack` for float arrays
(training, editing weights).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from jaxtyping import Array, Float, Int

from decodax.kernels import smallm

__all__ = ["BLOCK", "PACKABLE", "PackedWeight", "concat_rows", "dequantize", "from_gguf_blocks",
           "linear_packed", "map_rows", "pack_q8_0", "take_rows", "unpack"]

BLOCK = 32
PACKABLE = frozenset({GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0})


@struct.dataclass
class PackedWeight:
    """A ``[N, K]`` float32 weight in GGUF blocks of 32 along ``K`` (a pytree).

    ``q``: uint8 ``[N, K/2]`` for Q4_1 (byte ``j`` of a block: code ``j`` in the
    low nibble, code ``j + 16`` in the high one) or int8 ``[N, K]`` for Q8_0.
    ``scales``: float32 ``[N, K/32, 2]`` (``d``, ``m``) for Q4_1, ``[N, K/32, 1]``
    (``d``) for Q8_0. ``shape``/``dtype`` describe the logical float matrix.
    """

    q: Array
    scales: Array

    @property
    def kind(self) -> str:
        return "q4_1" if self.q.dtype == jnp.uint8 else "q8_0"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.scales.shape[1] * BLOCK)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        return jnp.dtype(jnp.float32)


def from_gguf_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> PackedWeight:
    """Split a GGUF tensor's raw bytes (``[N, bytes per row]`` uint8) into a :class:`PackedWeight`.

    Q4_1 blocks are ``f16 d, f16 m, 16 bytes of nibbles``; Q8_0 blocks are
    ``f16 d, 32 int8``. The float16 scales are widened to float32 (exactly).
    """
    n, k = shape
    if qtype not in PACKABLE:
        raise ValueError(f"packed weights: expected a tensor of type Q4_1 or Q8_0, got {qtype.name}")
    if k % BLOCK:
        raise ValueError(f"packed weights: expected a row length divisible by {BLOCK}, got {k}")
    nb = k // BLOCK
    block_bytes = 20 if qtype == GGMLQuantizationType.Q4_1 else 34
    blocks = np.ascontiguousarray(raw, np.uint8).reshape(n, nb, block_bytes)
    if qtype == GGMLQuantizationType.Q4_1:
        scales = blocks[..., :4].copy().view(np.float16).astype(np.float32)  # [N, nb, 2] = (d, m)
        q = blocks[..., 4:].reshape(n, k // 2)
    else:
        scales = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # [N, nb, 1]
        q = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
    return PackedWeight(q=jnp.asarray(q), scales=jnp.asarray(scales))


def _codes(q: Array) -> Array:
    """Codes as float32 ``[N, nb, 32]`` in element order."""
    n = q.shape[0]
    if q.dtype == jnp.uint8:
        b = q.reshape(n, -1, BLOCK // 2)
        return jnp.concatenate([b & 0x0F, b >> 4], axis=-1).astype(jnp.float32)
    return q.reshape(n, -1, BLOCK).astype(jnp.float32)


def _dequantize(q: Array, scales: Array) -> Array:
    w = scales[..., :1] * _codes(q)
    if q.dtype == jnp.uint8:
        w = w + scales[..., 1:]
    return w.reshape(q.shape[0], -1)


def dequantize(w: PackedWeight) -> Float[Array, "N K"]:
    """The float32 matrix (bitwise ``gguf.quants.dequantize``: ``d * q`` is exact)."""
    return _dequantize(w.q, w.scales)


def unpack(tree: Any) -> Any:
    """Replace every :class:`PackedWeight` in a pytree (e.g. params) by its float32 matrix."""
    return jax.tree.map(lambda x: dequantize(x) if isinstance(x, PackedWeight) else x, tree,
                        is_leaf=lambda x: isinstance(x, PackedWeight))


def pack_q8_0(tree: Any) -> Any:
    """Quantize every float matrix ``[N, K]`` (``K`` a multiple of 32) in a pytree to Q8_0 blocks
    (``gguf.quants.quantize``), e.g. a trained draft for inference; vectors stay float."""

    def one(x):
        if isinstance(x, PackedWeight) or getattr(x, "ndim", 0) != 2 or x.shape[1] % BLOCK:
            return x
        raw = gguf_quantize(np.asarray(x, np.float32), GGMLQuantizationType.Q8_0)
        return from_gguf_blocks(raw, GGMLQuantizationType.Q8_0, tuple(x.shape))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, PackedWeight))


def take_rows(w: PackedWeight | Array, idx: Int[Array, "..."]) -> Float[Array, "... K"]:
    """Rows ``w[idx]`` (an embedding lookup), dequantizing only the rows taken."""
    if not isinstance(w, PackedWeight):
        return jnp.take(w, idx, axis=0)
    flat = idx.reshape(-1)
    rows = _dequantize(jnp.take(w.q, flat, axis=0), jnp.take(w.scales, flat, axis=0))
    return rows.reshape(*idx.shape, w.shape[1])


def concat_rows(ws: list, axis: int = -2) -> PackedWeight | np.ndarray:
    """Concatenate ``[out, in]`` weights along the output (row) axis (``axis`` -2 or 0).

    Packed weights of one kind stay packed; any other mix is dequantized and
    concatenated as a float32 numpy array (correct, just not packed).
    """
    if axis not in (0, -2):
        raise ValueError(f"concat_rows: expected the row axis (0 or -2), got {axis}")
    if all(isinstance(w, PackedWeight) and w.kind == ws[0].kind for w in ws):
        return PackedWeight(q=jnp.concatenate([w.q for w in ws]), scales=jnp.concatenate([w.scales for w in ws]))
    return np.concatenate([np.asarray(dequantize(w)) if isinstance(w, PackedWeight) else w for w in ws], axis=0)


def map_rows(fn: Callable[[Array], Array], w: PackedWeight) -> PackedWeight:
    """Apply a row permutation/selection ``fn`` (acting on axis 0) to a packed weight."""
    return PackedWeight(q=jnp.asarray(fn(np.asarray(w.q))), scales=jnp.asarray(fn(np.asarray(w.scales))))


def _xla(x, q, scales):
    return jnp.einsum("...k,nk->...n", x, _dequantize(q, scales))


@jax.custom_jvp
def _packed_linear(x, q, scales):
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    n, k = q.shape[0], x.shape[-1]
    call = jax.ffi.ffi_call(smallm.PACKED_NT, jax.ShapeDtypeStruct((rows, n), jnp.float32),
                            vmap_method="sequential")
    y = jax.lax.platform_dependent(
        x.reshape(rows, k), q, scales,
        cpu=lambda a, b, c: call(a, b, c),
        default=lambda a, b, c: _xla(a, b, c),
    )
    return y.reshape(*x.shape[:-1], n)


@_packed_linear.defjvp
def _packed_linear_jvp(primals, tangents):
    (x, q, scales), (dx, _, dscales) = primals, tangents
    # linear in x and in the scales (w = d q + m); the integer codes have no tangent.
    return _packed_linear(x, q, scales), _xla(dx, q, scales) + _xla(x, q, dscales)


def linear_packed(x: Float[Array, "... K"], w: PackedWeight) -> Float[Array, "... N"]:
    """``x @ dequantize(w).T``: the packed kernel for float32 inputs of at most
    ``MAX_ROWS`` rows on CPU, else XLA's dot on the dequantized matrix."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features but the packed weight is [out, in] = {w.shape}")
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if x.dtype != jnp.float32 or not 1 <= rows <= smallm.MAX_ROWS or not smallm.available():
        return _xla(x.astype(jnp.float32), w.q, w.scales)
    return _packed_linear(x, w.q, w.scales)

