"""``linear(x, w) = x @ w.T`` with a small-M CPU kernel (XLA FFI custom call).

Decoding multiplies a few rows (the T new tokens of a decode, verify or
Jacobi step) by large weight matrices. XLA:CPU computes one row as a fast
matrix-vector product but 2+ rows with a GEMM that repacks the weight matrix
on every call, so verifying 8 tokens costs ~3x decoding one although both only
need to stream the weights once. ``smallm_gemm.cc`` streams each weight row
once, keeps ``rows x 4`` dot products in AVX2 registers and splits the output
columns over XLA's intra-op thread pool; each output element is computed the
same way whatever ``M`` is, so a verify step and a decode step give bitwise
equal logits for the same context.

The shared library is compiled on first use with the system C++ compiler
(``$CXX`` or ``g++``) into ``$DECODAX_CACHE`` (default ``~/.cache/decodax``)
and registered as an XLA:CPU FFI target. Where it cannot be used (no
compiler, no AVX2/FMA, another platform, ``DECODAX_SMALLM=0``, non-float32
operands, more than ``MAX_ROWS`` rows) ``linear`` is the plain XLA product.
Under ``jax.jit`` on a GPU/TPU the XLA branch is selected at lowering
(``lax.platform_dependent``); gradients use the XLA product (``custom_jvp``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = ["MAX_ROWS", "available", "bmm", "linear", "linear_xla"]

MAX_ROWS = 32  # above this XLA's GEMM is the better kernel (prefill)
_DIR = Path(__file__).parent
_SOURCES = [_DIR / "smallm_gemm.cc", _DIR / "packed_gemm.cc"]  # compiled into one library
_HEADERS = [_DIR / "gemm_common.h"]
_NT, _NN, PACKED_NT = "decodax_smallm_nt", "decodax_smallm_nn", "decodax_packed_nt"
_TARGETS = {_NT: "SmallmNT", _NN: "SmallmNN", PACKED_NT: "PackedNT"}


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _cache_dir() -> Path:
    root = os.environ.get("DECODAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "decodax")
    return Path(root) / "kernels"


def _build() -> Path:
    """Compile the kernel sources once per (sources, jaxlib version); return the .so path."""
    source = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    tag = hashlib.sha256(source + jax.__version__.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"libdecodax_smallm_{tag}.so"
    if lib.exists():
        return lib
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the decodax kernels failed:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders never see a partial file
    return lib


@functools.cache
def available() -> bool:
    """Whether the small-M kernels are compiled and registered for XLA:CPU."""
    if os.environ.get("DECODAX_SMALLM", "1") == "0" or not _cpu_has_avx2_fma():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 -- any build/registration failure means: use XLA
        warnings.warn(f"decodax: small-M CPU kernel unavailable, using XLA's dot ({e})", stacklevel=2)
        return False
    return True


def _xla_bmm(x, w, w_index, transposed):
    if w.ndim == 4:
        w = w[w_index]
    w = jnp.broadcast_to(w, (x.shape[0],) + w.shape[1:])
    return jnp.einsum("gmk,gnk->gmn" if transposed else "gmk,gkn->gmn", x, w)


def _live_mask(lengths, group, g, n):
    live = jnp.arange(n)[None, :] < jnp.repeat(lengths, group, total_repeat_length=g)[:, None]
    return live[:, None, :]  # [G, 1, n]


def _xla_bmm_live(x, w, lengths, w_index, transposed, group):
    """The XLA reference of the kernel, including its treatment of ``lengths``."""
    g = x.shape[0]
    if transposed:
        y = _xla_bmm(x, w, w_index, True)
        return jnp.where(_live_mask(lengths, group, g, y.shape[-1]), y, 0.0)
    return _xla_bmm(jnp.where(_live_mask(lengths, group, g, x.shape[-1]), x, 0.0), w, w_index, False)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _bmm(x, w, lengths, w_index: int, transposed: bool, group: int):
    n = w.shape[-2] if transposed else w.shape[-1]
    call = jax.ffi.ffi_call(_NT if transposed else _NN,
                            jax.ShapeDtypeStruct((x.shape[0], x.shape[1], n), jnp.float32),
                            vmap_method="sequential")
    return jax.lax.platform_dependent(
        x, w, lengths,
        cpu=lambda a, b, c: call(a, b, c, w_index=np.int64(w_index), group=np.int64(group)),
        default=lambda a, b, c: _xla_bmm_live(a, b, c, w_index, transposed, group),
    )


@_bmm.defjvp
def _bmm_jvp(w_index, transposed, group, primals, tangents):
    (x, w, lengths), (dx, dw, _) = primals, tangents
    f = functools.partial(_xla_bmm_live, lengths=lengths, w_index=w_index, transposed=transposed, group=group)
    return _bmm(x, w, lengths, w_index, transposed, group), f(dx, w) + f(x, dw)


def _use_kernel(x, w, rows: int) -> bool:
    return x.dtype == jnp.float32 and w.dtype == jnp.float32 and 1 <= rows <= MAX_ROWS and available()


def bmm(x: Float[Array, "G M K"], w: Float[Array, "*L Gw A B"], *, transposed: bool,
        w_index: int | None = None, lengths: Int[Array, " Bl"] | None = None) -> Float[Array, "G M N"]:
    """Batched small-M product ``x[g] @ w[g].T`` (``transposed``) or ``x[g] @ w[g]``.

    ``w`` has batch size ``G`` or 1 (shared); a 4-D ``w`` is a stack of which
    entry ``w_index`` is used (one layer of the ``[L, B, K, S, D]`` KV cache,
    read in place rather than sliced out first). ``lengths`` (``[B]``, ``G``
    a multiple of ``B``): batch entry ``g`` only uses the first
    ``lengths[g // (G // B)]`` rows of its ``w`` -- the committed cache slots.
    The ``transposed`` form (attention scores ``q . k``) returns zeros in the
    other columns; the plain form (``p . v``) sums over those rows only, which
    is exact when ``x`` is zero there (softmax weights of masked slots).
    """
    if (w.ndim == 4) != (w_index is not None) or x.ndim != 3 or w.ndim not in (3, 4):
        raise ValueError(f"bmm: x must be [G, M, K] and w [G|1, ., .] (or 4-D with w_index), got "
                         f"{x.shape}, {w.shape}, w_index={w_index}")
    g = x.shape[0]
    if lengths is None:
        lengths = jnp.full((1,), np.iinfo(np.int32).max, jnp.int32)
    if g % lengths.shape[0]:
        raise ValueError(f"bmm: batch {g} is not a multiple of len(lengths) = {lengths.shape[0]}")
    group = g // lengths.shape[0]
    lengths = lengths.astype(jnp.int32)
    w_index = 0 if w_index is None else int(w_index)
    if not _use_kernel(x, w, x.shape[1]):
        return _xla_bmm_live(x, w, lengths, w_index, bool(transposed), group)
    return _bmm(x, w, lengths, w_index, bool(transposed), group)


def linear_xla(x: Float[Array, "... K"], w: Float[Array, "N K"]) -> Float[Array, "... N"]:
    """``x @ w.T`` as one XLA dot (weights stored ``[out, in]``, like ``torch.nn.Linear``)."""
    return jnp.einsum("...k,nk->...n", x, w)


def linear(x: Float[Array, "... K"], w: Float[Array, "N K"]) -> Float[Array, "... N"]:
    """``x @ w.T`` for weights stored ``[out, in]``: the small-M kernel when it applies
    (float32, at most ``MAX_ROWS`` rows, kernel available), else one XLA dot."""
    if x.shape[-1] != w.shape[-1] or w.ndim != 2:
        raise ValueError(f"linear: x has {x.shape[-1]} features but w must be [out, in], got {w.shape}")
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if not _use_kernel(x, w, rows):
        return linear_xla(x, w)
    y = _bmm(x.reshape(1, rows, x.shape[-1]), w[None], jnp.full((1,), w.shape[0], jnp.int32), 0, True, 1)
    return y.reshape(*x.shape[:-1], w.shape[0])
