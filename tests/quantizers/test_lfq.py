"""LFQ and group-wise LFQ: the entropy terms equal an exact enumeration of the small codebook
(softmax of -distance / temperature), binary code ids, straight-through gradients, round
trips, bad group counts."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decodax.quantizers import lfq
from jax import jit

N, D = 16, 4  # 16 vectors of 4 bits: the 16 codes of {-1, 1}^4 fit in one batch
SETTINGS = settings(max_examples=5, deadline=None, database=None, derandomize=True)


@partial(jit, static_argnums=3)
def _lfq(z, w, inv_t, groups):
    """One compilation per group count: quantize and its input gradient."""
    def f(z):
        r = lfq.quantize(z, groups=groups, inv_temperature=inv_t)
        return jnp.sum(r.quantized * w), r

    grad, out = jax.grad(f, has_aux=True)(z)
    return out, grad


def all_codes(groups: int) -> np.ndarray:
    """Every code of each group, as an input batch: z = the code's +-1 vector."""
    bits = D // groups
    ids = np.arange(N) % 2**bits if groups == 1 else np.stack([np.arange(N) % 4, np.arange(N) // 4], -1)
    ids = ids.reshape(N, groups)
    return np.concatenate([np.where((ids[:, g:g + 1] >> np.arange(bits)) & 1, 1.0, -1.0) for g in range(groups)],
                          -1).astype(np.float32), ids.squeeze(-1) if groups == 1 else ids


def exact_entropies(z: np.ndarray, groups: int, inv_t: float) -> tuple[float, float]:
    """Enumerate every code of each group: p(c | z) = softmax(-||z - c||^2 inv_t), float64."""
    bits = z.shape[-1] // groups
    codes = np.array([[1.0 if (i >> j) & 1 else -1.0 for j in range(bits)] for i in range(2**bits)])
    per_sample, codebook = [], []
    for g in range(groups):
        zg = z[:, g * bits:(g + 1) * bits].astype(np.float64)
        logits = -((zg[:, None, :] - codes[None]) ** 2).sum(-1) * inv_t
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        h = lambda q: -(q * np.log(np.where(q > 0, q, 1))).sum(-1)  # noqa: E731
        per_sample.append(h(p).mean())
        codebook.append(h(p.mean(0)))
    return float(np.mean(per_sample)), float(np.mean(codebook))


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2]), st.sampled_from([0.3, 1.0, 3.0]))
def test_entropy_estimate_equals_exact_enumeration(seed, groups, inv_t):
    z = np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)
    out = _lfq(z, np.zeros_like(z), inv_t, groups)[0]
    per_sample, codebook = exact_entropies(z, groups, inv_t)
    np.testing.assert_allclose(out.losses["per_sample_entropy"], per_sample, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.losses["codebook_entropy"], codebook, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out.losses["entropy"], per_sample - codebook, rtol=2e-4, atol=2e-6)
    expected = 0.25 * out.losses["commitment"] + 0.1 * out.losses["entropy"]
    np.testing.assert_allclose(out.loss, expected, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_cold_limit_gives_the_code_histogram_entropy(groups):
    rng = np.random.default_rng(1)
    z = (np.sign(rng.standard_normal((N, D))) * (0.5 + rng.random((N, D)))).astype(np.float32)
    out = _lfq(z, np.zeros_like(z), 100.0, groups)[0]  # temperature 0.01: near one-hot assignments
    assert float(out.losses["per_sample_entropy"]) < 1e-6
    codes = np.asarray(out.codes).reshape(N, groups)
    hist = [np.bincount(codes[:, g], minlength=2 ** (D // groups)) / N for g in range(groups)]
    exact = np.mean([-(p[p > 0] * np.log(p[p > 0])).sum() for p in hist])
    np.testing.assert_allclose(out.losses["codebook_entropy"], exact, rtol=1e-5)


def test_signs_binary_ids_and_straight_through():
    rng = np.random.default_rng(2)
    z, w = rng.standard_normal((2, N, D)).astype(np.float32)
    out, grad = _lfq(z, w, 1.0, 1)
    np.testing.assert_array_equal(out.quantized, np.where(z > 0, 1.0, -1.0))
    np.testing.assert_array_equal(out.codes, ((z > 0) * 2 ** np.arange(D)).sum(-1))  # dim 0 least significant
    np.testing.assert_array_equal(grad, w)
    out2 = _lfq(z, w, 1.0, 2)[0]
    per_group = [((z[:, 2 * g:2 * g + 2] > 0) * [1, 2]).sum(-1) for g in (0, 1)]
    np.testing.assert_array_equal(out2.codes, np.stack(per_group, -1))


@pytest.mark.parametrize("groups", [1, 2])
def test_codes_to_vectors_to_codes_round_trip(groups):
    z, ids = all_codes(groups)  # every code of the (group) codebook, as +-1 inputs
    vectors = np.asarray(lfq.codes_to_vectors(ids, D, groups))
    np.testing.assert_array_equal(vectors, z)  # codes -> vectors
    out = _lfq(vectors, np.zeros_like(z), 1.0, groups)[0]
    np.testing.assert_array_equal(out.codes, ids)  # -> codes
    assert float(out.stats["utilization"]) == 1.0


def test_bad_groups_and_codes_are_rejected():
    z = np.zeros((2, 6), np.float32)
    with pytest.raises(ValueError, match="does not divide"):
        lfq.quantize(z, groups=4)
    with pytest.raises(ValueError, match="does not divide"):
        lfq.codes_to_vectors(np.zeros((2, 4), np.int32), 6, groups=4)
    with pytest.raises(ValueError, match="code ids"):
        lfq.codes_to_vectors(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match="bits per group"):
        lfq.quantize(np.zeros((1, lfq.MAX_ENUM_BITS + 1), np.float32))
