"""VQ-Logits (Shao et al. 2025, "VQ-Logits: Compressing the Output Bottleneck of Large
Language Models via Vector Quantized Logits").

The ``V x d`` output embedding is replaced by a ``K x d`` codebook ``C`` (``K << V``) and a
token -> code map ``M``: the model computes ``K`` code logits ``L_c = h C^T`` and scatters
them to the vocabulary, ``L_v[t] = L_c[M(t)]``, followed by the ordinary softmax over the
``V`` tokens. Tokens sharing a code share a logit, so the softmax needs only ``K`` terms:
``log p(t) = L_c[M(t)] - logsumexp_k(L_c[k] + log n_k)`` with ``n_k = |M^-1(k)|`` (codes with
no token drop out). :func:`log_probs` uses that form (``O(K)`` per position, never a
``V``-wide tensor when targets are given); :func:`token_logits` materialises ``L_v``.

The map is either pre-assigned or obtained, as in the paper's initialisation study, by
clustering a trained model's output embeddings: :func:`from_embeddings` runs k-means (k-means++
or Forgy seeding, then Lloyd iterations) and returns the centroids and each token's cluster.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from decodax.quantizers import metrics, vq
from decodax.quantizers.base import check_codebook_size, check_codes, take_codes

__all__ = [
    "VQLogits", "code_counts", "code_logits", "from_embeddings", "log_normalizer", "log_probs",
    "token_embeddings", "token_logits",
]


def _check_map(token_to_code, num_codes: int) -> None:
    check_codebook_size(num_codes, "VQ-Logits")
    check_codes(token_to_code, num_codes, "VQ-Logits token_to_code")


def code_logits(h: Float[Array, "*b d"], codebook: Float[Array, "K d"]) -> Float[Array, "*b K"]:
    """``L_c = h C^T``: one logit per code."""
    return h @ codebook.T


def code_counts(token_to_code: Int[Array, "V"], num_codes: int) -> Float[Array, "K"]:
    """``n_k``: how many tokens map to each code."""
    return metrics.code_histogram(token_to_code, num_codes)


def token_logits(
    h: Float[Array, "*b d"], codebook: Float[Array, "K d"], token_to_code: Int[Array, "V"]
) -> Float[Array, "*b V"]:
    """The scattered vocabulary logits ``L_v[..., t] = L_c[..., M(t)]``."""
    _check_map(token_to_code, codebook.shape[0])
    return jnp.take(code_logits(h, codebook), jnp.asarray(token_to_code), axis=-1)


def log_normalizer(logits_c: Float[Array, "*b K"], counts: Float[Array, "K"]) -> Float[Array, "*b"]:
    """``logsumexp_t L_v[t] = logsumexp_k (L_c[k] + log n_k)`` (codes with ``n_k = 0`` excluded)."""
    return jax.nn.logsumexp(jnp.where(counts > 0, logits_c + jnp.log(jnp.maximum(counts, 1.0)), -jnp.inf), axis=-1)


def log_probs(
    h: Float[Array, "*b d"],
    codebook: Float[Array, "K d"],
    token_to_code: Int[Array, "V"],
    tokens: Int[Array, "*b"] | None = None,
) -> Float[Array, "*b ..."]:
    """``log softmax(L_v)``: over the whole vocabulary ``[*b, V]``, or only at ``tokens``
    (``[*b]``, e.g. targets for the NLL / perplexity), computed through the ``K`` codes."""
    k = codebook.shape[0]
    _check_map(token_to_code, k)
    token_to_code = jnp.asarray(token_to_code)
    lc = code_logits(h, codebook)
    norm = log_normalizer(lc, code_counts(token_to_code, k))
    if tokens is None:
        return jnp.take(lc, token_to_code, axis=-1) - norm[..., None]
    picked = jnp.take_along_axis(lc, jnp.take(token_to_code, tokens)[..., None], axis=-1)[..., 0]
    return picked - norm


def token_embeddings(codebook: Float[Array, "K d"], token_to_code: Int[Array, "V"]) -> Float[Array, "V d"]:
    """``codes -> vectors``: the effective ``V x d`` output embedding ``C[M(t)]``
    (``ValueError`` for concrete out-of-range map entries, NaN rows under jit)."""
    return take_codes(codebook, token_to_code, "VQ-Logits token_embeddings")


_INITS = ("kmeans++", "random")


@partial(jax.jit, static_argnames=("k", "iters"))
def _forgy_kmeans(key: PRNGKeyArray, data: Float[Array, "N D"], k: int, iters: int) -> Float[Array, "k D"]:
    """Forgy seeding (``k`` distinct rows drawn uniformly) and ``iters`` Lloyd iterations whose
    update is a segment sum (``O(N D)``, no ``[N, k]`` one-hot product); empty clusters keep
    their center."""
    n = data.shape[0]
    centers = data[jax.random.choice(key, n, (k,), replace=False)]

    def lloyd(_, c):
        codes = vq.nearest_code(data, c)
        sums = jax.ops.segment_sum(data, codes, k)
        counts = jax.ops.segment_sum(jnp.ones((n,), data.dtype), codes, k)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

    return jax.lax.fori_loop(0, iters, lloyd, centers)


def from_embeddings(key: PRNGKeyArray, embeddings: Float[Array, "V d"], num_codes: int,
                    iters: int = 20, init: str = "kmeans++") -> tuple[Float[Array, "K d"], Int[Array, "V"]]:
    """Codebook and token -> code map from trained output embeddings (the initialisation
    Shao et al. 2025 study for VQ-Logits): k-means over the ``V`` rows, each token assigned to
    its nearest centroid.

    ``init="kmeans++"`` seeds with k-means++ (``num_codes`` sequential ``O(V d)`` passes) then
    runs ``iters`` Lloyd iterations; ``init="random"`` seeds with ``num_codes`` distinct rows
    drawn uniformly (Forgy), which avoids the sequential seeding pass and is the practical
    choice for thousands of codes on a CPU. ``ValueError`` for an unknown ``init``, a codebook
    size below 2 or above ``V``, or negative ``iters``.
    """
    if init not in _INITS:
        raise ValueError(f"VQ-Logits from_embeddings: init must be one of {_INITS}, got {init!r}")
    check_codebook_size(num_codes, "VQ-Logits")
    if int(iters) != iters or iters < 0:
        raise ValueError(f"VQ-Logits from_embeddings: iters must be an integer >= 0, got {iters}")
    data = jnp.asarray(embeddings, jnp.float32)
    if data.ndim != 2 or num_codes > data.shape[0]:
        raise ValueError(f"VQ-Logits from_embeddings: need [V, d] embeddings with V >= num_codes={num_codes}, "
                         f"got shape {data.shape}")
    if init == "kmeans++":
        codebook = vq.kmeans_plusplus(key, data, num_codes, iters)
    else:
        codebook = _forgy_kmeans(key, data, num_codes, int(iters))
    return codebook, vq.nearest_code(data, codebook)


class VQLogits(nn.Module):
    """Output layer with a learnable ``[num_codes, dim]`` codebook (param ``"codebook"``).

    ``__call__(h, token_to_code, tokens=None)`` returns :func:`log_probs`; the map is an
    argument (an array, fixed or re-assigned by the caller), not a parameter.
    """

    num_codes: int
    dim: int
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, h: Float[Array, "*b d"], token_to_code: Int[Array, "V"],
                 tokens: Int[Array, "*b"] | None = None) -> Float[Array, "*b ..."]:
        check_codebook_size(self.num_codes, "VQ-Logits")
        codebook = self.param("codebook", self.embedding_init, (self.num_codes, self.dim))
        return log_probs(h, codebook, token_to_code, tokens)
