import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.model import cache as kv
from decodax.model.config import tiny_config


def _filled(cache, t, seed=0):
    c = cache
    shape = (c.num_layers, c.batch, t, c.k.shape[2], c.k.shape[4])  # token-major, as the model emits
    k = jax.random.normal(jax.random.key(seed), shape)
    v = jax.random.normal(jax.random.key(seed + 1), shape)
    return jax.jit(kv.write)(c, k, v), k, v


def _slot_major(x):
    """[L, B, T, K, D] (model order) -> [L, B, K, T, D] (cache order)."""
    return jnp.swapaxes(x, 2, 3)


def test_write_does_not_commit_and_commit_is_per_row():
    c = kv.init_cache(tiny_config(), batch=3, capacity=16)
    c2, k, _ = _filled(c, 4)
    assert c2.length.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(c2.k[:, :, :, :4], _slot_major(k))
    c3 = kv.commit(c2, jnp.array([1, 4, 0]))
    assert c3.length.tolist() == [1, 4, 0]
    # the next write goes after each row's own length
    c4, k2, _ = _filled(c3, 2, seed=7)
    np.testing.assert_array_equal(c4.k[:, 0, :, 1:3], _slot_major(k2)[:, 0])
    np.testing.assert_array_equal(c4.k[:, 1, :, 4:6], _slot_major(k2)[:, 1])
    np.testing.assert_array_equal(c4.k[:, 1, :, :4], _slot_major(k)[:, 1])  # committed untouched


def test_rollback_restores_committed_state():
    c = kv.init_cache(tiny_config(), batch=2, capacity=8)
    c, _, _ = _filled(c, 3)
    c = kv.commit(c, jnp.array([3, 2]))
    snapshot = jax.tree.map(lambda x: x, c)
    c2, _, _ = _filled(c, 4, seed=3)
    c2 = kv.commit(c2, jnp.array([4, 1]))
    back = kv.rollback(c2, snapshot.length)
    assert back.length.tolist() == [3, 2]
    for b, n in enumerate([3, 2]):
        np.testing.assert_array_equal(back.k[:, b, :, :n], snapshot.k[:, b, :, :n])


def test_gather_moves_tree_path_and_commits():
    c = kv.init_cache(tiny_config(), batch=2, capacity=12)
    c = kv.commit(_filled(c, 2)[0], jnp.array([2, 1]))
    c, k, _ = _filled(c, 5, seed=11)  # 5 tree nodes at slots length..length+5
    src = jnp.array([[0, 2, 4], [1, 3, 0]])
    out = jax.jit(kv.gather)(c, src, jnp.array([3, 2]))
    assert out.length.tolist() == [5, 3]
    k = _slot_major(k)
    np.testing.assert_array_equal(out.k[:, 0, :, 2:5], jnp.take(k[:, 0], jnp.array([0, 2, 4]), axis=2))
    np.testing.assert_array_equal(out.k[:, 1, :, 1:3], jnp.take(k[:, 1], jnp.array([1, 3]), axis=2))


def test_writes_past_capacity_are_dropped_and_commit_is_clamped():
    c = kv.init_cache(tiny_config(), batch=1, capacity=4)
    c = kv.commit(c, jnp.array([3]))
    c2, _, _ = _filled(c, 3)
    assert c2.k.shape == c.k.shape
    assert int(kv.commit(c2, jnp.array([3])).length[0]) == 4


def test_capacity_errors():
    with pytest.raises(ValueError, match="capacity"):
        kv.init_cache(tiny_config(), batch=1, capacity=0)
    with pytest.raises(ValueError, match="needs 10 cache slots but the cache capacity is 8"):
        kv.check_capacity(8, 10)
