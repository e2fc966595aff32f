"""GGUF file -> (ModelConfig, params pytree, Tokenizer) for llama-architecture models.

The header, metadata and tensor table are parsed here with ``struct`` on a
memory map (``gguf.GGUFReader`` builds one numpy view per metadata item and
takes seconds on a 49k-token vocabulary); tensor data is dequantized with
``gguf.quants.dequantize`` (numpy), so every type the ``gguf`` package can
dequantize is supported: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K-quants, IQ*.

Layout notes:
  * A GGUF tensor with ggml dims ``[ne0, ne1]`` is the numpy array
    ``[ne1, ne0]`` = torch ``Linear.weight`` ``[out, in]``; decodax uses
    ``x @ w`` so linear weights are transposed to ``[in, out]``.
  * llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for its
    interleaved ("GPT-J") RoPE; :func:`unpermute_qk` undoes it (as HF
    transformers' ``reverse_permute_weights``) so that the rotate-half RoPE of
    :mod:`decodax.model.transformer` is correct.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from jaxtyping import Array, Float

from decodax.kernels.packed import PACKABLE, PackedWeight, concat_rows, from_gguf_blocks, map_rows
from decodax.model.config import ModelConfig
from decodax.model.tokenizer import Tokenizer
from decodax.model.transformer import fuse_layer

__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "GGUFFileNotFoundError",
    "read_gguf",
    "load_gguf",
    "config_from_metadata",
    "permute_qk",
    "unpermute_qk",
    "supported_tensor_types",
    "check_tensor_type",
]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_SUPPORTED_ARCHITECTURES = ("llama",)

_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class GGUFFileNotFoundError(FileNotFoundError, ValueError):
    """A missing GGUF file: both a ``FileNotFoundError`` and a ``ValueError``."""


def supported_tensor_types() -> frozenset[GGMLQuantizationType]:
    """The tensor types the installed ``gguf`` package can dequantize to float32."""
    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:  # pragma: no cover - older/newer gguf without the registry
        probe = set()
        for qtype in GGMLQuantizationType:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            try:
                gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
                probe.add(qtype)
            except Exception:
                pass
        return frozenset(probe)
    return frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, *traits})


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table.

    ``shape`` is the numpy (row-major) shape, i.e. the ggml dims reversed;
    ``type`` is a ``GGMLQuantizationType`` or the raw int of an unknown type.
    """

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType | int
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None when the type is unknown

    @property
    def type_name(self) -> str:
        return self.type.name if isinstance(self.type, GGMLQuantizationType) else f"<unknown type {self.type}>"


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: metadata dict, tensor table and the memory-mapped bytes."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    _buffer: Any = dataclasses.field(repr=False, default=None)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored data as numpy (float view or uint8 blocks), zero-copy."""
        info = self._info(name)
        if not isinstance(info.type, GGMLQuantizationType) or info.nbytes is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unknown type {info.type}")
        flat = np.frombuffer(self._buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return flat.reshape(_byte_shape(info.shape, info.type))

    def dequantize(self, name: str) -> Float[np.ndarray, "..."]:
        """The tensor as a float32 numpy array of shape ``info.shape``."""
        info = self._info(name)
        check_tensor_type(info, self.path)
        out = gguf.quants.dequantize(self.raw(name), info.type)
        # F32 comes back as a view of the read-only memory map: copy so nothing downstream
        # (e.g. a zero-copy device_put on CPU) keeps pointing into the file.
        if info.type == GGMLQuantizationType.F32:
            return np.array(out, dtype=np.float32).reshape(info.shape)
        return np.asarray(out, dtype=np.float32).reshape(info.shape)

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"{self.path}: no tensor named {name!r}") from None


