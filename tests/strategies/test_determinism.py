"""Every registered strategy is deterministic given its key: two runs with one key give the
same tokens and counters (the sampling ones are run with a sampling sampler, so the key matters;
a second key is run too, to show that it does). Decoders come from ``decodax.methods`` on the
tiny model, as the CLI builds them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from strategies.common import EOS, N, PROMPTS, tiny_model

from decodax import generate, sampling
from decodax.methods import make_decoder
from decodax.strategies import build_ngram_table, with_ngram

GREEDY = sampling.make_sampler(temperature=0.0)
HOT = sampling.make_sampler(temperature=1.5)
# (method, sampler): the sampling strategies take a sampling sampler; the others are deterministic
# by construction and run greedy (their key is unused, which the same-key check still covers).
CASES = [("beam", GREEDY), ("contrastive", GREEDY), ("contrastive-decoding", HOT), ("momentum", GREEDY),
         ("cntp", HOT), ("adadec", GREEDY), ("ead", HOT), ("superposed", GREEDY)]


def run(name, sampler, model, params, key):
    dec = make_decoder(name, model, params, sampler)
    if name == "superposed":  # the registered hook's table is the default tokenizer's: a tiny one here
        params = with_ngram(params, build_ngram_table([np.arange(97, dtype=np.int32)] * 2, 6, vocab_size=97))
    out = generate(dec, params, PROMPTS, max_new_tokens=N, key=key, eos_ids=(EOS,))
    return out.tokens, out.lengths, out.calls


EARLY_EXIT = {"contrastive-decoding", "ead"}  # their small model is an early exit: two layers


@pytest.fixture(scope="module")
def two_layers():
    return tiny_model(2, 4, "tiny2")


@pytest.mark.parametrize("name,sampler", CASES, ids=[c[0] for c in CASES])
def test_same_key_same_output(tiny, two_layers, name, sampler):
    model, params = two_layers if name in EARLY_EXIT else tiny
    a = run(name, sampler, model, params, jax.random.key(7))
    b = run(name, sampler, model, params, jax.random.key(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    if not sampler.is_greedy:  # the key is used: another key changes some row
        c = run(name, sampler, model, params, jax.random.key(8))
        assert any(not np.array_equal(x, y) for x, y in zip(a, c)), f"{name}: the key has no effect"
