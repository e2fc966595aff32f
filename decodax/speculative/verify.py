"""Lossless speculative verifiers: pure functions of logits / probabilities and PRNG keys.

Every verifier is batched over rows with per-row acceptance, uses static
shapes only, and is ``jax.jit``-compatible; none of them needs a model.

Shapes and conventions
----------------------
* Chains: ``draft_tokens int32[B, K]`` and target distributions ``[B, K + 1, V]``
  where position ``i`` is the target's distribution of draft token ``i`` and
  position ``K`` is the bonus position. Chain verifiers return
  ``(accepted_len int32[B] in [0, K], next_token int32[B])``: the emitted tokens
  are ``draft_tokens[b, :accepted_len[b]]`` followed by ``next_token[b]``; commit
  ``accepted_len + 1`` cache entries when the model was fed ``[root, drafts]``.
* Trees: see :mod:`decodax.speculative.trees` (node 0 is the root, i.e. the last
  emitted token; ``parents[i] < i``; target distribution at node ``i`` = law of
  the token after the path root..i). ``parents`` is ``[N]`` (a static template,
  validated before tracing) or ``[B, N]`` (one tree per row, possibly traced).
  Tree verifiers return a :class:`TreeVerifyResult` ``(path int32[B, P],
  accepted_len int32[B], next_token int32[B])`` with ``path[:, 0] == 0`` and
  ``-1`` padding; ``P = max_depth + 1``, where the static ``max_depth`` defaults
  to the tree's depth for concrete parents and to ``N - 1`` for traced ones (a
  smaller value than the real depth truncates paths).
* Sampling verifiers take *probabilities*, after the same logits processors
  (temperature, top-k, top-p, min-p) were applied to target and draft alike;
  tokens of probability 0 (padded vocabularies) are never emitted.
* ``draft_probs`` is the distribution each draft token was drawn from;
  ``None`` means deterministic drafts (greedy drafters, n-gram lookup, fixed
  candidates): q is the point mass on the draft token. In the chain and tree
  verifiers a token whose recorded draft probability is 0 is treated as
  deterministic as well (SpecTr requires genuine i.i.d. samples of q).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from decodax.speculative import trees

__all__ = [
    "MultiDraftResult",
    "TreeVerifyResult",
    "sample_without_replacement",
    "spectr_rho",
    "verify_greedy",
    "verify_multi_draft",
    "verify_recursive",
    "verify_sampling",
    "verify_tree_greedy",
    "verify_tree_sampling",
]


class TreeVerifyResult(NamedTuple):
    """Result of a tree verification.

    ``path[b, :accepted_len[b] + 1]`` are the accepted node indices, root first
    (``-1`` padding); ``next_token[b]`` follows the last accepted node. Feed
    ``KVCache.gather(cache, path, accepted_len + 1)``.
    """

    path: Int[Array, "B P"]
    accepted_len: Int[Array, " B"]
    next_token: Int[Array, " B"]


class MultiDraftResult(NamedTuple):
    """Result of a multi-draft verification: emitted tokens are
    ``draft_tokens[b, draft_index[b], :accepted_len[b]]`` then ``next_token[b]``."""

    draft_index: Int[Array, " B"]
    accepted_len: Int[Array, " B"]
    next_token: Int[Array, " B"]


# --------------------------------------------------------------------------- helpers

ResidualFn = Callable[[Array, Array], Array]


def _normalize_or(r: Array, fallback: Array) -> Array:
    """``r / sum(r)`` along the vocabulary, or ``fallback`` where ``r`` has no mass."""
    s = r.sum(-1, keepdims=True)
    ok = s > 0
    return jnp.where(ok, r / jnp.where(ok, s, 1.0), fallback)


def _residual(p: Array, q: Array) -> Array:
    """``norm(max(0, p - q))`` (Leviathan et al. 2023, Sec. 2.3); ``p`` when p <= q everywhere.

    The all-zero residual (p == q) is reached only by a rejection of
    probability 0, which float rounding can still produce: ``p`` is returned
    then, so no zero-probability (e.g. padded) token is ever emitted.
    """
    return _normalize_or(jnp.maximum(p - q, 0.0), p)


def _uniforms(key: Array, shape: tuple[int, ...], dtype) -> Array:
    """All the randomness of one verification in a single draw, in ``[tiny, 1)``.

    One PRNG call per verifier keeps compile time low (each call site expands
    into its own PRNG kernel on CPU)."""
    return jax.random.uniform(key, shape, dtype=dtype, minval=jnp.finfo(dtype).tiny)


def _categorical(u: Array, probs: Array) -> Array:
    """One sample per row from unnormalised ``probs`` by Gumbel-max on uniforms ``u``
    of the same shape; zero-probability entries are never drawn (unless all are zero)."""
    pos = probs > 0
    logp = jnp.where(pos, jnp.log(jnp.where(pos, probs, 1.0)), -jnp.inf)
    return jnp.argmax(logp - jnp.log(-jnp.log(u)), axis=-1).astype(jnp.int32)


def _take(x: Array, idx: Array) -> Array:
    """``x[..., idx]`` per leading index: x [..., V], idx [...] -> [...]."""
    return jnp.take_along_axis(x, idx[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _point_mass_if_zero(q: Array, x: Array, v: int) -> tuple[Array, Array]:
    """Treat a token whose draft probability is 0 as a deterministic draft (q = point mass)."""
    qx = _take(q, x)
    zero = qx <= 0
    q = jnp.where(zero[..., None], jax.nn.one_hot(x, v, dtype=q.dtype), q)
    return q, jnp.where(zero, 1.0, qx)


def _check_vocab(name: str, draft_v: int, target_v: int) -> None:
    if draft_v != target_v:
        raise ValueError(
            f"{name}: draft vocabulary size {draft_v} differs from target vocabulary size "
            f"{target_v}; drafter and target must share the tokenizer (pad the smaller one)"
        )


def _check_chain(name: str, draft_tokens, target, draft_probs=None) -> tuple[int, int, int]:
    if np.ndim(draft_tokens) != 2:
        raise ValueError(f"{name}: draft_tokens must be int[B, K], got shape {np.shape(draft_tokens)}")
    b, k = np.shape(draft_tokens)
    if k < 1:
        raise ValueError(f"{name}: draft length must be >= 1, got K = {k}")
    if np.ndim(target) != 3 or np.shape(target)[:2] != (b, k + 1):
        raise ValueError(
            f"{name}: target must be [B, K + 1, V] = [{b}, {k + 1}, V] for drafts of shape "
            f"[{b}, {k}], got {np.shape(target)}"
        )
    v = np.shape(target)[-1]
    if draft_probs is not None:
        _check_vocab(name, np.shape(draft_probs)[-1], v)
        if np.shape(draft_probs) != (b, k, v):
            raise ValueError(f"{name}: draft_probs must be [B, K, V] = {(b, k, v)}, got {np.shape(draft_probs)}")
    return b, k, v


def _check_tree(name: str, tokens, parents, target, draft_probs=None) -> tuple[int, int, int, int | None]:
    if np.ndim(tokens) != 2:
        raise ValueError(f"{name}: tree tokens must be int[B, N], got shape {np.shape(tokens)}")
    b, n = np.shape(tokens)
    if n < 2:
        raise ValueError(f"{name}: a token tree needs the root and >= 1 draft node, got N = {n}")
    if np.shape(parents) not in ((n,), (b, n)):
        raise ValueError(f"{name}: parents must be [N] or [B, N] with N = {n}, got {np.shape(parents)}")
    if np.ndim(target) != 3 or np.shape(target)[:2] != (b, n):
        raise ValueError(f"{name}: target must be [B, N, V] = [{b}, {n}, V], got {np.shape(target)}")
    v = np.shape(target)[-1]
    if draft_probs is not None:
        _check_vocab(name, np.shape(draft_probs)[-1], v)
        if np.shape(draft_probs) != (b, n, v):
            raise ValueError(f"{name}: draft_probs must be [B, N, V] = {(b, n, v)}, got {np.shape(draft_probs)}")
    max_depth = None
    if trees.concrete_parents(parents) is not None:
        trees.validate_parents(parents)
        max_depth = trees.max_tree_depth(parents)
    return b, n, v, max_depth


# --------------------------------------------------------------------------- chains


def verify_greedy(
    draft_tokens: Int[ArrayLike, "B K"],
    target_logits: Float[ArrayLike, "B K+1 V"],
) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """Greedy chain verification (Leviathan et al. 2023, Sec. 2 at temperature 0;
    Stern et al. 2018, blockwise parallel decoding, Sec. 3 "verify" step).

    Accepts the longest prefix with ``draft_tokens[b, i] == argmax target_logits[b, i]``;
    ``next_token`` is the target argmax at the first mismatch (or the bonus
    position ``K``). Returns ``(accepted_len int32[B] in [0, K], next_token int32[B])``.
    Ties in the argmax go to the lowest token id (``jnp.argmax``).
    """
    _, k, _ = _check_chain("verify_greedy", draft_tokens, target_logits)
    target_tokens = jnp.argmax(jnp.asarray(target_logits), axis=-1).astype(jnp.int32)  # [B, K+1]
    match = jnp.asarray(draft_tokens, jnp.int32) == target_tokens[:, :k]
    accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    next_token = jnp.take_along_axis(target_tokens, accepted[:, None], axis=1)[:, 0]
    return accepted, next_token


def verify_sampling(
    draft_tokens: Int[ArrayLike, "B K"],
    draft_probs: Float[ArrayLike, "B K V"] | None,
    target_probs: Float[ArrayLike, "B K+1 V"],
    key: PRNGKeyArray,
) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023,
    Algorithm 2 "modified rejection sampling").

    Draft token ``x_i`` (drawn from ``q_i = draft_probs[:, i]``) is accepted with
    probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the next
    token is drawn from ``norm(max(0, p_i - q_i))``; if all ``K`` are accepted a
    bonus token is drawn from ``p_K``. ``draft_probs=None``: deterministic drafts
    (accept with probability ``p_i(x_i)``; residual = ``p_i`` without ``x_i``,
    renormalised). The emitted tokens are distributed exactly as autoregressive
    sampling from the target. Returns ``(accepted_len int32[B], next_token int32[B])``.
    """
    _check_chain("verify_sampling", draft_tokens, target_probs, draft_probs)
    return _verify_chain(draft_tokens, draft_probs, target_probs, key, residual_fn=_residual)


