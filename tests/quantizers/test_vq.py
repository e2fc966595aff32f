"""VQ-VAE: brute-force nearest codes, straight-through and loss gradients, the rotation
trick's gradient, EMA updates only in training, dead-code restart, k-means++, round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decodax.quantizers import vq
from jax import jit

N, K, D = 16, 8, 4  # one shape for the tests below: each new shape compiles again
BETA = 0.25
SETTINGS = settings(max_examples=8, deadline=None, database=None, derandomize=True)


def data(seed: int, shape=(N, D)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_nearest = jit(vq.nearest_code)


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_nearest_code_equals_brute_force(seed):
    x, cb = data(seed), data(seed + 1, (K, D))
    brute = np.argmin(((x[:, None, :].astype(np.float64) - cb[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(_nearest(x, cb), brute)


@jit
def _analysis(codebook, x, w):
    """One forward, one batched backward: d/d(codebook, x) of sum(q * w), codebook and commitment losses."""

    def f(c, x):
        r = vq.quantize(c, x, beta=BETA)
        return jnp.stack([jnp.sum(r.quantized * w), r.losses["codebook"], r.losses["commitment"]]), r

    (jc, jx), out = jax.jacrev(f, argnums=(0, 1), has_aux=True)(codebook, x)
    return {"out": out, "ste": jx[0], "codebook_c": jc[1], "codebook_x": jx[1], "commit_c": jc[2], "commit_x": jx[2]}


def test_straight_through_gradient_is_identity_and_values_are_codes():
    cb, x, w = data(0, (K, D)), data(1), data(2)
    r = _analysis(cb, x, w)
    np.testing.assert_array_equal(r["ste"], w)  # d sum(q * w) / dx = w exactly
    np.testing.assert_allclose(r["out"].quantized, cb[np.asarray(r["out"].codes)], atol=1e-6)


def test_codebook_loss_moves_codes_and_commitment_moves_inputs():
    cb, x, w = data(0, (K, D)), data(1), data(2)
    r = _analysis(cb, x, w)
    q = cb[np.asarray(r["out"].codes)]
    np.testing.assert_array_equal(r["codebook_x"], 0)
    np.testing.assert_array_equal(r["commit_c"], 0)
    np.testing.assert_allclose(r["commit_x"], 2 * (x - q) / (N * D), atol=1e-6)
    expected_c = np.zeros_like(cb)
    np.add.at(expected_c, np.asarray(r["out"].codes), 2 * (q - x) / (N * D))
    np.testing.assert_allclose(r["codebook_c"], expected_c, atol=1e-6)
    losses = r["out"].losses
    np.testing.assert_allclose(losses["codebook"], np.mean((x - q) ** 2), rtol=1e-5)
    np.testing.assert_allclose(r["out"].loss, (1 + BETA) * losses["commitment"], rtol=1e-5)


@jit
def _rotation(e, q, w):
    out, vjp = jax.vjp(lambda e: vq.rotation_trick(e, q), e)
    return out, vjp(w)[0]


def test_rotation_trick_value_is_q_and_gradient_is_scaled_rotation():
    e, q, w = data(3), data(4), data(5)
    out, g = _rotation(e, q, w)
    np.testing.assert_allclose(out, q, atol=1e-6)
    for i in range(N):  # the paper's R = I - 2 r r^T + 2 q^ e^^T, lambda = ||q|| / ||e||, grad = lambda R^T w
        u, v = e[i] / np.linalg.norm(e[i]), q[i] / np.linalg.norm(q[i])
        r = (u + v) / np.linalg.norm(u + v)
        rot = np.eye(D) - 2 * np.outer(r, r) + 2 * np.outer(v, u)
        np.testing.assert_allclose(rot @ u, v, atol=1e-5)
        lam = np.linalg.norm(q[i]) / np.linalg.norm(e[i])
        np.testing.assert_allclose(g[i], lam * rot.T @ w[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(g[i]), lam * np.linalg.norm(w[i]), rtol=1e-4)


# --------------------------------------------------------------------------- EMA module

DECAY, EPS, PATIENCE = 0.9, 1e-5, 2
EMA_VQ = vq.VectorQuantizer(num_codes=K, dim=D, use_ema=True, decay=DECAY, eps=EPS, dead_code_patience=PATIENCE)
_step = jit(lambda v, x, key: EMA_VQ.apply(v, x, train=True, mutable=["vq_stats"], rngs={"restart": key}))
KEY = jax.random.key(0, impl="rbg")


def ema_setup():
    """Codes 0..5 sit on six data clusters; codes 6 and 7 are far away and never used."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((K, D)).astype(np.float32) * 3
    centers[6:] += 100.0
    x = (centers[np.arange(N) % 6] + 0.1 * rng.standard_normal((N, D))).astype(np.float32)
    stats = {"codebook": centers, "cluster_size": np.ones(K, np.float32), "embed_sum": centers.copy(),
             "unused_steps": np.zeros(K, np.int32)}
    return {"vq_stats": stats}, x


