"""Real images that ship with the installed libraries, for training VQ tokenizers offline.

* :func:`digit_images` -- scikit-learn's ``load_digits`` (UCI optical recognition of
  handwritten digits: 1797 grey 8x8 images, 16 intensity levels), scaled to ``[0, 1]`` and
  upsampled bilinearly (``jax.image.resize``) to ``size x size`` with one channel;
* :func:`image_patches` -- random ``size x size`` RGB patches of the colour photographs
  bundled inside scikit-image (:data:`SKIMAGE_IMAGES`; no download), with a spatial
  train/test split so that test patches never overlap a training patch;
* :func:`train_test_split` -- a deterministic (seeded permutation) split of any arrays.

Nothing here touches the network: both libraries ship these files in their wheels.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = ["SKIMAGE_IMAGES", "digit_images", "image_patches", "skimage_image", "train_test_split"]

# colour photographs inside scikit-image's wheel (skimage/data/*.png|jpg), loaded without pooch
SKIMAGE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.25  # bottom quarter of each photograph's rows holds the test patches


def _check_size(size: int, what: str) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"{what}: size must be a positive integer, got {size}")
    return int(size)


def digit_images(size: int = 32) -> tuple[Float[np.ndarray, "N size size 1"], Int[np.ndarray, "N"]]:
    """scikit-learn's 1797 handwritten digits as ``float32 [N, size, size, 1]`` in ``[0, 1]``
    (pixel / 16, bilinear upsampling from 8x8, clipped) and their ``int32`` labels ``[N]``."""
    size = _check_size(size, "digit_images")
    return _digits(size)


@lru_cache(maxsize=4)
def _digits(size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = jnp.asarray(d.images, jnp.float32)[..., None] / 16.0
    if size != 8:
        x = jax.image.resize(x, (x.shape[0], size, size, 1), method="bilinear")
    x = np.clip(np.asarray(x), 0.0, 1.0).astype(np.float32)
    x.flags.writeable = False
    y = np.asarray(d.target, np.int32)
    y.flags.writeable = False
    return x, y


@lru_cache(maxsize=len(SKIMAGE_IMAGES))
def skimage_image(name: str) -> Float[np.ndarray, "H W 3"]:
    """One bundled scikit-image photograph as ``float32 [H, W, 3]`` in ``[0, 1]``."""
    import skimage.data

    if name not in SKIMAGE_IMAGES:
        raise ValueError(f"skimage_image: unknown image {name!r}; choose from {SKIMAGE_IMAGES}")
    im = np.asarray(getattr(skimage.data, name)())
    if im.ndim != 3 or im.shape[-1] < 3:
        raise ValueError(f"skimage_image: {name} is not an RGB image (shape {im.shape})")
    im = (im[..., :3].astype(np.float32) / 255.0)
    im.flags.writeable = False
    return im


def image_patches(
    size: int, n: int, seed: int, *, split: str = "all", images: tuple[str, ...] = SKIMAGE_IMAGES
) -> Float[np.ndarray, "n size size 3"]:
    """``n`` random ``size x size`` RGB patches in ``[0, 1]``, ``float32 [n, size, size, 3]``.

    Each patch picks a photograph uniformly from ``images`` and a uniform top-left corner,
    all from ``numpy.random.default_rng(seed)`` (deterministic). ``split``: ``"train"`` draws
    from the top ``1 - TEST_FRACTION`` of each photograph's rows, ``"test"`` from the bottom
    ``TEST_FRACTION`` (disjoint pixels, so no test patch overlaps a training patch), ``"all"``
    from the whole photograph.
    """
    size = _check_size(size, "image_patches")
    if int(n) != n or n < 0:
        raise ValueError(f"image_patches: n must be a non-negative integer, got {n}")
    if split not in SPLITS:
        raise ValueError(f"image_patches: split must be one of {SPLITS}, got {split!r}")
    if not images:
        raise ValueError("image_patches: no images to draw from")
    rng = np.random.default_rng(seed)
    ims = [skimage_image(name) for name in images]
    regions = []
    for im in ims:
        cut = int(round(im.shape[0] * (1.0 - TEST_FRACTION)))
        lo, hi = {"train": (0, cut), "test": (cut, im.shape[0]), "all": (0, im.shape[0])}[split]
        if hi - lo < size or im.shape[1] < size:
            raise ValueError(f"image_patches: a {size}x{size} patch does not fit the {split} region "
                             f"of an image of shape {im.shape}")
        regions.append((lo, hi))
    which = rng.integers(0, len(ims), n)
    out = np.empty((n, size, size, 3), np.float32)
    for i, k in enumerate(which):
        (lo, hi), im = regions[k], ims[k]
        r = rng.integers(lo, hi - size + 1)
        c = rng.integers(0, im.shape[1] - size + 1)
        out[i] = im[r:r + size, c:c + size]
    return out


def train_test_split(*arrays: np.ndarray | Array, test_fraction: float = 0.2, seed: int = 0) -> list[np.ndarray]:
    """Deterministic split of arrays sharing their first axis: ``[a_train, a_test, b_train,
    b_test, ...]`` from one permutation drawn by ``numpy.random.default_rng(seed)``; the test
    part is the first ``round(test_fraction * N)`` permuted rows (at least one of each part)."""
    if not arrays:
        raise ValueError("train_test_split: no arrays given")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"train_test_split: test_fraction must lie in (0, 1), got {test_fraction}")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"train_test_split: arrays differ in length: {[len(a) for a in arrays]}")
    if n < 2:
        raise ValueError(f"train_test_split: need at least 2 rows, got {n}")
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    out = []
    for a in arrays:
        a = np.asarray(a)
        out += [a[train], a[test]]
    return out
