"""Codebook utilization, code perplexity, MSE and PSNR on cases with known values."""

import numpy as np

from decodax.quantizers import metrics
from jax import jit


@jit
def _metrics(codes, mask, x, y):
    return {
        "util": metrics.utilization(codes, 8),
        "perp": metrics.code_perplexity(codes, 8),
        "util_masked": metrics.utilization(codes, 8, mask),
        "perp_masked": metrics.code_perplexity(codes, 8, mask),
        "hist": metrics.code_histogram(codes, 4),
        "mse": metrics.mse(x, y),
        "psnr": metrics.psnr(x, y),
        "psnr255": metrics.psnr(255 * x, 255 * y, data_range=255.0),
    }


def test_known_values():
    codes = np.array([[0, 1, 2, 3], [0, 1, 2, 3]], np.int32)  # 4 of 8 codes, equally often
    mask = np.array([[True, True, False, False], [True, True, False, False]])
    x = np.zeros((3, 4), np.float32)
    r = _metrics(codes, mask, x, x + 0.1)
    np.testing.assert_allclose(r["util"], 0.5)
    np.testing.assert_allclose(r["perp"], 4.0, rtol=1e-6)  # exp(entropy) = the number of codes in use
    np.testing.assert_allclose(r["util_masked"], 0.25)
    np.testing.assert_allclose(r["perp_masked"], 2.0, rtol=1e-6)
    np.testing.assert_array_equal(r["hist"], [2, 2, 2, 2])
    np.testing.assert_allclose(r["mse"], 0.01, rtol=1e-5)
    np.testing.assert_allclose(r["psnr"], 20.0, rtol=1e-5)
    np.testing.assert_allclose(r["psnr255"], 20.0, rtol=1e-5)
    one = _metrics(np.zeros_like(codes), mask, x, x + 0.1)
    np.testing.assert_allclose(one["perp"], 1.0)
    np.testing.assert_allclose(one["util"], 1 / 8)
