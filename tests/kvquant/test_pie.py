"""PIE (decodax.kvquant.pie) and KVQuant calibration (decodax.kvquant.calibrate).

* With one layer, a token's keys/values depend only on the token and its position,
  so PIE's re-rotated cache must equal a full re-prefill of the edited text; leaving
  the suffix keys at their stale positions (``rerotate=False``) must not.
* Deeper models: an edit that rewrites the same tokens leaves the logits unchanged.
* Calibration: shapes, sorted centroids, thresholds bracketing the pre-RoPE keys, and
  the pre-RoPE keys re-rotated equal the cache's keys.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.kvquant import init_quant_cache, make_codec
from decodax.kvquant.calibrate import calibrate_kvquant, calibration_kv
from decodax.kvquant.pie import pie_edit
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.rope import rotate
from decodax.model.transformer import Model

TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 30), 3, 64)
NEW = jnp.array([[7, 8, 9, 10, 11], [12, 13, 14, 15, 16]])


def _model(layers):
    model = Model(tiny_config(n_layers=layers))
    return model, model.init(jax.random.PRNGKey(0))


PIE = jax.jit(pie_edit, static_argnums=(0, 4, 5), static_argnames="rerotate")


@partial(jax.jit, static_argnums=0)
def _prefill(model, params, toks):
    n = toks.shape[1]
    out = model.apply(params, toks, jnp.broadcast_to(jnp.arange(n), toks.shape), kv.init_cache(model.config, 2, 48),
                      empty_cache=True)
    return kv.commit(out.cache, n)


@pytest.mark.parametrize("start,end", [(10, 13), (10, 17)])  # grow by 2, shrink by 2
def test_one_layer_pie_equals_reprefill_and_stale_positions_do_not(start, end):
    model, params = _model(1)
    cache = _prefill(model, params, TOKENS)
    edited = jnp.concatenate([TOKENS[:, :start], NEW, TOKENS[:, end:]], axis=1)
    ref = _prefill(model, params, edited)
    n = edited.shape[1]
    pie = PIE(model, params, cache, NEW, start, end)
    assert pie.length.tolist() == [n, n]
    np.testing.assert_allclose(pie.k[:, :, :, :n], ref.k[:, :, :, :n], atol=1e-5)
    np.testing.assert_allclose(pie.v[:, :, :, :n], ref.v[:, :, :, :n], atol=1e-5)
    stale = PIE(model, params, cache, NEW, start, end, rerotate=False)
    assert float(jnp.abs(stale.k[:, :, :, :n] - ref.k[:, :, :, :n]).max()) > 1e-2


def test_rewriting_the_same_tokens_changes_nothing():
    model, params = _model(2)
    cache = _prefill(model, params, TOKENS[:, :-1])
    pie = PIE(model, params, cache, TOKENS[:, 10:13], 10, 13)
    last, pos = TOKENS[:, -1:], jnp.full((2, 1), 29)
    np.testing.assert_allclose(model.apply(params, last, pos, pie).logits,
                               model.apply(params, last, pos, cache).logits, atol=1e-5)


def test_pie_bad_arguments():
    model, params = _model(1)
    cache = _prefill(model, params, TOKENS)
    with pytest.raises(ValueError, match="start <= end"):
        pie_edit(model, params, cache, NEW, 12, 10)
    with pytest.raises(ValueError, match="past a row's cached length"):
        pie_edit(model, params, cache, NEW, 10, 31)
    with pytest.raises(ValueError, match="cache slots"):
        pie_edit(model, params, cache, jnp.zeros((2, 20), jnp.int32), 10, 11)
    with pytest.raises(ValueError, match="float KVCache"):
        pie_edit(model, params, init_quant_cache(model.config, 2, 48, make_codec("kivi4", group=8)), NEW, 1, 2)


def test_kvquant_calibration():
    model, params = _model(2)
    toks = TOKENS[:1]
    k_pre, v = calibration_kv(model, params, toks)
    cache = _prefill(model, params, TOKENS)
    np.testing.assert_allclose(rotate(k_pre, jnp.arange(30), model.config.rope_theta), cache.k[:, :1, :, :30], atol=1e-5)
    aux = calibrate_kvquant(model, params, toks, bits=3, outlier_frac=0.1)
    assert aux["k_centroids"].shape == aux["v_centroids"].shape == (2, 8)
    assert bool(jnp.all(jnp.diff(aux["k_centroids"], axis=-1) >= 0))
    lo, hi = aux["k_lo"][:, :, None], aux["k_hi"][:, :, None]  # [L, K, 1, D]
    inside = jnp.mean((k_pre[:, 0, :, 1:] >= lo) & (k_pre[:, 0, :, 1:] <= hi))
    assert 0.85 <= float(inside) < 1.0  # 10% outliers by construction (percentile interpolation)