def _verify_chain(draft_tokens, draft_probs, target_probs, key, *, residual_fn: ResidualFn):
    draft_tokens = jnp.asarray(draft_tokens, jnp.int32)
    target_probs = jnp.asarray(target_probs)
    b, k = draft_tokens.shape
    v = target_probs.shape[-1]
    noise = _uniforms(key, (b, k + v), target_probs.dtype)
    u, u_sample = noise[:, :k], noise[:, k:]
    px = _take(target_probs[:, :k], draft_tokens)  # [B, K]
    if draft_probs is None:
        q_all = None
        qx = jnp.ones_like(px)
    else:
        draft_probs = jnp.asarray(draft_probs, target_probs.dtype)
        q_all = draft_probs
        qx = _take(draft_probs, draft_tokens)
    # q(x) == 0 (a token the drafter claims it could not draw) is handled as a point mass.
    accept = u * jnp.where(qx > 0, qx, 1.0) < px
    accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    rows = jnp.arange(b)
    p_n = target_probs[rows, accepted]  # [B, V]
    at = jnp.minimum(accepted, k - 1)
    x_n = draft_tokens[rows, at]
    if q_all is None:
        q_n = jax.nn.one_hot(x_n, v, dtype=target_probs.dtype)
    else:
        q_n, _ = _point_mass_if_zero(q_all[rows, at], x_n, v)
    dist = jnp.where((accepted == k)[:, None], p_n, residual_fn(p_n, q_n))
    return accepted, _categorical(u_sample, dist)


