"""Stochastic beam search draft trees: the drafting half of RSD-S.

Recursive Speculative Decoding (Jeon et al. 2024) builds its draft tree with
Stochastic Beam Search (Kool et al. 2019, "Stochastic Beams and Where to Find
Them"): every level keeps the ``width`` sequences with the largest Gumbel-
perturbed log-probabilities, where a child's perturbation is conditioned on
its parent's (the truncated Gumbel of Kool et al.'s top-down sampling). The
children of each node are then the first draws of a sampling *without
replacement* from the draft distribution at that node, in draw order, with a
random number of them per node -- exactly what :func:`verify_recursive`
verifies losslessly (the count of siblings depends only on perturbed values,
which are independent of which tokens were drawn).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

__all__ = ["BeamTree", "stochastic_beam_tree"]

# draft_logits(tokens [B, N], parents [B, N], nodes [B, W]) -> logits [B, W, V]:
# the draft model's next-token logits after the path root..node, for each node.
DraftLogitsFn = Callable[[Array, Array, Array], Array]


class BeamTree(NamedTuple):
    """A draft tree with one shape per row: node 0 is the root (the last emitted token),
    level ``l`` holds nodes ``1 + (l - 1) * width ...``, siblings in draw order."""

    tokens: Int[Array, "B N"]
    parents: Int[Array, "B N"]
    draft_probs: Float[Array, "B N V"]  # law at the parent each node was drawn from (root row: 0)
    scores: Float[Array, "B N"]  # perturbed log-probabilities (conditioned Gumbels)


def _log1mexp(a: Array) -> Array:
    """log(1 - exp(a)) for a <= 0, accurate on both sides of log 2."""
    return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def _truncated_gumbel(g: Array, bound: Array) -> Array:
    """Shift the Gumbels ``g`` [..., V] so that their maximum becomes ``bound`` [...]
    (Kool et al. 2019, eq. 23, numerically stable form)."""
    z = jnp.max(g, axis=-1, keepdims=True)
    t = bound[..., None]
    v = t - g + _log1mexp(jnp.minimum(g - z, 0.0))
    out = t - jnp.maximum(v, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(v)))
    return jnp.where(jnp.isfinite(t) & jnp.isfinite(g), out, -jnp.inf)


def stochastic_beam_tree(
    draft_logits: DraftLogitsFn,
    root: Int[Array, " B"],
    key: PRNGKeyArray,
    *,
    width: int,
    depth: int,
) -> BeamTree:
    """Draft a tree of ``1 + width * depth`` nodes by stochastic beam search.

    ``draft_logits`` gives the draft distribution after the path to each of
    ``width`` nodes of the tree built so far (it may run a draft model with the
    tree's ancestor mask, or look up a table). A level with fewer than
    ``width`` tokens of positive draft mass gets filler nodes (score -inf,
    arbitrary tokens, after every real sibling) whose draft probabilities are
    zeroed, so the verifiers treat them as deterministic candidates: wasted
    slots, not a wrong law. Verify the result with
    ``verify_recursive(tree.tokens, tree.parents, tree.draft_probs, target, key)``.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"stochastic_beam_tree: width and depth must be >= 1, got {width}, {depth}")
    b = root.shape[0]
    n = 1 + width * depth
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(root.astype(jnp.int32))
    parents = jnp.zeros((b, n), jnp.int32).at[:, 0].set(-1)
    # Beams of level 0: the root, then dead beams (log-probability -inf) to keep shapes static.
    beam_nodes = jnp.zeros((b, width), jnp.int32)
    beam_logp = jnp.full((b, width), -jnp.inf).at[:, 0].set(0.0)
    beam_score = beam_logp
    draft_probs = scores = None
    for level in range(depth):
        logits = draft_logits(tokens, parents, beam_nodes).astype(jnp.float32)  # [B, W, V]
        if draft_probs is None:
            v = logits.shape[-1]
            draft_probs = jnp.zeros((b, n, v), jnp.float32)
            scores = jnp.full((b, n), -jnp.inf).at[:, 0].set(0.0)
        logq = jax.nn.log_softmax(logits, axis=-1)
        child_logp = beam_logp[..., None] + logq  # [B, W, V]
        g = child_logp + jax.random.gumbel(jax.random.fold_in(key, level), child_logp.shape)
        g = _truncated_gumbel(jnp.where(jnp.isfinite(child_logp), g, -jnp.inf), beam_score)
        top, flat = jax.lax.top_k(g.reshape(b, -1), width)  # sorted: siblings in draw order
        beam, tok = flat // v, (flat % v).astype(jnp.int32)
        idx = 1 + level * width + jnp.arange(width)
        par = jnp.take_along_axis(beam_nodes, beam, axis=1)
        tokens = tokens.at[:, idx].set(tok)
        parents = parents.at[:, idx].set(par)
        q = jnp.take_along_axis(jnp.exp(logq), beam[..., None], axis=1)
        q = jnp.where(jnp.isfinite(top)[..., None], q, 0.0)  # filler nodes: verified as deterministic
        draft_probs = draft_probs.at[:, idx].set(q)
        scores = scores.at[:, idx].set(top)
        beam_logp = jnp.take_along_axis(child_logp.reshape(b, -1), flat, axis=1)
        beam_nodes, beam_score = jnp.broadcast_to(idx, (b, width)).astype(jnp.int32), top
    return BeamTree(tokens, parents, draft_probs, scores)