def _byte_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if not shape:
        return (size,)
    return (*shape[:-1], shape[-1] // block * size)


def check_tensor_type(info: GGUFTensorInfo, path: str = "<gguf>") -> None:
    """Raise ValueError when ``gguf`` cannot dequantize this tensor's type."""
    supported = supported_tensor_types()
    if info.type not in supported:
        names = ", ".join(sorted(t.name for t in supported))
        raise ValueError(
            f"{path}: tensor {info.name!r} has type {info.type_name}, which the gguf package "
            f"({getattr(gguf, '__version__', '?')}) cannot dequantize; expected one of: {names}"
        )


class _Cursor:
    """Bounds-checked little-endian reader over a buffer."""

    def __init__(self, buf: Any, size: int, path: str):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(
                f"{self.path}: corrupt or truncated GGUF: expected {n} bytes for {what} at byte "
                f"{self.pos}, but the file has {self.size} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: corrupt GGUF: {what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            itype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if itype == GGUFValueType.STRING:
                self.need(8 * count, what)  # each string has at least its length prefix
                return [self.string(what) for _ in range(count)]
            if itype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY, what) for _ in range(count)]
            if itype not in _NUMPY_DTYPES:
                raise ValueError(f"{self.path}: corrupt GGUF: {what} has unknown array item type {itype}")
            dtype = np.dtype(_NUMPY_DTYPES[itype])
            self.need(dtype.itemsize * count, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += dtype.itemsize * count
            return arr
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"{self.path}: corrupt GGUF: {what} has unknown value type {vtype}")
        return self.scalar(_SCALAR_FORMATS[vtype], what)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table (tensor data stays memory-mapped).

    Raises ValueError (``GGUFFileNotFoundError`` for a missing file) naming
    what was expected and what was found, for a missing, non-GGUF, truncated
    or otherwise corrupt file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GGUFFileNotFoundError(f"GGUF file not found: expected an existing file at {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"expected a GGUF file, got a directory or special file: {path!r}")
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(
            f"{path}: not a GGUF file: expected at least 24 bytes (magic, version, counts), got {size}"
        )
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic = buf[:4]
    if magic != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file: expected magic {_MAGIC!r}, got {magic!r}")
    cur = _Cursor(buf, size, path)
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in _SUPPORTED_VERSIONS:
        hint = " (a big-endian GGUF?)" if struct.unpack("<I", struct.pack(">I", version))[0] in _SUPPORTED_VERSIONS else ""
        raise ValueError(
            f"{path}: unsupported GGUF version: expected one of {_SUPPORTED_VERSIONS}, got {version}{hint}"
        )
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    # Each key/value needs >= 12 bytes and each tensor entry >= 24: reject absurd counts early.
    cur.need(12 * n_kv + 24 * n_tensors, f"{n_kv} metadata entries and {n_tensors} tensor entries")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"type of metadata {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment % 8:
        raise ValueError(f"{path}: corrupt GGUF: expected general.alignment a positive multiple of 8, got {alignment}")

    entries = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.scalar("<I", f"n_dims of tensor {name!r}")
        if not 0 < n_dims <= 4:
            raise ValueError(f"{path}: corrupt GGUF: tensor {name!r} expected 1..4 dims, got {n_dims}")
        dims = [cur.scalar("<Q", f"dims of tensor {name!r}") for _ in range(n_dims)]
        raw_type = cur.scalar("<I", f"type of tensor {name!r}")
        offset = cur.scalar("<Q", f"offset of tensor {name!r}")
        entries.append((name, tuple(reversed(dims)), raw_type, offset))
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, raw_type, offset in entries:
        try:
            qtype: GGMLQuantizationType | int = GGMLQuantizationType(raw_type)
        except ValueError:
            qtype = raw_type
        nbytes = None
        if isinstance(qtype, GGMLQuantizationType):
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise ValueError(
                    f"{path}: corrupt GGUF: tensor {name!r} of type {qtype.name} has row length "
                    f"{shape[-1]}, expected a multiple of the block size {block}"
                )
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
            end = data_start + offset + nbytes
            if end > size:
                raise ValueError(
                    f"{path}: truncated GGUF: tensor {name!r} ({qtype.name}, shape {shape}) expected "
                    f"bytes up to {end}, but the file has {size} bytes"
                )
        if name in tensors:
            raise ValueError(f"{path}: corrupt GGUF: duplicate tensor name {name!r}")
        tensors[name] = GGUFTensorInfo(name, shape, qtype, data_start + offset, nbytes)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, _buffer=buf)


def _get(meta: Mapping[str, Any], key: str, path: str, default: Any = ..., kind: type = int) -> Any:
    if key not in meta:
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata is missing required key {key!r}")
        return default
    value = meta[key]
    if isinstance(value, (np.ndarray, list)):
        raise ValueError(f"{path}: GGUF metadata {key!r}: expected a scalar {kind.__name__}, got an array")
    return kind(value)


