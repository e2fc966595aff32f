"""Image generation over VQ tokens: a class-conditional autoregressive transformer over a
tokenizer's code grid (sampled by any decodax decoder, e.g. Speculative Jacobi Decoding with
:class:`~decodax.jacobi.init.SpatialInit`) and digit-quality metrics (classifier accuracy,
Fréchet distance); Neighboring Autoregressive Modeling (NAR: near-to-far parallel steps with
horizontal / vertical heads, ``h + w - 1`` forwards per grid)."""

from decodax.images.ar import (ImageLayout, ImageModel, code_loss, image_model, load_image_model, sample_codes,
                               save_image_model, train_image_model)
from decodax.images.metrics import DigitMetrics, frechet_distance, pool_features
from decodax.images.nar import (VERTICAL_HEAD, cell_logits, load_nar_model, nar_logits, nar_loss, nar_mask,
                                nar_params, sample_nar, save_nar_model, train_nar_model)

__all__ = [
    "DigitMetrics",
    "ImageLayout",
    "ImageModel",
    "VERTICAL_HEAD",
    "cell_logits",
    "code_loss",
    "frechet_distance",
    "image_model",
    "load_image_model",
    "load_nar_model",
    "nar_logits",
    "nar_loss",
    "nar_mask",
    "nar_params",
    "pool_features",
    "sample_codes",
    "sample_nar",
    "save_image_model",
    "save_nar_model",
    "train_image_model",
    "train_nar_model",
]
