"""Recording and plotting a Jacobi trajectory: which guesses each iteration fed, and which
of them became fixed (emitted) at which iteration.

An inspection tool for notebooks: it steps the jitted decoder from Python once per
iteration (the decoding loops themselves stay on device, in ``generate``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decodax import sampling
from decodax.decoding.driver import pad_prompts
from decodax.jacobi.decoder import fed_window, jacobi, jacobi_drafter
from decodax.jacobi.init import RandomInit, WindowInit

__all__ = ["Trajectory", "jacobi_trajectory", "plot_trajectory"]


class Trajectory(NamedTuple):
    """Iteration ``i`` fed ``guesses[i]`` for output positions ``start[i] .. start[i] + n - 1``
    and fixed the first ``accepted[i]`` of them (plus the token after them); ``tokens``
    is the decoded output (``tokens[start[i] - 1]`` was the last token fed)."""

    start: np.ndarray  # [I]
    guesses: np.ndarray  # [I, n]
    accepted: np.ndarray  # [I]
    tokens: np.ndarray  # [num_generated]


def jacobi_trajectory(model, params, prompt: list[int], *, window: int, max_new_tokens: int,
                      init: WindowInit | None = None, sampler: sampling.Sampler | None = None,
                      key=None) -> Trajectory:
    """Decode one prompt with :func:`~decodax.jacobi.jacobi` and record every iteration's window."""
    sampler = sampler or sampling.make_sampler(temperature=0.0)
    init = init if init is not None else RandomInit(model.config.vocab_size)
    dec = jacobi(model, window=window, init=init, sampler=sampler)
    drafter = jacobi_drafter(window, init, model.config.vocab_size)
    tokens, lengths = pad_prompts([prompt], pad_to=16)
    capacity = int(lengths.max()) + max_new_tokens + window + 1
    state = dec.init(params, jnp.asarray(tokens), jnp.asarray(lengths), key if key is not None else jax.random.key(0),
                     max_new_tokens=max_new_tokens, capacity=capacity)

    window_of = jax.jit(lambda state: fed_window(drafter, params, state, window=window, sampler=sampler))
    step = jax.jit(dec.step)
    start, guesses, accepted = [], [], []
    while int(state.num_generated[0]) < max_new_tokens:
        before = int(state.num_generated[0])
        guesses.append(np.asarray(window_of(state))[0])
        state = step(params, state)
        start.append(before)
        accepted.append(int(state.num_generated[0]) - before - 1)
    n = int(state.num_generated[0])
    return Trajectory(np.asarray(start), np.stack(guesses), np.asarray(accepted), np.asarray(state.tokens[0, :n]))


def plot_trajectory(traj: Trajectory, ax=None, decode=None):
    """A grid of iterations (rows) x output positions (columns): each iteration's guesses,
    green where fixed by that iteration, red where rejected; the token emitted after the
    fixed prefix is outlined. ``decode``: token id -> label (default: the id)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    iters, n = traj.guesses.shape
    width = int(traj.start.max()) + n
    if ax is None:
        _, ax = plt.subplots(figsize=(min(0.55 * width + 1, 24), 0.45 * iters + 1))
    label = decode or str
    for i in range(iters):
        for j in range(n):
            pos = traj.start[i] + j
            fixed = j < traj.accepted[i]
            ax.add_patch(Rectangle((pos, i), 1, 1, color="#7fc97f" if fixed else "#f4a6a6", alpha=0.9))
            ax.text(pos + 0.5, i + 0.5, label(int(traj.guesses[i, j])), ha="center", va="center", fontsize=7)
        nxt = traj.start[i] + traj.accepted[i]
        if nxt < len(traj.tokens):
            ax.add_patch(Rectangle((nxt, i), 1, 1, fill=False, lw=1.5, ec="#1f4e9a"))
    ax.set_xlim(0, width)
    ax.set_ylim(iters, 0)
    ax.set_xlabel("output position")
    ax.set_ylabel("iteration")
    ax.set_title(f"Jacobi trajectory: {len(traj.tokens)} tokens in {iters} iterations "
                 f"(+ prefill), window {n}")
    return ax
