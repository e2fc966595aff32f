"""The compressed KV cache (decodax.kvquant.cache) behind the KVCache interface.

* Rollback restores exactly the committed state: a cache written and committed past
  ``n`` (groups encoded, the ring advanced), then rolled back to ``n``, shows
  bit-identical keys/values to a cache that only ever held ``n`` tokens -- for every
  codec, including rollbacks below the quantized boundary (within the slack).
* The visible state is ``decode(encode(group))`` below ``q(n)`` and the exact floats above.
* Decoders run unchanged: with a residual window longer than any sequence (nothing is
  ever coded) chain speculative decoding with an early-exit self-draft (layer-sliced
  cache) and token-tree decoding (gather) on the compressed cache give exactly plain greedy's tokens; with
  KIVI-8 the logits stay close to the float cache's.
* ``attention="pallas"`` (interpreted) equals ``"xla"`` over float and KIVI caches.
* ValueErrors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax import generate
from decodax.kvquant import QuantCacheSpec, init_quant_cache, make_codec
from decodax.kvquant.cache import dequantized, kv_bytes_per_token, quantized_length
from decodax.methods import make_decoder
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model

CFG = tiny_config(n_layers=2)
G = 8
CODECS = ["kivi2", "kvquant3", "gear2"]


def _kv(seed, t):
    shape = (CFG.n_layers, 2, t, CFG.n_kv_heads, CFG.head_dim)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


@jax.jit
def _put(cache, k, v):
    return kv.commit(kv.write(cache, k, v), k.shape[2])


def _fill(cache, k, v, cuts):
    """Write [cuts[i], cuts[i+1]) chunks of (k, v), committing each."""
    for a, b in zip(cuts[:-1], cuts[1:]):
        cache = _put(cache, k[:, :, a:b], v[:, :, a:b])
    return cache


def _visible(cache, n):
    return [tuple(np.asarray(x)[:, :, :n] for x in dequantized(cache, l)) for l in range(CFG.n_layers)]


@pytest.mark.parametrize("name", CODECS)
def test_rollback_restores_the_committed_state_exactly(name):
    codec = make_codec(name, group=G)
    k, v = _kv(0, 48)
    new = lambda: init_quant_cache(CFG, 2, 64, codec, residual=4, sink=1 if "kvquant" in name else 0, slack=16)
    n = 29
    ref = _fill(new(), k, v, [0, 24, n])  # only ever held n tokens
    # past n in steps of 1..5 tokens (groups encoded, ring advanced), then back to n
    moved = _fill(new(), k, v, [0, 24, 29, 34, 39, 41])
    assert int(quantized_length(moved)[0]) > int(quantized_length(ref)[0])  # the rollback crosses q(n)
    back = kv.rollback(moved, n)
    for (ka, va), (kb, vb) in zip(_visible(ref, n), _visible(back, n)):
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)
    # and both go on identically
    more = lambda c: _fill(dataclasses.replace(c), *(x.at[:, :, n:].multiply(-1) for x in (k, v)), [n, 40])
    for (ka, va), (kb, vb) in zip(_visible(more(ref), 40), _visible(more(back), 40)):
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)


@pytest.mark.parametrize("name", ["kvquant3"])
def test_visible_state_is_coded_groups_then_exact_floats(name):
    codec = make_codec(name, group=G)
    k, v = _kv(1, 40)
    cache = _fill(init_quant_cache(CFG, 2, 64, codec, residual=5), k, v, [0, 17, 18, 33])
    q = int(quantized_length(cache)[0])
    assert q == (33 - 5) // G * G and 5 <= 33 - q < 5 + G
    kd, vd = dequantized(cache, 1)
    kt, vt = (x[1].transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, S, D]
    np.testing.assert_array_equal(kd[:, :, q:33], kt[:, :, q:33])
    np.testing.assert_array_equal(vd[:, :, q:33], vt[:, :, q:33])
    grp = lambda x: x[:, :, :q].reshape(2, CFG.n_kv_heads, q // G, G, -1)  # noqa: E731
    pos = jnp.broadcast_to(jnp.arange(q).reshape(q // G, G), (2, q // G, G))
    aux = jax.tree.map(lambda a: a[1], cache.aux)
    ek, ev = codec.decode(aux, codec.encode(aux, grp(kt), grp(vt), pos), pos)
    np.testing.assert_allclose(kd[:, :, :q], ek.reshape(kd[:, :, :q].shape), atol=1e-5)
    np.testing.assert_allclose(vd[:, :, :q], ev.reshape(vd[:, :, :q].shape), atol=1e-5)
    assert float(jnp.abs(kd[:, :, :q] - kt[:, :, :q]).max()) > 1e-3  # really coded


@pytest.fixture(scope="module")
def tiny():
    model = Model(CFG)
    return model, model.init(jax.random.PRNGKey(0))


PROMPTS = [[5, 9, 11, 5, 9, 11, 5, 9, 11, 7], [3, 4, 5, 6, 3, 4, 5]]


@pytest.mark.parametrize("method", ["ee-draft", "tr"])
def test_decoders_run_unchanged_on_a_compressed_cache(tiny, method):
    model, params = tiny
    ref = generate(make_decoder("ar", model, params), params, PROMPTS, max_new_tokens=12).rows()
    # a window longer than every sequence: nothing is coded, so greedy must be exact
    lossless = dataclasses.replace(model, cache_spec=QuantCacheSpec(make_codec("kivi4", group=G), residual=512))
    out = generate(make_decoder(method, lossless, params), params, PROMPTS, max_new_tokens=12)
    assert out.rows() == ref


def test_kivi8_logits_stay_close_and_bytes_shrink(tiny):
    model, params = tiny
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 40), 3, 64)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    run = jax.jit(lambda c, a, b: model.apply(params, toks[:, a:b], pos[:, a:b], c), static_argnums=(1, 2))
    full = run(kv.init_cache(CFG, 2, 64), 0, 40).logits
    cache = init_quant_cache(CFG, 2, 64, make_codec("kivi8", group=G), residual=4)
    out = run(kv.commit(run(cache, 0, 24).cache, 24), 24, 40)
    np.testing.assert_allclose(out.logits, full[:, 24:], atol=2e-3)
    float_bytes = 2 * CFG.head_dim * 4 * CFG.n_layers * CFG.n_kv_heads
    # D = 8, G = 8: 8 code bytes + 8 scale bytes per token for keys and for values, of 64
    assert kv_bytes_per_token(cache, 1024, CFG.head_dim) == pytest.approx(float_bytes / 2, rel=0.02)


def test_pallas_attention_equals_xla(tiny):
    """Prefill (flash attention), then a tree-masked step over a float cache (split-K decode
    partials) and over a KIVI-4 cache (fused dequantize-and-attend partials)."""
    model, params = tiny
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 36), 3, 64)
    pos = jnp.broadcast_to(jnp.arange(36), (2, 36))
    apply = jax.jit(model.apply, static_argnames=("empty_cache", "attention"))
    tree = jnp.array([[True, False, False], [True, True, False], [True, False, True]])  # 2 branches
    mask = jnp.broadcast_to(tree, (2, 3, 3))
    for cache in (kv.init_cache(CFG, 2, 64), init_quant_cache(CFG, 2, 64, make_codec("kivi4", group=G), residual=4)):
        pre = apply(params, toks[:, :30], pos[:, :30], cache, empty_cache=True)
        if isinstance(cache, kv.KVCache):
            flash = apply(params, toks[:, :30], pos[:, :30], cache, empty_cache=True, attention="pallas")
            np.testing.assert_allclose(flash.logits, pre.logits, atol=1e-5)
        cache = kv.commit(pre.cache, jnp.array([30, 27]))
        step = {impl: apply(params, toks[:, 30:33], pos[:, 30:33], cache, attn_mask=mask, attention=impl)
                for impl in ("xla", "pallas")}
        np.testing.assert_allclose(step["pallas"].logits, step["xla"].logits, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the codec group"):
        init_quant_cache(CFG, 1, 60, make_codec("kivi4", group=G))
    with pytest.raises(ValueError, match="sink"):
        init_quant_cache(CFG, 1, 64, make_codec("kivi4", group=G), sink=G)
    with pytest.raises(ValueError, match="unknown KV codec"):
        make_codec("kiwi4")
    with pytest.raises(ValueError, match="bits must be one of"):
        make_codec("kivi3")
    with pytest.raises(ValueError, match="attention must be one of"):
        Model(CFG).apply(Model(CFG).init(jax.random.PRNGKey(0)), jnp.zeros((1, 1), jnp.int32),
                         jnp.zeros((1, 1), jnp.int32), kv.init_cache(CFG, 1, 8), attention="cuda")
    with pytest.raises(ValueError, match="KIVI codec"):
        model = Model(CFG)
        cache = init_quant_cache(CFG, 1, 64, make_codec("int8", group=G))
        model.apply(model.init(jax.random.PRNGKey(0)), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                    cache, attention="pallas")
