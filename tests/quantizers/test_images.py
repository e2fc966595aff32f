"""Bundled images: scikit-learn digits upsampled, scikit-image patches (deterministic, split
regions disjoint), the seeded train/test split."""

import numpy as np
import pytest

from decodax.quantizers import images


def test_digit_images():
    x, y = images.digit_images(16)
    assert x.shape == (1797, 16, 16, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    x8, _ = images.digit_images(8)
    from sklearn.datasets import load_digits
    np.testing.assert_allclose(x8[..., 0], load_digits().images / 16.0, rtol=1e-6)
    with pytest.raises(ValueError):
        images.digit_images(0)


def test_image_patches_deterministic_and_split():
    a = images.image_patches(8, 6, seed=3, split="train")
    assert a.shape == (6, 8, 8, 3) and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, images.image_patches(8, 6, seed=3, split="train"))
    assert not np.array_equal(a, images.image_patches(8, 6, seed=4, split="train"))
    # every test patch lies in the bottom quarter of its photograph, every train patch above it
    im = images.skimage_image("astronaut")
    cut = int(round(im.shape[0] * (1 - images.TEST_FRACTION)))
    windows = np.lib.stride_tricks.sliding_window_view(im, (8, 8, 3))[:, :, 0]  # [rows, cols, 8, 8, 3]
    for split, ok in (("test", lambda r: r >= cut), ("train", lambda r: r + 8 <= cut)):
        for p in images.image_patches(8, 3, seed=0, split=split, images=("astronaut",)):
            rows = np.nonzero(np.all(windows == p, axis=(2, 3, 4)))[0]
            assert any(ok(r) for r in rows), split
    with pytest.raises(ValueError):
        images.image_patches(8, 2, seed=0, split="valid")
    with pytest.raises(ValueError):
        images.skimage_image("not-an-image")


def test_train_test_split():
    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    xtr, xte, ytr, yte = images.train_test_split(x, y, test_fraction=0.3, seed=1)
    assert len(xte) == 3 and len(xtr) == 7 and sorted(np.r_[ytr, yte].tolist()) == list(range(10))
    np.testing.assert_array_equal(xte[:, 0] // 2, yte)
    assert np.array_equal(yte, images.train_test_split(y, test_fraction=0.3, seed=1)[1])
    with pytest.raises(ValueError):
        images.train_test_split(x, y[:5])
    with pytest.raises(ValueError):
        images.train_test_split(x, test_fraction=1.0)
