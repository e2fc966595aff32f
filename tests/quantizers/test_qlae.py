"""QLAE: per-dimension nearest value, straight-through and loss gradients, round trips, and
the weight-decay mask sparing the codebook values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decodax.quantizers import qlae
from jax import jit

N, D, V = 16, 3, 5


@jit
def _qlae(values, z, w):
    """One compilation: quantize, gradients of its output and of its losses."""
    ste, out = jax.grad(lambda z: (jnp.sum((r := qlae.quantize(values, z)).quantized * w), r), has_aux=True)(z)
    return {
        "out": out,
        "ste": ste,
        "quant_v": jax.grad(lambda v: qlae.quantize(v, z).losses["quantization"])(values),
        "quant_z": jax.grad(lambda z: qlae.quantize(values, z).losses["quantization"])(z),
        "commit_v": jax.grad(lambda v: qlae.quantize(v, z).losses["commitment"])(values),
        "decoded": qlae.codes_to_vectors(values, out.codes),
    }


def setup(seed=0):
    rng = np.random.default_rng(seed)
    values = np.sort(rng.standard_normal((D, V)), axis=1).astype(np.float32)  # own values per dimension
    z, w = rng.standard_normal((2, N, D)).astype(np.float32)
    return values, z, w


def test_nearest_value_per_dimension_and_straight_through():
    values, z, w = setup()
    r = _qlae(values, z, w)
    brute = np.argmin(np.abs(z[:, :, None] - values[None]), axis=-1)
    np.testing.assert_array_equal(r["out"].codes, brute)
    q = np.take_along_axis(np.broadcast_to(values, (N, D, V)), brute[..., None], -1)[..., 0]
    np.testing.assert_allclose(r["out"].quantized, q, atol=1e-6)
    np.testing.assert_array_equal(r["ste"], w)
    np.testing.assert_array_equal(r["decoded"], q)  # codes -> vectors


def test_losses_move_values_and_encoder_separately():
    r = _qlae(*setup(1))
    np.testing.assert_array_equal(r["quant_z"], 0)  # quantization loss: values only
    np.testing.assert_array_equal(r["commit_v"], 0)  # commitment loss: encoder only
    assert np.abs(r["quant_v"]).sum() > 0
    losses = r["out"].losses
    np.testing.assert_allclose(r["out"].loss, 0.01 * losses["quantization"] + 0.01 * losses["commitment"], rtol=1e-6)


def test_codes_to_vectors_to_codes_round_trip():
    values = np.asarray(qlae.init_values(D, V))
    np.testing.assert_allclose(values[0], np.linspace(-0.5, 0.5, V), atol=1e-7)
    codes = np.stack([np.arange(N) % V, (np.arange(N) // V) % V, np.arange(N)[::-1] % V], -1).astype(np.int32)
    v = np.asarray(qlae.codes_to_vectors(values, codes))
    np.testing.assert_array_equal(_qlae(values, v, np.zeros_like(v))["out"].codes, codes)
    with pytest.raises(ValueError, match="code ids"):
        qlae.codes_to_vectors(values, np.full((1, D), V))


def test_weight_decay_spares_the_codebook_values():
    model = qlae.LatentQuantizer(num_latents=D, values_per_latent=V)
    init = jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), np.zeros((1, D))))
    params = {"encoder": {"kernel": np.ones((4, D), np.float32)}, "quantizer": init["params"]}
    assert set(params["quantizer"]) == {qlae.VALUES_NAME}
    params["quantizer"] = {qlae.VALUES_NAME: np.asarray(qlae.init_values(D, V))}
    mask = qlae.weight_decay_mask(params)
    assert mask == {"encoder": {"kernel": True}, "quantizer": {qlae.VALUES_NAME: False}}
    tx = qlae.adamw(learning_rate=0.5, weight_decay=0.1)
    zeros = jax.tree.map(np.zeros_like, params)
    new = jit(lambda p: optax.apply_updates(p, tx.update(zeros, tx.init(p), p)[0]))(params)
    np.testing.assert_allclose(new["encoder"]["kernel"], 1 - 0.5 * 0.1, rtol=1e-6)  # decayed
    np.testing.assert_array_equal(new["quantizer"][qlae.VALUES_NAME], params["quantizer"][qlae.VALUES_NAME])


def test_too_few_values_are_rejected():
    with pytest.raises(ValueError, match="codebook size"):
        qlae.init_values(D, 1)
    with pytest.raises(ValueError, match="codebook size"):
        qlae.quantize(np.zeros((D, 1), np.float32), np.zeros((2, D), np.float32))
