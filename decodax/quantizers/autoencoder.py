"""One small convolutional autoencoder shared by every quantizer: image tokenizers to compare
VQ bottlenecks at an equal code budget.

The network (:class:`ConvAutoEncoder`) is the same for all quantizers; only the bottleneck
and the width of the projection into it change. Encoder: a 3x3 convolution, two stride-2
4x4 convolutions (``size -> size / 4``: 32x32 images give an 8x8 grid, 64 tokens), a
residual block, a GroupNorm (``latent_norm``, VQGAN's ``norm_out``), then a linear
projection (1x1) to the quantizer's dimension. Decoder: a 1x1 projection back, a residual
block, two stride-2 transposed convolutions and a 3x3 output convolution with a sigmoid
(pixels in ``[0, 1]``). SiLU activations; no other normalisation.

Bottlenecks (``quantizer_name`` in :data:`QUANTIZERS`), all with the same budget of
``codebook_size = K`` (default 1024 = 2^10) distinct tokens per latent position:

* ``"vq"`` -- VQ-VAE (van den Oord et al. 2017): K learnt codes of dimension ``latent_dim``,
  codebook + ``beta`` commitment loss, the reference ``U(-1/K, 1/K)`` initialisation;
* ``"vq-ema"`` -- VQ-VAE's EMA codebook (decay 0.99, Laplace smoothing) plus dead-code
  restart from the batch (Jukebox / SoundStream; ``dead_code_patience`` steps unused);
* ``"simvq"`` -- SimVQ (Zhu et al. 2024): frozen random codes through one learnt linear layer;
* ``"fsq"`` -- FSQ (Mentzer et al. 2023; the gradient goes through the tanh bound, as in the
  paper's listing), levels with ``prod(levels) = K``: for K = 2^b the
  bits are spread as evenly as possible over ``ceil(b / 3)`` dimensions (1024 -> [8, 8, 4, 4]).
  The paper's own recommendation for ~2^10 is [8, 5, 5, 5] = 1000 codes; we take the exact
  1024 so that every quantizer has the same token range;
* ``"lfq"`` -- LFQ (MAGVIT-v2, Yu et al. 2023): ``log2 K`` = 10 sign bits, entropy loss
  (MAGVIT-v2 defaults: weight 0.1, temperature 0.01, commitment 0.25);
* ``"group-lfq"`` -- WeTok's group-wise LFQ: the same 10 bits in ``lfq_groups`` = 2 groups of 5,
  the entropy loss per group over its 32 codes;
* ``"qlae"`` -- QLAE (Hsu et al. 2023): ``d`` latent dimensions with ``qlae_values = n`` learnt
  scalar values each, ``n^d = K`` (default n = 4, d = 5: 4^5 = 1024 grid points), trained
  with AdamW and the paper's high weight decay (0.1) on everything but the values;
* ``"rvq"`` -- residual VQ (SoundStream, Zeghidour et al. 2021): ``rvq_stages = S`` = 2 stages of
  ``K^(1/S)`` = 32 codes of dimension ``latent_dim`` (32 x 32 = 1024 combinations from only 64
  stored vectors), SoundStream's recipe: EMA codebooks initialised by k-means on the first
  batch's latents, dead-code restart.

Tokens: one integer id per latent position in ``[0, K)``. Single-codebook quantizers (VQ,
EMA VQ, SimVQ, FSQ, LFQ) give it directly. The multi-code ones map their per-book codes
``c_0 .. c_{m-1}`` (group-LFQ groups, QLAE dimensions, RVQ stages) to the mixed-radix number
``sum_i c_i prod_{j<i} r_j`` (book 0 least significant), a bijection onto ``[0, K)`` since the
radices multiply to ``K``; :func:`token_to_codes` undoes it. For group LFQ this id is exactly
plain LFQ's 10-bit id; for RVQ, ``id % 32`` is the coarse stage-0 code.

Training (:func:`train_tokenizer`) minimises ``MSE(x, decode(quantize(encode(x)))) +`` the
quantizer's auxiliary loss with :mod:`decodax.train` (``TrainState`` and ``fit``; the step
is :func:`decodax.train.make_train_step`'s with the ``"vq_stats"`` collection carried through,
since EMA codebooks and dead-code counters change in the forward pass, in training only).
Variables: ``"params"`` (trained), ``"vq_stats"`` (EMA / dead-code state, ``vq-ema`` and ``rvq``)
and ``"frozen"`` (SimVQ's random codes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from decodax.quantizers import fsq as fsq_lib
from decodax.quantizers import metrics, qlae, rvq
from decodax.quantizers.base import Quantized, check_codes, digits_to_index, index_to_digits
from decodax.quantizers.fsq import FSQ
from decodax.quantizers.lfq import LFQ
from decodax.quantizers.qlae import LatentQuantizer
from decodax.quantizers.rvq import ResidualVQ
from decodax.quantizers.simvq import SimVQ
from decodax.quantizers.vq import VectorQuantizer
from decodax.train import TrainState, epoch_batches, fit

__all__ = [
    "QUANTIZERS", "ConvAutoEncoder", "Tokenizer", "codes_to_token", "default_fsq_levels", "detokenize",
    "evaluate", "init_tokenizer", "load_tokenizer", "make_tokenizer", "reconstruct", "save_tokenizer",
    "token_to_codes", "tokenize", "tokenizer_info", "train_tokenizer",
]

QUANTIZERS = ("vq", "vq-ema", "simvq", "fsq", "lfq", "group-lfq", "qlae", "rvq")
DOWNSAMPLE = 4  # two stride-2 convolutions
_CONFIG = "tokenizer.json"
_VARIABLES = "variables"
_CHUNK = 256  # images per jitted call in tokenize / detokenize / reconstruct


def _log2_int(k: int, what: str) -> int:
    b = int(k).bit_length() - 1
    if k < 2 or 2**b != k:
        raise ValueError(f"{what}: codebook_size must be a power of two >= 2, got {k}")
    return b


def _int_root(k: int, n: int) -> int | None:
    """``r`` with ``r ** n == k`` exactly, else None."""
    r = round(k ** (1.0 / n))
    for c in (r - 1, r, r + 1):
        if c >= 2 and c**n == k:
            return c
    return None


def _int_log(k: int, base: int) -> int | None:
    """``d`` with ``base ** d == k`` exactly, else None."""
    d, p = 0, 1
    while p < k:
        p, d = p * base, d + 1
    return d if p == k and d >= 1 else None


def default_fsq_levels(codebook_size: int) -> tuple[int, ...]:
    """FSQ levels with ``prod = codebook_size = 2^b``: ``ceil(b / 3)`` dimensions, the ``b``
    bits spread as evenly as possible (at most 3 bits = 8 levels each; more bits first):
    256 -> (8, 8, 4), 1024 -> (8, 8, 4, 4), 4096 -> (8, 8, 8, 8)."""
    b = _log2_int(codebook_size, "FSQ")
    d = -(-b // 3)
    bits = [b // d + (1 if i < b % d else 0) for i in range(d)]
    return tuple(2**k for k in bits)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Configuration of a conv-autoencoder image tokenizer (frozen and hashable: it is the
    static argument of the jitted functions). Build it with :func:`make_tokenizer`.

    ``channels`` is the encoder/decoder width (the 8x8 stage has ``2 * channels``);
    ``image_channels`` the pixels' channels (1 grey, 3 RGB); ``latent_dim`` the code vector
    dimension of the vector quantizers (vq, vq-ema, simvq, rvq) -- FSQ, LFQ, group LFQ and
    QLAE take their dimension from the budget instead (:attr:`code_dim`). ``latent_norm``:
    a GroupNorm before the encoder's last activation and projection (VQGAN's ``norm_out``), so
    the latents start spread at O(1) scale whatever the data; without it this small encoder's
    latents start as a cluster ~0.03 wide, inside SimVQ's code cloud and FSQ's central bin.
    """

    quantizer: str
    codebook_size: int = 1024
    channels: int = 32
    latent_dim: int = 16
    image_channels: int = 1
    beta: float = 0.25
    ema_decay: float = 0.99
    dead_code_patience: int = 50
    fsq_levels: tuple[int, ...] = ()
    lfq_groups: int = 2
    qlae_values: int = 4
    rvq_stages: int = 2
    rvq_kmeans_init: bool = True
    latent_norm: bool = True

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose from {QUANTIZERS}")
        for name in ("codebook_size", "channels", "latent_dim", "image_channels"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"Tokenizer: {name} must be a positive integer, got {v}")
        if self.codebook_size < 2:
            raise ValueError(f"Tokenizer: codebook_size must be >= 2, got {self.codebook_size}")
        if self.dead_code_patience < 0:
            raise ValueError(f"Tokenizer: dead_code_patience must be >= 0, got {self.dead_code_patience}")
        k, q = self.codebook_size, self.quantizer
        if q == "fsq":
            levels = tuple(int(v) for v in self.fsq_levels) or default_fsq_levels(k)
            if fsq_lib.codebook_size(levels) != k:
                raise ValueError(f"Tokenizer: FSQ levels {list(levels)} give {fsq_lib.codebook_size(levels)} "
                                 f"codes, not codebook_size={k}")
            object.__setattr__(self, "fsq_levels", levels)
        elif q in ("lfq", "group-lfq"):
            b = _log2_int(k, q)
            if q == "group-lfq" and (self.lfq_groups < 2 or b % self.lfq_groups):
                raise ValueError(f"Tokenizer: group-lfq needs lfq_groups >= 2 dividing log2(K) = {b}, "
                                 f"got {self.lfq_groups}")
        elif q == "qlae" and _int_log(k, self.qlae_values) is None:
            raise ValueError(f"Tokenizer: QLAE needs qlae_values^d == codebook_size; "
                             f"{self.qlae_values} is no integer root of {k}")
        elif q == "rvq" and (self.rvq_stages < 1 or _int_root(k, self.rvq_stages) is None):
            raise ValueError(f"Tokenizer: RVQ needs codebook_size = (codes per stage)^stages; "
                             f"{k} is no {self.rvq_stages}-th power")

    @property
    def code_dim(self) -> int:
        """Dimension of the vectors the quantizer sees."""
        q, k = self.quantizer, self.codebook_size
        if q == "fsq":
            return len(self.fsq_levels)
        if q in ("lfq", "group-lfq"):
            return _log2_int(k, q)
        if q == "qlae":
            return _int_log(k, self.qlae_values)
        return self.latent_dim

    @property
    def radices(self) -> tuple[int, ...]:
        """Sizes of the per-book codebooks whose mixed-radix number is the token id
        (``()`` for single-codebook quantizers)."""
        q, k = self.quantizer, self.codebook_size
        if q == "group-lfq":
            return (2 ** (_log2_int(k, q) // self.lfq_groups),) * self.lfq_groups
        if q == "qlae":
            return (self.qlae_values,) * self.code_dim
        if q == "rvq":
            return (_int_root(k, self.rvq_stages),) * self.rvq_stages
        return ()

    @property
    def module(self) -> "ConvAutoEncoder":
        return ConvAutoEncoder(self)

    def grid(self, size: int) -> tuple[int, int]:
        """Latent grid ``(h, w)`` of ``size x size`` images."""
        return size // DOWNSAMPLE, size // DOWNSAMPLE

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fsq_levels"] = list(d["fsq_levels"])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tokenizer":
        d = dict(d)
        d["fsq_levels"] = tuple(d.get("fsq_levels", ()))
        d.setdefault("latent_norm", False)  # configs saved before the field existed had no norm
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"Tokenizer config has unknown fields {sorted(unknown)}")
        return cls(**d)


def make_tokenizer(quantizer_name: str, *, codebook_size: int = 1024, channels: int, latent_dim: int,
                   image_channels: int = 1, **options: Any) -> Tokenizer:
    """A :class:`Tokenizer` for ``quantizer_name`` in :data:`QUANTIZERS` (``ValueError``
    otherwise, or when the budget does not fit the quantizer). ``options``: the other
    :class:`Tokenizer` fields (``beta``, ``dead_code_patience``, ``fsq_levels``, ``lfq_groups``,
    ``qlae_values``, ``rvq_stages``, ...)."""
    if quantizer_name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer_name!r}; choose from {QUANTIZERS}")
    unknown = set(options) - {f.name for f in dataclasses.fields(Tokenizer)}
    if unknown:
        raise ValueError(f"make_tokenizer: unknown options {sorted(unknown)}")
    return Tokenizer(quantizer_name, codebook_size=codebook_size, channels=channels, latent_dim=latent_dim,
                     image_channels=image_channels, **options)


