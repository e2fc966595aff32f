"""VQ-Logits: log-probabilities through the K codes equal the full softmax over the scattered
vocabulary logits; codebook and map from clustered embeddings; round trips; bad input."""

import jax
import numpy as np
import pytest

from decodax.quantizers import vq, vq_logits
from jax import jit

V, K, DM, B = 40, 4, 4, 6
KEY = jax.random.key(0, impl="rbg")


@jit
def _vq_logits(h, codebook, token_to_code, tokens):
    return {
        "full": vq_logits.log_probs(h, codebook, token_to_code),
        "picked": vq_logits.log_probs(h, codebook, token_to_code, tokens),
        "logits": vq_logits.token_logits(h, codebook, token_to_code),
        "embeddings": vq_logits.token_embeddings(codebook, token_to_code),
    }


def setup(seed=0):
    rng = np.random.default_rng(seed)
    h, codebook = rng.standard_normal((B, DM)).astype(np.float32), rng.standard_normal((K, DM)).astype(np.float32)
    token_to_code = rng.integers(0, K - 1, V).astype(np.int32)  # code K-1 maps no token
    return h, codebook, token_to_code, rng.integers(0, V, B).astype(np.int32)


def test_log_probs_equal_the_softmax_of_the_scattered_logits():
    h, codebook, token_to_code, tokens = setup()
    r = _vq_logits(h, codebook, token_to_code, tokens)
    logits = (h.astype(np.float64) @ codebook.T)[:, token_to_code]  # L_v[t] = L_c[M(t)]
    np.testing.assert_allclose(r["logits"], logits, rtol=1e-5, atol=1e-5)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(r["full"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["picked"], ref[np.arange(B), tokens], rtol=1e-5, atol=1e-5)
    same = token_to_code == token_to_code[0]
    np.testing.assert_array_equal(r["full"][:, same], np.repeat(r["full"][:, :1], same.sum(), 1))


def test_codebook_from_clustered_embeddings_and_round_trip():
    rng = np.random.default_rng(3)
    centers = np.array([[10, 0, 0, 0], [-10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 0, -10]], np.float32)
    emb = (centers[np.arange(V) % K] + 0.1 * rng.standard_normal((V, DM))).astype(np.float32)
    codebook, token_to_code = jit(lambda e: vq_logits.from_embeddings(KEY, e, K, iters=2))(emb)
    m = np.asarray(token_to_code)
    for c in range(K):  # tokens of one cluster share one code, different clusters differ
        assert len(set(m[np.arange(V) % K == c])) == 1
    assert len(set(m)) == K
    h, _, _, tokens = setup()
    r = _vq_logits(h, np.asarray(codebook), m, tokens)
    np.testing.assert_array_equal(vq.nearest_code(r["embeddings"], codebook), m)  # codes -> vectors -> codes


def test_bad_codebook_and_map_are_rejected():
    h, codebook, token_to_code, _ = setup()
    with pytest.raises(ValueError, match="codebook size"):
        vq_logits.log_probs(h, codebook[:1], np.zeros(V, np.int32))
    with pytest.raises(ValueError, match="code ids"):
        vq_logits.token_logits(h, codebook, np.full(V, K, np.int32))
    with pytest.raises(ValueError, match="code ids"):
        vq_logits.token_embeddings(codebook, np.array([-1]))


def _inertia(emb, codebook, m):
    return float(np.sum((emb - np.asarray(codebook)[m]) ** 2))


def test_forgy_seeded_map_is_consistent_and_lloyd_lowers_the_inertia():
    emb = np.random.default_rng(5).standard_normal((V, DM)).astype(np.float32)
    cb0, m0 = vq_logits.from_embeddings(KEY, emb, K, iters=0, init="random")
    cb5, m5 = vq_logits.from_embeddings(KEY, emb, K, iters=5, init="random")
    rows = {tuple(r) for r in emb.tolist()}
    assert all(tuple(r) in rows for r in np.asarray(cb0).tolist())  # Forgy: K distinct data rows
    assert len({tuple(r) for r in np.asarray(cb0).tolist()}) == K
    for cb, m in ((cb0, m0), (cb5, m5)):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(vq.nearest_code(emb, cb)))
        assert np.asarray(m).min() >= 0 and np.asarray(m).max() < K
    assert _inertia(emb, cb5, np.asarray(m5)) <= _inertia(emb, cb0, np.asarray(m0)) + 1e-4


def test_from_embeddings_rejects_bad_arguments():
    emb = np.zeros((V, DM), np.float32)
    with pytest.raises(ValueError, match="init"):
        vq_logits.from_embeddings(KEY, emb, K, init="bogus")
    with pytest.raises(ValueError, match="V >= num_codes"):
        vq_logits.from_embeddings(KEY, emb[:3], K, init="random")
    with pytest.raises(ValueError, match="iters"):
        vq_logits.from_embeddings(KEY, emb, K, iters=-1)
    with pytest.raises(ValueError, match="codebook size"):
        vq_logits.from_embeddings(KEY, emb, 1, init="random")