# --------------------------------------------------------------------------- trees


def verify_tree_greedy(
    tokens: Int[ArrayLike, "B N"],
    parents: Int[ArrayLike, "*B N"],
    target_logits: Float[ArrayLike, "B N V"],
    *,
    max_depth: int | None = None,
) -> TreeVerifyResult:
    """Greedy token-tree verification (SpecInfer, Miao et al. 2024, greedy
    "VerifyGreedy"; Medusa, Cai et al. 2024, Sec. 2.1.2 with greedy acceptance).

    A node is accepted when its token equals the target argmax at its parent and
    its parent is accepted; the deepest accepted node wins (lowest index among
    equally deep ones) and ``next_token`` is the target argmax there. Node 0 is
    the root (always accepted, its token is ignored). Returns a
    :class:`TreeVerifyResult` with ``path [B, P]``, ``P = max_depth + 1``.
    """
    b, n, _, static_depth = _check_tree("verify_tree_greedy", tokens, parents, target_logits)
    if max_depth is None:
        max_depth = n - 1 if static_depth is None else static_depth
    tokens = jnp.asarray(tokens, jnp.int32)
    parents_arr = jnp.maximum(jnp.asarray(parents, jnp.int32), 0)
    choice = jnp.argmax(jnp.asarray(target_logits), axis=-1).astype(jnp.int32)  # [B, N]
    if parents_arr.ndim == 1:
        parent_choice = choice[:, parents_arr]  # target argmax at each node's parent
    else:
        parent_choice = jnp.take_along_axis(choice, parents_arr, axis=1)
    match = (tokens == parent_choice) | (jnp.arange(n) == 0)[None, :]
    mask = trees.ancestor_mask(parents)  # [N, N] (static constant) or [B, N, N]
    depth = (mask.sum(-1) - 1).astype(jnp.int32)  # [N] or [B, N]
    if mask.ndim == 2:
        mask, depth = mask[None], depth[None]
    accepted_node = ~jnp.any(mask & ~match[:, None, :], axis=-1)  # every ancestor matches
    best = jnp.argmax(jnp.where(accepted_node, depth, -1), axis=1).astype(jnp.int32)
    path = trees.accepted_path(parents, best, max_depth)
    accepted_len = (jnp.sum(path >= 0, axis=1) - 1).astype(jnp.int32)
    next_token = jnp.take_along_axis(choice, best[:, None], axis=1)[:, 0]
    return TreeVerifyResult(path, accepted_len, next_token)


