"""KVQuant: k-means datatype, dense-and-sparse outliers, attention sink, bytes per token."""

import jax
import numpy as np
import pytest

from decodax.kvquant import kvquant, uniform

B, KV, S, D = 2, 2, 64, 8  # 2048 values: every fit below shares one shape


def heavy_tailed(seed: int, shape=(B, KV, S, D)) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(df=3, size=shape).astype(np.float32)


def host(tree):
    """Library outputs as numpy arrays: eager jnp ops in the tests would each compile."""
    return jax.tree.map(np.asarray, tree)


def mse(a, b) -> float:
    return float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))


def nearest(x, c) -> np.ndarray:
    """Each value replaced by its nearest centroid (numpy indexing: no extra compile)."""
    return np.asarray(c)[np.asarray(kvquant.assign(x, c))]


def test_kmeans_beats_uniform_on_student_t_at_3_bits():
    x = heavy_tailed(0, (2048,))
    # uniform.quantize_asymmetric's 3-bit grid over the whole sample, in numpy (no extra compile)
    step = (x.max() - x.min()) / 7
    uniform_hat = np.round((x - x.min()) / step) * step + x.min()
    c = kvquant.fit_centroids(x, 3)
    kmeans_hat = nearest(x, c)
    assert c.shape == (8,) and np.all(np.diff(c) > 0)
    assert mse(kmeans_hat, x) < 0.5 * mse(uniform_hat, x)


def test_lloyd_iterations_improve_on_the_quantile_start_and_are_deterministic():
    x = heavy_tailed(1, (2048,))
    start = np.quantile(x, (np.arange(8) + 0.5) / 8).astype(np.float32)  # the initial centroids
    fitted = kvquant.fit_centroids(x, 3)
    assert mse(nearest(x, fitted), x) < mse(nearest(x, start), x)
    np.testing.assert_array_equal(kvquant.fit_centroids(x, 3), fitted)


def test_sensitivity_weighting_moves_centroids_to_the_sensitive_values():
    x = heavy_tailed(2, (2048,))
    fisher = np.where(x > 1.0, 100.0, 1.0).astype(np.float32)  # e.g. squared gradients

    def weighted_error(c):
        return float(np.sum(fisher * (nearest(x, c) - x) ** 2))

    weighted = kvquant.fit_centroids(x, 3, weights=fisher)
    plain = kvquant.fit_centroids(x, 3)
    assert weighted_error(weighted) < 0.8 * weighted_error(plain)
    # zero weights drop values from the fit altogether
    inside = kvquant.fit_centroids(x, 3, weights=(np.abs(x) <= 1).astype(np.float32))
    assert np.all(np.abs(inside) <= 1)


def calibrated_centroids(bits: int, axis: int = -2) -> np.ndarray:
    """Centroids for keys (``axis=-2``, per-channel normalisation) or values (-1, per token)."""
    calib = heavy_tailed(3)
    lo, hi = kvquant.thresholds(calib, axis=axis)
    xn = kvquant.normalise(calib, lo, hi)
    return kvquant.fit_centroids(xn, bits, weights=(np.abs(xn) <= 1).astype(np.float32))


@pytest.mark.parametrize("axis", [-2, -1])
def test_dense_and_sparse_keeps_outliers_and_the_sink_exact(axis):
    x = heavy_tailed(4)
    x[:, :, 0] = 1e3  # a huge attention-sink token: exact, and no effect on the thresholds
    x[0, 1, 7, 2] = -500.0
    c = calibrated_centroids(3)
    q = host(kvquant.quantize(x, c, axis=axis))
    x_hat = np.asarray(kvquant.dequantize(q))
    lo, hi = q.lo, q.hi
    np.testing.assert_array_equal(x_hat[:, :, :1], x[:, :, :1])
    outlier = (x < lo) | (x > hi)
    outlier[:, :, 0] = False
    per_block = outlier.reshape(B, KV, -1).sum(-1)
    assert per_block.sum() > 0 and per_block.max() <= q.outlier_idx.shape[-1]  # the default capacity
    np.testing.assert_array_equal(x_hat[outlier], x[outlier])
    # inliers: within the distance to the nearest centroid, scaled back
    c = np.asarray(c)
    gaps = np.diff(c)
    reach = max(gaps.max() / 2, 1 + float(c[0]), 1 - float(c[-1]))
    half = np.broadcast_to((hi - lo) / 2, x.shape)
    inlier = ~outlier
    inlier[:, :, 0] = False
    assert np.all(np.abs(x_hat - x)[inlier] <= reach * half[inlier] + 1e-5 * np.abs(x).max())


