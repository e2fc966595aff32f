"""decode_attention (Pallas split-K, interpret mode) equals decode_attention_reference in float32."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import combine_partials, decode_attention
from pallas_kernels.reference import NEG_INF, decode_attention_reference as _decode_attention_reference

decode_attention_reference = jax.jit(_decode_attention_reference, static_argnames="scale")  # one compile per shape

TOL = 1e-5

# (B, T, H, KV, S, D, block_k, num_splits, lengths): ragged rows incl. length 1 and == S,
# S not a multiple of the split, D not a power of two, SmolLM2's 9/3 heads, a row of length 0.
CASES = [
    (3, 1, 6, 2, 100, 24, 16, 4, [1, 100, 50]),
    (4, 4, 3, 1, 64, 64, 16, 2, [64, 1, 33, 0]),
    (2, 3, 9, 3, 256, 64, 32, 8, [200, 1]),
]


def _inputs(b, t, h, kvh, s, d, seed=0):
    kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, t, h, d), jnp.float32),
        jax.random.normal(kk, (b, kvh, s, d), jnp.float32),
        jax.random.normal(kv_, (b, kvh, s, d), jnp.float32),
    )


def _err(a, b):
    return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("case", CASES)
def test_ragged_lengths_match_reference_and_wrong_lengths_do_not(case):
    b, t, h, kvh, s, d, bk, ns, lengths = case
    q, k, v = _inputs(b, t, h, kvh, s, d)
    lengths = jnp.asarray(lengths, jnp.int32)
    ref = decode_attention_reference(q, k, v, lengths)
    out = decode_attention(q, k, v, lengths, block_k=bk, num_splits=ns, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _err(out, ref) <= TOL
    # negative control: reading one slot too many (or too few) is caught
    off = jnp.where(lengths < s, lengths + 1, lengths - 1)
    wrong = decode_attention(q, k, v, off, block_k=bk, num_splits=ns, interpret=True)
    assert _err(wrong, ref) > 1e-3


def test_length_zero_gives_zeros_and_garbage_past_length_is_ignored():
    b, t, h, kvh, s, d, bk, ns, lengths = CASES[1]
    q, k, v = _inputs(b, t, h, kvh, s, d, seed=3)
    lengths = jnp.asarray(lengths, jnp.int32)
    slot = jnp.arange(s)[None, None, :, None]
    dead = slot >= lengths[:, None, None, None]
    k_bad, v_bad = jnp.where(dead, jnp.nan, k), jnp.where(dead, 1e6, v)
    out = decode_attention(q, k_bad, v_bad, lengths, block_k=bk, num_splits=ns, interpret=True)
    assert _err(out, decode_attention_reference(q, k, v, lengths)) <= TOL
    assert float(jnp.abs(out[3]).max()) == 0.0


def test_single_token_gqa_matches_dense_softmax():
    """T=1 against a hand-written softmax (checks the reference's GQA head mapping too)."""
    b, t, h, kvh, s, d, bk, ns, lengths = CASES[0]
    q, k, v = _inputs(b, t, h, kvh, s, d, seed=5)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = decode_attention(q, k, v, lengths, block_k=bk, num_splits=ns, interpret=True)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for r in range(b):
        n = int(lengths[r])
        for hh in range(h):
            sc = kn[r, hh // (h // kvh), :n] @ qn[r, 0, hh] * d**-0.5
            p = np.exp(sc - sc.max())
            want = (p / p.sum()) @ vn[r, hh // (h // kvh), :n]
            np.testing.assert_allclose(np.asarray(out[r, 0, hh]), want, atol=TOL, rtol=0)


def test_combine_partials_ignores_empty_splits():
    rng = np.random.default_rng(0)
    o = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32)  # [N=3, M=2, D=4]
    m = jnp.asarray([[0.5, 1.0], [NEG_INF, NEG_INF], [2.0, -1.0]], jnp.float32)
    l = jnp.asarray([[1.5, 2.0], [0.0, 0.0], [3.0, 0.5]], jnp.float32)
    got = combine_partials(o, m, l)
    w = np.exp(np.asarray(m) - np.asarray(m).max(0))
    want = (w[..., None] * np.asarray(o)).sum(0) / (w * np.asarray(l)).sum(0)[:, None]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert float(jnp.abs(combine_partials(o[1:2], m[1:2], l[1:2])).max()) == 0.0


@pytest.mark.parametrize(
    "q_shape, cache_shape, len_shape, kwargs, match",
    [
        ((2, 1, 4, 16), (2, 3, 32, 16), (2,), {}, "multiple of KV heads"),
        ((2, 1, 4, 16), (2, 2, 32, 8), (2,), {}, "caches must be"),
        ((2, 1, 4, 16), (3, 2, 32, 16), (2,), {}, "caches must be"),
        ((2, 4, 16), (2, 2, 32, 16), (2,), {}, "ranks"),
        ((2, 1, 4, 16), (2, 2, 32, 16), (3,), {}, "lengths must be"),
        ((2, 1, 4, 16), (2, 2, 32, 16), (2,), {"block_k": 48}, "power of two"),
        ((2, 1, 4, 16), (2, 2, 32, 16), (2,), {"num_splits": 0}, "num_splits"),
    ],
)
def test_bad_input_raises_value_error(q_shape, cache_shape, len_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(
            jnp.zeros(q_shape),
            jnp.zeros(cache_shape),
            jnp.zeros(cache_shape),
            jnp.ones(len_shape, jnp.int32),
            interpret=True,
            **kwargs,
        )


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_triton_and_mosaic(platform, monkeypatch):
    """Compiled (not interpreted) kernel lowers to Triton (cuda) / Mosaic (tpu) MLIR on a CPU host.

    Each platform uses its own S: the jitted impl caches its trace (compiler params included).
    """
    mod = importlib.import_module("pallas_kernels.decode_attention")
    if platform == "cuda":
        triton = pytest.importorskip("jax.experimental.pallas.triton")
        monkeypatch.setattr(mod, "compiler_params", lambda interpret: triton.CompilerParams(num_warps=4))
    q, k, v = _inputs(2, 1, 9, 3, 256 if platform == "cuda" else 128, 64)
    lengths = jnp.asarray([200, 1], jnp.int32)
    f = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, block_k=32, interpret=False))
    text = f.trace(q, k, v, lengths).lower(lowering_platforms=(platform,)).as_text()
    assert "decodax_decode_attention" in text
