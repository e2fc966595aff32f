"""A class-conditional autoregressive transformer over an image tokenizer's code grid
(the LlamaGen / VQGAN-transformer recipe at toy scale: Esser et al. 2021, "Taming
Transformers"; Sun et al. 2024, "Autoregressive Model Beats Diffusion").

Vocabulary (:class:`ImageLayout`): the ``K`` codes are ids ``[0, K)``, the class tokens
``K .. K + C - 1``, BOS is ``K + C``. A training sequence is
``[BOS, class, code_0 .. code_{hw-1}]`` (the ``h x w`` grid in raster order); the loss counts
only the code targets. Sampling prompts ``[BOS, class]`` and generates ``hw`` tokens with any
decodax :class:`~decodax.decoding.Decoder`; :class:`ImageModel` sets the logits of the
non-code ids to ``-inf`` inside ``Model.logits``, so every decoder (autoregressive, SJD's
verification, its window refresh) samples codes only and the target law is the one over
codes. Emitted token ``i`` is raster position ``i`` (what
:class:`~decodax.jacobi.init.SpatialInit` assumes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from decodax.decoding.driver import generate
from decodax.decoding.state import Decoder
from decodax.model.config import ModelConfig
from decodax.model.transformer import Model
from decodax.train.loop import fit
from decodax.train.losses import logits_of
from decodax.train.partial import epoch_batches
from decodax.train.state import create_state, make_train_step

__all__ = ["ImageLayout", "ImageModel", "code_loss", "image_model", "load_image_model", "sample_codes",
           "save_image_model", "train_image_model"]


def _positive(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Token ids of a class-conditional code-grid model: codes ``[0, codebook_size)``, class
    ``c`` at ``codebook_size + c``, BOS last; sequences ``[BOS, class, codes (raster)]``."""

    codebook_size: int
    n_classes: int = 10
    height: int = 8
    width: int = 8

    def __post_init__(self):
        for name in ("codebook_size", "n_classes", "height", "width"):
            _positive("ImageLayout", name, getattr(self, name))

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.n_classes + 1

    @property
    def bos(self) -> int:
        return self.codebook_size + self.n_classes

    @property
    def num_codes(self) -> int:
        """Tokens per image (``height * width``)."""
        return self.height * self.width

    @property
    def seq_len(self) -> int:
        return 2 + self.num_codes

    def _labels(self, labels) -> np.ndarray:
        y = np.asarray(labels)
        out_of_range = y.size and (y.min() < 0 or y.max() >= self.n_classes)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or out_of_range:
            raise ValueError(f"ImageLayout: labels must be ints in [0, {self.n_classes}) of shape [N], "
                             f"got dtype {y.dtype} shape {y.shape}")
        return y.astype(np.int32)

    def prompts(self, labels: Int[np.ndarray, " N"]) -> Int[np.ndarray, "N 2"]:
        """``[BOS, class]`` per label."""
        y = self._labels(labels)
        return np.stack([np.full_like(y, self.bos), self.codebook_size + y], axis=1)

    def sequences(self, codes: Int[np.ndarray, "N h w"], labels: Int[np.ndarray, " N"]
                  ) -> tuple[Int[np.ndarray, "N T"], Int[np.ndarray, "N T"]]:
        """Training ``(tokens, mask)``: ``[BOS, class, codes]`` and a mask that is 1 exactly on the
        code positions (``lm_loss`` reads ``mask[:, 1:]`` as "this target counts")."""
        c = np.asarray(codes)
        if c.ndim != 3 or c.shape[1:] != (self.height, self.width):
            raise ValueError(f"ImageLayout.sequences: codes must be [N, {self.height}, {self.width}], got {c.shape}")
        if c.size and (c.min() < 0 or c.max() >= self.codebook_size):
            raise ValueError(f"ImageLayout.sequences: codes must lie in [0, {self.codebook_size})")
        if len(c) != len(np.asarray(labels)):
            raise ValueError(f"ImageLayout.sequences: {len(c)} code grids but {len(np.asarray(labels))} labels")
        tokens = np.concatenate([self.prompts(labels), c.reshape(len(c), -1).astype(np.int32)], axis=1)
        mask = np.zeros_like(tokens)
        mask[:, 2:] = 1
        return tokens, mask

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ImageModel(Model):
    """A decodax :class:`~decodax.model.transformer.Model` whose logits of the ids
    ``>= num_codes`` (class tokens, BOS) are ``-inf``: training's softmax and every decoder's
    sampling run over the codes only. Hashable like ``Model``."""

    num_codes: int = 0

    def logits(self, params: dict, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        lg = super().logits(params, hidden)
        keep = jnp.arange(lg.shape[-1]) < self.num_codes
        return jnp.where(keep, lg, -jnp.inf)


def image_model(layout: ImageLayout, *, dim: int = 128, n_layers: int = 4, n_heads: int = 4,
                n_kv_heads: int | None = None, hidden_dim: int | None = None, max_seq_len: int = 128,
                name: str = "image-ar") -> ImageModel:
    """A LLaMA-style decoder over ``layout``'s vocabulary (untied head, no EOS; ``max_seq_len``
    must hold the prompt, the ``hw`` codes and a Jacobi window)."""
    if max_seq_len < layout.seq_len:
        raise ValueError(f"image_model: max_seq_len {max_seq_len} < sequence length {layout.seq_len}")
    config = ModelConfig(vocab_size=layout.vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads or n_heads, hidden_dim=hidden_dim or 4 * dim,
                         tie_embeddings=False, max_seq_len=max_seq_len, bos_id=layout.bos, eos_ids=(),
                         name=name)
    return ImageModel(config, num_codes=layout.codebook_size)


def code_loss(model: ImageModel):
    """Next-token cross-entropy on the code targets (``mask[:, 1:]``), ``loss_fn(params, batch, key)``
    for :func:`decodax.train.make_train_step`. As :func:`decodax.train.lm_loss`, except that
    targets outside the mask are replaced by code 0 before the cross-entropy: their logits are
    ``-inf`` in an :class:`ImageModel`, and ``inf * 0`` would make the masked mean NaN."""

    def loss_fn(params, batch, key):
        del key
        tokens = batch["tokens"]
        mask = batch["mask"][:, 1:].astype(jnp.float32)
        targets = jnp.where(mask > 0, tokens[:, 1:], 0)
        logits = logits_of(model, params, tokens)[:, :-1].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        loss = jnp.sum(jnp.where(mask > 0, ce, 0.0)) / jnp.maximum(mask.sum(), 1.0)
        return loss, {"tokens": mask.sum()}

    return loss_fn


def train_image_model(model: ImageModel, tokens: Int[np.ndarray, "N T"], mask: Int[np.ndarray, "N T"], *,
                      steps: int, batch_size: int, lr: float = 3e-3, weight_decay: float = 0.05, seed: int = 0,
                      params: Any = None, progress: bool = False, log_path: str | os.PathLike | None = None
                      ) -> tuple[Any, list[dict[str, float]]]:
    """Next-token cross-entropy on the code positions (:func:`code_loss`), AdamW with
    warmup + cosine decay, shuffled epochs (:func:`decodax.train.epoch_batches`), run by
    :func:`decodax.train.fit`. Returns ``(params, history)``."""
    _positive("train_image_model", "steps", steps)
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"train_image_model: tokens and mask must be equal [N, T], got {tokens.shape}, {mask.shape}")
    if tokens.min() < 0 or tokens.max() >= model.config.vocab_size:
        raise ValueError(f"train_image_model: token ids outside [0, {model.config.vocab_size})")
    key = jax.random.key(seed)
    params = model.init(key) if params is None else params
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    state = create_state(params, tx, jax.random.fold_in(key, 1))
    batch_fn = epoch_batches({"tokens": tokens, "mask": mask}, min(batch_size, len(tokens)), seed)
    state, history = fit(state, make_train_step(code_loss(model)), batch_fn, steps, progress=progress,
                         log_path=log_path)
    return state.params, history