def test_sink_is_left_out_of_the_per_channel_thresholds():
    x = heavy_tailed(5)
    lo, hi = map(np.asarray, kvquant.thresholds(x, axis=-2, sink=1))
    x[:, :, 0] = 1e3
    lo2, hi2 = map(np.asarray, kvquant.thresholds(x, axis=-2, sink=1))
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)
    assert lo.shape == (B, KV, 1, D)


def test_keys_values_and_calibrated_bounds():
    k, v = heavy_tailed(6), heavy_tailed(7)
    lo, hi = kvquant.thresholds(heavy_tailed(3), axis=-2)  # offline per-channel key thresholds
    qk = kvquant.quantize_keys(k, calibrated_centroids(3), bounds=(lo, hi), capacity=16)
    qv = kvquant.quantize_values(v, calibrated_centroids(3, axis=-1))
    assert qk.codes.dtype == np.uint8 and np.asarray(qk.codes).max() < 8
    assert qk.outlier_idx.shape == (B, KV, 16) and qv.lo.shape == (B, KV, S, 1)
    assert mse(kvquant.dequantize(qk), k) < 0.1 * np.var(k)  # 3 bits, Student-t keys
    # the k-means datatype beats 3-bit min/max codes with the same (per-token) groups
    plain = uniform.dequantize_asymmetric(*uniform.quantize_asymmetric(v, 3))
    assert mse(kvquant.dequantize(qv), v) < mse(plain, v)


def test_traces_under_jit():
    x, c = heavy_tailed(10), np.linspace(-1, 1, 8, dtype=np.float32)
    out = jax.eval_shape(lambda x, c: kvquant.dequantize(kvquant.quantize_keys(x, c)), x, c)
    assert out.shape == x.shape
    assert jax.eval_shape(lambda x: kvquant.fit_centroids(x, 3), x).shape == (8,)


def test_bytes_per_token():
    # D = 64, 4 bits, 1024 tokens: codes 64, stats 0.5 + 8, sparse 2 * 0.01 * 64 * 8, sink 0.5
    got = kvquant.bytes_per_token(64, 4, 1024)
    assert got == pytest.approx(64 + 0.5 + 8 + 10.24 + 0.5)
    assert 512 / got >= 3.5


def test_bad_input():
    x = heavy_tailed(9)
    c = np.linspace(-1, 1, 4, dtype=np.float32)
    with pytest.raises(ValueError, match="bits"):
        kvquant.fit_centroids(x, 5)
    with pytest.raises(ValueError, match="iters"):
        kvquant.fit_centroids(x, 2, iters=0)
    with pytest.raises(ValueError, match="weights"):
        kvquant.fit_centroids(x, 2, weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="centroids"):
        kvquant.quantize(x, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="axis"):
        kvquant.quantize(x, c, axis=0)
    with pytest.raises(ValueError, match="outlier_frac"):
        kvquant.quantize(x, c, outlier_frac=1.0)
    with pytest.raises(ValueError, match="sink"):
        kvquant.quantize(x, c, sink=S)
    with pytest.raises(ValueError, match="sink"):
        kvquant.quantize(x, c, sink=-1, bounds=(x[..., :1, :], x[..., :1, :]))
    with pytest.raises(ValueError, match="capacity"):
        kvquant.quantize(x, c, capacity=S * D)
    with pytest.raises(ValueError, match="bits"):
        kvquant.bytes_per_token(64, 8, 1024)
