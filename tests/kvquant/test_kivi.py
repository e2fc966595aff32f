"""KIVI: the packed format of the spec (numpy reference), error bounds, bytes per token."""

import jax
import numpy as np
import pytest

from decodax.kvquant import kivi, packing, uniform

B, KV, S, D, GROUP = 2, 2, 64, 8, 4  # one shape for all of tests/kvquant: fewer compiles


def host(tree):
    """Library outputs as numpy arrays: eager jnp ops in the tests would each compile."""
    return jax.tree.map(np.asarray, tree)


def kv(seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, KV, S, D)).astype(np.float32)
    k[..., 3] *= 20.0  # an outlier channel, as in real key caches
    v = rng.standard_normal((B, KV, S, D)).astype(np.float32)
    return k, v


def reference(x: np.ndarray, bits: int, axis: int, group: int, scale, zero):
    """The packed KV format (decodax.kvquant.kivi) in numpy. ``scale``/``zero`` are checked against the formula to float
    rounding (XLA divides by the scalar 2^b - 1 as a reciprocal product, 1 ulp off numpy);
    codes are then recomputed from the stored ones, which is what a consumer sees."""
    a = axis % x.ndim
    shape = x.shape[:a] + (x.shape[a] // group, group) + x.shape[a + 1 :]
    g = x.reshape(shape)
    lo, hi = g.min(axis=a + 1), g.max(axis=a + 1)
    ref_scale = (hi - lo) / np.float32(2**bits - 1)
    ref_scale = np.where(ref_scale == 0, np.float32(1), ref_scale)
    np.testing.assert_array_equal(zero, lo)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    scale, zero = np.expand_dims(scale, a + 1), np.expand_dims(zero, a + 1)
    codes = np.clip(np.round((g - zero) / scale), 0, 2**bits - 1).astype(np.uint8)
    return codes.reshape(x.shape)


@pytest.mark.parametrize("bits", kivi.KIVI_BITS)
def test_format_matches_the_spec(bits):
    k, v = kv()
    q = host(kivi.quantize(k, v, bits, GROUP))
    assert (q.bits, q.group, q.head_dim) == (bits, GROUP, D)
    assert q.k_codes.shape == q.v_codes.shape == (B, KV, S, D * bits // 8)
    assert q.k_scale.shape == q.k_zero.shape == (B, KV, S // GROUP, D)
    assert q.v_scale.shape == q.v_zero.shape == (B, KV, S, 1)
    for codes, scale, zero, x, axis, group in (
        (q.k_codes, q.k_scale, q.k_zero, k, -2, GROUP),
        (q.v_codes, q.v_scale, q.v_zero, v, -1, D),
    ):
        assert codes.dtype == np.uint8 and scale.dtype == zero.dtype == np.float32
        ref_codes = reference(x, bits, axis, group, scale, zero)
        np.testing.assert_array_equal(packing.unpack(codes, bits), ref_codes)


@pytest.mark.parametrize("bits", kivi.KIVI_BITS)
def test_round_trip_within_half_a_step(bits):
    k, v = kv(1)
    q = kivi.quantize(k, v, bits, GROUP)
    k_hat, v_hat = host((kivi.dequantize_keys(q), kivi.dequantize_values(q)))
    k_scale, v_scale = host((q.k_scale, q.v_scale))
    slack = 1e-5 * np.abs(k).max()
    assert np.all(np.abs(k_hat - k) <= np.repeat(k_scale, GROUP, axis=-2) / 2 + slack)
    assert np.all(np.abs(v_hat - v) <= v_scale / 2 + slack)


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels():
    k, _ = kv(2)
    per_channel = host(kivi.dequantize_keys(kivi.quantize(k, k, 2, GROUP)))
    per_token = host(uniform.dequantize_asymmetric(*uniform.quantize_asymmetric(k, 2)))
    normal = np.arange(D) != 3  # the outlier channel stretches every per-token range
    err_channel = np.mean((per_channel - k)[..., normal] ** 2)
    assert err_channel < 0.1 * np.mean((per_token - k)[..., normal] ** 2)


def test_constant_blocks_round_trip_exactly():
    k = np.full((B, KV, S, D), -2.5, np.float32)
    q = kivi.quantize(k, k, 2, GROUP)
    np.testing.assert_array_equal(kivi.dequantize_keys(q), k)
    np.testing.assert_array_equal(kivi.dequantize_values(q), k)


def test_bytes_per_token():
    # D = 64, 4 bits, group 32: keys 32 + 2*64*4/32 = 48, values 32 + 8 = 40
    assert kivi.bytes_per_token(64, 4, 32) == 88.0
    assert kivi.bytes_per_token(64, 2, 32, kv_heads=3, layers=30) == (16 + 16 + 16 + 8) * 90
    assert 512 / kivi.bytes_per_token(64, 4, 32) >= 3.5  # the 4-bit memory target
    with_window = kivi.bytes_per_token(64, 4, 32, residual=128, context=1024)
    assert with_window == pytest.approx(88 * 896 / 1024 + 512 * 128 / 1024)


def test_traces_under_jit():
    k, v = kv()
    out = jax.eval_shape(lambda k, v: kivi.dequantize_keys(kivi.quantize(k, v, 2, GROUP)), k, v)
    assert out.shape == k.shape


def test_bad_input():
    k, v = kv()
    with pytest.raises(ValueError, match="bits"):
        kivi.quantize(k, v, 3, GROUP)
    with pytest.raises(ValueError, match="group size 5 does not divide"):
        kivi.quantize(k, v, 4, 5)
    with pytest.raises(ValueError, match="multiple of 4"):
        kivi.quantize_values(v[..., :6], 2)
    with pytest.raises(ValueError, match="same shape"):
        kivi.quantize(k, v[:1], 4, GROUP)
    with pytest.raises(ValueError, match="context"):
        kivi.bytes_per_token(64, 4, 32, residual=16)
    with pytest.raises(ValueError, match="bits"):
        kivi.bytes_per_token(64, 1, 32)