def sample_codes(decoder: Decoder, params: Any, layout: ImageLayout, labels: Int[np.ndarray, " N"], *,
                 key: PRNGKeyArray, batch_size: int | None = None
                 ) -> tuple[Int[np.ndarray, "N h w"], Int[np.ndarray, " N"]]:
    """Generate one code grid per label with ``decoder`` (prompt ``[BOS, class]``,
    ``max_new_tokens = h * w``); returns the grids and each image's target forwards
    (``GenerateOutput.calls``: the prefill plus the decoder's steps while the row ran)."""

    def sample_batch(i, prompts):
        out = generate(decoder, params, prompts, max_new_tokens=layout.num_codes, key=jax.random.fold_in(key, i),
                       pad_to=2)
        if np.any(out.lengths != layout.num_codes) or out.tokens[:, :layout.num_codes].max() >= layout.codebook_size:
            raise RuntimeError("sample_codes: a row did not produce a full grid of codes")
        return out.tokens[:, :layout.num_codes], out.calls

    return _sample_in_batches("sample_codes", layout, labels, batch_size, sample_batch)


def _sample_in_batches(owner: str, layout: ImageLayout, labels, batch_size: int | None, sample_batch
                       ) -> tuple[Int[np.ndarray, "N h w"], Int[np.ndarray, " N"]]:
    """``sample_batch(i, prompts [B, 2]) -> (codes [B, hw], forwards [B])`` over ``labels`` in
    batches of ``batch_size`` (default all; a short last batch is padded with its last label,
    so every call has one compiled shape); returns the grids ``[N, h, w]`` and forwards ``[N]``."""
    labels = layout._labels(labels)
    n = len(labels)
    if n == 0:
        raise ValueError(f"{owner}: no labels")
    batch_size = n if batch_size is None else _positive(owner, "batch_size", batch_size)
    codes, calls = [], []
    for i, start in enumerate(range(0, n, batch_size)):
        part = labels[start:start + batch_size]
        pad = batch_size - len(part) if n > batch_size else 0
        got_codes, got_calls = sample_batch(i, layout.prompts(np.concatenate([part, np.repeat(part[-1:], pad)])))
        codes.append(np.asarray(got_codes)[:len(part)])
        calls.append(np.broadcast_to(np.asarray(got_calls), (len(part) + pad,))[:len(part)])
    return (np.concatenate(codes).reshape(n, layout.height, layout.width).astype(np.int32),
            np.concatenate(calls).astype(np.int32))


