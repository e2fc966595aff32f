"""The recorded Jacobi trajectory is consistent with the decoded output."""

from __future__ import annotations

import jax
import matplotlib
import numpy as np

from decodax.decoding import autoregressive, generate
from decodax.jacobi import RepeatLast
from decodax.jacobi.trajectory import jacobi_trajectory, plot_trajectory
from decodax.model.config import tiny_config
from decodax.model.transformer import Model

matplotlib.use("Agg")


def test_trajectory_matches_the_output():
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=()))
    params = model.init(jax.random.key(3))
    prompt = [5, 17, 3, 88, 41, 5, 17]
    traj = jacobi_trajectory(model, params, prompt, window=5, max_new_tokens=24, init=RepeatLast())
    ref = generate(autoregressive(model), params, [prompt], max_new_tokens=24).rows()[0]
    assert traj.tokens[:24].tolist() == ref
    for i in range(len(traj.start)):
        s, a = traj.start[i], traj.accepted[i]
        assert traj.guesses[i, :a].tolist() == traj.tokens[s : s + a].tolist()  # fixed guesses were emitted
        if a < traj.guesses.shape[1] and s + a < len(traj.tokens):
            assert traj.guesses[i, a] != traj.tokens[s + a]  # the first rejected guess was wrong
        if i:
            assert s == traj.start[i - 1] + traj.accepted[i - 1] + 1
    assert traj.accepted.max() > 0
    ax = plot_trajectory(traj)
    assert len(ax.patches) >= traj.guesses.size
