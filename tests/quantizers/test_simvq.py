"""SimVQ: the frozen N(0, 1/D) codes stay outside the params, the one linear layer gets the
gradients, the codebook is C W + b, round trips, bad codebook size."""

import jax
import numpy as np
import pytest

from decodax.quantizers import simvq
from jax import jit

N, K, D = 32, 256, 16  # 4096 frozen values: enough for the std check
MODEL = simvq.SimVQ(num_codes=K, dim=D)
KEY = jax.random.key(0, impl="rbg")


@jit
def _simvq(variables, x):
    def loss(params):
        r = MODEL.apply({**variables, "params": params}, x)
        return r.loss, r

    grads, out = jax.grad(loss, has_aux=True)(variables["params"])
    return out, grads


_init = jit(MODEL.init)


def setup():
    x = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    return _init(KEY, x), x


def test_frozen_codes_and_the_linear_layer_are_initialised_as_the_paper():
    variables, _ = setup()
    assert set(variables) == {"frozen", "params"}  # C is not a parameter: optimizers never see it
    c = np.asarray(variables["frozen"]["codebook"])
    assert c.shape == (K, D)
    np.testing.assert_allclose(c.std(), D**-0.5, rtol=0.05)
    assert abs(c.mean()) < 0.02
    proj = variables["params"]["proj"]
    for w in (proj["kernel"], proj["bias"]):  # torch nn.Linear default: U(-1/sqrt(D), 1/sqrt(D))
        assert np.abs(w).max() <= D**-0.5 and np.abs(w).max() > 0.8 * D**-0.5


def test_gradients_reach_the_linear_layer_and_codes_are_c_times_w():
    variables, x = setup()
    out, grads = _simvq(variables, x)
    proj = jax.tree.map(np.asarray, variables["params"]["proj"])
    codebook = np.asarray(variables["frozen"]["codebook"]) @ proj["kernel"] + proj["bias"]
    codes = np.asarray(out.codes)
    brute = np.argmin(((x[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(codes, brute)
    np.testing.assert_allclose(out.quantized, codebook[codes], atol=1e-5)
    assert set(grads) == {"proj"} and all(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))
    q = codebook[codes]
    np.testing.assert_allclose(out.loss, 1.25 * np.mean((x - q) ** 2), rtol=1e-4)  # codebook + 0.25 commitment


def test_codes_to_vectors_to_codes_round_trip():
    variables, x = setup()
    codes = np.arange(N, dtype=np.int32) * 7 % K
    decoded = np.asarray(jit(lambda v, c: MODEL.apply(v, c, method="decode"))(variables, codes))
    out, _ = _simvq(variables, decoded)  # the same program as the other tests: x has the same shape
    np.testing.assert_array_equal(out.codes, codes)
    with pytest.raises(ValueError, match="code ids"):
        MODEL.apply(variables, np.array([K]), method="decode")


def test_codebook_smaller_than_two_is_rejected():
    with pytest.raises(ValueError, match="codebook size"):
        jax.eval_shape(lambda: simvq.SimVQ(num_codes=1, dim=D).init(KEY, np.zeros((1, D), np.float32)))
    with pytest.raises(ValueError, match="codebook size"):
        simvq.frozen_codebook(KEY, 1, D)
