"""Token trees for tree speculative decoding (SpecInfer, Medusa, EAGLE, RSD).

Convention (used by every tree function in decodax)
---------------------------------------------------
A tree of ``N`` nodes is given by ``parents: int32[N]`` (one static template) or
``int32[B, N]`` (one tree per row):

* node 0 is the **root**: the last emitted token, already decided but not yet in
  the KV cache (the token the previous verification returned as ``next_token``);
  ``parents[0] == -1``;
* every other node ``i`` has ``0 <= parents[i] < i`` (topological order, hence no
  cycles); siblings are *tried in index order* by the sampling verifiers, so a
  drafter lists a node's candidates in the order it drew them;
* the model is fed all ``N`` tokens (root included) at positions
  ``length + depth[i]`` (:func:`tree_positions`) with the ancestor mask
  (:func:`ancestor_mask`), so its outputs at node ``i`` are the target's
  distribution of the token that follows the path ``root .. i``;
* the entries are written at cache slots ``length + i``; after verification the
  accepted path ``path[b, :accepted_len[b] + 1]`` (root first) is moved into
  place and committed with ``KVCache.gather(cache, path, accepted_len + 1)``.

A chain of ``K`` drafts is the tree ``parents = [-1, 0, 1, ..., K - 1]``
(:func:`chain_tree`). Paths are padded with ``-1``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

__all__ = [
    "TreeTemplate",
    "accepted_path",
    "ancestor_mask",
    "chain_tree",
    "concrete_parents",
    "full_tree",
    "tree_depths",
    "tree_from_paths",
    "tree_positions",
    "validate_parents",
]


# --------------------------------------------------------------------------- validation


def concrete_parents(parents: ArrayLike) -> np.ndarray | None:
    """``parents`` as a numpy array when it is concrete (not traced), else ``None``."""
    try:
        return np.asarray(parents)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def validate_parents(parents: ArrayLike) -> np.ndarray:
    """Check a concrete parent array against the tree convention; return it as int32 numpy.

    Raises ``ValueError`` (naming the offending node) when a parent is out of
    range, the parent pointers form a cycle, the root is not node 0, or the
    nodes are not in topological order (``parents[i] < i``).
    """
    arr = concrete_parents(parents)
    if arr is None:
        raise ValueError("validate_parents needs a concrete (non-traced) parent array")
    if arr.ndim not in (1, 2) or arr.shape[-1] < 1:
        raise ValueError(f"tree parents must have shape [N] or [B, N] with N >= 1, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tree parents must be integers, got dtype {arr.dtype}")
    for r, row in enumerate(np.atleast_2d(arr)):
        where = f"row {r}: " if arr.ndim == 2 else ""
        n = row.shape[0]
        if row[0] != -1:
            raise ValueError(f"{where}node 0 is the root and must have parent -1, got {row[0]}")
        for i in range(1, n):
            if not 0 <= row[i] < n:
                raise ValueError(
                    f"{where}tree parent of node {i} is {row[i]}, expected an index in [0, {n})"
                )
        for i in range(1, n):  # follow the parent pointers: a cycle never reaches the root
            j, steps = i, 0
            while j != 0:
                j = row[j]
                steps += 1
                if steps > n:
                    raise ValueError(f"{where}tree parents are cyclic: node {i} never reaches the root")
        for i in range(1, n):
            if row[i] >= i:
                raise ValueError(
                    f"{where}tree nodes must be in topological order (parents[i] < i), but node "
                    f"{i} has parent {row[i]}; renumber the nodes breadth-first"
                )
    return arr.astype(np.int32)


# --------------------------------------------------------------------------- structure


def ancestor_mask(parents: Int[ArrayLike, "*B N"]) -> Bool[Array, "*B N N"]:
    """Ancestor-or-self mask: ``mask[..., i, j]`` is True iff node j lies on the path root..i.

    This is the attention mask among the ``N`` new tokens of a token tree
    (SpecInfer, Miao et al. 2024, Sec. 4 "tree attention"; Medusa's tree mask):
    pass it as ``Model.apply(..., attn_mask=mask)`` (broadcast to ``[B, N, N]``).
    Works on traced parents (``ceil(log2 N)`` pointer-doubling steps).
    """
    concrete = concrete_parents(parents)
    if concrete is not None:  # static tree: a numpy constant
        return jnp.asarray(_np_ancestor_mask(validate_parents(concrete)))
    parents = jnp.asarray(parents, jnp.int32)
    n = parents.shape[-1]
    nodes = jnp.arange(n, dtype=jnp.int32)
    up = jnp.where(parents < 0, nodes, parents)  # root points to itself
    eye = jnp.eye(n, dtype=bool)
    mask = eye | jax.nn.one_hot(up, n, dtype=bool)  # distance 0 and 1
    for _ in range(max(1, int(np.ceil(np.log2(max(n, 2)))))):
        # mask[i] |= mask[up[i]]; up = up[up]  (ancestors within twice the distance)
        mask = mask | jnp.take_along_axis(mask, jnp.broadcast_to(up[..., :, None], mask.shape), axis=-2)
        up = jnp.take_along_axis(up, up, axis=-1)
    return mask


def _np_ancestor_mask(parents: np.ndarray) -> np.ndarray:
    rows = np.atleast_2d(parents)
    b, n = rows.shape
    mask = np.zeros((b, n, n), bool)
    mask[:, np.arange(n), np.arange(n)] = True
    for i in range(1, n):  # topological order: the parent's row is complete
        mask[:, i] |= mask[np.arange(b), rows[:, i]]
    return mask if np.ndim(parents) == 2 else mask[0]


def tree_depths(parents: Int[ArrayLike, "*B N"]) -> Int[Array, "*B N"]:
    """Depth of every node (root 0): its position offset after the committed tokens."""
    if concrete_parents(parents) is not None:
        return jnp.asarray(_np_depths(validate_parents(parents)))
    return (ancestor_mask(parents).sum(-1) - 1).astype(jnp.int32)


def tree_positions(parents: Int[ArrayLike, "*B N"], length: Int[ArrayLike, " B"]) -> Int[Array, "B N"]:
    """Position ids of the tree tokens: ``length[b] + depth[i]`` (the root sits at ``length``).

    ``length`` is the cache's committed length per row (``KVCache.length``).
    """
    depth = tree_depths(parents)
    length = jnp.asarray(length, jnp.int32)
    return (length[:, None] + depth).astype(jnp.int32)


def _np_depths(parents: np.ndarray) -> np.ndarray:
    rows = np.atleast_2d(parents)
    depth = np.zeros(rows.shape, np.int32)
    for i in range(1, rows.shape[-1]):
        depth[:, i] = np.take_along_axis(depth, np.maximum(rows[:, i : i + 1], 0), 1)[:, 0] + 1
    return depth if np.ndim(parents) == 2 else depth[0]


def max_tree_depth(parents: ArrayLike) -> int | None:
    """Static maximum depth of a concrete tree, ``None`` when ``parents`` is traced."""
    concrete = concrete_parents(parents)
    if concrete is None:
        return None
    return int(_np_depths(np.atleast_2d(concrete)).max())


def accepted_path(
    parents: Int[ArrayLike, "*B N"],
    node: Int[ArrayLike, " B"],
    max_depth: int | None = None,
) -> Int[Array, "B P"]:
    """Node indices on the path root -> ``node[b]`` (root first), padded with ``-1``.

    ``P = max_depth + 1`` (computed from concrete parents, else ``N``). The valid
    prefix has ``depth[node] + 1`` entries and is exactly the ``src`` argument of
    ``KVCache.gather(cache, src, count)`` for the tree entries written at slots
    ``length + i`` (SpecInfer / Medusa / EAGLE path commit).
    """
    node = jnp.asarray(node, jnp.int32)
    concrete = concrete_parents(parents)
    n = np.shape(parents)[-1]
    if max_depth is None:
        max_depth = n - 1 if concrete is None else int(_np_depths(concrete).max())
    p = max_depth + 1
    if concrete is not None:  # static tree(s): one table lookup
        concrete = validate_parents(concrete)
        if concrete.ndim == 1:
            return jnp.asarray(_np_path_table(concrete, p))[node]
        table = np.stack([_np_path_table(row, p) for row in concrete])  # [B, N, P]
        return jnp.take_along_axis(jnp.asarray(table), node[:, None, None], axis=1)[:, 0]
    parents_arr = jnp.asarray(parents, jnp.int32)
    mask = ancestor_mask(parents_arr)  # [*B, N, N]
    depth = (mask.sum(-1) - 1).astype(jnp.int32)  # [*B, N]
    if parents_arr.ndim == 1:
        mask = jnp.broadcast_to(mask, (node.shape[0], n, n))
        depth = jnp.broadcast_to(depth, (node.shape[0], n))
    on_path = jnp.take_along_axis(mask, jnp.broadcast_to(node[:, None, None], (node.shape[0], 1, n)), axis=1)[:, 0]
    level = depth[:, :, None] == jnp.arange(p, dtype=jnp.int32)[None, None, :]  # [B, N, P]
    hit = on_path[:, :, None] & level
    idx = jnp.sum(jnp.where(hit, jnp.arange(n, dtype=jnp.int32)[None, :, None], 0), axis=1)
    return jnp.where(hit.any(axis=1), idx, -1).astype(jnp.int32)


def _np_path_table(parents: np.ndarray, width: int) -> np.ndarray:
    """``table[i]`` = path root..i padded with -1 to ``width`` (concrete [N] parents)."""
    n = parents.shape[0]
    table = np.full((n, width), -1, np.int32)
    for i in range(n):
        path = [i]
        while path[-1] != 0:
            path.append(int(parents[path[-1]]))
        path = path[::-1][:width]
        table[i, : len(path)] = path
    return table


# --------------------------------------------------------------------------- templates


class TreeTemplate(NamedTuple):
    """A static token tree (numpy, usable as a trace-time constant).

    ``parents[i]`` follows the module convention (root 0, BFS order);
    ``depth[i]`` is the node's depth; ``rank[i]`` is which candidate of its
    parent the node is (Medusa: the top-``rank`` token of head ``depth - 1``;
    Token Recycling: column ``rank`` of the adjacency row of the parent token;
    the root has rank -1); ``paths[i]`` is the rank path from the root.
    """

    parents: np.ndarray
    depth: np.ndarray
    rank: np.ndarray
    paths: tuple[tuple[int, ...], ...]

    @property
    def num_nodes(self) -> int:
        return int(self.parents.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def ancestor_mask(self) -> np.ndarray:
        return np.asarray(ancestor_mask(self.parents))


def tree_from_paths(paths: Sequence[Sequence[int]]) -> TreeTemplate:
    """Static tree from candidate-rank paths, Medusa style (Cai et al. 2024, Sec. 2.1.2).

    ``paths`` is a list like ``[(0,), (1,), (0, 0), (0, 1), (1, 0)]``: the path
    ``(0, 1)`` is the top-1 candidate following the top-0 candidate of depth 1.
    Missing prefixes are added, duplicates dropped, and the nodes sorted
    breadth-first (by depth, then lexicographically), with the root (the empty
    path) as node 0.
    """
    clean: set[tuple[int, ...]] = {()}
    for path in paths:
        path = tuple(int(r) for r in path)
        if any(r < 0 for r in path):
            raise ValueError(f"tree path ranks must be >= 0, got {path}")
        for d in range(len(path) + 1):
            clean.add(path[:d])
    ordered = sorted(clean, key=lambda t: (len(t), t))
    index = {path: i for i, path in enumerate(ordered)}
    parents = np.array([-1] + [index[p[:-1]] for p in ordered[1:]], np.int32)
    depth = np.array([len(p) for p in ordered], np.int32)
    rank = np.array([-1] + [p[-1] for p in ordered[1:]], np.int32)
    return TreeTemplate(parents=parents, depth=depth, rank=rank, paths=tuple(ordered))


def full_tree(branching: int | Sequence[int], depth: int | None = None) -> TreeTemplate:
    """The full tree with ``branching[d]`` children per node at depth ``d`` (k-ary if an int).

    ``full_tree(2, 3)`` has ``1 + 2 + 4 + 8`` nodes. With a sequence,
    ``depth`` defaults to its length (the constant-branching-factor trees of
    RSD-C, Jeon et al. 2024).
    """
    if isinstance(branching, int):
        if depth is None:
            raise ValueError("full_tree(k, depth) needs a depth when branching is an int")
        branching = [branching] * depth
    branching = [int(b) for b in branching]
    if depth is not None and depth != len(branching):
        raise ValueError(f"depth {depth} does not match {len(branching)} branching factors")
    if not branching or any(b < 1 for b in branching):
        raise ValueError(f"full_tree needs depth >= 1 and branching factors >= 1, got {branching}")
    paths = [
        p for d in range(1, len(branching) + 1) for p in itertools.product(*[range(b) for b in branching[:d]])
    ]
    return tree_from_paths(paths)


def chain_tree(k: int) -> TreeTemplate:
    """A chain of ``k`` drafts as a tree: ``parents = [-1, 0, 1, ..., k - 1]``."""
    if k < 1:
        raise ValueError(f"draft length must be >= 1, got {k}")
    return tree_from_paths([(0,) * k])