# --------------------------------------------------------------------------- token ids


def codes_to_token(tokenizer: Tokenizer, codes: Int[Array, "*batch ..."]) -> Int[Array, "*batch"]:
    """The quantizer's codes -> one token id in ``[0, K)`` (mixed radix for multi-code ones)."""
    radices = tokenizer.radices
    return jnp.asarray(codes, jnp.int32) if not radices else digits_to_index(codes, radices)


def token_to_codes(tokenizer: Tokenizer, tokens: Int[Array, "*batch"]) -> Int[Array, "*batch ..."]:
    """Inverse of :func:`codes_to_token` for ids in ``[0, K)``."""
    radices = tokenizer.radices
    return jnp.asarray(tokens, jnp.int32) if not radices else index_to_digits(tokens, radices)


# --------------------------------------------------------------------------- the network


class _ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.features, (3, 3))(nn.silu(x))
        h = nn.Conv(self.features, (3, 3))(nn.silu(h))
        return x + h


class ConvAutoEncoder(nn.Module):
    """Encoder (downsample 4) -> projection -> quantizer -> projection -> decoder.

    ``__call__(x, train)`` -> ``(reconstruction, Quantized)`` (the training forward, with the
    straight-through vectors); ``encode``, ``quantize``, ``decode_latents`` and
    ``codes_to_latents`` are the pieces (``apply(..., method=...)``).
    """

    config: Tokenizer

    def setup(self):
        cfg, ch = self.config, self.config.channels
        self.enc_in = nn.Conv(ch, (3, 3))
        self.down1 = nn.Conv(ch, (4, 4), strides=(2, 2))
        self.down2 = nn.Conv(2 * ch, (4, 4), strides=(2, 2))
        self.enc_res = _ResBlock(2 * ch)
        if cfg.latent_norm:
            self.enc_norm = nn.GroupNorm(num_groups=math.gcd(32, 2 * ch))
        self.pre_quant = nn.Dense(cfg.code_dim)
        self.post_quant = nn.Dense(2 * ch)
        self.dec_res = _ResBlock(2 * ch)
        self.up1 = nn.ConvTranspose(ch, (4, 4), strides=(2, 2))
        self.up2 = nn.ConvTranspose(ch, (4, 4), strides=(2, 2))
        self.dec_out = nn.Conv(cfg.image_channels, (3, 3))
        self.quantizer = _make_quantizer(cfg)

    def encode(self, x: Float[Array, "B H W C"]) -> Float[Array, "B h w d"]:
        h = nn.silu(self.enc_in(x))
        h = nn.silu(self.down1(h))
        h = self.enc_res(nn.silu(self.down2(h)))
        if self.config.latent_norm:
            h = self.enc_norm(h)
        return self.pre_quant(nn.silu(h))

    def quantize(self, z: Float[Array, "B h w d"], train: bool = False) -> Quantized:
        return self.quantizer(z, train=train)

    def decode_latents(self, q: Float[Array, "B h w d"]) -> Float[Array, "B H W C"]:
        h = self.dec_res(self.post_quant(q))
        h = nn.silu(self.up1(nn.silu(h)))
        h = nn.silu(self.up2(h))
        return nn.sigmoid(self.dec_out(h))

    def codes_to_latents(self, codes: Int[Array, "B h w ..."]) -> Float[Array, "B h w d"]:
        return self.quantizer.decode(codes)

    def __call__(self, x: Float[Array, "B H W C"], train: bool = False):
        q = self.quantize(self.encode(x), train=train)
        return self.decode_latents(q.quantized), q


