"""Perplexity of a model decoding over a compressed KV cache (``decodax bench --kv-caches``,
``experiments/kv_cache_ppl.py``).

Protocol (the one KIVI / KVQuant / GEAR report on WikiText-2, made streaming):
windows of ``context`` tokens, stride ``context - prefill``; each window's first
``prefill`` tokens are prefilled into the cache, then the rest is fed ``chunk``
tokens at a time, each chunk attending to the *cache* (coded groups + float
window) and to itself, and committed. Every token after the prefill is scored
once, so a token's context is ``prefill .. context - 1`` tokens. The float cache
runs the same protocol, so the perplexities are paired.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from decodax.kvquant import QuantCacheSpec, make_codec
from decodax.kvquant.cache import kv_bytes_per_token
from decodax.kvquant.calibrate import calibrate_kvquant
from decodax.model import cache as kv

__all__ = ["KV_CACHES", "KVCacheRow", "cache_spec", "kv_cache_markdown", "kv_cache_table", "perplexity",
           "wikitext_windows", "window_nll"]

KV_CACHES = ("float", "int8", "int4", "kivi4", "kivi2", "kvquant4", "kvquant3", "kvquant2", "gear4", "gear2")
GROUP = {"int": 32, "kivi": 32, "kvquant": 32, "gear": 64}
RESIDUAL = 128  # KIVI's default float window (tokens)


DEFAULT_WIKITEXT = Path("../shared/data/wikitext-2")


def wikitext_windows(tok, context: int, n: int, split: str = "test", root: str | Path | None = None) -> np.ndarray:
    """The first ``n`` non-overlapping ``context``-token windows of WikiText-2 ``split``
    (``[n, context]`` int32); FileNotFoundError naming the path when the data is absent."""
    path = Path(root or DEFAULT_WIKITEXT) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 not found at {path} (see ../shared/data/README.md)")
    text = path.read_text()[: n * context * 8]  # ~4 characters a token: plenty
    ids = np.asarray(tok.encode(text), np.int32)
    if len(ids) < n * context:
        raise ValueError(f"{path} gives {len(ids)} tokens, fewer than {n} windows of {context}")
    return ids[: n * context].reshape(n, context)


class KVCacheRow(NamedTuple):
    name: str
    ppl: float
    bytes_per_token: float  # keys + values, all layers and KV heads, at the window's full context
    compression: float  # float cache bytes / these bytes
    tokens: int


def cache_spec(name: str, model, params, calibration: Int[Array, "1 N"] | None = None,
               *, chunk: int = 32) -> QuantCacheSpec | None:
    """The ``Model.cache_spec`` for a cache name of ``KV_CACHES`` (None: the float cache).
    KVQuant codecs are calibrated on ``calibration`` tokens (required for them)."""
    if name == "float":
        return None
    kind = name.rstrip("0123456789")
    codec = make_codec(name, group=GROUP.get(kind), rope_theta=model.config.rope_theta)
    aux = None
    if kind == "kvquant":
        if calibration is None:
            raise ValueError(f"{name} needs calibration tokens (KVQuant's offline centroids and thresholds)")
        aux = calibrate_kvquant(model, params, calibration, codec.bits)
    return QuantCacheSpec(codec, residual=RESIDUAL, sink=1 if kind == "kvquant" else 0, slack=chunk, aux=aux)


@partial(jax.jit, static_argnames=("model", "prefill", "chunk"))
def window_nll(model, params, tokens: Int[Array, "B C"], *, prefill: int, chunk: int):
    """Summed negative log-likelihood of ``tokens[:, prefill:]`` per row (protocol above)."""
    b, c = tokens.shape
    n_chunks = (c - prefill) // chunk
    pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    out = model.apply(params, tokens[:, :prefill], pos[:, :prefill], model.init_cache(b, c),
                      logits_at=jnp.full((b, 1), prefill - 1), empty_cache=True)
    first = -jax.nn.log_softmax(out.logits[:, 0])[jnp.arange(b), tokens[:, prefill]]
    padded = jnp.pad(tokens, ((0, 0), (0, 1)))

    def step(cache, j):
        s = prefill + j * chunk
        toks = jax.lax.dynamic_slice_in_dim(tokens, s, chunk, axis=1)
        o = model.apply(params, toks, jax.lax.dynamic_slice_in_dim(pos, s, chunk, axis=1), cache)
        target = jax.lax.dynamic_slice_in_dim(padded, s + 1, chunk, axis=1)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(o.logits), target[..., None], axis=-1)[..., 0]
        nll = jnp.where(s + 1 + jnp.arange(chunk) < c, nll, 0.0)  # the window's last token predicts nothing
        return kv.commit(o.cache, chunk), nll.sum(-1)

    _, nlls = jax.lax.scan(step, kv.commit(out.cache, prefill), jnp.arange(n_chunks))
    return first + nlls.sum(0)


def perplexity(model, params, windows: np.ndarray, *, prefill: int, chunk: int, batch: int = 4) -> float:
    """Perplexity over ``windows[N, C]`` (rows scored from ``prefill`` on)."""
    n, c = windows.shape
    if (c - prefill) % chunk or not 0 < prefill < c:
        raise ValueError(f"need 0 < prefill < context and chunk | context - prefill; got {prefill}, {c}, {chunk}")
    total = 0.0
    for i in range(0, n, batch):
        rows = windows[i:i + batch]
        if len(rows) < batch:  # keep one compiled shape: pad with copies, count only the real rows
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows), 0)])
        nll = np.asarray(window_nll(model, params, jnp.asarray(rows), prefill=prefill, chunk=chunk))
        total += float(nll[: min(batch, n - i)].sum())
    return math.exp(total / (n * (c - prefill)))


def kv_cache_table(model, params, windows: np.ndarray, names, *, prefill: int, chunk: int = 32,
                   calibration=None, batch: int = 4, progress=None) -> list[KVCacheRow]:
    """One :class:`KVCacheRow` per cache name, float first (same windows, same protocol)."""
    names = ["float"] + [n for n in names if n != "float"]
    c = windows.shape[1]
    cfg = model.config
    float_bytes = 2 * cfg.head_dim * 4 * cfg.n_layers * cfg.n_kv_heads
    rows = []
    for name in names:
        if progress is not None:
            progress(name)
        spec = cache_spec(name, model, params, calibration, chunk=chunk)
        m = dataclasses.replace(model, cache_spec=spec)
        ppl = perplexity(m, params, windows, prefill=prefill, chunk=chunk, batch=batch)
        per = float_bytes if spec is None else kv_bytes_per_token(m.init_cache(1, c), c, cfg.head_dim)
        rows.append(KVCacheRow(name, ppl, per, float_bytes / per, windows.shape[0] * (c - prefill)))
    return rows


def kv_cache_markdown(rows: list[KVCacheRow]) -> str:
    base = rows[0].ppl
    lines = ["| KV cache | perplexity | Δ vs float | KV bytes / token | compression |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.ppl:.4f} | {r.ppl - base:+.4f} | {r.bytes_per_token:,.0f} | {r.compression:.2f}x |")
    return "\n".join(lines) + "\n"
