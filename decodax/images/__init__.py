"""Image generation over VQ tokens: a class-conditional autoregressive transformer over a
tokenizer's code grid (sampled by any decodax decoder, e.g. Speculative Jacobi Decoding with
:class:`~decodax.jacobi.init.SpatialInit`) and digit-quality metrics (classifier accuracy,
Fréchet distance)."""

from decodax.images.ar import (ImageLayout, ImageModel, code_loss, image_model, load_image_model, sample_codes,
                               save_image_model, train_image_model)
from decodax.images.metrics import DigitMetrics, frechet_distance, pool_features

__all__ = [
    "DigitMetrics",
    "ImageLayout",
    "ImageModel",
    "code_loss",
    "frechet_distance",
    "image_model",
    "load_image_model",
    "pool_features",
    "sample_codes",
    "save_image_model",
    "train_image_model",
]