def verify_tree_sampling(
    tokens: Int[ArrayLike, "B N"],
    parents: Int[ArrayLike, "*B N"],
    draft_probs: Float[ArrayLike, "B N V"] | None,
    target_probs: Float[ArrayLike, "B N V"],
    key: PRNGKeyArray,
    *,
    max_depth: int | None = None,
) -> TreeVerifyResult:
    """Token-tree speculative sampling: multi-candidate recursive rejection sampling
    (SpecInfer, Miao et al. 2024, "multi-step speculative sampling" (MSS), the
    stochastic tree verification that EAGLE, Li et al. 2024, also uses).

    Starting at the root with ``p = target_probs[:, 0]``, the children of the
    current node are tried in index order: child ``x`` (drawn from
    ``q = draft_probs[:, child]``, the draft distribution at its parent, drawn
    independently of its earlier siblings) is accepted with probability
    ``min(1, p(x) / q(x))``, and the walk moves to it with
    ``p = target_probs[:, child]``; on rejection ``p <- norm(max(0, p - q))`` and
    the next sibling is tried. When every child is rejected (or a leaf is
    reached) the next token is drawn from ``p``. ``draft_probs=None``:
    deterministic candidates (e.g. top-k children, EAGLE-2 / Medusa / Token
    Recycling trees): accept with probability ``p(x)``, on rejection remove
    ``x``'s mass and renormalise. Lossless for any tree shape.
    """
    b, n, _, static_depth = _check_tree("verify_tree_sampling", tokens, parents, target_probs, draft_probs)
    return _verify_tree(
        tokens, parents, draft_probs, target_probs, key,
        without_replacement=False, residual_fn=_residual,
        max_depth=_depth_or(max_depth, static_depth, n),
    )  # fmt: skip


def verify_recursive(
    tokens: Int[ArrayLike, "B N"],
    parents: Int[ArrayLike, "*B N"],
    draft_probs: Float[ArrayLike, "B N V"],
    target_probs: Float[ArrayLike, "B N V"],
    key: PRNGKeyArray,
    *,
    max_depth: int | None = None,
) -> TreeVerifyResult:
    """Recursive Speculative Decoding verification (Jeon et al. 2024, "recursive
    rejection sampling" for draft trees sampled *without replacement*).

    Siblings are the successive draws without replacement from the draft
    distribution at their parent ``q = draft_probs[:, child]`` (e.g.
    :func:`sample_without_replacement`, in its output order). The ``i``-th
    sibling was drawn from ``q_i = q`` restricted to the tokens of siblings
    ``1 .. i-1`` removed, renormalised; it is accepted with probability
    ``min(1, p_i(x_i) / q_i(x_i))`` and on rejection
    ``p_{i+1} = norm(max(0, p_i - q_i))``. When all siblings are rejected the
    next token is drawn from the last residual. Lossless; same return as
    :func:`verify_tree_sampling`.
    """
    if draft_probs is None:
        raise ValueError("verify_recursive: RSD needs the draft distributions (draft_probs), got None")
    b, n, _, static_depth = _check_tree("verify_recursive", tokens, parents, target_probs, draft_probs)
    return _verify_tree(
        tokens, parents, draft_probs, target_probs, key,
        without_replacement=True, residual_fn=_residual,
        max_depth=_depth_or(max_depth, static_depth, n),
    )  # fmt: skip


