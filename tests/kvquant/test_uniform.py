"""Uniform quantizers: asymmetric error bounds per bit width, and the symmetric int8/int4
baseline never overflowing its integer range (with the public ``127.5`` bug as negative control)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decodax.kvquant import packing, uniform

SETTINGS = settings(max_examples=25, deadline=None, database=None, derandomize=True)
# One [B, KV, S, D] shape for every test of tests/kvquant: each new shape compiles again.
SHAPE = (2, 2, 64, 8)


def sample(seed: int, magnitude: float, offset: float, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=3, size=shape) * magnitude + offset
    return x.astype(np.float32)


def host(tree):
    """Library outputs as numpy arrays: eager jnp ops in the tests would each compile."""
    return jax.tree.map(np.asarray, tree)


def rounding_slack(x: np.ndarray) -> float:
    """Float32 rounding in ``(x - zero) / scale`` and ``code * scale + zero``: a few ulps of |x|."""
    return 8 * np.finfo(np.float32).eps * float(np.max(np.abs(x)) + 1e-30)


# ------------------------------------------------------------------ asymmetric

@SETTINGS
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    layout=st.sampled_from([(-1, None), (-2, 4), (-1, 4)]),  # per token, KIVI keys, groups in D
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e-3, 1.0, 1e3]),
    offset=st.sampled_from([0.0, -5.0, 100.0]),
)
def test_asymmetric_error_is_at_most_half_a_step(bits, layout, seed, magnitude, offset):
    axis, group = layout
    x = sample(seed, magnitude, offset)
    q = host(uniform.quantize_asymmetric(x, bits, axis=axis, group=group))
    n = x.shape[axis]
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == x.shape
    assert q.scale.shape[axis] == n // (group or n)
    assert q.codes.max() <= 2**bits - 1
    x_hat = np.asarray(uniform.dequantize_asymmetric(q.codes, q.scale, q.zero, axis=axis))
    step = np.repeat(q.scale, n // q.scale.shape[axis], axis=axis)
    assert np.all(np.abs(x - x_hat) <= step / 2 + rounding_slack(x))


def test_error_shrinks_with_bits():
    x = sample(0, 1.0, 0.0)
    errs = []
    for bits in (2, 4, 8):
        q = uniform.quantize_asymmetric(x, bits)
        errs.append(float(np.abs(host(uniform.dequantize_asymmetric(*q)) - x).max()))
    assert errs[0] > errs[1] > errs[2]


def test_constant_groups_round_trip_exactly():
    x = np.full(SHAPE, 3.25, np.float32)
    q = uniform.quantize_asymmetric(x, 2, axis=-2, group=4)
    np.testing.assert_array_equal(q.scale, 1.0)
    np.testing.assert_array_equal(uniform.dequantize_asymmetric(*q, axis=-2), x)


def test_excluded_elements_do_not_widen_the_range():
    x = sample(3, 1.0, 0.0)
    x[0, 0, 0] = [0.0, 1.0, 2.0, 3.0, 1000.0, 0.5, 1.5, 2.5]
    exclude = np.abs(x) > 100
    exclude[0, 0, 1] = True  # a fully excluded group: zero 0, scale 1, no NaN
    q = host(uniform.quantize_asymmetric(x, 2, exclude=exclude))
    assert float(q.zero[0, 0, 0, 0]) == 0.0 and float(q.scale[0, 0, 0, 0]) == 1.0
    assert float(q.zero[0, 0, 1, 0]) == 0.0 and float(q.scale[0, 0, 1, 0]) == 1.0
    assert int(q.codes[0, 0, 0, 4]) == 3  # the excluded element is clipped to the top code


# ------------------------------------------------------------------ symmetric

def check_symmetric(quantize, x: np.ndarray, bits: int) -> None:
    """Codes stay in [-qmax, qmax], the absmax element codes to +-qmax, error <= scale / 2."""
    qmax = 2 ** (bits - 1) - 1
    codes, scale = host(quantize(x, bits))
    codes = codes.astype(np.int64)  # no wrap-around hides an overflow
    assert codes.min() >= -qmax and codes.max() <= qmax, f"codes in [{codes.min()}, {codes.max()}]"
    at_absmax = np.abs(x) == np.max(np.abs(x), axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.abs(codes[at_absmax]), qmax)
    np.testing.assert_array_equal(np.sign(codes[at_absmax]), np.sign(x[at_absmax]))
    x_hat = codes * scale
    assert np.all(np.abs(x - x_hat) <= scale / 2 + rounding_slack(x))


def quantize_symmetric(x, bits):
    return uniform.quantize_symmetric(x, bits)


def quantize_symmetric_1275_bug(x, bits):
    """The public int8-cache variant: ``rint(x * 127.5 / absmax)`` -- the absmax element -> 128."""
    absmax = np.max(np.abs(x), axis=-1, keepdims=True)
    return np.rint(x * 127.5 / absmax), absmax / 127.5


@SETTINGS
@given(
    bits=st.sampled_from(uniform.SYMMETRIC_BITS),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e-6, 1.0, 1e4]),
    negative_peak=st.booleans(),
)
def test_symmetric_absmax_never_overflows(bits, seed, magnitude, negative_peak):
    x = sample(seed, magnitude, 0.0)
    # one row with its peak tied at +absmax and -absmax; one whose peak is negative
    x[0, 0, 0, :2] = [70.0 * magnitude, -70.0 * magnitude]
    if negative_peak:
        x[0, 0, 1] = -np.abs(x[0, 0, 1])
    check_symmetric(quantize_symmetric, x, bits)


def test_negative_control_the_1275_bug_is_caught():
    x = sample(1, 1.0, 0.0)
    with pytest.raises(AssertionError, match="codes in"):
        check_symmetric(quantize_symmetric_1275_bug, x, 8)
    # and what it does once cast to int8 the usual (wrapping) way: +absmax becomes -128
    codes, _ = quantize_symmetric_1275_bug(np.array([[1.0, -0.5]], np.float32), 8)
    assert codes.astype(np.int64).astype(np.int8)[0, 0] == -128


def test_symmetric_zero_rows_and_scale_shape():
    x = np.zeros(SHAPE, np.float32)
    q = uniform.quantize_symmetric(x, 8)
    assert q.codes.dtype == jnp.int8 and q.scale.shape == SHAPE[:-1] + (1,)
    np.testing.assert_array_equal(uniform.dequantize_symmetric(*q), x)


def test_int4_codes_pack_with_an_offset():
    x = sample(2, 1.0, 0.0)
    q = host(uniform.quantize_symmetric(x, 4))
    unsigned = (np.asarray(q.codes) + 7).astype(np.uint8)
    assert unsigned.max() <= 14
    restored = np.asarray(packing.unpack(packing.pack(unsigned, 4), 4)).astype(np.int8) - 7
    np.testing.assert_array_equal(restored, q.codes)


def test_bytes_per_token():
    assert uniform.float_bytes_per_token(64) == 512
    assert uniform.symmetric_bytes_per_token(64, 8) == 2 * (64 + 4)
    assert uniform.symmetric_bytes_per_token(64, 4, kv_heads=3, layers=30) == 2 * (32 + 4) * 90


def test_bad_input():
    x = np.zeros((4, 6), np.float32)
    for bits in (0, 9, 2.0):
        with pytest.raises(ValueError, match="bits"):
            uniform.quantize_asymmetric(x, bits)
    for bits in (2, 3, 16):
        with pytest.raises(ValueError, match="bits"):
            uniform.quantize_symmetric(x, bits)
    with pytest.raises(ValueError, match="does not divide"):
        uniform.quantize_asymmetric(x, 4, axis=-1, group=4)
    with pytest.raises(ValueError, match="does not divide"):
        uniform.quantize_asymmetric(x, 4, axis=0, group=3)
    with pytest.raises(ValueError, match="out of range"):
        uniform.quantize_asymmetric(x, 4, axis=2)
    with pytest.raises(ValueError, match="do not divide"):
        uniform.dequantize_asymmetric(np.zeros((4, 6), np.uint8), np.ones((4, 4)), np.zeros((4, 4)))
