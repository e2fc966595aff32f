"""Quality of generated digits: class accuracy under a classifier trained on real digits and
a Fréchet distance between feature Gaussians (the FID recipe of Heusel et al. 2017, "GANs
Trained by a Two Time-Scale Update Rule", with a feature space small enough for digits).

Feature space (:func:`pool_features`): every image is average-pooled to 8x8 (the resolution
of scikit-learn's digits, which the 32x32 tokenizer images were upsampled from) and
flattened, so real, reconstructed and generated images of any multiple-of-8 size share one
space. :class:`DigitMetrics` fits, on real training digits, a multinomial logistic regression
(scikit-learn) for accuracy and a PCA (``pca_dim`` components) whose projections feed the
Fréchet distance ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (``scipy.linalg.sqrtm``).
Reference figures: the classifier's accuracy on held-out real digits, and the Fréchet
distance of a real sample to held-out real digits (the floor at that sample size).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jaxtyping import Float, Int

__all__ = ["DigitMetrics", "frechet_distance", "pool_features"]


def pool_features(images: Float[np.ndarray, "N H W *C"], size: int = 8) -> Float[np.ndarray, "N F"]:
    """Images ``[N, H, W]`` or ``[N, H, W, 1]`` (``H, W`` multiples of ``size``) average-pooled to
    ``size x size`` and flattened: ``float64 [N, size * size]``."""
    x = np.asarray(images, np.float64)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"pool_features: expected one channel, got shape {x.shape}")
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1] % size or x.shape[2] % size or len(x) == 0:
        raise ValueError(f"pool_features: images must be [N>0, H, W(, 1)] with H, W multiples of {size}, "
                         f"got {x.shape}")
    n, h, w = x.shape
    return x.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4)).reshape(n, size * size)


def frechet_distance(a: Float[np.ndarray, "N D"], b: Float[np.ndarray, "M D"]) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples); the
    matrix square root by ``scipy.linalg.sqrtm`` (imaginary round-off dropped)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: need [N>=2, D] and [M>=2, D] features, got {a.shape}, {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.all(np.isfinite(covmean)):  # singular product: regularise (as the FID reference code)
        eps = 1e-6 * np.eye(len(s_a))
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


@dataclasses.dataclass
class DigitMetrics:
    """A digit classifier and a PCA feature space fitted on real digits (:meth:`fit`)."""

    classifier: Any
    pca: Any

    @classmethod
    def fit(cls, images: Float[np.ndarray, "N H W *C"], labels: Int[np.ndarray, " N"], *, pca_dim: int = 20,
            seed: int = 0) -> "DigitMetrics":
        """Logistic regression (lbfgs, ``C = 1``) and PCA(``pca_dim``) on the pooled features."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        x, y = pool_features(images), np.asarray(labels)
        if len(x) != len(y):
            raise ValueError(f"DigitMetrics.fit: {len(x)} images but {len(y)} labels")
        if not 1 <= pca_dim <= min(x.shape):
            raise ValueError(f"DigitMetrics.fit: pca_dim must be in [1, {min(x.shape)}], got {pca_dim}")
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
        pca = PCA(pca_dim, random_state=seed).fit(x)
        return cls(clf, pca)

    def predict(self, images: Float[np.ndarray, "N H W *C"]) -> Int[np.ndarray, " N"]:
        return self.classifier.predict(pool_features(images)).astype(np.int32)

    def accuracy(self, images: Float[np.ndarray, "N H W *C"], labels: Int[np.ndarray, " N"]) -> float:
        """Fraction of ``images`` the classifier assigns to ``labels`` (for generated digits: the
        class they were conditioned on)."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def features(self, images: Float[np.ndarray, "N H W *C"]) -> Float[np.ndarray, "N D"]:
        return self.pca.transform(pool_features(images))

    def frechet(self, images: Float[np.ndarray, "N H W *C"], reference: Float[np.ndarray, "M H W *C"]) -> float:
        """Fréchet distance between ``images`` and ``reference`` in the PCA feature space."""
        return frechet_distance(self.features(images), self.features(reference))