def test_hand_built_state_matches_init():
    variables, x = ema_setup()
    shapes = jax.eval_shape(lambda: EMA_VQ.init(KEY, x))  # traced, not compiled
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(lambda a: (a.shape, a.dtype), variables)


def test_ema_updates_only_in_training_mode():
    variables, x = ema_setup()
    # train=False, even with "vq_stats" mutable: the statistics it returns are its inputs, untouched
    # (checked on the traced program, so for any values, without compiling it)
    closed = jax.make_jaxpr(lambda v, x: EMA_VQ.apply(v, x, train=False, mutable=["vq_stats"])[1])(variables, x)
    n_stats = len(jax.tree.leaves(variables))
    assert closed.jaxpr.outvars == closed.jaxpr.invars[:n_stats]

    out, new = _step(variables, x, KEY)
    codes = np.asarray(out.codes)
    np.testing.assert_array_equal(codes, np.arange(N) % 6)
    onehot = np.eye(K)[codes]
    size = DECAY * 1.0 + (1 - DECAY) * onehot.sum(0)
    embed = DECAY * variables["vq_stats"]["embed_sum"] + (1 - DECAY) * onehot.T @ x
    smoothed = (size + EPS) / (size.sum() + K * EPS) * size.sum()  # Laplace smoothing
    s = new["vq_stats"]
    np.testing.assert_allclose(s["cluster_size"], size, rtol=1e-6)
    np.testing.assert_allclose(s["embed_sum"], embed, rtol=1e-5)
    np.testing.assert_allclose(s["codebook"], embed / smoothed[:, None], rtol=1e-5)
    np.testing.assert_array_equal(s["unused_steps"], [0] * 6 + [1, 1])

    with pytest.raises(ValueError, match="mutable"):
        jax.jit(lambda v, x: EMA_VQ.apply(v, x, train=True, rngs={"restart": KEY}))(variables, x)


def test_dead_codes_are_restarted_from_the_batch():
    variables, x = ema_setup()
    _, v1 = _step(variables, x, KEY)
    assert np.all(np.asarray(v1["vq_stats"]["codebook"])[6:] > 50)  # patience 2: not yet
    _, v2 = _step(v1, x, jax.random.key(1, impl="rbg"))
    s = jax.tree.map(np.asarray, v2["vq_stats"])
    for code in (6, 7):
        assert np.any(np.all(s["codebook"][code] == x, axis=1)), "restarted code is a batch vector"
    np.testing.assert_array_equal(s["unused_steps"], 0)
    np.testing.assert_array_equal(s["cluster_size"][6:], 1.0)
    np.testing.assert_array_equal(s["embed_sum"][6:], s["codebook"][6:])


_kmeans_init = jit(lambda pts: vq.kmeans_plusplus_init(pts, iters=2)(KEY, (4, D)))  # the Flax initializer


def test_kmeans_plusplus_finds_separated_clusters():
    rng = np.random.default_rng(3)
    centers = np.array([[10, 0, 0, 0], [-10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 0, -10]], np.float32)
    pts = (centers[np.arange(40) % 4] + 0.1 * rng.standard_normal((40, D))).astype(np.float32)
    got = np.asarray(_kmeans_init(pts))
    means = np.stack([pts[np.arange(40) % 4 == c].mean(0) for c in range(4)])
    order = np.argmin(((got[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert sorted(order) == [0, 1, 2, 3], "one center per cluster"
    np.testing.assert_allclose(got, means[order], atol=1e-5)  # Lloyd steps reach the cluster means


def test_codes_to_vectors_round_trip_and_range_checks():
    cb = data(0, (K, D))
    vectors = vq.codes_to_vectors(cb, np.arange(K))
    np.testing.assert_array_equal(_nearest(np.concatenate([vectors, vectors]), cb), np.tile(np.arange(K), 2))
    for bad in ([0, K], [-1]):
        with pytest.raises(ValueError, match="code ids"):
            vq.codes_to_vectors(cb, np.asarray(bad))
    under_jit = np.asarray(jit(vq.codes_to_vectors)(cb, jnp.asarray([1, K, -1])))
    np.testing.assert_array_equal(under_jit[0], cb[1])
    assert np.isnan(under_jit[1:]).all()  # not checkable under jit: NaN, never a wrong code


def test_codebook_smaller_than_two_is_rejected():
    with pytest.raises(ValueError, match="codebook size"):
        vq.quantize(np.zeros((1, D), np.float32), data(0))
    with pytest.raises(ValueError, match="codebook size"):
        jax.eval_shape(lambda: vq.VectorQuantizer(num_codes=1, dim=D).init(KEY, data(0)))
    with pytest.raises(ValueError, match="dead_code_patience"):
        jax.eval_shape(lambda: vq.VectorQuantizer(num_codes=K, dim=D, dead_code_patience=2).init(KEY, data(0)))
