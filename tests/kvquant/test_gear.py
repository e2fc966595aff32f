"""GEAR: dense + low-rank + sparse beats plain quantization, improves with rank, keeps outliers."""

import jax
import numpy as np
import pytest

from decodax.kvquant import gear, uniform

B, KV, S, D = 2, 2, 64, 8  # one shape for all of tests/kvquant: fewer compiles
FRAC = 0.02  # one outlier count for every test: one compiled top-k
# rbg: a threefry draw costs seconds of compile time on these 2 busy cores; any key works
KEY = jax.random.key(0, impl="rbg")


def block(seed: int = 0) -> np.ndarray:
    """Keys-like: a few shared directions (low rank), noise, and rare large outliers."""
    rng = np.random.default_rng(seed)
    u, w = rng.standard_normal((B, KV, S, 2)), rng.standard_normal((B, KV, 2, D)) * 3
    x = u @ w + 0.3 * rng.standard_normal((B, KV, S, D))
    spikes = rng.random((B, KV, S, D)) < 0.01
    return np.where(spikes, 25 * rng.standard_normal((B, KV, S, D)), x).astype(np.float32)


def err(x_hat, x) -> float:
    return float(np.linalg.norm(np.asarray(x_hat) - x))


@pytest.mark.parametrize("bits, axis, group", [(2, -1, None), (4, -2, 4)])  # per token; KIVI keys
def test_beats_plain_quantization_at_the_same_bits(bits, axis, group):
    x = block()
    q = uniform.quantize_asymmetric(x, bits, axis=axis, group=group)
    plain = uniform.dequantize_asymmetric(*q, axis=axis)
    g = gear.compress(x, KEY, bits=bits, rank=2, outlier_frac=FRAC, axis=axis, group=group)
    assert g.scale.shape == q.scale.shape and g.axis == axis and g.bits == bits
    assert err(gear.decompress(g), x) < 0.75 * err(plain, x)


def test_error_decreases_with_rank():
    x = block(1)
    errs = [err(gear.decompress(gear.compress(x, KEY, bits=2, rank=r, outlier_frac=FRAC)), x)
            for r in (1, 2, 4)]
    plain = err(uniform.dequantize_asymmetric(*uniform.quantize_asymmetric(x, 2)), x)
    assert plain > errs[0] > errs[1] > errs[2], (plain, errs)


def test_without_rank_and_outliers_it_is_plain_quantization():
    x = block(5)
    g = gear.compress(x, KEY, bits=2, rank=0, outlier_frac=0.0)
    assert g.a.shape == (B, KV, S, 0) and g.outlier_idx.shape == (B, KV, 0)
    plain = uniform.dequantize_asymmetric(*uniform.quantize_asymmetric(x, 2))
    np.testing.assert_array_equal(gear.decompress(g), plain)


def test_outliers_are_exact_and_the_format_is_packed():
    x = block(2)
    g = gear.compress(x, KEY, bits=2, rank=1, outlier_frac=FRAC)
    count = int(np.ceil(FRAC * S * D))
    assert g.outlier_idx.shape == g.outlier_val.shape == (B, KV, count)
    assert g.codes.shape == (B, KV, S, D // 4) and g.codes.dtype == np.uint8
    assert g.a.shape == (B, KV, S, 1) and g.b.shape == (B, KV, D, 1)
    flat_x, flat_hat = x.reshape(B, KV, -1), np.asarray(gear.decompress(g)).reshape(B, KV, -1)
    idx = np.asarray(g.outlier_idx)
    kept = np.take_along_axis(flat_x, idx, -1)
    np.testing.assert_array_equal(np.take_along_axis(flat_hat, idx, -1), kept)
    # they are the largest magnitudes of each block
    smallest_kept = np.abs(kept).min(-1, keepdims=True)
    assert np.sum(np.abs(flat_x) > smallest_kept) <= idx.size


def test_traces_under_jit():
    x = block(3)
    out = jax.eval_shape(lambda x, key: gear.decompress(gear.compress(x, key, bits=4, rank=2)), x, KEY)
    assert out.shape == x.shape


def test_power_iteration_recovers_a_low_rank_matrix():
    rng = np.random.default_rng(4)
    r = (rng.standard_normal((B, KV, S, 2)) @ rng.standard_normal((B, KV, 2, D))).astype(np.float32)
    a, b = map(np.asarray, gear.low_rank(r, 2, KEY))
    np.testing.assert_allclose(a @ np.swapaxes(b, -1, -2), r, atol=1e-4)
    eye = np.broadcast_to(np.eye(2), (B, KV, 2, 2))
    np.testing.assert_allclose(np.swapaxes(a, -1, -2) @ a, eye, atol=1e-5)


def test_bytes_per_token():
    # D = 64, 4 bits, KIVI dense part (group 32) 88 B; rank 4 over 1024 tokens: 2*(1088*4*4)/1024;
    # 1% outliers: 2 * ceil(655.36) * 8 / 1024
    got = gear.bytes_per_token(64, 4, 4, 1024, group=32)
    assert got == pytest.approx(88 + 2 * 1088 * 16 / 1024 + 2 * 656 * 8 / 1024)
    assert 512 / got >= 3.5


def test_bad_input():
    x = block()
    with pytest.raises(ValueError, match="bits"):
        gear.compress(x, KEY, bits=3, rank=1)
    with pytest.raises(ValueError, match="rank"):
        gear.compress(x, KEY, bits=2, rank=D + 1)
    with pytest.raises(ValueError, match="outlier_frac"):
        gear.compress(x, KEY, bits=2, rank=1, outlier_frac=1.0)
    with pytest.raises(ValueError, match="axis"):
        gear.compress(x, KEY, bits=2, rank=1, axis=0)
    with pytest.raises(ValueError, match="does not divide"):
        gear.compress(x, KEY, bits=2, rank=1, axis=-2, group=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        gear.compress(x[..., :6], KEY, bits=2, rank=1)
    with pytest.raises(ValueError, match="iterations"):
        gear.low_rank(x, 1, KEY, iters=0)
    with pytest.raises(ValueError, match="context"):
        gear.bytes_per_token(64, 4, 4, 0, group=32)