def _make_quantizer(cfg: Tokenizer) -> nn.Module:
    q, k, d = cfg.quantizer, cfg.codebook_size, cfg.code_dim
    if q == "vq":
        return VectorQuantizer(k, d, beta=cfg.beta)
    if q == "vq-ema":
        return VectorQuantizer(k, d, beta=cfg.beta, use_ema=True, decay=cfg.ema_decay,
                               dead_code_patience=cfg.dead_code_patience)
    if q == "simvq":
        return SimVQ(k, d, beta=cfg.beta)
    if q == "fsq":
        return FSQ(cfg.fsq_levels)
    if q == "lfq":
        return LFQ(d)
    if q == "group-lfq":
        return LFQ(d, groups=cfg.lfq_groups)
    if q == "qlae":
        return LatentQuantizer(d, cfg.qlae_values)
    return ResidualVQ(cfg.rvq_stages, cfg.radices[0], d, beta=cfg.beta, use_ema=True, decay=cfg.ema_decay,
                      dead_code_patience=cfg.dead_code_patience)


# --------------------------------------------------------------------------- init / training


def _check_images(tokenizer: Tokenizer, images, what: str) -> np.ndarray | Array:
    shape = np.shape(images)
    if len(shape) != 4 or shape[-1] != tokenizer.image_channels:
        raise ValueError(f"{what}: images must be [N, H, W, {tokenizer.image_channels}], got shape {shape}")
    if shape[1] % DOWNSAMPLE or shape[2] % DOWNSAMPLE or shape[1] < DOWNSAMPLE or shape[2] < DOWNSAMPLE:
        raise ValueError(f"{what}: image height and width must be positive multiples of {DOWNSAMPLE}, got {shape}")
    return images


