"""SpatialInit (SJD's spatial-neighbour window initialiser): guesses equal hand-computed
neighbours (emitted tokens and earlier guesses of the same window, raster 0 random),
ValueErrors. The exact-law test of SJD with SpatialInit is parametrized into
``test_decoder.test_sjd_law_of_first_tokens_is_the_target_law``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.decoding.state import DecodeState
from decodax.jacobi.init import SpatialInit


def _state(rows: list[list[int]], buffer: int = 16) -> DecodeState:
    b = len(rows)
    tokens = np.zeros((b, buffer), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    n = np.array([len(r) for r in rows], np.int32)
    last = np.array([r[-1] if r else 0 for r in rows], np.int32)
    z = jnp.zeros((b,), jnp.int32)
    return DecodeState(tokens=jnp.asarray(tokens), num_generated=jnp.asarray(n), done=jnp.zeros((b,), bool),
                       cache=None, key=jax.random.key(0), last_token=jnp.asarray(last),
                       prompt=jnp.zeros((b, 2), jnp.int32), prompt_len=z + 2, calls=z, steps=jnp.int32(0))


def test_guesses_copy_the_hand_computed_neighbours():
    # width 3 raster:   r0 r1 r2 / r3 r4 r5 / r6 r7 r8
    rows = [[10, 11, 12, 13],  # window starts at raster 4
            [20],  # raster 1
            [30, 31, 32, 33, 34, 35, 36, 37]]  # raster 8
    state = _state(rows)
    above = np.asarray(SpatialInit(3, 50)(state, jax.random.key(1), 5))
    # row 0: r4 <- r1 = 11, r5 <- r2 = 12, r6 <- r3 = 13, r7 <- r4 (guess) = 11, r8 <- r5 (guess) = 12
    # row 1: r1 <- left r0 = 20, r2 <- left r1 (guess) = 20, r3 <- r0 = 20, r4 <- r1 (guess) = 20, r5 <- r2 = 20
    # row 2: r8 <- r5 = 35, r9 <- r6 = 36, r10 <- r7 = 37, r11 <- r8 (guess) = 35, r12 <- r9 (guess) = 36
    assert above.tolist() == [[11, 12, 13, 11, 12], [20] * 5, [35, 36, 37, 35, 36]]
    left = np.asarray(SpatialInit(3, 50, prefer="left")(state, jax.random.key(1), 5))
    # row 0: r4 <- r3 = 13, r5 <- r4 = 13, r6 (column 0) <- above r3 = 13, r7 <- r6 = 13, r8 <- 13
    # row 2: r8 <- r7 = 37, r9 (column 0) <- r6 = 36, r10 <- r9 = 36, r11 <- 36, r12 (col 0) <- r9 = 36
    assert left.tolist() == [[13] * 5, [20] * 5, [37, 36, 36, 36, 36]]


def test_raster_zero_is_random_and_propagates():
    state = _state([[], []])
    out = np.asarray(SpatialInit(2, 1000)(state, jax.random.key(2), 4))
    # r0 random, r1 <- left r0, r2 <- above r0, r3 <- above r1
    assert np.all(out == out[:, :1]) and out[0, 0] != out[1, 0]
    assert np.all((out >= 0) & (out < 1000))
    jitted = jax.jit(lambda s, k: SpatialInit(2, 1000)(s, k, 4))
    assert np.array_equal(np.asarray(jitted(state, jax.random.key(2))), out)


def test_hashable_and_bad_arguments():
    assert hash(SpatialInit(8, 1024)) == hash(SpatialInit(8, 1024))
    for bad in (dict(width=0, vocab_size=4), dict(width=2.0, vocab_size=4), dict(width=True, vocab_size=4),
                dict(width=2, vocab_size=0), dict(width=2, vocab_size=4, prefer="below")):
        with pytest.raises(ValueError, match="SpatialInit"):
            SpatialInit(**bad)
