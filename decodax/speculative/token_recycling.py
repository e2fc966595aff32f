"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating
Inference of Large Language Models with Token Recycling"): a training-free tree drafter.

The drafter keeps an adjacency matrix ``adj int32[B, V, w]``: row ``t`` holds
the ``w`` candidate next tokens of token ``t``, namely the top-``w`` tokens of
the target's logits the last time ``t`` was fed to the target (the candidate
tokens a verification step would otherwise throw away). Every step:

* **draft**: BFS expansion of a static tree template from the root
  (``last_token``): node ``i`` gets ``adj[token(parent(i)), rank(i)]``;
* **verify**: one target forward of the whole tree (tree attention);
* **update**: for every tree node with token ``t``, ``adj[t] := top_w(logits at
  that node)`` (all nodes, accepted or not).

The matrix is initialised from the prompt's prefill logits (``adj[prompt[j]] :=
top_w(logits[j])``; tokens never seen keep row 0, i.e. token 0 candidates).
The paper keeps the matrix across queries ("hot start"); here it lives in the
decoding state of one ``generate`` call, so each call starts from its prompt.
"""

from __future__ import annotations

import functools
import heapq
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from decodax.decoding.state import DecodeState
from decodax.speculative import trees
from decodax.speculative.drafters import Drafter, Proposal

__all__ = ["TRState", "expand_template", "token_recycling", "tr_template"]


class TRState(NamedTuple):
    adj: Int[Array, "B V W"]  # candidate next tokens of every token, best first


def tr_template(num_nodes: int = 80, width: int = 8, max_depth: int = 6, decay: float = 1.5) -> trees.TreeTemplate:
    """A static imbalanced tree like Token Recycling's (wide near the root, narrow deeper).

    Best-first selection of the ``num_nodes - 1`` rank paths of highest prior
    ``prod_d a(r_d)`` with ``a(r) = 0.5 / (1 + r) ** decay`` (rank ``r`` in
    ``[0, width)``, depth ``<= max_depth``): the top-rank chain goes deepest,
    lower ranks branch near the root. The default (80 nodes, 8 ranks, depth 6)
    has the size of the paper's tree (~80 nodes).
    """
    for name, val, lo in (("num_nodes", num_nodes, 2), ("width", width, 1), ("max_depth", max_depth, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"tr_template: {name} must be an int >= {lo}, got {val!r}")
    if not decay > 0:
        raise ValueError(f"tr_template: decay must be > 0, got {decay!r}")
    prior = [0.5 / (1.0 + r) ** decay for r in range(width)]
    heap = [(-prior[r], (r,)) for r in range(width)]
    heapq.heapify(heap)
    paths: list[tuple[int, ...]] = []
    while heap and len(paths) < num_nodes - 1:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        if len(path) < max_depth:
            for r in range(width):
                heapq.heappush(heap, (neg * prior[r], path + (r,)))
    return trees.tree_from_paths(paths)


def expand_template(template: trees.TreeTemplate, root: Int[Array, " B"],
                    children: Callable[[Array, np.ndarray], Array]) -> Int[Array, "B N"]:
    """BFS expansion of a static template: ``tokens[:, i] = children(parent_tokens, ranks)``
    level by level (``children([B, n], int[n]) -> [B, n]``), node 0 = ``root``."""
    n = template.num_nodes
    tok = jnp.zeros((root.shape[0], n), jnp.int32).at[:, 0].set(root.astype(jnp.int32))
    for d in range(1, template.max_depth + 1):
        idx = np.nonzero(template.depth == d)[0]
        par = template.parents[idx]
        tok = tok.at[:, idx].set(children(tok[:, par], template.rank[idx]).astype(jnp.int32))
    return tok


def token_recycling(vocab_size: int, *, template: trees.TreeTemplate | None = None, width: int = 8) -> Drafter:
    """Token Recycling drafter (Luo et al. 2024) for :func:`tree_speculative`.

    ``vocab_size`` sizes the adjacency matrix ``[V, width]`` (the paper's
    ``k = 8``); ``template`` defaults to :func:`tr_template` ``(80 nodes)``;
    its ranks must be ``< width``. Drafts are deterministic (``probs=None``).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"token_recycling: vocab_size must be an int >= 1, got {vocab_size!r}")
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= vocab_size:
        raise ValueError(f"token_recycling: width must be an int in [1, {vocab_size}], got {width!r}")
    template = tr_template(width=width) if template is None else template
    if not isinstance(template, trees.TreeTemplate):
        raise ValueError(f"token_recycling: template must be a TreeTemplate, got {type(template).__name__}")
    trees.validate_parents(template.parents)
    if template.num_nodes < 2 or int(template.rank[1:].max()) >= width:
        raise ValueError(f"token_recycling: template needs >= 2 nodes and ranks < width = {width}, got ranks "
                         f"up to {int(template.rank.max())} over {template.num_nodes} nodes")
    return _token_recycling(vocab_size, width, _TemplateKey(template))


class _TemplateKey:
    """Hashable wrapper of a TreeTemplate (memoisation key)."""

    def __init__(self, template: trees.TreeTemplate):
        self.template = template
        self._key = (tuple(template.parents.tolist()), tuple(template.rank.tolist()))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _TemplateKey) and self._key == other._key


def recycle(adj: Int[Array, "B V W"], tokens: Int[Array, "B T"], logits: Float[Array, "B T V"],
            valid: Int[Array, "B T"] | None = None) -> Int[Array, "B V W"]:
    """``adj[b, tokens[b, t]] := top_W(logits[b, t])`` for every (valid) fed token."""
    b, v, w = adj.shape
    top = jax.lax.top_k(logits, w)[1].astype(jnp.int32)  # [B, T, W]
    idx = tokens.astype(jnp.int32) if valid is None else jnp.where(valid, tokens, v)  # v: dropped
    return adj.at[jnp.arange(b)[:, None], idx].set(top, mode="drop")


@functools.lru_cache(maxsize=64)
def _token_recycling(vocab: int, width: int, tkey: _TemplateKey) -> Drafter:
    template = tkey.template
    n = template.num_nodes

    def init(params, state: DecodeState, *, logits=None) -> TRState:
        b, p = state.prompt.shape
        adj = jnp.zeros((b, vocab, width), jnp.int32)
        if logits is not None:
            valid = jnp.arange(p)[None, :] < state.prompt_len[:, None]
            adj = recycle(adj, state.prompt, logits, valid)
        return TRState(adj)

    def propose(params, state: DecodeState, dstate: TRState, key, *, k, sampler=None) -> Proposal:
        if k != n - 1:
            raise ValueError(f"token_recycling: template has {n - 1} draft nodes, asked for k = {k}")
        rows = jnp.arange(state.last_token.shape[0])[:, None]
        tok = expand_template(template, state.last_token,
                              lambda par, rank: dstate.adj[rows, par, jnp.asarray(rank)[None, :]])
        return Proposal(tok[:, 1:], None, jnp.full(tok.shape[:1], n - 1, jnp.int32), dstate)

    def update(dstate: TRState, state: DecodeState, accepted, *, logits=None, tokens=None, path=None) -> TRState:
        if logits is None:
            return dstate
        return TRState(recycle(dstate.adj, tokens, logits))

    return Drafter(init=init, propose=propose, update=update, name=f"token_recycling(N={n}, w={width})",
                   may_be_empty=False, template=template.paths, wants_logits=True)
