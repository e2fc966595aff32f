"""Constants and the tiny-model builder shared by the strategy tests (fixtures in conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from decodax.model.config import tiny_config
from decodax.model.transformer import Model

EOS = 91  # the tiny model's EOS id
PROMPTS = [[5, 17, 3, 88, 41, 5, 17], [9, 8, 7, 6], [42, 42]]
N = 10  # max_new_tokens of every test
ROWS, WIDTH = 4, 24  # the reference forward's static shape


def tiny_model(n_layers: int, seed: int, name: str = "tiny"):
    """A tiny model and params drawn with numpy in ``Model.init``'s shapes and law (its eager
    Flax init takes ~8 s here); numpy until the end: eager jax ops would each compile."""
    model = Model(tiny_config(vocab_size=97, n_layers=n_layers, eos_ids=(EOS,), tie_embeddings=False, name=name))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return np.ones(leaf.shape, np.float32)
        return rng.normal(0.0, 0.2 if "lm_head" in name else 0.02, leaf.shape).astype(np.float32)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    return model, jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))
