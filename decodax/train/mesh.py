"""Device mesh with ``data`` and ``fsdp`` axes, parameter/batch shardings, multi-host start-up."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["BATCH_AXES", "initialize_distributed", "make_mesh", "shard_batch", "shard_params"]

BATCH_AXES = ("data", "fsdp")  # the batch is split over every device (FSDP convention)

# Set by TPU pod / cluster launchers; any of them means "this is one process of many".
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                  "TPU_WORKER_HOSTNAMES", "SLURM_JOB_NUM_NODES", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(force: bool | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when the environment asks for multi-host
    (a coordinator address, TPU pod worker list, SLURM/MPI world) or ``DECODAX_DISTRIBUTED=1``;
    ``DECODAX_DISTRIBUTED=0`` or ``force=False`` disables. Returns whether it initialized."""
    setting = os.environ.get("DECODAX_DISTRIBUTED")
    wanted = force if force is not None else (setting == "1" if setting in ("0", "1")
                                               else any(os.environ.get(k) for k in _MULTIHOST_ENV))
    if wanted and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        return True
    return False


def make_mesh(data: int | None = None, fsdp: int | None = None, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all). Unspecified sizes take the
    rest: ``make_mesh()`` is all-data, ``make_mesh(fsdp=4)`` on 8 devices is 2 x 4."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data is None and fsdp is None:
        data, fsdp = n, 1
    elif data is None:
        data = n // fsdp if fsdp and n % fsdp == 0 else -1
    elif fsdp is None:
        fsdp = n // data if data and n % data == 0 else -1
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"make_mesh: data x fsdp must equal the {n} devices, got data={data}, fsdp={fsdp}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def _param_spec(x: Any, fsdp: int) -> P:
    """Shard the largest axis divisible by the fsdp size; replicate small or indivisible leaves."""
    shape = np.shape(x)
    if fsdp == 1 or not shape:
        return P()
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % fsdp == 0 and shape[i] >= fsdp]
    if not axes:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = "fsdp"
    return P(*spec)


def shard_params(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (params, optimizer state) on ``mesh``: FSDP-sharded along ``fsdp``,
    replicated along ``data``."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, _param_spec(x, fsdp))), tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split every leaf's leading (batch) axis over all devices (``data`` x ``fsdp``)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        if np.shape(x)[0] % n:
            raise ValueError(f"shard_batch: batch size {np.shape(x)[0]} is not a multiple of the {n} devices")
        return jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES)))

    return jax.tree.map(put, batch)