def init_tokenizer(tokenizer: Tokenizer, images: Float[Array, "N H W C"], seed: int = 0) -> dict[str, Any]:
    """Fresh variables (shapes from ``images[:1]``). RVQ (SoundStream) then re-initialises
    each stage's codebook by k-means++ (+ 10 Lloyd iterations) on the residuals of the
    initial encoder's latents of ``images`` (pass the first training batch)."""
    images = jnp.asarray(_check_images(tokenizer, images, "init_tokenizer"), jnp.float32)
    key = jax.random.PRNGKey(seed)
    variables = _init(tokenizer, key, images[:1])
    if tokenizer.quantizer == "rvq" and tokenizer.rvq_kmeans_init:
        z = tokenizer.module.apply(variables, images, method=ConvAutoEncoder.encode)
        shape = (tokenizer.rvq_stages, tokenizer.radices[0], tokenizer.code_dim)
        if z.size // shape[2] >= shape[1]:
            cbs = rvq.kmeans_init(z.reshape(-1, shape[2]))(jax.random.fold_in(key, 1), shape)
            stats = dict(variables["vq_stats"]["quantizer"])
            stats["codebooks"], stats["embed_sum"] = cbs, cbs
            variables = {**variables, "vq_stats": {**variables["vq_stats"], "quantizer": stats}}
    return variables


