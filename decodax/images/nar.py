"""Neighboring Autoregressive Modeling (NAR; He et al. 2025, "Neighboring Autoregressive
Modeling for Efficient Visual Generation") for the class-conditional code-grid model of
:mod:`decodax.images.ar`.

NAR generates an ``h x w`` code grid *near-to-far*: token ``(i, j)`` has distance
``d = i + j`` from the top-left token, and step ``d`` generates every token of distance ``d``
in parallel, so a grid takes ``h + w - 1`` steps instead of ``h * w``.

* **Sequence and positions.** The :class:`~decodax.images.ar.ImageLayout` sequence
  ``[BOS, class, codes in raster order]`` with the raster positions ``0 .. T-1`` as RoPE
  positions (as the AR model); only the attention mask changes.
* **Near-to-far mask** (:func:`nar_mask`). The prefix is causal among itself and sees no grid
  token; a grid token of distance ``d`` sees the whole prefix and every grid token of distance
  ``<= d`` (those of distance ``d`` are inputs of the same step, so they see each other). One
  forward over the full, static-shape sequence therefore serves training, and at sampling
  the not-yet-generated positions (any placeholder code) are never read by a position of
  smaller distance.
* **Dimension-oriented heads.** Two output matrices on the same final hidden state: the
  *horizontal* head (the model's ``lm_head``) at ``(i, j)`` predicts ``(i, j + 1)``; the
  *vertical* head (``params["lm_head_v"]``, :data:`VERTICAL_HEAD`) at ``(i, j)`` predicts
  ``(i + 1, j)``. Token ``(0, 0)`` is predicted by the horizontal head at the class position
  (exactly the AR model's rule for the first code). Both keep the code-only ``-inf`` logits of
  :class:`~decodax.images.ar.ImageModel`.
* **Training** (:func:`nar_loss`): cross-entropy of both heads on every target inside the
  grid (``(0, 0)`` from the class position, horizontal targets ``j + 1 < w``, vertical targets
  ``i + 1 < h``), one mean over all of them.
* **Sampling** (:func:`sample_nar`): each token of distance ``d + 1`` gets exactly one
  prediction (:func:`cell_logits`): the horizontal head at its left neighbour ``(i, j - 1)``
  when ``j > 0``, else (first column) the vertical head at ``(i - 1, 0)``. Both sources have
  distance ``d``, so a step's forward reads only tokens already generated.

The NAR law is ``p(grid) = prod_c p_c(grid_c | tokens of smaller distance)`` with ``p_c`` the
sampler's distribution (:func:`decodax.sampling.probs`) of the cell's chosen head.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from decodax import sampling
from decodax.images.ar import (_PARAMS, ImageLayout, ImageModel, _positive, _sample_in_batches, load_image_model,
                               save_image_model)
from decodax.model.cache import init_cache
from decodax.train.loop import fit
from decodax.train.partial import epoch_batches
from decodax.train.state import create_state, make_train_step

__all__ = ["VERTICAL_HEAD", "cell_logits", "load_nar_model", "nar_logits", "nar_loss", "nar_mask", "nar_params",
           "sample_nar", "save_nar_model", "train_nar_model"]

VERTICAL_HEAD = "lm_head_v"  # params key of the vertical head's [V, D] output matrix


# --------------------------------------------------------------------------- #
# Static structure of a layout (numpy, computed at trace time)
# --------------------------------------------------------------------------- #


def _cells(layout: ImageLayout) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each raster cell ``c = i * w + j``."""
    return np.divmod(np.arange(layout.num_codes), layout.width)


def nar_mask(layout: ImageLayout) -> Bool[np.ndarray, "T T"]:
    """``mask[q, k]``: sequence position ``q`` may attend to ``k`` (prefix causal; a grid token of
    distance ``d`` sees the prefix and every grid token of distance ``<= d``)."""
    i, j = _cells(layout)
    dist = np.concatenate([[-1, -1], i + j])
    mask = dist[None, :] <= dist[:, None]
    mask[:2, :2] = np.tril(np.ones((2, 2), bool))
    return mask


