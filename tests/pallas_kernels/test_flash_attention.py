"""flash_attention (Pallas, interpret mode) equals attention_reference in float32."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference as _attention_reference, causal_mask

attention_reference = jax.jit(_attention_reference, static_argnames="scale")  # one compile per shape

TOL = 1e-5

# (B, T, H, KV, D, block_q, block_k): T not a block multiple, D not a power of two,
# MQA with G=3 (SmolLM2's 9/3 ratio), and a T smaller than the minimum block.
SHAPES = [
    (2, 37, 4, 2, 24, 16, 32),
    (1, 48, 3, 1, 64, 32, 16),
    (2, 5, 2, 2, 16, 64, 64),
]


def _qkv(b, t, h, kvh, d, seed=0):
    kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, t, h, d), jnp.float32),
        jax.random.normal(kk, (b, t, kvh, d), jnp.float32),
        jax.random.normal(kv_, (b, t, kvh, d), jnp.float32),
    )


def tree_mask(b: int, t: int, seed: int = 0) -> np.ndarray:
    """Ancestor masks of random token trees (node 0 the root, parent[i] < i), diagonal set."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            mask[r, i, i] = True
            if i:
                p = int(rng.integers(0, i))
                mask[r, i] |= mask[r, p]
    return mask


def _err(a, b):
    return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("shape", SHAPES)
def test_causal_matches_reference(shape):
    b, t, h, kvh, d, bq, bk = shape
    q, k, v = _qkv(b, t, h, kvh, d)
    out = flash_attention(q, k, v, block_q=bq, block_k=bk, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _err(out, attention_reference(q, k, v)) <= TOL
    # an explicit causal mask goes through the masked kernel path: same answer
    explicit = flash_attention(q, k, v, causal_mask(b, t), block_q=bq, block_k=bk, interpret=True)
    assert _err(explicit, out) <= TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_tree_mask_matches_reference_and_wrong_mask_does_not(shape):
    b, t, h, kvh, d, bq, bk = shape
    q, k, v = _qkv(b, t, h, kvh, d, seed=1)
    mask = jnp.asarray(tree_mask(b, t, seed=t))
    ref = attention_reference(q, k, v, mask)
    out = flash_attention(q, k, v, mask, block_q=bq, block_k=bk, interpret=True)
    assert _err(out, ref) <= TOL
    # negative control: a different (transposed) mask must be caught by the same check
    wrong = flash_attention(q, k, v, jnp.swapaxes(mask, 1, 2), block_q=bq, block_k=bk, interpret=True)
    assert _err(wrong, ref) > 1e-2


def test_fully_masked_row_is_uniform_over_real_keys_only():
    b, t, h, kvh, d, bq, bk = SHAPES[0]  # T=37 padded to 64: padding keys must get no weight
    q, k, v = _qkv(b, t, h, kvh, d, seed=2)
    mask = np.asarray(tree_mask(b, t, seed=3)).copy()
    mask[0, 5] = False
    mask = jnp.asarray(mask)
    out = flash_attention(q, k, v, mask, block_q=bq, block_k=bk, interpret=True)
    assert _err(out, attention_reference(q, k, v, mask)) <= TOL
    uniform = jnp.repeat(v, h // kvh, axis=2).mean(axis=1)[0]  # [H, D]
    assert _err(out[0, 5], uniform) <= TOL


def test_composes_with_jit_and_custom_scale():
    b, t, h, kvh, d, bq, bk = SHAPES[2]
    q, k, v = _qkv(b, t, h, kvh, d, seed=4)
    f = jax.jit(
        lambda q, k, v: flash_attention(q, k, v, scale=0.3, block_q=bq, block_k=bk, interpret=True)
    )
    assert _err(f(q, k, v), attention_reference(q, k, v, scale=0.3)) <= TOL


@pytest.mark.parametrize(
    "q_shape, k_shape, mask_shape, kwargs, match",
    [
        ((1, 8, 4, 16), (1, 8, 3, 16), None, {}, "multiple of KV heads"),
        ((1, 8, 4, 16), (1, 7, 2, 16), None, {}, "k and v must be"),
        ((1, 8, 4, 16), (1, 8, 2, 32), None, {}, "k and v must be"),
        ((8, 4, 16), (1, 8, 2, 16), None, {}, "ranks"),
        ((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 7), {}, "mask must be"),
        ((1, 8, 4, 16), (1, 8, 2, 16), None, {"block_q": 24}, "power of two"),
        ((1, 8, 4, 16), (1, 8, 2, 16), None, {"block_k": 0}, "power of two"),
    ],
)
def test_bad_input_raises_value_error(q_shape, k_shape, mask_shape, kwargs, match):
    q = jnp.zeros(q_shape)
    k = jnp.zeros(k_shape)
    mask = None if mask_shape is None else jnp.ones(mask_shape, bool)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, mask, interpret=True, **kwargs)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_triton_and_mosaic(platform, monkeypatch):
    """Compiled (not interpreted) kernels lower to Triton (cuda) / Mosaic (tpu) MLIR on a CPU host.

    Only the lowering is checked here; compiling and running needs the device. Each platform
    uses its own T: the jitted impl caches its trace, compiler params included, per shape.
    """
    mod = importlib.import_module("pallas_kernels.flash_attention")
    if platform == "cuda":
        triton = pytest.importorskip("jax.experimental.pallas.triton")
        monkeypatch.setattr(mod, "compiler_params", lambda interpret: triton.CompilerParams(num_warps=4))
    t = 37 if platform == "cuda" else 29
    q, k, v = _qkv(1, t, 4, 2, 64)
    mask = jnp.asarray(tree_mask(1, t))
    for m in (None, mask):
        f = jax.jit(lambda q, k, v, m=m: flash_attention(q, k, v, m, interpret=False))
        text = f.trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
        assert "decodax_flash_attention" in text
