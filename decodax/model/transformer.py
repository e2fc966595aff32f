"""LLaMA-family decoder (GQA, RoPE, RMSNorm, SwiGLU) as one pure ``apply`` function."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from decodax.kernels import PackedWeight, linear, take_rows
from decodax.model import cache as kv
from decodax.model.attention import attend, resolve_attention
from decodax.model.config import ModelConfig
from decodax.model.rope import rotate

class ModelOutput(NamedTuple):
    logits: Float[Array, "B T V"] | None
    hidden: Float[Array, "B T D"]
    cache: kv.KVCache
    taps: Float[Array, "N B T D"] | None = None  # hidden states after the layers named in ``taps``


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm (Zhang & Sennrich, 2019), computed in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)) * weight


def rope(x: Float[Array, "B T H D"], positions: Int[Array, "B T"], theta: float) -> Array:
    """Rotary position embedding (Su et al., 2021), rotate-half (HF/NeoX) layout."""
    return rotate(x, positions[:, :, None], theta)


class Block(nn.Module):
    """One pre-norm decoder layer: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x)).

    Attention reads the committed cache (slots < ``cache.length`` of layer
    ``layer``; a float ``KVCache``, a compressed ``QuantKVCache``, or None for
    no cache) and the T new tokens (pairs allowed by ``attn_mask``) under one
    softmax (:func:`decodax.model.attention.attend`, implementation
    ``attention``), so new keys/values never need to be written before they are used. Q/K/V and gate/up projections are fused
    (``wqkv``, ``w_gate_up``): fewer, larger matrix-vector products. Weights are
    stored ``[out, in]`` (the GGUF / ``torch.nn.Linear`` layout), as float
    arrays or as GGUF blocks (:class:`decodax.kernels.PackedWeight`), and applied
    with :func:`decodax.kernels.linear`, which streams each weight row once.
    """

    config: ModelConfig

    def weight(self, name: str, shape: tuple[int, int]) -> Array | PackedWeight:
        """A linear weight: a float param, or a :class:`PackedWeight` given in the params
        (Flax's own shape check only knows plain arrays, so the shape is checked here)."""
        if self.has_variable("params", name):
            w = self.get_variable("params", name)
            if isinstance(w, PackedWeight):
                if w.shape != shape:
                    raise ValueError(f"param {name!r}: expected shape {shape}, got packed {w.shape}")
                return w
        return self.param(name, nn.initializers.normal(0.02), shape)

    @nn.compact
    def __call__(self, x, positions, cache, attn_mask, layer=0, attention="xla"):
        c = self.config
        d, hd, h, kvh = c.dim, c.head_dim, c.n_heads, c.n_kv_heads
        attn_norm = self.param("attn_norm", nn.initializers.ones, (d,))
        wqkv = self.weight("wqkv", ((h + 2 * kvh) * hd, d))
        wo = self.weight("wo", (d, h * hd))
        mlp_norm = self.param("mlp_norm", nn.initializers.ones, (d,))
        w_gate_up = self.weight("w_gate_up", (2 * c.hidden_dim, d))
        w_down = self.weight("w_down", (d, c.hidden_dim))

        b, t, _ = x.shape
        g = c.q_per_kv
        qkv = linear(rms_norm(x, attn_norm, c.norm_eps), wqkv)
        q = rope(qkv[..., : h * hd].reshape(b, t, h, hd), positions, c.rope_theta)
        k = rope(qkv[..., h * hd : (h + kvh) * hd].reshape(b, t, kvh, hd), positions, c.rope_theta)
        v = qkv[..., (h + kvh) * hd :].reshape(b, t, kvh, hd)

        # Queries grouped by KV head: [B, K, T*G, hd] (GQA without repeating K/V).
        q = (q * hd**-0.5).reshape(b, t, kvh, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, hd)
        o = attend(q, k, v, attn_mask, cache, layer, attention)
        o = o.reshape(b, kvh, t, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, h * hd)
        x = x + linear(o, wo)

        gu = linear(rms_norm(x, mlp_norm, c.norm_eps), w_gate_up)
        x = x + linear(nn.silu(gu[..., : c.hidden_dim]) * gu[..., c.hidden_dim :], w_down)
        return x, k, v


def fuse_layer(layer: dict, concat=jnp.concatenate) -> dict:
    """Separate projections (``wq, wk, wv, w_gate, w_up``, each ``[..., out, in]``) ->
    the fused layout Block uses (outputs concatenated)."""
    out = {k: v for k, v in layer.items() if k not in ("wq", "wk", "wv", "w_gate", "w_up")}
    out["wqkv"] = concat([layer["wq"], layer["wk"], layer["wv"]], axis=-2)
    out["w_gate_up"] = concat([layer["w_gate"], layer["w_up"]], axis=-2)
    return out


def split_layer(layer: dict, config: ModelConfig) -> dict:
    """Inverse of ``fuse_layer``: the fused layer dict -> separate projections."""
    c = config
    q_end, k_end = c.n_heads * c.head_dim, (c.n_heads + c.n_kv_heads) * c.head_dim
    out = {k: v for k, v in layer.items() if k not in ("wqkv", "w_gate_up")}
    wqkv, gu = layer["wqkv"], layer["w_gate_up"]
    out.update(wq=wqkv[..., :q_end, :], wk=wqkv[..., q_end:k_end, :], wv=wqkv[..., k_end:, :],
               w_gate=gu[..., : c.hidden_dim, :], w_up=gu[..., c.hidden_dim :, :])
    return out


@dataclasses.dataclass(frozen=True)
class Model:
    """A LLaMA-family decoder: ``init`` makes params, ``apply`` is the one pure forward.

    Hashable (it only holds the static config and cache spec), so it can be
    passed to ``jax.jit`` as a static argument and closed over by decoders.
    ``cache_spec`` chooses the KV cache every decoder builds (``init_cache``):
    ``dataclasses.replace(model, cache_spec=QuantCacheSpec(make_codec("kivi4")))``
    runs any decoder on a KIVI-4 cache.
    """

    config: ModelConfig
    cache_spec: Any = None  # None: a float KVCache; else e.g. decodax.kvquant.QuantCacheSpec

    def init_cache(self, batch: int, capacity: int, dtype: Any = jnp.float32):
        """An empty KV cache for this model: float (``cache_spec`` None) or compressed
        (``cache_spec.init``; its capacity may round up to the codec's group)."""
        if self.cache_spec is None:
            return kv.init_cache(self.config, batch, capacity, dtype)
        return self.cache_spec.init(self.config, batch, capacity)

    def init(self, key: PRNGKeyArray) -> dict:
        """Random parameters (normal(0.02)) for tests and training from scratch."""
        c = self.config
        k_emb, k_head, k_layers = jax.random.split(key, 3)
        block = Block(c)
        dummy = (
            jnp.zeros((1, 1, c.dim)), jnp.zeros((1, 1), jnp.int32), None, jnp.ones((1, 1, 1), bool),
        )
        layers = [block.init(k, *dummy)["params"] for k in jax.random.split(k_layers, c.n_layers)]
        params = {
            "embed": jax.random.normal(k_emb, (c.vocab_size, c.dim)) * 0.02,
            "layers": layers,
            "final_norm": jnp.ones((c.dim,)),
        }
        if not c.tie_embeddings:
            params["lm_head"] = jax.random.normal(k_head, (c.vocab_size, c.dim)) * 0.02
        return params

    def logits(self, params: dict, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Final RMSNorm then the LM head (tied to the embedding unless ``lm_head`` exists)."""
        h = rms_norm(hidden, params["final_norm"], self.config.norm_eps)
        return linear(h, params["lm_head"] if "lm_head" in params else params["embed"])

    def apply(
        self,
        params: dict,
        tokens: Int[Array, "B T"] | None,
        positions: Int[Array, "B T"],
        cache: kv.KVCache,
        attn_mask: Bool[Array, "B T T"] | None = None,
        *,
        exit_layer: int | None = None,
        logits_at: Int[Array, "B K"] | None = None,
        compute_logits: bool = True,
        empty_cache: bool = False,
        taps: tuple[int, ...] = (),
        attention: str = "auto",
        embeds: Float[Array, "B T D"] | None = None,
    ) -> ModelOutput:
        """Run T new tokens through the decoder over the committed cache.

        Args:
          tokens, positions: new token ids and their RoPE positions.
          cache: committed entries are ``slots < cache.length``; the T new
            keys/values are written at ``length .. length + T`` (not committed).
          attn_mask: allowed pairs among the new tokens (None: causal chain; a
            token tree passes its ancestor mask).
          exit_layer: run only the first ``exit_layer`` layers (early exit /
            self-speculation, e.g. LayerSkip, DEL); the LM head is applied to
            that layer's output and only those layers' cache entries are written.
          logits_at: positions (indices into T) whose logits are wanted;
            None computes all T.
          compute_logits: False skips the LM head (``logits`` is None).
          empty_cache: the caller guarantees no committed entries (a prefill):
            attention skips the cache, which saves work and compile time.
          taps: layer counts ``l`` (1-based, ``<=`` the layers run) whose output
            hidden states are returned as ``taps[N, B, T, D]`` (DEL's per-layer
            acceptance statistics read them from the verify forward).
          attention: ``"auto"`` (default), ``"xla"`` or ``"pallas"``
            (:mod:`decodax.model.attention`).
          embeds: input embeddings fed instead of looking up ``tokens`` (which may
            then be None): e.g. Superposed Decoding's weighted sum of several
            tokens' embeddings. None (default): ``params["embed"][tokens]``.

        Returns:
          ``ModelOutput(logits, hidden, cache)``; ``hidden`` is the (pre-norm)
          output of the last layer run.
        """
        c = self.config
        if embeds is None and tokens is None:
            raise ValueError("Model.apply needs tokens or embeds")
        b, t = tokens.shape if embeds is None else embeds.shape[:2]
        n_layers = c.n_layers if exit_layer is None else int(exit_layer)
        if not 1 <= n_layers <= c.n_layers:
            raise ValueError(f"exit_layer must be in [1, {c.n_layers}], got {exit_layer}")
        taps = tuple(int(l) for l in taps)
        if any(not 1 <= l <= n_layers for l in taps):
            raise ValueError(f"taps must name layers in [1, {n_layers}], got {taps}")
        if attn_mask is None:
            attn_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        impl = resolve_attention(attention)
        block = Block(c)
        x = take_rows(params["embed"], tokens) if embeds is None else embeds
        ks, vs, tapped = [], [], {}
        # A Python loop over per-layer weight dicts: XLA's CPU dot is ~2.5x slower on
        # slices of stacked weights (scan) than on separate arrays.
        for i, lp in enumerate(params["layers"][:n_layers]):
            x, k, v = block.apply({"params": lp}, x, positions, None if empty_cache else cache, attn_mask, i, impl)
            ks.append(k)
            vs.append(v)
            if i + 1 in taps:
                tapped[i + 1] = x
        new_cache = kv.write(cache, jnp.stack(ks), jnp.stack(vs))
        logits = None
        if compute_logits:
            h = x
            if logits_at is not None:
                h = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1)
            logits = self.logits(params, h)
        tap_out = jnp.stack([tapped[l] for l in taps]) if taps else None
        return ModelOutput(logits=logits, hidden=x, cache=new_cache, taps=tap_out)


def param_count(params: Any) -> int:
    """Number of weights (a packed ``[N, K]`` matrix counts ``N * K``)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda p: isinstance(p, PackedWeight))
    return sum(int(p.shape[0] * p.shape[1]) if isinstance(p, PackedWeight) else int(p.size) for p in leaves)
