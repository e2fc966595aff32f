"""Packed GGUF weights: exact dequantization and products bitwise equal to float32 weights."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from decodax.kernels import MAX_ROWS, PackedWeight, available, dequantize, linear, pack_q8_0, take_rows, unpack
from decodax.kernels.packed import concat_rows, from_gguf_blocks, linear_packed, map_rows
from decodax.model.transformer import param_count

KINDS = [Q.Q4_1, Q.Q8_0]


def packed(n: int, k: int, qtype, seed: int = 0) -> tuple[PackedWeight, np.ndarray]:
    """A random ``[n, k]`` matrix quantized by ``gguf``; returns (packed, gguf's dequantization)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    return from_gguf_blocks(raw, qtype, (n, k)), gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("qtype", KINDS)
def test_dequantize_is_gguf_bit_for_bit(qtype):
    pw, ref = packed(37, 96, qtype)
    assert pw.shape == (37, 96) and pw.kind == qtype.name.lower() and pw.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dequantize(pw)), ref)
    np.testing.assert_array_equal(np.asarray(take_rows(pw, jnp.array([[3, 0], [36, 3]]))), ref[[[3, 0], [36, 3]]])


@pytest.mark.skipif(not available(), reason="CPU kernels not available on this machine")
@pytest.mark.parametrize("qtype", KINDS)
@pytest.mark.parametrize("n,k", [(960, 576), (7, 64), (4, 32)])
def test_product_bitwise_equals_float_weights(qtype, n, k):
    """Same float32 values, same micro-kernel: the packed product is the float one, bit for bit,
    for every row count the kernel takes (and so independent of M)."""
    pw, ref = packed(n, k, qtype, seed=n + k)
    for m in (1, 2, 3, 8, MAX_ROWS):
        x = jax.random.normal(jax.random.key(m), (m, k))
        got = np.asarray(jax.jit(linear)(x, pw))
        np.testing.assert_array_equal(got, np.asarray(jax.jit(linear)(x, jnp.asarray(ref))))
        np.testing.assert_allclose(got, np.asarray(x, np.float64) @ ref.T.astype(np.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", KINDS)
def test_prefill_fallback_vmap_and_grad(qtype):
    pw, ref = packed(24, 64, qtype, seed=5)
    w = jnp.asarray(ref)
    big = jax.random.normal(jax.random.key(1), (2, MAX_ROWS, 64))  # 64 rows: XLA's dot on dequantized w
    np.testing.assert_allclose(linear(big, pw), big @ w.T, rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.key(2), (3, 2, 64))
    np.testing.assert_allclose(jax.vmap(linear, (0, None))(x, pw), x @ w.T, rtol=1e-5, atol=1e-5)

    def loss(x, scales):
        return jnp.sum(jnp.sin(linear(x, PackedWeight(q=pw.q, scales=scales))))

    def loss_ref(x, scales):
        return jnp.sum(jnp.sin(x @ dequantize(PackedWeight(q=pw.q, scales=scales)).T))

    gx, gs = jax.grad(loss, argnums=(0, 1))(x[0], pw.scales)
    rx, rs = jax.grad(loss_ref, argnums=(0, 1))(x[0], pw.scales)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gs, rs, rtol=1e-4, atol=1e-4)


def test_concat_map_unpack_and_count():
    a, ra = packed(8, 64, Q.Q4_1, seed=1)
    b, rb = packed(4, 64, Q.Q4_1, seed=2)
    c, rc = packed(4, 64, Q.Q8_0, seed=3)
    ab = concat_rows([a, b], axis=-2)
    assert isinstance(ab, PackedWeight)
    np.testing.assert_array_equal(np.asarray(dequantize(ab)), np.concatenate([ra, rb]))
    mixed = concat_rows([a, c], axis=-2)  # different kinds: dequantized, still exact
    assert isinstance(mixed, np.ndarray)
    np.testing.assert_array_equal(mixed, np.concatenate([ra, rc]))
    flipped = map_rows(lambda r: r[::-1], a)
    np.testing.assert_array_equal(np.asarray(dequantize(flipped)), ra[::-1])
    tree = {"w": a, "n": jnp.ones(3)}
    assert param_count(tree) == 8 * 64 + 3
    flat = unpack(tree)
    np.testing.assert_array_equal(np.asarray(flat["w"]), ra)


def test_bad_input():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match="Q4_1 or Q8_0"):
        from_gguf_blocks(gguf.quants.quantize(w, Q.Q5_0), Q.Q5_0, (4, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        from_gguf_blocks(np.zeros((4, 20), np.uint8), Q.Q4_1, (4, 40))
    pw, _ = packed(4, 64, Q.Q8_0)
    with pytest.raises(ValueError, match="features"):
        linear_packed(jnp.ones((1, 32)), pw)
    with pytest.raises(ValueError, match="row axis"):
        concat_rows([pw, pw], axis=1)


def test_pack_q8_0_quantizes_matrices_only():
    w = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    tree = pack_q8_0({"w": jnp.asarray(w), "norm": jnp.ones(64), "odd": jnp.ones((2, 20))})
    assert isinstance(tree["w"], PackedWeight) and tree["w"].kind == "q8_0"
    assert not isinstance(tree["norm"], PackedWeight) and not isinstance(tree["odd"], PackedWeight)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(np.asarray(dequantize(tree["w"])), ref)
    assert np.abs(ref - w).max() <= np.abs(w).max() / 127  # half a step of the largest block scale, at most