_CONFIG, _PARAMS = "image_model.json", "params.msgpack"


def save_image_model(path: str | os.PathLike, model: ImageModel, layout: ImageLayout, params: Any,
                     info: dict | None = None) -> str:
    """Write ``path/image_model.json`` (config, layout, ``info``) and ``path/params.msgpack``."""
    from flax import serialization

    directory = os.path.abspath(os.fspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _PARAMS), "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(params)))
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump({"config": dataclasses.asdict(model.config), "layout": layout.to_json(), "info": info or {}},
                  f, indent=1)
    return directory


def load_image_model(path: str | os.PathLike) -> tuple[ImageModel, ImageLayout, Any, dict]:
    """``(model, layout, params, info)`` written by :func:`save_image_model`."""
    from flax import serialization

    directory = os.path.abspath(os.fspath(path))
    with open(os.path.join(directory, _CONFIG)) as f:
        meta = json.load(f)
    cfg = dict(meta["config"])
    cfg["eos_ids"] = tuple(cfg["eos_ids"])
    layout = ImageLayout(**meta["layout"])
    model = ImageModel(ModelConfig(**cfg), num_codes=layout.codebook_size)
    template = jax.eval_shape(model.init, jax.random.key(0))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    with open(os.path.join(directory, _PARAMS), "rb") as f:
        params = serialization.from_bytes(template, f.read())
    return model, layout, jax.tree.map(jnp.asarray, params), meta.get("info", {})
