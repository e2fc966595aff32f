"""``fit``: the training loop around ``train_step`` -- sharding, checkpoints, resume, logs."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rich.progress import Progress

from decodax.train.checkpoint import Checkpoints
from decodax.train.mesh import shard_batch, shard_params
from decodax.train.state import TrainState

__all__ = ["fit"]


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batch_fn: Callable[[int], Any],
    num_steps: int,
    *,
    mesh: Mesh | None = None,
    checkpoints: Checkpoints | None = None,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Run ``train_step`` until ``state.step == num_steps``; returns the final state and
    the metrics of the steps run in this call.

    ``batch_fn(step)`` gives the batch of a step, so a resumed run sees the
    same data as an uninterrupted one. With ``checkpoints`` the latest saved
    state (if any) replaces ``state`` first, a checkpoint is written every
    ``save_every`` steps and at the end. With ``mesh`` the state is FSDP-sharded
    and each batch split over all devices. ``log_path`` gets one JSON line of
    metrics per step (appended across resumes).
    """
    if num_steps < 0:
        raise ValueError(f"fit: num_steps must be >= 0, got {num_steps}")
    if checkpoints is not None:
        state = checkpoints.restore(state) or state
    # Steps donate their input state; copy once so the caller's arrays (e.g. a frozen base
    # shared with other code) are never invalidated.
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    if mesh is not None:
        state = shard_params(state, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step_fn = jax.jit(train_step, in_shardings=(shardings, None),
                          out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
    else:
        step_fn = jax.jit(train_step, donate_argnums=(0,))
    log = open(log_path, "a") if log_path is not None else None
    history: list[dict[str, float]] = []
    start = int(state.step)
    try:
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task("train", total=num_steps, completed=start)
            for step in range(start, num_steps):
                batch = batch_fn(step)
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                state, metrics = step_fn(state, batch)
                row = {"step": step + 1, **{k: float(np.asarray(v)) for k, v in metrics.items()}}
                history.append(row)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if checkpoints is not None:
                    checkpoints.save(state)
                bar.update(task, advance=1, description=f"train loss {row['loss']:.4f}")
        if checkpoints is not None:
            checkpoints.save(state, force=True)
            checkpoints.wait()
    finally:
        if log is not None:
            log.close()
    return state, history
