"""FSQ: the bound is centred (the public notebook's ``tan`` shift is caught, as a negative
control), saturates at the edge levels, even levels give exactly L values; straight-through
gradients; codes -> vectors -> codes round trip; bad levels rejected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.quantizers import fsq
from jax import jit

LEVELS = (2, 3, 4, 5, 8)  # odd and even; implicit codebook of 960 codes
K = int(np.prod(LEVELS))
N = K  # one input shape [K, 5] for every test: one compilation


@jit
def _fsq(z, w):
    grad, out = jax.grad(lambda z: (jnp.sum((r := fsq.quantize(z, LEVELS)).quantized * w), r), has_aux=True)(z)
    return out, grad, fsq.bound(z, LEVELS)


_decode = jit(lambda codes: fsq.codes_to_vectors(codes, LEVELS))


def library_bound(z: np.ndarray) -> np.ndarray:
    return np.asarray(_fsq(z, np.zeros_like(z))[2])


def bound_with_tan(z: np.ndarray, levels, eps: float = fsq.EPS) -> np.ndarray:
    """This module's bound with the public notebook's shift ``tan(offset / half_l)`` (the bug)."""
    lv = np.asarray(levels, np.float32)
    half_l = (lv - 1) * (1 + eps) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0).astype(np.float32)
    return np.tanh(z + np.tan(offset / half_l)) * half_l - offset


def assert_centred_and_saturating(bound_fn) -> None:
    """``bound(0) = 0`` exactly (no bias towards one side for even L); large inputs reach the
    outermost levels ``-(L//2)`` and ``(L-1)//2`` after rounding."""
    z = np.zeros((N, len(LEVELS)), np.float32)
    z[1], z[2] = -50.0, 50.0
    b = bound_fn(z)
    np.testing.assert_allclose(b[0], 0.0, atol=1e-6)
    lv = np.asarray(LEVELS)
    np.testing.assert_array_equal(np.round(b[1:3]), np.stack([-(lv // 2), (lv - 1) // 2]))


def test_bound_is_centred_and_saturates_at_the_edge_levels():
    assert_centred_and_saturating(library_bound)


def test_tan_shift_of_the_public_notebook_fails_the_same_check():
    # negative control: with tan instead of arctanh, bound(0) = -0.042 for L = 2 and
    # -4e-4 for L = 4 -- even levels are biased, and the check above catches it
    with pytest.raises(AssertionError):
        assert_centred_and_saturating(lambda z: bound_with_tan(z, LEVELS))
    np.testing.assert_allclose(bound_with_tan(np.zeros(1, np.float32), (2,)), -0.042, atol=1e-3)


def test_quantized_values_are_exactly_the_levels():
    z = np.linspace(-6, 6, N, dtype=np.float32)[:, None].repeat(len(LEVELS), 1)
    out, _, _ = _fsq(z, np.zeros_like(z))
    q = np.asarray(out.quantized)
    for i, lv in enumerate(LEVELS):
        allowed = np.arange(-(lv // 2), (lv - 1) // 2 + 1) / (lv // 2)
        np.testing.assert_array_equal(np.unique(q[:, i]), allowed)  # L distinct values, odd or even
        assert np.all(np.diff(q[:, i]) >= 0), "monotone"
    assert np.all(np.abs(q) <= 1)


def test_straight_through_gradient_is_identity_on_the_rounding():
    """round_ste(bound(z)): the rounding passes the identity, so the gradient reaching z is the
    bound's (the listing's), not the identity (which would skip tanh's saturation)."""
    rng = np.random.default_rng(0)
    z, w = rng.standard_normal((2, N, len(LEVELS))).astype(np.float32) * 2
    out, grad, _ = _fsq(z, w)
    half_width = np.asarray([lv // 2 for lv in LEVELS], np.float32)
    bound_grad = jax.grad(lambda z: jnp.sum(fsq.bound(z, LEVELS) / half_width * w))(z)
    np.testing.assert_allclose(grad, bound_grad, rtol=1e-5, atol=1e-6)
    assert not np.allclose(grad, w)  # not the identity to z
    np.testing.assert_allclose(out.quantized, _decode(out.codes), atol=1e-6)


def test_codes_to_vectors_to_codes_round_trip():
    codes = np.arange(K)
    v = np.asarray(_decode(codes))
    assert len(np.unique(v, axis=0)) == K
    # an input whose bound is exactly the level: z = arctanh((level + offset) / half_l) - shift
    lv = np.asarray(LEVELS, np.float64)
    half_l, offset = (lv - 1) * (1 + fsq.EPS) / 2, np.where(lv % 2 == 0, 0.5, 0.0)
    z = np.arctanh((v * (lv // 2) + offset) / half_l) - np.arctanh(offset / half_l)
    out, _, _ = _fsq(z.astype(np.float32), np.zeros_like(z, np.float32))
    np.testing.assert_array_equal(out.codes, codes)
    np.testing.assert_array_equal(out.quantized, v)
    assert float(out.stats["utilization"]) == 1.0
    np.testing.assert_allclose(out.stats["perplexity"], K, rtol=1e-4)


def test_bad_levels_and_codes_are_rejected():
    for bad in ([], [1, 4], [3, 0], [2.5]):
        with pytest.raises(ValueError, match="level"):
            fsq.check_levels(bad)
    with pytest.raises(ValueError, match="level"):
        fsq.quantize(np.zeros((2, 2), np.float32), (4, 1))
    with pytest.raises(ValueError, match="len\\(levels\\)"):
        fsq.bound(np.zeros((2, 3), np.float32), (4, 4))
    with pytest.raises(ValueError, match="code ids"):
        fsq.codes_to_vectors(np.array([0, K]), LEVELS)