def _depth_or(max_depth: int | None, static_depth: int | None, n: int) -> int:
    if max_depth is not None:
        return max_depth
    return n - 1 if static_depth is None else static_depth


def _verify_tree(
    tokens, parents, draft_probs, target_probs, key, *,
    without_replacement: bool, residual_fn: ResidualFn, max_depth: int,
):  # fmt: skip
    """Sequential walk over the nodes in index order (a ``lax.scan`` over ``N - 1`` nodes).

    ``residual_fn(p, q)`` is the rejection update (the tests inject wrong ones
    as negative controls)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    target_probs = jnp.asarray(target_probs)
    b, n = tokens.shape
    v = target_probs.shape[-1]
    dtype = target_probs.dtype
    parents_arr = jnp.asarray(parents, jnp.int32)  # [N] or [B, N]; never broadcast (no big constants)
    noise = _uniforms(key, (b, n + v), dtype)
    u, u_sample = noise[:, :n], noise[:, n:]
    vocab_ids = jnp.arange(v, dtype=jnp.int32)

    def step(state, xs):
        cur, p, excluded = state
        j, tok, par, q, p_child, u_j = xs
        is_child = par == cur  # [B]
        hit = tok[:, None] == vocab_ids  # [B, V] one-hot of the node's token
        if q is None:
            q = hit.astype(dtype)
        else:
            if without_replacement:  # the draw excluded the already rejected siblings
                q = _normalize_or(jnp.where(excluded, 0.0, q), q)
            zero = ~jnp.any(hit & (q > 0), axis=-1)  # q(x) == 0: treat as deterministic
            q = jnp.where(zero[:, None], hit.astype(dtype), q)
        px = jnp.sum(jnp.where(hit, p, 0.0), axis=-1)
        qx = jnp.sum(jnp.where(hit, q, 0.0), axis=-1)
        accept = is_child & (u_j * qx < px)
        reject = is_child & ~accept
        p = jnp.where(accept[:, None], p_child, jnp.where(reject[:, None], residual_fn(p, q), p))
        excluded = jnp.where(accept[:, None], False, excluded | (reject[:, None] & hit))
        cur = jnp.where(accept, j, cur)
        return (cur, p, excluded), None

    def lead(x):  # node axis first for the scan, root dropped
        return None if x is None else jnp.moveaxis(jnp.asarray(x)[:, 1:], 1, 0)

    xs = (
        jnp.arange(1, n, dtype=jnp.int32),
        lead(tokens),
        parents_arr[1:] if parents_arr.ndim == 1 else lead(parents_arr),
        None if draft_probs is None else lead(jnp.asarray(draft_probs, dtype)),
        lead(target_probs),
        lead(u),
    )
    init = (jnp.zeros((b,), jnp.int32), target_probs[:, 0], jnp.zeros((b, v), bool))
    (cur, p, _), _ = jax.lax.scan(step, init, xs)
    next_token = _categorical(u_sample, p)
    path = trees.accepted_path(parents, cur, max_depth)
    accepted_len = (jnp.sum(path >= 0, axis=1) - 1).astype(jnp.int32)
    return TreeVerifyResult(path, accepted_len, next_token)


def sample_without_replacement(
    logits: Float[ArrayLike, "*batch V"], key: PRNGKeyArray, k: int
) -> Int[Array, "*batch k"]:
    """``k`` distinct tokens drawn without replacement, in draw order (the Gumbel-top-k
    trick, Kool et al. 2019, "Stochastic Beams and Where to Find Them"; the
    drafting step of Recursive Speculative Decoding, Jeon et al. 2024).

    ``argsort(logits + Gumbel noise)[:k]`` is distributed as ``k`` successive
    draws from ``softmax(logits)`` each excluding the earlier ones. ``k`` must not
    exceed the number of tokens with finite logit (else the extra tokens are
    arbitrary zero-probability ones, which the verifiers treat as deterministic).
    """
    logits = jnp.asarray(logits)
    v = logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"sample_without_replacement: need 1 <= k <= V = {v}, got k = {k}")
    g = jax.random.gumbel(key, logits.shape, dtype=jnp.result_type(logits.dtype, jnp.float32))
    _, idx = jax.lax.top_k(logits + g, k)
    return idx.astype(jnp.int32)


# --------------------------------------------------------------------------- SpecTr


def spectr_rho(
    p: Float[ArrayLike, "*B V"], q: Float[ArrayLike, "*B V"], k: Int[ArrayLike, "*B"], iters: int = 40
) -> Float[Array, "*B"]:
    """The SpecTr K-SEQ parameter ``rho*`` (Sun et al. 2023, k-sequential selection).

    ``rho*`` in ``[1, k]`` solves ``1 - (1 - beta(rho))^k = rho * beta(rho)`` with
    ``beta(rho) = sum_x min(q(x), p(x) / rho)``. The difference
    ``rho * beta(rho) - (1 - (1 - beta(rho))^k)`` is non-decreasing in rho
    (``rho * beta = sum min(rho q, p)`` grows, ``beta`` shrinks), so bisection
    finds it; the returned value is the upper end, which always satisfies the
    validity condition ``1 - (1 - beta)^k <= rho * beta`` (k = 1 gives rho = 1:
    plain speculative sampling).
    """
    p = jnp.asarray(p)
    q = jnp.asarray(q, p.dtype)
    kf = jnp.maximum(jnp.asarray(k, p.dtype), 1.0)

    def psi(rho):
        s = jnp.sum(jnp.minimum(rho[..., None] * q, p), axis=-1)  # rho * beta(rho)
        beta = s / rho
        return s - 1.0 + jnp.clip(1.0 - beta, 0.0, 1.0) ** kf

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = psi(mid) >= 0
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.ones_like(kf)
    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, kf))
    return jnp.where(psi(lo) >= 0, lo, hi)


def _kseq_residual(p, q, rho, k):
    """SpecTr K-SEQ residual: ``p_res ∝ p - min(q, p / rho) * (1 - (1 - beta)^k) / beta``."""
    beta = jnp.sum(jnp.minimum(q, p / rho[..., None]), axis=-1)
    kf = jnp.asarray(k, p.dtype)
    p_acc = 1.0 - jnp.clip(1.0 - beta, 0.0, 1.0) ** kf
    coef = jnp.where(beta > 0, p_acc / jnp.where(beta > 0, beta, 1.0), kf)
    return _normalize_or(jnp.maximum(p - jnp.minimum(q, p / rho[..., None]) * coef[..., None], 0.0), p)


def verify_multi_draft(
    draft_tokens: Int[ArrayLike, "B M K"],
    draft_probs: Float[ArrayLike, "B M K V"],
    target_probs: Float[ArrayLike, "B M K+1 V"],
    key: PRNGKeyArray,
    *,
    rho: float | None = None,
) -> MultiDraftResult:
    """SpecTr multi-draft verification (Sun et al., NeurIPS 2023): the token-level
    k-sequential draft selection (K-SEQ, the paper's (1 - 1/e)-optimal draft
    selection algorithm) applied position by position to the drafts still
    consistent with the emitted prefix (the SpecTr sampling algorithm).

    ``M`` drafts of length ``K`` are sampled i.i.d. from the draft model;
    ``draft_probs[b, m, t]`` is the draft distribution of token ``t`` of draft
    ``m`` and ``target_probs[b, m, t]`` the target's in that draft's context
    (position ``K``: bonus). At position ``t`` with ``k`` surviving drafts (all
    sharing the emitted prefix, so sharing ``p`` and ``q``), K-SEQ tries them in
    index order: draft token ``x`` is accepted with probability
    ``min(1, p(x) / (rho q(x)))``; if none is, the token is drawn from
    ``p_res ∝ p - min(q, p / rho) (1 - (1 - beta)^k) / beta``,
    ``beta = sum_x min(q(x), p(x) / rho)``. The survivors are the drafts whose
    token equals the emitted one; the round stops when none survives, and a
    bonus token is drawn from the target when all ``K`` positions are accepted.
    ``rho=None`` uses :func:`spectr_rho` per position; a given ``rho`` smaller
    than that is raised to it (validity). Returns :class:`MultiDraftResult`:
    the followed draft (lowest index among those matching the emitted tokens),
    ``accepted_len`` in ``[0, K]`` and ``next_token``.
    """
    name = "verify_multi_draft"
    if draft_probs is None:
        raise ValueError(f"{name}: SpecTr needs draft_probs (drafts are i.i.d. samples of q), got None")
    if np.ndim(draft_tokens) != 3:
        raise ValueError(f"{name}: draft_tokens must be int[B, M, K], got shape {np.shape(draft_tokens)}")
    b, m, k = np.shape(draft_tokens)
    if k < 1 or m < 1:
        raise ValueError(f"{name}: need >= 1 draft of length >= 1, got M = {m}, K = {k}")
    if np.ndim(target_probs) != 4 or np.shape(target_probs)[:3] != (b, m, k + 1):
        raise ValueError(f"{name}: target_probs must be [B, M, K + 1, V] = [{b}, {m}, {k + 1}, V], got {np.shape(target_probs)}")
    v = np.shape(target_probs)[-1]
    _check_vocab(name, np.shape(draft_probs)[-1], v)
    if np.shape(draft_probs) != (b, m, k, v):
        raise ValueError(f"{name}: draft_probs must be [B, M, K, V] = {(b, m, k, v)}, got {np.shape(draft_probs)}")
    return _verify_multi_draft(draft_tokens, draft_probs, target_probs, key, rho=rho, residual_rule=_kseq_residual)


def _verify_multi_draft(draft_tokens, draft_probs, target_probs, key, *, rho, residual_rule):
    """``residual_rule(p, q, rho, k)`` is the K-SEQ residual (the tests inject the
    single-draft ``norm(max(0, p - q))`` as a negative control)."""
    draft_tokens = jnp.asarray(draft_tokens, jnp.int32)
    target_probs = jnp.asarray(target_probs)
    dtype = target_probs.dtype
    draft_probs = jnp.asarray(draft_probs, dtype)
    b, m, k = draft_tokens.shape
    rows = jnp.arange(b)
    v = target_probs.shape[-1]
    noise = _uniforms(key, (k + 1, b, m + v), dtype)  # per position: M acceptance + V sampling

    def step(state, xs):
        alive, done, accepted, next_token = state
        t, noise_t = xs
        u_t, u_sample = noise_t[:, :m], noise_t[:, m:]
        lead = jnp.argmax(alive, axis=1)  # all survivors share the prefix, hence p and q
        p = target_probs[rows, lead, t]
        q = draft_probs[rows, lead, t]
        x = draft_tokens[:, :, t]  # [B, M]
        n_alive = alive.sum(axis=1)
        r = spectr_rho(p, q, n_alive)
        if rho is not None:
            r = jnp.maximum(r, jnp.asarray(rho, dtype))
        px = jnp.take_along_axis(p, x, axis=1)
        qx = jnp.take_along_axis(q, x, axis=1)
        acc = alive & (u_t * r[:, None] * qx < px)
        any_acc = acc.any(axis=1)
        y_acc = jnp.take_along_axis(x, jnp.argmax(acc, axis=1)[:, None], axis=1)[:, 0]
        res = residual_rule(p, q, r, n_alive)
        y = jnp.where(any_acc, y_acc, _categorical(u_sample, res))
        survivors = alive & (x == y[:, None])
        stop = ~done & ~survivors.any(axis=1)
        next_token = jnp.where(stop, y, next_token)
        accepted = jnp.where(~done & ~stop, t + 1, accepted)
        alive = jnp.where((done | stop)[:, None], alive, survivors)
        return (alive, done | stop, accepted, next_token), None

    init = (jnp.ones((b, m), bool), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
    xs = (jnp.arange(k, dtype=jnp.int32), noise[:k])
    (alive, done, accepted, next_token), _ = jax.lax.scan(step, init, xs)
    lead = jnp.argmax(alive, axis=1).astype(jnp.int32)
    bonus = _categorical(noise[k, :, m:], target_probs[rows, lead, k])
    next_token = jnp.where(done, next_token, bonus)
    return MultiDraftResult(lead, accepted.astype(jnp.int32), next_token.astype(jnp.int32))
