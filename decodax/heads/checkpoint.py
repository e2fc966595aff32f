"""Save / load trained draft heads (orbax params + a JSON config) for the bench and the CLI."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from decodax.heads.medusa import DraftHeads

__all__ = ["load_heads", "save_heads"]

_CONFIG = "heads.json"
_PARAMS = "params"


def save_heads(directory: str | os.PathLike, heads: DraftHeads, params: Any, info: dict | None = None) -> str:
    """Write ``directory/heads.json`` and ``directory/params`` (orbax); returns the directory."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, _PARAMS)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, params, force=True)
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump({"dim": heads.dim, "num_heads": heads.num_heads, "hydra": heads.hydra, **(info or {})}, f, indent=1)
    return directory


def load_heads(directory: str | os.PathLike) -> tuple[DraftHeads, Any]:
    """``(DraftHeads, params)`` saved by :func:`save_heads`; ``FileNotFoundError`` naming the
    missing file, ``ValueError`` naming the file that cannot be read."""
    directory = os.path.abspath(os.fspath(directory))
    cfg_path, params_path = os.path.join(directory, _CONFIG), os.path.join(directory, _PARAMS)
    for p in (cfg_path, params_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"draft heads checkpoint incomplete: {p} does not exist "
                                    f"(train them with experiments/train_draft_heads.py)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        heads = DraftHeads(dim=int(cfg["dim"]), num_heads=int(cfg["num_heads"]), hydra=bool(cfg["hydra"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} is not a valid draft heads config: {e}") from e
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, heads.init())
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(params_path, target)
    except Exception as e:  # noqa: BLE001 -- orbax raises many types for unreadable data
        raise ValueError(f"{params_path} is corrupt or does not match {cfg_path}: {e}") from e
    return heads, params
