"""Shared fixtures of the strategy tests: one tiny model and a brute-force forward.

The model is untied with its LM head scaled x10 (clear margins between candidates,
varied greedy continuations) and token 91 as its EOS, which the greedy, beam and
contrastive continuations of ``PROMPTS`` reach in some rows and not in others. ``forward`` runs
full causal forwards without a KV cache (the references' only model access)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.model.cache import init_cache
from strategies.common import ROWS, WIDTH, tiny_model


@pytest.fixture(scope="session")
def tiny():
    """One layer (each extra layer costs seconds of compile time per decoder)."""
    return tiny_model(1, 3)


@pytest.fixture(scope="session")
def forward(tiny):
    """``forward(seqs)`` -> per sequence (log-probs [len, V], unit hidden states [len, D]),
    the hidden states taken after the final RMSNorm (its gain applied; the RMS scale
    does not change a cosine)."""
    model, params = tiny

    @jax.jit
    def run(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(WIDTH), (ROWS, WIDTH))
        out = model.apply(params, tokens, positions, init_cache(model.config, ROWS, WIDTH), empty_cache=True)
        h = out.hidden * params["final_norm"]
        return jax.nn.log_softmax(out.logits, axis=-1), h / jnp.linalg.norm(h, axis=-1, keepdims=True)

    def call(seqs):
        assert len(seqs) <= ROWS and max(map(len, seqs)) <= WIDTH
        tokens = np.zeros((ROWS, WIDTH), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
        logp, h = map(np.asarray, run(params, jnp.asarray(tokens)))
        return [(logp[i, : len(s)], h[i, : len(s)]) for i, s in enumerate(seqs)]

    return call