def _inference_sources(layout: ImageLayout) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: the sequence position whose hidden state predicts it and whether the vertical
    head does (left neighbour + horizontal head; first column: upper neighbour + vertical head;
    ``(0, 0)``: the class position + horizontal head)."""
    i, j = _cells(layout)
    c = np.arange(layout.num_codes)
    src = np.where(j > 0, 2 + c - 1, np.where(i > 0, 2 + c - layout.width, 1))
    return src, (j == 0) & (i > 0)


def _training_pairs(layout: ImageLayout) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Head name -> (source sequence positions, target cells) of every in-grid target."""
    i, j = _cells(layout)
    c = np.arange(layout.num_codes)
    right, down = c[j + 1 < layout.width], c[i + 1 < layout.height]
    return {"lm_head": (np.concatenate([[1], 2 + right]), np.concatenate([[0], right + 1])),
            VERTICAL_HEAD: (2 + down, down + layout.width)}


# --------------------------------------------------------------------------- #
# Forward and heads
# --------------------------------------------------------------------------- #


def _check_model(owner: str, model: ImageModel, layout: ImageLayout) -> None:
    if (not isinstance(model, ImageModel) or model.num_codes != layout.codebook_size
            or model.config.vocab_size != layout.vocab_size):
        raise ValueError(f"{owner}: model does not match the layout (an ImageModel from image_model(layout) needed)")
    if model.config.max_seq_len < layout.seq_len:
        raise ValueError(f"{owner}: model max_seq_len {model.config.max_seq_len} < sequence length {layout.seq_len}")


def _check_params(owner: str, params: Any) -> None:
    if not isinstance(params, dict) or VERTICAL_HEAD not in params:
        raise ValueError(f"{owner}: params have no vertical head {VERTICAL_HEAD!r} (make them with nar_params)")


def nar_params(model: ImageModel, key: PRNGKeyArray, params: dict | None = None) -> dict:
    """NAR params: ``params`` (``None``: ``model.init(key)``) plus the vertical head. A fresh
    model's vertical head is drawn like the horizontal one (normal(0.02)); given AR-trained
    params without one, it starts as a copy of the horizontal head (a warm start)."""
    if params is None:
        params = model.init(key)
        base = params.get("lm_head", params["embed"])
        return {**params, VERTICAL_HEAD: jax.random.normal(jax.random.fold_in(key, 7), base.shape) * 0.02}
    if VERTICAL_HEAD in params:
        return params
    return {**params, VERTICAL_HEAD: jnp.array(params.get("lm_head", params["embed"]))}


def _hidden(model: ImageModel, layout: ImageLayout, params: dict, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.asarray(nar_mask(layout)), (b, t, t))
    return model.apply(params, tokens, pos, init_cache(model.config, b, t), mask, empty_cache=True,
                       compute_logits=False).hidden


def _head(model: ImageModel, params: dict, name: str, hidden: Float[Array, "*B D"]) -> Float[Array, "*B V"]:
    return model.logits(params if name == "lm_head" else {**params, "lm_head": params[name]}, hidden)


def _check_tokens(owner: str, layout: ImageLayout, tokens) -> None:
    if tuple(tokens.shape[1:]) != (layout.seq_len,) or tokens.ndim != 2:
        raise ValueError(f"{owner}: tokens must be [N, {layout.seq_len}] ([BOS, class, codes]), got {tokens.shape}")


def nar_logits(model: ImageModel, layout: ImageLayout, params: dict, tokens: Int[Array, "B T"]
               ) -> tuple[Float[Array, "B T V"], Float[Array, "B T V"]]:
    """``(horizontal, vertical)`` logits at every sequence position from one forward under the
    near-to-far mask (code-only: ``-inf`` off the codes)."""
    _check_model("nar_logits", model, layout)
    _check_params("nar_logits", params)
    _check_tokens("nar_logits", layout, tokens)
    hidden = _hidden(model, layout, params, jnp.asarray(tokens))
    return _head(model, params, "lm_head", hidden), _head(model, params, VERTICAL_HEAD, hidden)