@partial(jax.jit, static_argnums=0)
def _init(tokenizer, key, x):
    return dict(tokenizer.module.init({"params": key}, x, train=False))


def _optimizer(tokenizer: Tokenizer, lr: float) -> optax.GradientTransformation:
    """Adam; QLAE: AdamW with the paper's weight decay 0.1, sparing the codebook values."""
    if tokenizer.quantizer == "qlae":
        return qlae.adamw(lr, weight_decay=0.1)
    return optax.adam(lr)


def _train_step(tokenizer: Tokenizer):
    """:func:`decodax.train.make_train_step`'s step, with the non-param collections (EMA
    codebooks, dead-code counters, SimVQ's frozen codes) carried in ``state.params`` beside
    ``"params"`` and updated from the forward pass instead of by the optimizer."""
    module = tokenizer.module

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        k_restart, k_dropout = jax.random.split(key)
        variables = state.params
        x = batch["images"]

        def loss_fn(params):
            (recon, q), mutated = module.apply({**variables, "params": params}, x, train=True,
                                               mutable=["vq_stats"],
                                               rngs={"restart": k_restart, "dropout": k_dropout})
            rec = metrics.mse(recon, x)
            return rec + q.loss, (rec, q, mutated)

        (loss, (rec, q, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = state.tx.update(grads, state.opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        out = {"loss": loss, "mse": rec, "quantizer_loss": q.loss, "grad_norm": optax.tree.norm(grads),
               **{f"loss_{k}": v for k, v in q.losses.items()},
               **{f"batch_{k}": jnp.mean(v) for k, v in q.stats.items() if k != "num_active"}}
        new_vars = {**variables, **mutated, "params": params}
        return state.replace(step=state.step + 1, params=new_vars, opt_state=opt_state), out

    return train_step


def train_tokenizer(
    tokenizer: Tokenizer,
    images: Float[Array, "N H W C"],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    variables: dict[str, Any] | None = None,
    progress: bool = False,
    log_path: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Train on ``images`` (``[N, H, W, image_channels]`` in ``[0, 1]``) for ``steps`` steps of
    ``batch_size`` shuffled images (epochs, :func:`decodax.train.epoch_batches`), Adam(``lr``)
    (AdamW with weight decay for QLAE). Loss: pixel MSE + the quantizer's loss. Starts from
    :func:`init_tokenizer` on the first batch unless ``variables`` are given. Returns the
    variables and ``fit``'s per-step metrics (``loss``, ``mse``, ``quantizer_loss``,
    ``grad_norm``, the quantizer's named losses and batch code statistics)."""
    images = np.asarray(_check_images(tokenizer, images, "train_tokenizer"), np.float32)
    if int(steps) != steps or steps < 0:
        raise ValueError(f"train_tokenizer: steps must be a non-negative integer, got {steps}")
    if not 1 <= batch_size <= len(images):
        raise ValueError(f"train_tokenizer: batch_size must be in [1, {len(images)}], got {batch_size}")
    if not lr > 0:
        raise ValueError(f"train_tokenizer: lr must be > 0, got {lr}")
    batch_fn = epoch_batches({"images": images}, batch_size, seed)
    if variables is None:
        variables = init_tokenizer(tokenizer, batch_fn(0)["images"], seed)
    tx = _optimizer(tokenizer, lr)
    variables = dict(variables)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables, opt_state=tx.init(variables["params"]),
                       key=jax.random.PRNGKey(seed + 1), tx=tx)
    state, history = fit(state, _train_step(tokenizer), batch_fn, steps, progress=progress, log_path=log_path)
    return state.params, history


# --------------------------------------------------------------------------- tokens


@partial(jax.jit, static_argnums=0)
def _tokenize(tokenizer, variables, x):
    module = tokenizer.module
    z = module.apply(variables, x, method=ConvAutoEncoder.encode)
    q = module.apply(variables, z, train=False, method=ConvAutoEncoder.quantize)
    return codes_to_token(tokenizer, q.codes)


@partial(jax.jit, static_argnums=0)
def _detokenize(tokenizer, variables, tokens):
    module = tokenizer.module
    latents = module.apply(variables, token_to_codes(tokenizer, tokens), method=ConvAutoEncoder.codes_to_latents)
    return module.apply(variables, latents, method=ConvAutoEncoder.decode_latents)


def _chunked(fn, tokenizer, variables, x):
    """``fn`` over chunks of ``_CHUNK`` rows, the last one padded (one compilation per shape)."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("need at least one image / token grid")
    chunk = min(n, _CHUNK)
    outs = []
    for i in range(0, n, chunk):
        part = x[i:i + chunk]
        m = part.shape[0]
        if m < chunk:
            part = jnp.concatenate([part, jnp.repeat(part[-1:], chunk - m, axis=0)])
        outs.append(fn(tokenizer, variables, part)[:m])
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0]


def tokenize(tokenizer: Tokenizer, variables: dict[str, Any], images: Float[Array, "N H W C"]) -> Int[Array, "N h w"]:
    """``int32`` token ids ``[N, H/4, W/4]`` in ``[0, codebook_size)``: the quantizer's code
    (single-codebook quantizers) or the mixed-radix number of its per-book codes (group LFQ,
    QLAE, RVQ; see the module docstring). Evaluation mode: no state changes."""
    x = jnp.asarray(_check_images(tokenizer, images, "tokenize"), jnp.float32)
    return _chunked(_tokenize, tokenizer, variables, x)


def detokenize(tokenizer: Tokenizer, variables: dict[str, Any], codes: Int[Array, "N h w"]) -> Float[Array, "N H W C"]:
    """Token ids ``[N, h, w]`` -> images ``[N, 4h, 4w, image_channels]`` in ``[0, 1]``;
    ``ValueError`` for ids outside ``[0, codebook_size)`` or a wrong shape."""
    if np.ndim(codes) != 3:
        raise ValueError(f"detokenize: codes must be [N, h, w], got shape {np.shape(codes)}")
    check_codes(codes, tokenizer.codebook_size, "detokenize")
    return _chunked(_detokenize, tokenizer, variables, jnp.asarray(codes, jnp.int32))


def reconstruct(tokenizer: Tokenizer, variables: dict[str, Any],
                images: Float[Array, "N H W C"]) -> Float[Array, "N H W C"]:
    """``detokenize(tokenize(images))``: the decoder applied to the code vectors themselves
    (what a generator's tokens decode to), bitwise equal to that composition."""
    return detokenize(tokenizer, variables, tokenize(tokenizer, variables, images))


def evaluate(tokenizer: Tokenizer, variables: dict[str, Any], images: Float[Array, "N H W C"]) -> dict[str, Any]:
    """Held-out metrics: token ``utilization`` (fraction of the K ids used) and ``perplexity``
    over all positions of ``images``, reconstruction ``mse`` and ``psnr`` (dB, range 1);
    for multi-code quantizers also the mean per-book ``book_utilization`` / ``book_perplexity``."""
    tokens = tokenize(tokenizer, variables, images)
    recon = detokenize(tokenizer, variables, tokens)
    stats = metrics.code_stats(tokens, tokenizer.codebook_size)
    x = jnp.asarray(images, jnp.float32)
    out = {"utilization": float(stats["utilization"]), "perplexity": float(stats["perplexity"]),
           "mse": float(metrics.mse(recon, x)), "psnr": float(metrics.psnr(recon, x)),
           "codebook_size": tokenizer.codebook_size, "tokens_per_image": int(np.prod(tokens.shape[1:]))}
    if tokenizer.radices:
        book = metrics.code_stats(token_to_codes(tokenizer, tokens), tokenizer.radices[0], per_book=True)
        out["book_utilization"] = float(book["utilization"].mean())
        out["book_perplexity"] = float(book["perplexity"].mean())
    return out


# --------------------------------------------------------------------------- save / load


def save_tokenizer(path: str | os.PathLike, tokenizer: Tokenizer, variables: dict[str, Any],
                   info: dict | None = None) -> str:
    """Write ``path/tokenizer.json`` (the config, plus ``info``) and ``path/variables`` (orbax,
    all collections); returns the directory."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(path))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, _VARIABLES), jax.device_get(dict(variables)), force=True)
    with open(os.path.join(directory, _CONFIG), "w") as f:
        json.dump({"tokenizer": tokenizer.to_json(), "info": info or {}}, f, indent=1)
    return directory


def load_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, dict[str, Any]]:
    """``(Tokenizer, variables)`` written by :func:`save_tokenizer`; ``FileNotFoundError`` naming
    a missing file, ``ValueError`` for an unreadable config or variables that do not match it."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(path))
    cfg_path, var_path = os.path.join(directory, _CONFIG), os.path.join(directory, _VARIABLES)
    for p in (cfg_path, var_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"tokenizer checkpoint incomplete: {p} does not exist")
    try:
        with open(cfg_path) as f:
            tokenizer = Tokenizer.from_json(json.load(f)["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} is not a valid tokenizer config: {e}") from e
    x = jax.ShapeDtypeStruct((1, 4 * DOWNSAMPLE, 4 * DOWNSAMPLE, tokenizer.image_channels), jnp.float32)
    target = jax.eval_shape(lambda x: _init(tokenizer, jax.random.PRNGKey(0), x), x)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            variables = ckpt.restore(var_path, target)
    except Exception as e:  # noqa: BLE001 -- orbax raises many types for unreadable data
        raise ValueError(f"{var_path} is corrupt or does not match {cfg_path}: {e}") from e
    return tokenizer, dict(variables)


def tokenizer_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``info`` dict stored beside a saved tokenizer (training data, metrics, ...)."""
    with open(os.path.join(os.path.abspath(os.fspath(path)), _CONFIG)) as f:
        return json.load(f).get("info", {})
