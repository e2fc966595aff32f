"""The KV-cache perplexity protocol (decodax.bench.kv_cache): with the float cache it equals
teacher-forced perplexity of the same tokens from one full forward; a compressed cache
changes it; bad window shapes raise."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.bench.kv_cache import cache_spec, perplexity
from decodax.kvquant import QuantCacheSpec, make_codec
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model


def test_float_cache_protocol_equals_one_teacher_forced_forward():
    model = Model(tiny_config(n_layers=1))
    params = model.init(jax.random.PRNGKey(0))
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 48), 3, 64), np.int32)
    got = perplexity(model, params, windows, prefill=16, chunk=8, batch=2)
    logits = model.apply(params, jnp.asarray(windows), jnp.broadcast_to(jnp.arange(48), (3, 48)),
                         kv.init_cache(model.config, 3, 48), empty_cache=True).logits
    lp = jax.nn.log_softmax(logits[:, 15:47])
    nll = -jnp.take_along_axis(lp, jnp.asarray(windows[:, 16:, None]), axis=-1).mean()
    assert got == pytest.approx(math.exp(float(nll)), rel=1e-5)
    coded = dataclasses.replace(model, cache_spec=QuantCacheSpec(make_codec("int4", group=8), residual=8, slack=8))
    assert perplexity(coded, params, windows, prefill=16, chunk=8, batch=2) != pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        perplexity(model, params, windows, prefill=16, chunk=5)
    with pytest.raises(ValueError, match="calibration"):
        cache_spec("kvquant4", model, params)