def cell_logits(model: ImageModel, layout: ImageLayout, params: dict, tokens: Int[Array, "B T"]
                ) -> Float[Array, "B hw V"]:
    """The one prediction NAR sampling uses for each grid cell (raster order): the horizontal
    head at the left neighbour, the vertical head at the upper neighbour in the first column,
    the horizontal head at the class position for ``(0, 0)``. A cell of distance ``d`` reads
    only tokens of distance ``< d``."""
    _check_model("cell_logits", model, layout)
    _check_params("cell_logits", params)
    _check_tokens("cell_logits", layout, tokens)
    return _cell_logits(model, layout, params, jnp.asarray(tokens))


def _cell_logits(model, layout, params, tokens):
    src, vertical = _inference_sources(layout)
    h = _hidden(model, layout, params, tokens)[:, src]
    return jnp.where(vertical[:, None], _head(model, params, VERTICAL_HEAD, h), _head(model, params, "lm_head", h))


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def nar_loss(model: ImageModel, layout: ImageLayout):
    """Both heads' cross-entropy on all their in-grid targets, one mean over them;
    ``loss_fn(params, batch, key)`` for :func:`decodax.train.make_train_step` with
    ``batch = {"tokens": [B, T]}`` (``ImageLayout.sequences``). Metrics: each head's mean."""
    _check_model("nar_loss", model, layout)
    pairs = {name: p for name, p in _training_pairs(layout).items() if len(p[0])}

    def loss_fn(params, batch, key):
        del key
        tokens = batch["tokens"]
        hidden = _hidden(model, layout, params, tokens)
        ces, metrics = [], {}
        for name, (src, tgt) in pairs.items():
            logits = _head(model, params, name, hidden[:, src]).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 2 + tgt])
            ces.append(ce.reshape(-1))
            metrics["horizontal" if name == "lm_head" else "vertical"] = ce.mean()
        ce = jnp.concatenate(ces)
        return ce.mean(), {**metrics, "tokens": jnp.asarray(ce.size, jnp.float32)}

    return loss_fn


