import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model


@pytest.fixture(scope="module")
def tiny():
    model = Model(tiny_config(vocab_size=61, n_layers=3))
    return model, model.init(jax.random.key(0))


def _full(model, params, tokens, capacity=32):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return jax.jit(model.apply)(params, tokens, pos, kv.init_cache(model.config, b, capacity))


def test_incremental_decoding_equals_full_forward(tiny):
    model, params = tiny
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 61)
    full = _full(model, params, tokens).logits
    c = kv.init_cache(model.config, 2, 32)
    apply = jax.jit(model.apply)
    out = apply(params, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)), c)
    c = kv.commit(out.cache, 5)
    for i in range(5, 9):
        step = apply(params, tokens[:, i : i + 1], jnp.full((2, 1), i), c)
        np.testing.assert_allclose(step.logits[:, 0], full[:, i], atol=1e-5)
        c = kv.commit(step.cache, 1)


def test_tree_mask_equals_separate_chains(tiny):
    """Two branches fed as one tree with an ancestor mask give each chain's logits."""
    model, params = tiny
    prefix = jnp.array([[5, 6, 7]])
    a, b = [8, 9], [10, 11]
    c = kv.commit(_full(model, params, prefix).cache, 3)
    tokens = jnp.array([[8, 9, 10, 11]])
    pos = jnp.array([[3, 4, 3, 4]])
    mask = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)[None]
    tree = jax.jit(model.apply)(params, tokens, pos, c, attn_mask=mask).logits
    for branch, sl in ((a, slice(0, 2)), (b, slice(2, 4))):
        chain = _full(model, params, jnp.array([[5, 6, 7] + branch])).logits[:, 3:]
        np.testing.assert_allclose(tree[:, sl], chain, atol=1e-5)


def test_exit_layer_logits_at_and_hidden(tiny):
    model, params = tiny
    tokens = jnp.array([[3, 4, 5, 6]])
    pos = jnp.arange(4)[None]
    c = kv.init_cache(model.config, 1, 8)
    full = model.apply(params, tokens, pos, c)
    sel = model.apply(params, tokens, pos, c, logits_at=jnp.array([[3, 1]]))
    np.testing.assert_allclose(sel.logits[0], full.logits[0, jnp.array([3, 1])], atol=1e-6)
    early = model.apply(params, tokens, pos, c, exit_layer=1)
    shallow = Model(model.config)
    one_layer = dict(params, layers=params["layers"][:1])
    ref = jax.jit(lambda p: _ref_one_layer(shallow, p, tokens))(one_layer)
    np.testing.assert_allclose(early.hidden, ref, atol=1e-5)
    # only the first layer's cache entries are written
    assert float(jnp.abs(early.cache.k[1:]).max()) == 0.0
    assert float(jnp.abs(early.cache.k[0, 0, :, :4]).max()) > 0.0
    with pytest.raises(ValueError, match="exit_layer"):
        model.apply(params, tokens, pos, c, exit_layer=4)


def _ref_one_layer(model, params, tokens):
    from decodax.model.transformer import Block

    cfg = model.config
    x = params["embed"][tokens]
    mask = jnp.tril(jnp.ones((4, 4), bool))[None]
    out, _, _ = Block(cfg).apply({"params": params["layers"][0]}, x, jnp.arange(4)[None], None, mask)
    return out


def test_jit_vmap_apply(tiny):
    model, params = tiny
    tokens = jax.random.randint(jax.random.key(2), (3, 1, 6), 0, 61)
    pos = jnp.broadcast_to(jnp.arange(6), (3, 1, 6))
    cache = kv.init_cache(model.config, 1, 8)
    f = jax.jit(jax.vmap(lambda t, p: model.apply(params, t, p, cache).logits))
    out = f(tokens, pos)
    for i in range(3):
        np.testing.assert_allclose(out[i], _full(model, params, tokens[i], 8).logits, atol=1e-5)


def test_untied_head_and_param_shapes():
    model = Model(tiny_config(tie_embeddings=False))
    params = model.init(jax.random.key(0))
    assert params["lm_head"].shape == (64, 32)
    assert len(params["layers"]) == 2
    assert params["layers"][0]["wqkv"].shape == ((4 + 2 * 2) * 8, 32)
    out = _full(model, params, jnp.array([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 64)