def config_from_metadata(
    metadata: Mapping[str, Any], tensors: Mapping[str, GGUFTensorInfo] | None = None, path: str = "<gguf>"
) -> ModelConfig:
    """Build a ModelConfig from llama.* / tokenizer.ggml.* GGUF metadata.

    ``tensors`` (optional) supplies the vocabulary size when ``llama.vocab_size``
    is absent and decides ``tie_embeddings`` (no ``output.weight`` = tied).
    """
    arch = metadata.get("general.architecture")
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture: expected general.architecture in "
            f"{list(_SUPPORTED_ARCHITECTURES)}, got {arch!r}"
        )
    p = f"{arch}."
    if f"{p}expert_count" in metadata and _get(metadata, f"{p}expert_count", path) > 0:
        raise ValueError(f"{path}: mixture-of-experts llama GGUFs are not supported (expected expert_count 0)")
    scaling = metadata.get(f"{p}rope.scaling.type", "none")
    if scaling not in ("none", None) or (tensors is not None and "rope_freqs.weight" in tensors):
        raise ValueError(
            f"{path}: RoPE scaling is not supported: expected no {p}rope.scaling.type and no rope_freqs "
            f"tensor, got scaling type {scaling!r}"
        )
    dim = _get(metadata, f"{p}embedding_length", path)
    n_heads = _get(metadata, f"{p}attention.head_count", path)
    n_kv = _get(metadata, f"{p}attention.head_count_kv", path, default=n_heads)
    head_dim = _get(metadata, f"{p}attention.key_length", path, default=None)
    if head_dim is None:
        head_dim = dim // n_heads if n_heads and dim % n_heads == 0 else None
    value_dim = _get(metadata, f"{p}attention.value_length", path, default=head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{path}: expected attention.value_length == key_length ({head_dim}), got {value_dim}")
    rot = _get(metadata, f"{p}rope.dimension_count", path, default=head_dim)
    if rot != head_dim:
        raise ValueError(f"{path}: partial RoPE is not supported: expected rope.dimension_count {head_dim}, got {rot}")

    n_tokens = len(metadata["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in metadata else None
    vocab = _get(metadata, f"{p}vocab_size", path, default=None)
    if vocab is None and tensors is not None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    if vocab is None:
        vocab = n_tokens
    if vocab is None:
        raise ValueError(f"{path}: cannot tell the vocabulary size: expected {p}vocab_size or tokenizer tokens")

    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in metadata and int(metadata[key]) not in eos_ids:
            eos_ids.append(int(metadata[key]))
    for name, tid in (("bos", metadata.get("tokenizer.ggml.bos_token_id")), ("eos", eos)):
        if tid is not None and not 0 <= int(tid) < vocab:
            raise ValueError(f"{path}: {name} token id must be in [0, {vocab}), got {int(tid)}")
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    pad = metadata.get("tokenizer.ggml.padding_token_id")
    return ModelConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=_get(metadata, f"{p}block_count", path),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        hidden_dim=_get(metadata, f"{p}feed_forward_length", path),
        head_dim=head_dim,
        rope_theta=_get(metadata, f"{p}rope.freq_base", path, default=10000.0, kind=float),
        norm_eps=_get(metadata, f"{p}attention.layer_norm_rms_epsilon", path, kind=float),
        tie_embeddings=tensors is None or "output.weight" not in tensors,
        max_seq_len=_get(metadata, f"{p}context_length", path, default=2048),
        bos_id=None if bos is None else int(bos),
        eos_ids=tuple(eos_ids),
        pad_id=None if pad is None else int(pad),
        name=str(metadata.get("general.name", arch)),
    )


def permute_qk(w: Float[np.ndarray, "O I"], n_heads: int) -> Float[np.ndarray, "O I"]:
    """llama.cpp's converter permutation of Q/K rows (HF rotate-half -> interleaved RoPE).

    ``w`` is ``[n_heads * head_dim, in]`` (torch layout). Inverse of :func:`unpermute_qk`.
    """
    o = w.shape[0]
    return w.reshape(n_heads, 2, o // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: Float[np.ndarray, "O I"], n_heads: int) -> Float[np.ndarray, "O I"]:
    """Undo :func:`permute_qk` (HF transformers' ``reverse_permute_weights``).

    Row ``h*hd + 2i + j`` of the GGUF tensor becomes row ``h*hd + j*hd/2 + i``,
    the rotate-half layout of ``decodax.model.transformer.rope``.
    """
    o = w.shape[0]
    return w.reshape(n_heads, o // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_TENSORS = {
    # gguf name: (params key, numpy shape ([out, in], the layout decodax keeps) from the config)
    "attn_norm": ("attn_norm", lambda c: (c.dim,)),
    "attn_q": ("wq", lambda c: (c.n_heads * c.head_dim, c.dim)),
    "attn_k": ("wk", lambda c: (c.n_kv_heads * c.head_dim, c.dim)),
    "attn_v": ("wv", lambda c: (c.n_kv_heads * c.head_dim, c.dim)),
    "attn_output": ("wo", lambda c: (c.dim, c.n_heads * c.head_dim)),
    "ffn_norm": ("mlp_norm", lambda c: (c.dim,)),
    "ffn_gate": ("w_gate", lambda c: (c.hidden_dim, c.dim)),
    "ffn_up": ("w_up", lambda c: (c.hidden_dim, c.dim)),
    "ffn_down": ("w_down", lambda c: (c.dim, c.hidden_dim)),
}


def _check_tensors(f: GGUFFile, config: ModelConfig) -> None:
    c = config
    expected: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (c.vocab_size, c.dim),
        "output_norm.weight": (c.dim,),
    }
    if not c.tie_embeddings:
        expected["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        for short, (_, shape_fn) in _LAYER_TENSORS.items():
            expected[f"blk.{i}.{short}.weight"] = shape_fn(c)
    missing = [n for n in expected if n not in f.tensors]
    if missing:
        raise ValueError(
            f"{f.path}: expected llama tensors missing from the GGUF: {missing[:8]}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    extra = [n for n in f.tensors if n not in expected]
    if extra:
        raise ValueError(f"{f.path}: unsupported tensors in a llama GGUF (biases, rope_freqs, ...): {extra[:8]}")
    for name, shape in expected.items():
        info = f.tensors[name]
        if tuple(info.shape) != shape:
            raise ValueError(f"{f.path}: tensor {name!r}: expected shape {shape} (numpy order), got {info.shape}")
        check_tensor_type(info, f.path)


def load_gguf(
    path: str | os.PathLike, dtype: Any = jnp.float32, *, stack_layers: bool = False, packed: bool = False
) -> tuple[ModelConfig, dict, Tokenizer]:
    """Load a llama-architecture GGUF file into ``(ModelConfig, params, Tokenizer)``.

    Every tensor is dequantized with ``gguf.quants.dequantize`` to float32
    numpy, Q/K rows are un-permuted (llama.cpp's interleaved RoPE -> the
    rotate-half layout of ``transformer.rope``), linear weights kept in the
    file's ``[out, in]`` layout, and each leaf converted once to ``dtype``.

    ``params["layers"]`` is a list of per-layer dicts (``attn_norm``, ``wqkv``,
    ``wo``, ``mlp_norm``, ``w_gate_up``, ``w_down``: Q/K/V and gate/up fused,
    see ``transformer.fuse_layer``), the layout ``Model.apply`` iterates over; ``stack_layers=True`` instead gives
    one dict of arrays stacked on a leading layer axis. ``params`` has no
    ``"lm_head"`` when the file has no ``output.weight`` (tied embeddings).

    ``packed=True`` keeps Q4_1 and Q8_0 matrices (linear weights, embedding)
    in their GGUF blocks as :class:`decodax.kernels.PackedWeight`: ~5x less
    memory and memory traffic per decode step, bitwise the same products
    (float32 only; not with ``stack_layers``). Fused projections whose parts
    have different types are dequantized.

    All validation (file, magic, version, architecture, tensor names, shapes
    and types, tokenizer metadata) happens before any array work and raises
    ValueError naming what was expected and what was found.
    """
    if packed and (stack_layers or jnp.dtype(dtype) != jnp.float32):
        raise ValueError(f"load_gguf: packed=True needs dtype float32 and stack_layers=False, "
                         f"got dtype={jnp.dtype(dtype).name}, stack_layers={stack_layers}")
    f = read_gguf(path)
    config = config_from_metadata(f.metadata, f.tensors, f.path)
    _check_tensors(f, config)
    tokenizer = Tokenizer.from_gguf_metadata(f.metadata, path=f.path)
    c = config

    def to_jnp(x: np.ndarray | PackedWeight) -> Array | PackedWeight:
        return x if isinstance(x, PackedWeight) else jnp.asarray(x, dtype=dtype)

    def tensor(name: str) -> np.ndarray | PackedWeight:
        info = f.tensors[name]
        if packed and len(info.shape) == 2 and info.type in PACKABLE:
            return from_gguf_blocks(f.raw(name), info.type, tuple(info.shape))
        return f.dequantize(name)

    def layer_tensor(i: int, short: str) -> np.ndarray | PackedWeight:
        w = tensor(f"blk.{i}.{short}.weight")
        if short in ("attn_q", "attn_k"):
            heads = c.n_heads if short == "attn_q" else c.n_kv_heads
            unpermute = functools.partial(unpermute_qk, n_heads=heads)
            w = map_rows(unpermute, w) if isinstance(w, PackedWeight) else unpermute(w)
        return w

    def layer(i: int) -> dict[str, np.ndarray | PackedWeight]:
        sep = {key: layer_tensor(i, short) for short, (key, _) in _LAYER_TENSORS.items()}
        return fuse_layer(sep, concat=concat_rows)

    per_layer = [layer(i) for i in range(c.n_layers)]
    if stack_layers:
        layers: Any = {k: to_jnp(np.stack([lp[k] for lp in per_layer])) for k in per_layer[0]}
    else:
        layers = [{k: to_jnp(v) for k, v in lp.items()} for lp in per_layer]
    params: dict[str, Any] = {
        "embed": to_jnp(tensor("token_embd.weight")),
        "layers": layers,
        "final_norm": to_jnp(f.dequantize("output_norm.weight")),
    }
    if not c.tie_embeddings:
        params["lm_head"] = to_jnp(tensor("output.weight"))
    return config, params, tokenizer