def train_nar_model(model: ImageModel, layout: ImageLayout, tokens: Int[np.ndarray, "N T"], *, steps: int,
                    batch_size: int, lr: float = 3e-3, weight_decay: float = 0.05, seed: int = 0,
                    params: Any = None, progress: bool = False, log_path: str | os.PathLike | None = None
                    ) -> tuple[Any, list[dict[str, float]]]:
    """:func:`nar_loss` with the recipe of :func:`~decodax.images.ar.train_image_model` (AdamW,
    warmup + cosine decay, shuffled epochs, :func:`decodax.train.fit`). ``tokens`` are
    ``ImageLayout.sequences``' ``[BOS, class, codes]``; ``params`` may be NAR params or AR
    params (the vertical head then starts as a copy of the horizontal one). Returns
    ``(params, history)``."""
    _positive("train_nar_model", "steps", steps)
    _positive("train_nar_model", "batch_size", batch_size)
    _check_model("train_nar_model", model, layout)
    tokens = np.asarray(tokens)
    _check_tokens("train_nar_model", layout, tokens)
    if (len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer) or np.any(tokens[:, 0] != layout.bos)
            or np.any((tokens[:, 1] < layout.codebook_size) | (tokens[:, 1] >= layout.bos))
            or tokens[:, 2:].min() < 0 or tokens[:, 2:].max() >= layout.codebook_size):
        raise ValueError("train_nar_model: tokens must be non-empty int rows [BOS, class, codes] "
                         "(ImageLayout.sequences)")
    key = jax.random.key(seed)
    params = nar_params(model, key, params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    state = create_state(params, tx, jax.random.fold_in(key, 1))
    batch_fn = epoch_batches({"tokens": tokens.astype(np.int32)}, min(batch_size, len(tokens)), seed)
    state, history = fit(state, make_train_step(nar_loss(model, layout)), batch_fn, steps, progress=progress,
                         log_path=log_path)
    return state.params, history


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(model: ImageModel, layout: ImageLayout, sampler: sampling.Sampler, params: dict,
              prompts: Int[Array, "B 2"], key: PRNGKeyArray) -> tuple[Int[Array, "B hw"], Int[Array, ""]]:
    i, j = _cells(layout)
    dist = jnp.asarray(i + j)
    grid = jnp.zeros((prompts.shape[0], layout.num_codes), jnp.int32)  # placeholders: never read early

    def step(d, carry):
        grid, forwards = carry
        logits = _cell_logits(model, layout, params, jnp.concatenate([prompts, grid], axis=1))
        drawn = sampling.sample_with(sampler, logits, jax.random.fold_in(key, d))
        return jnp.where(dist == d, drawn, grid), forwards + 1

    return jax.lax.fori_loop(0, layout.height + layout.width - 1, step, (grid, jnp.zeros((), jnp.int32)))


def sample_nar(model: ImageModel, params: dict, layout: ImageLayout, labels: Int[np.ndarray, " N"], *,
               key: PRNGKeyArray, sampler: sampling.Sampler | None = None, batch_size: int | None = None
               ) -> tuple[Int[np.ndarray, "N h w"], Int[np.ndarray, " N"]]:
    """Generate one code grid per label near-to-far in ``h + w - 1`` steps.

    Step ``d`` runs one forward of the whole static-shape sequence (positions not yet
    generated hold code 0, which the mask hides from every position that is read) and draws
    the distance-``d`` cells from :func:`cell_logits` with ``sampler`` (default
    ``make_sampler()``, temperature 1; the semantics of :func:`decodax.sampling.sample_with`,
    codes only; penalties are not supported). Keys: batch ``b`` uses ``fold_in(key, b)``; its
    step ``d`` draws every cell's row of ``[B, hw, V]`` with ``fold_in(batch_key, d)`` and keeps
    the distance-``d`` cells. The whole loop is one jitted ``fori_loop``.

    Returns the grids ``[N, h, w]`` and each image's model forwards, ``h + w - 1`` (the first
    step's forward over ``[BOS, class]`` is the prefill that predicts ``(0, 0)``, so this counts
    like :func:`~decodax.images.ar.sample_codes`' ``calls``, which is ``h * w`` for
    autoregressive decoding)."""
    _check_model("sample_nar", model, layout)
    _check_params("sample_nar", params)
    sampler = sampling.make_sampler() if sampler is None else sampler
    if not isinstance(sampler, sampling.Sampler) or sampler.needs_context:
        raise ValueError(f"sample_nar: sampler must be a decodax Sampler without penalties, got {sampler!r}")
    return _sample_in_batches("sample_nar", layout, labels, batch_size, lambda b, prompts: _generate(
        model, layout, sampler, params, jnp.asarray(prompts), jax.random.fold_in(key, b)))


# --------------------------------------------------------------------------- #
# Save / load
# --------------------------------------------------------------------------- #


def save_nar_model(path: str | os.PathLike, model: ImageModel, layout: ImageLayout, params: dict,
                   info: dict | None = None) -> str:
    """:func:`~decodax.images.ar.save_image_model` of NAR params (info gets ``"nar": True``)."""
    _check_params("save_nar_model", params)
    return save_image_model(path, model, layout, params, {**(info or {}), "nar": True})


def load_nar_model(path: str | os.PathLike) -> tuple[ImageModel, ImageLayout, dict, dict]:
    """``(model, layout, params, info)`` written by :func:`save_nar_model`."""
    from flax import serialization

    model, layout, params, info = load_image_model(path)  # restores every entry but the vertical head
    with open(os.path.join(os.path.abspath(os.fspath(path)), _PARAMS), "rb") as f:
        raw = serialization.msgpack_restore(f.read())
    if not info.get("nar") or VERTICAL_HEAD not in raw:
        raise ValueError(f"load_nar_model: {path} holds no NAR model (written by save_image_model?)")
    return model, layout, {**params, VERTICAL_HEAD: jnp.asarray(raw[VERTICAL_HEAD])}, info
