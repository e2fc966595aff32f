"""The verify cost curve: time of one forward of T new tokens over a cache, T = 1..16."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decodax.model import cache as kv


def step_costs(model, params, ts: Sequence[int] = (1, 2, 4, 8, 16), context: int = 256,
               capacity: int = 512, reps: int = 30) -> dict[int, float]:
    """Median seconds of ``model.apply`` (all T logits) for T new tokens after ``context`` tokens.

    Every speculative and Jacobi method pays cost(T)/cost(1) per verification.
    The cache is donated, as in the decoding loop, so its update is in place.
    """
    fwd = jax.jit(
        lambda p, t, pos, c: model.apply(p, t, pos, c).logits, donate_argnums=(3,)
    )
    out = {}
    for t in ts:
        tokens = jnp.ones((1, t), jnp.int32)
        pos = jnp.arange(context, context + t, dtype=jnp.int32)[None]
        fresh = lambda: kv.commit(kv.init_cache(model.config, 1, capacity), jnp.array([context]))
        jax.block_until_ready(fwd(params, tokens, pos, fresh()))
        times = []
        for _ in range(reps):
            c = fresh()
            jax.block_until_ready(c)
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, tokens, pos, c))
            times.append(time.perf_counter() - t0)
        out[t] = float(np.median(times))
    return out


def step_cost_markdown(costs: dict[int, float]) -> str:
    base = costs[min(costs)]
    lines = ["| T (new tokens) | step time (ms) | cost(T)/cost(1) |", "|---:|---:|---:|"]
    for t, c in costs.items():
        lines.append(f"| {t} | {c * 1e3:.2f} | {c / base:.2f} |")
    return "\n".join(lines) + "\n"
