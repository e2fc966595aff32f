"""decodax.images.metrics: pooling, the Fréchet distance's closed form, the digit classifier."""

from __future__ import annotations

import numpy as np
import pytest

from decodax.images.metrics import DigitMetrics, frechet_distance, pool_features


def test_pool_features():
    x = np.zeros((2, 16, 16, 1))
    x[0, :2, :2] = 1.0
    f = pool_features(x)
    assert f.shape == (2, 64) and f[0, 0] == 1.0 and f.sum() == 1.0
    for bad in (np.zeros((2, 12, 12)), np.zeros((2, 16, 16, 3)), np.zeros((0, 8, 8))):
        with pytest.raises(ValueError):
            pool_features(bad)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + 1.0
    # |mu|^2 = 3, tr(I + 4I - 2 * 2I) = 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_digit_classifier_on_real_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images / 16.0, np.ones((4, 4)))  # 32x32 blocks pool back exactly to 8x8
    m = DigitMetrics.fit(x[:1400], d.target[:1400])
    assert m.accuracy(x[1400:], d.target[1400:]) > 0.9
    assert m.frechet(x[:300], x[1400:]) < m.frechet(np.random.default_rng(0).random(x[:300].shape), x[1400:])
