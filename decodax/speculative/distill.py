"""A distilled draft model: the target's first layers, fine-tuned by knowledge distillation.

DistillSpec-style training (Zhou et al. 2024, "DistillSpec: Improving
Speculative Decoding via Knowledge Distillation"; Hinton et al. 2015): the
draft -- the target's embedding, its first ``n`` layers (initialised from the
target's), final norm and tied LM head -- is trained to match the target's
next-token distribution on the target's own generations (on-policy data), so
more drafts are accepted. The embedding / LM head stay frozen and shared with
the target. The teacher is stored sparsely as its top-``K`` log-probabilities
per position; the loss is the cross-entropy of the draft against the teacher's
renormalised top-``K`` distribution (forward KL up to a constant).

Saved with orbax (:func:`save_draft`); :func:`load_draft` rebuilds the
``Model`` and its params around the target's embedding, ready for
:func:`~decodax.speculative.draft_model.draft_model_drafter` (``params["draft"]``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jaxtyping import Array, Float, Int

from decodax.kernels import pack_q8_0, unpack
from decodax.model.cache import init_cache
from decodax.model.transformer import Model
from decodax.speculative.draft_model import first_layers_model

__all__ = ["draft_init", "kd_loss", "load_draft", "save_draft", "teacher_topk"]

_CONFIG = "draft.json"
_PARAMS = "params"


def draft_init(target_params: dict, n_layers: int) -> dict:
    """The trainable part of an ``n_layers`` draft initialised from the target: float copies of
    its first layers and final norm (``{"layers": [...], "final_norm": ...}``)."""
    if not 1 <= n_layers <= len(target_params["layers"]):
        raise ValueError(f"draft_init: n_layers must be in [1, {len(target_params['layers'])}], got {n_layers}")
    return unpack({"layers": list(target_params["layers"][:n_layers]), "final_norm": target_params["final_norm"]})


def _base(target_params: dict) -> dict:
    return {k: target_params[k] for k in ("embed", "lm_head") if k in target_params}


def teacher_topk(model: Model, params: dict, tokens: Int[Array, "B T"], k: int
                 ) -> tuple[Int[Array, "B T K"], Float[Array, "B T K"]]:
    """The target's top-``k`` next-token ids and log-probabilities at every position (teacher forcing)."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits = model.apply(params, tokens, pos, init_cache(model.config, b, t), empty_cache=True).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vals, ids = jax.lax.top_k(logp, k)
    return ids.astype(jnp.int32), vals


def kd_loss(draft_model: Model, temperature: float = 1.0):
    """``loss_fn(params, batch, key)`` for :func:`decodax.train.make_train_step`.

    ``params = {"draft": draft_init(...), "base": {"embed"[, "lm_head"]}}`` (base frozen);
    ``batch = {"tokens": [B, T], "mask": [B, T]`` (1 where position ``t``'s next token
    is a training target), ``"teacher_ids"``, ``"teacher_logp": [B, T, K]}``. Loss:
    ``-Σ_k p_k log q(id_k)`` with ``p`` the teacher's top-K renormalised (at
    ``temperature``); metrics: ``agree`` (draft argmax = teacher argmax) and ``kl``
    (KL from the teacher's renormalised top-K to the draft).
    """

    def loss_fn(params, batch, key):
        del key
        dp = {**jax.lax.stop_gradient(params["base"]), **params["draft"]}
        tokens, mask = batch["tokens"], batch["mask"].astype(jnp.float32)
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits = draft_model.apply(dp, tokens, pos, init_cache(draft_model.config, b, t), empty_cache=True).logits
        logq = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
        p = jax.nn.softmax(batch["teacher_logp"] / temperature, axis=-1)
        q_sel = jnp.take_along_axis(logq, batch["teacher_ids"], axis=-1)
        ce = -jnp.sum(p * q_sel, axis=-1)
        denom = jnp.maximum(mask.sum(), 1.0)
        agree = (jnp.argmax(logq, -1) == batch["teacher_ids"][..., 0]).astype(jnp.float32)
        kl = jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-30)) - q_sel), axis=-1)  # KL(p_topK || q) >= 0
        return jnp.sum(ce * mask) / denom, {"agree": jnp.sum(agree * mask) / denom, "kl": jnp.sum(kl * mask) / denom}

    return loss_fn


def save_draft(directory: str | os.PathLike, draft: dict, info: dict | None = None) -> str:
    """Write ``directory/draft.json`` and ``directory/params`` (orbax: the trainable part,
    plus ``"acceptance"`` when a SpecDec++ head is included); returns the directory."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, _PARAMS), draft, force=True)
    cfg = {"n_layers": len(draft["layers"]), "acceptance": "acceptance" in draft, **(info or {})}
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump(cfg, f, indent=1)
    return directory


def load_draft(directory: str | os.PathLike, target_model: Model, target_params: dict, *, packed: bool = False
               ) -> tuple[Model, dict, dict]:
    """``(draft_model, draft_params, config)`` saved by :func:`save_draft`, the draft params
    completed with the target's embedding / LM head (``packed``: the draft's layer matrices
    quantized to Q8_0 blocks, ~4x fewer bytes per draft step). ``FileNotFoundError`` names
    a missing file, ``ValueError`` one that cannot be read."""
    directory = os.path.abspath(os.fspath(directory))
    cfg_path, params_path = os.path.join(directory, _CONFIG), os.path.join(directory, _PARAMS)
    for p in (cfg_path, params_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"draft model checkpoint incomplete: {p} does not exist "
                                    f"(train it with experiments/train_draft_model.py)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        n = int(cfg["n_layers"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} is not a valid draft config: {e}") from e
    like = draft_init(target_params, n)
    if cfg.get("acceptance"):
        from decodax.speculative.specdecpp import init_acceptance_head

        like["acceptance"] = init_acceptance_head(jax.random.key(0), target_model.config.dim,
                                                  int(cfg.get("acceptance_hidden", 256)))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            draft = ckpt.restore(params_path, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
    except Exception as e:  # noqa: BLE001 -- orbax raises many types for unreadable data
        raise ValueError(f"{params_path} is corrupt or does not match {cfg_path}: {e}") from e
    if packed:
        draft["layers"] = pack_q8_0(draft["layers"])
    return first_layers_model(target_model, n), {**_base(target_params), **draft}, cfg
