"""The small-M CPU kernel behind ``decodax.kernels.linear`` equals XLA's dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.kernels import MAX_ROWS, available, linear, linear_xla

needs_kernel = pytest.mark.skipif(not available(), reason="small-M kernel not available on this machine")


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, MAX_ROWS])
@pytest.mark.parametrize("k,n", [(576, 960), (64, 4), (37, 50), (8, 3)])
def test_linear_matches_xla(m, k, n):
    x = jax.random.normal(jax.random.key(m), (m, k))
    w = jax.random.normal(jax.random.key(k + n), (n, k))
    got = jax.jit(linear)(x, w)
    np.testing.assert_allclose(got, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_rows_are_independent_of_m():
    """A row's result does not depend on how many rows share the call: a verify
    step and a decode step see bitwise equal products (no near-tie flips)."""
    x = jax.random.normal(jax.random.key(0), (9, 576))
    w = jax.random.normal(jax.random.key(1), (1000, 576))
    full = np.asarray(jax.jit(linear)(x, w))
    for i in range(9):
        np.testing.assert_array_equal(np.asarray(jax.jit(linear)(x[i : i + 1], w))[0], full[i])


@needs_kernel
def test_batched_shapes_vmap_and_grad():
    x = jax.random.normal(jax.random.key(2), (2, 3, 40))
    w = jax.random.normal(jax.random.key(3), (24, 40))
    np.testing.assert_allclose(jax.jit(linear)(x, w), linear_xla(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(linear, (0, None))(x, w), linear_xla(x, w), rtol=1e-5, atol=1e-5)

    def loss(f, x, w):
        return jnp.sum(jnp.sin(f(x, w)))

    gx, gw = jax.grad(lambda x, w: loss(linear, x, w), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: loss(linear_xla, x, w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, rw, rtol=1e-4, atol=1e-4)


def test_fallbacks_and_bad_input():
    w = jax.random.normal(jax.random.key(4), (16, 8))
    big = jax.random.normal(jax.random.key(5), (MAX_ROWS + 1, 8))  # prefill-sized: XLA's GEMM
    np.testing.assert_allclose(linear(big, w), linear_xla(big, w), rtol=1e-6)
    half = big.astype(jnp.bfloat16)
    assert linear(half, w.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="features"):
        linear(big, w.T)


@needs_kernel
@pytest.mark.parametrize("transposed", [True, False])
def test_bmm_stacked_cache_with_lengths(transposed):
    """Attention over one layer of a stacked cache, reading only committed slots."""
    from decodax.kernels import bmm

    n_layers, b, heads, s, hd, m = 3, 2, 3, 40, 16, 6
    cache = jax.random.normal(jax.random.key(6), (n_layers, b * heads, s, hd))
    lengths = jnp.array([17, 40], jnp.int32)
    live = (jnp.arange(s)[None, :] < jnp.repeat(lengths, heads)[:, None])[:, None, :]  # [G, 1, S]
    for layer in (0, 2):
        if transposed:  # scores q . k: zeros past the length
            x = jax.random.normal(jax.random.key(layer), (b * heads, m, hd))
            want = jnp.where(live, jnp.einsum("gmd,gsd->gms", x, cache[layer]), 0.0)
        else:  # p . v: softmax weights are zero past the length
            x = jnp.where(live, jax.random.uniform(jax.random.key(layer), (b * heads, m, s)), 0.0)
            want = jnp.einsum("gms,gsd->gmd", x, cache[layer])
        got = jax.jit(lambda x, c: bmm(x, c, transposed=transposed, w_index=layer, lengths=lengths))(x, cache)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        grad = jax.grad(lambda x: jnp.sum(bmm(x, cache, transposed=transposed, w_index=layer, lengths=lengths) ** 2))
        assert grad(x).shape == x.shape and bool(jnp.all(jnp.isfinite(grad(x))))
    with pytest.raises(ValueError, match="multiple"):
        bmm(x, cache, transposed=transposed, w_index=0, lengths=jnp.ones((4,), jnp.int32))
