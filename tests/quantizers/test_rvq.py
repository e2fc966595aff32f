"""RVQ and Language-Codec's MCRVQ against a NumPy reference: all stages = the sum of the
stages' codes, masked stages see only their channel slice, quantize dropout uses a prefix of
stages, straight-through gradients, round trips; the module's EMA (per stage, active
examples only) and its training-only updates."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.quantizers import rvq
from jax import jit

N, S, K, D, M = 16, 4, 8, 6, 3  # M masked stages, as in Language-Codec (D divisible by M)


def reference(cbs: np.ndarray, x: np.ndarray, masked: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy (MC)RVQ in float64: masked stages quantize x on their slice, later ones the residual."""
    masks = np.repeat(np.eye(masked), D // masked, axis=1) if masked else None
    residual, total, codes = x.astype(np.float64), np.zeros(x.shape), []
    for s in range(S):
        cb = cbs[s] * masks[s] if s < masked else cbs[s]
        inp = x * masks[s] if s < masked else residual
        c = np.argmin(((inp[:, None] - cb[None]) ** 2).sum(-1), axis=1)
        residual, total = residual - cb[c], total + cb[c]
        codes.append(c)
    return np.stack(codes, -1), total


@partial(jit, static_argnums=4)
def _rvq(cbs, x, w, num_active, masked):
    """One compilation per masked-stage count: quantize and its input gradient."""
    f = partial(rvq.quantize, cbs, num_active=num_active, masked_stages=masked)
    ste, out = jax.grad(lambda x: (jnp.sum((r := f(x)).quantized * w), r), has_aux=True)(x)
    return {
        "out": out,
        "ste": ste,
    }


def setup(seed: int, scales=(1.0,) * S):
    rng = np.random.default_rng(seed)
    cbs = (rng.standard_normal((S, K, D)) * np.asarray(scales)[:, None, None]).astype(np.float32)
    x, w = rng.standard_normal((2, N, D)).astype(np.float32)
    return cbs, x, w


ALL = np.full(N, S, np.int32)


@pytest.mark.parametrize("masked", [0, M])
def test_all_stages_equal_the_sum_of_stages(masked):
    cbs, x, w = setup(0)
    r = _rvq(cbs, x, w, ALL, masked)
    codes, total = reference(cbs, x, masked)
    np.testing.assert_array_equal(r["out"].codes, codes)
    np.testing.assert_allclose(r["out"].quantized, total, atol=1e-5)
    np.testing.assert_allclose(rvq.codes_to_vectors(cbs, codes, masked), total, atol=1e-5)  # sum_s codebook_s[code_s]
    np.testing.assert_array_equal(r["ste"], w)  # one straight-through estimator on the total


def test_masked_stages_see_only_their_slice():
    cbs, x, w = setup(1)
    r = _rvq(cbs, x, w, ALL, M)
    width = D // M
    for s in range(M):
        other = np.ones(D, bool)
        other[s * width:(s + 1) * width] = False
        y = x.copy()
        y[:, other] += 3.0  # change every channel outside stage s's slice
        codes_y = np.asarray(_rvq(cbs, y, w, ALL, M)["out"].codes)
        np.testing.assert_array_equal(codes_y[:, s], np.asarray(r["out"].codes)[:, s])
    first = np.asarray(_rvq(cbs, x, w, np.ones(N, np.int32), M)["out"].quantized)  # stage 0 alone
    np.testing.assert_array_equal(first[:, width:], 0)  # its codewords are masked to its slice
    assert np.all(first[:, :width] != 0)


def test_quantize_dropout_uses_a_prefix_of_the_stages():
    cbs, x, w = setup(2)
    n = np.arange(N) % S + 1  # every depth 1..S
    r = _rvq(cbs, x, w, n.astype(np.int32), 0)
    codes = np.asarray(r["out"].codes)
    ref_codes, _ = reference(cbs, x, 0)
    np.testing.assert_array_equal(codes, ref_codes)  # dropped stages still report their choice
    expected = np.stack([sum(cbs[s][codes[i, s]] for s in range(n[i])) for i in range(N)])
    np.testing.assert_allclose(r["out"].quantized, expected, atol=1e-5)
    np.testing.assert_array_equal(r["out"].stats["num_active"], n)

    draws = np.asarray(jit(rvq.dropout_num_active, static_argnums=(1, 2, 3))(
        jax.random.key(0, impl="rbg"), 400, S, M))
    assert set(draws.tolist()) == set(range(M, S + 1))  # Language-Codec: n_q in {M..S}
    with pytest.raises(ValueError, match="min_active"):
        rvq.dropout_num_active(jax.random.key(0, impl="rbg"), 4, S, 0)


@pytest.mark.parametrize("masked", [0, M])
def test_codes_to_vectors_to_codes_round_trip(masked):
    # each later residual stage is 20x finer, so greedy encoding of a decoded sum is exact
    scales = [1.0] * masked + [0.05 ** (i + (masked > 0)) for i in range(S - masked)]
    cbs, x, w = setup(3, scales)
    codes = np.random.default_rng(4).integers(0, K, (N, S)).astype(np.int32)
    vectors = rvq.codes_to_vectors(cbs, codes, masked)
    np.testing.assert_array_equal(_rvq(cbs, vectors, w, ALL, masked)["out"].codes, codes)
    with pytest.raises(ValueError, match="code ids"):
        rvq.codes_to_vectors(cbs, np.full((1, S), K), masked)
    with pytest.raises(ValueError, match="only 4 codebooks"):
        rvq.codes_to_vectors(cbs, np.zeros((1, S + 1), np.int32))


def test_bad_stage_setups_are_rejected():
    cbs, x, _ = setup(6)
    with pytest.raises(ValueError, match="does not divide"):
        rvq.quantize(cbs, x, masked_stages=4)  # 4 masked stages cannot split D = 6 channels
    with pytest.raises(ValueError, match="masked stages but only"):
        rvq.quantize(cbs[:2], x, masked_stages=3)
    with pytest.raises(ValueError, match="codebook size"):
        rvq.quantize(cbs[:, :1], x)


# --------------------------------------------------------------------------- module, EMA

DECAY = 0.5
MODULE = rvq.ResidualVQ(num_stages=S, num_codes=K, dim=D, masked_stages=M, quantize_dropout=True,
                        use_ema=True, decay=DECAY)


def test_module_ema_counts_only_active_examples_and_only_in_training():
    cbs, x, _ = setup(5)
    stats = {"codebooks": cbs, "cluster_size": np.ones((S, K), np.float32), "embed_sum": cbs.copy()}
    variables = {"vq_stats": stats}
    key = jax.random.key(1, impl="rbg")
    shapes = jax.eval_shape(lambda: MODULE.init(key, x))
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, variables)

    closed = jax.make_jaxpr(lambda v, x: MODULE.apply(v, x, train=False, mutable=["vq_stats"])[1])(variables, x)
    assert closed.jaxpr.outvars == closed.jaxpr.invars[:3]  # train=False: statistics untouched

    out, new = jit(lambda v, x, k: MODULE.apply(v, x, train=True, mutable=["vq_stats"], rngs={"dropout": k}))(
        variables, x, key)
    n = np.asarray(out.stats["num_active"])
    assert n.min() >= M and n.max() <= S
    codes = np.asarray(out.codes)
    for s in range(S):
        active = n > s
        counts = np.bincount(codes[active, s], minlength=K)
        np.testing.assert_allclose(new["vq_stats"]["cluster_size"][s], DECAY + (1 - DECAY) * counts, rtol=1e-6)
