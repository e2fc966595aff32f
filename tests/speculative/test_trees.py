"""Token trees: validation, ancestor masks, depths/positions, templates, accepted paths, and
the round trip tree attention -> verification -> ``KVCache.gather``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decodax.model.cache import KVCache, gather
from decodax.speculative import trees, verify_tree_greedy


def random_parents(rng, n):
    return np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)], np.int32)


def brute_ancestors(parents):
    n = len(parents)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def brute_path(parents, node):
    path = [node]
    while parents[path[-1]] != -1:
        path.append(parents[path[-1]])
    return path[::-1]


# ------------------------------------------------------------------------- validation


def test_validate_parents_accepts_trees_and_rejects_bad_ones():
    np.testing.assert_array_equal(trees.validate_parents([-1, 0, 0, 1]), [-1, 0, 0, 1])
    np.testing.assert_array_equal(trees.validate_parents([[-1, 0, 1], [-1, 0, 0]]), [[-1, 0, 1], [-1, 0, 0]])
    with pytest.raises(ValueError, match="node 0 is the root"):
        trees.validate_parents([0, 0, 1])
    with pytest.raises(ValueError, match=r"node 2 is 5, expected an index in \[0, 4\)"):
        trees.validate_parents([-1, 0, 5, 1])
    with pytest.raises(ValueError, match="expected an index"):
        trees.validate_parents([-1, -1, 0])  # a second root
    with pytest.raises(ValueError, match="cyclic"):
        trees.validate_parents([-1, 2, 3, 1])
    with pytest.raises(ValueError, match="topological order"):
        trees.validate_parents([-1, 2, 0])
    with pytest.raises(ValueError, match="row 1: .*cyclic"):
        trees.validate_parents([[-1, 0, 1], [-1, 2, 1]])
    with pytest.raises(ValueError, match="integers"):
        trees.validate_parents(np.array([-1.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        trees.validate_parents(np.zeros((1, 1, 2), int))


# ----------------------------------------------------------------- masks and positions

_traced_mask = jax.jit(trees.ancestor_mask)
_traced_depth = jax.jit(trees.tree_depths)


@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_ancestor_mask_and_depths_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 11
    rows = np.stack([random_parents(rng, n) for _ in range(3)])
    want = np.stack([brute_ancestors(r) for r in rows])
    want_depth = want.sum(-1) - 1
    np.testing.assert_array_equal(trees.ancestor_mask(rows[0]), want[0])  # static (numpy) path
    np.testing.assert_array_equal(trees.ancestor_mask(rows), want)
    np.testing.assert_array_equal(_traced_mask(rows), want)  # traced: pointer doubling
    np.testing.assert_array_equal(_traced_mask(rows[1]), want[1])
    np.testing.assert_array_equal(trees.tree_depths(rows), want_depth)
    np.testing.assert_array_equal(_traced_depth(rows[2]), want_depth[2])


def test_tree_positions_are_length_plus_depth():
    t = trees.tree_from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    pos = np.asarray(trees.tree_positions(t.parents, np.array([5, 0])))
    np.testing.assert_array_equal(pos, np.stack([5 + t.depth, t.depth]))


def test_tree_attention_equals_chain_attention_on_every_path():
    """A token tree attended with the ancestor mask at positions length + depth gives, at every
    node, exactly what a causal chain over the path root..node gives (numpy attention)."""
    rng = np.random.default_rng(0)
    t = trees.tree_from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (2, 0), (0, 1, 0)])
    n, d, vocab, ctx = t.num_nodes, 8, 11, 4
    emb, pos_emb = rng.normal(size=(vocab, d)), rng.normal(size=(32, d))
    wq, wk, wv = (rng.normal(size=(d, d)) for _ in range(3))
    context = rng.integers(0, vocab, ctx)
    tokens = rng.integers(0, vocab, n)

    def qkv(toks, pos):
        e = emb[toks] + pos_emb[pos]
        return e @ wq, e @ wk, e @ wv

    def attend(q, k, v, mask):
        s = q @ k.T / np.sqrt(d)
        s = np.where(mask, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        return (w / w.sum(-1, keepdims=True)) @ v

    _, k_ctx, v_ctx = qkv(context, np.arange(ctx))
    pos = np.asarray(trees.tree_positions(t.parents, np.array([ctx])))[0]
    q_t, k_t, v_t = qkv(tokens, pos)
    mask = np.concatenate([np.ones((n, ctx), bool), np.asarray(trees.ancestor_mask(t.parents))], 1)
    out_tree = attend(q_t, np.concatenate([k_ctx, k_t]), np.concatenate([v_ctx, v_t]), mask)
    for i in range(n):
        path = brute_path(t.parents, i)
        seq = np.concatenate([context, tokens[path]])
        q_c, k_c, v_c = qkv(seq, np.arange(len(seq)))
        causal = np.tril(np.ones((len(seq), len(seq)), bool))
        out_chain = attend(q_c, k_c, v_c, causal)
        np.testing.assert_allclose(out_tree[i], out_chain[-1], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------- templates


def test_tree_from_paths_medusa_style():
    t = trees.tree_from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1)])
    assert t.paths == ((), (0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    np.testing.assert_array_equal(t.parents, [-1, 0, 0, 1, 1, 2, 3])
    np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(t.rank, [-1, 0, 1, 0, 1, 0, 0])
    assert t.num_nodes == 7 and t.max_depth == 3
    np.testing.assert_array_equal(t.ancestor_mask, brute_ancestors(t.parents))
    # missing prefixes are added
    u = trees.tree_from_paths([(1, 2)])
    assert u.paths == ((), (1,), (1, 2))
    with pytest.raises(ValueError, match=">= 0"):
        trees.tree_from_paths([(0, -1)])


def test_full_and_chain_trees():
    t = trees.full_tree(2, 3)
    assert t.num_nodes == 1 + 2 + 4 + 8 and t.max_depth == 3
    assert all(np.sum(t.parents == i) in (0, 2) for i in range(t.num_nodes))
    u = trees.full_tree([3, 2, 1])
    assert u.num_nodes == 1 + 3 + 6 + 6
    np.testing.assert_array_equal(trees.chain_tree(4).parents, [-1, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="draft length"):
        trees.chain_tree(0)
    with pytest.raises(ValueError, match="needs a depth"):
        trees.full_tree(2)
    with pytest.raises(ValueError, match="branching"):
        trees.full_tree([2, 0])


# ------------------------------------------------------------------- accepted paths


_traced_path = jax.jit(trees.accepted_path)


def test_accepted_path_matches_brute_force():
    rng = np.random.default_rng(1)
    n, b = 10, 6
    rows = np.stack([random_parents(rng, n) for _ in range(b)])
    node = rng.integers(0, n, b)
    depth = np.asarray(trees.tree_depths(rows))
    for parents, width in ((rows[0], None), (rows, None)):
        per_row = np.broadcast_to(parents, (b, n))
        path = np.asarray(trees.accepted_path(parents, node))
        p = depth.max() + 1 if parents.ndim == 2 else depth[0].max() + 1
        assert path.shape == (b, p)
        for r in range(b):
            want = brute_path(per_row[r], node[r])
            np.testing.assert_array_equal(path[r, : len(want)], want)
            assert (path[r, len(want) :] == -1).all()
    traced = np.asarray(_traced_path(rows, node))  # traced parents: width N
    assert traced.shape == (b, n)
    for r in range(b):
        want = brute_path(rows[r], node[r])
        np.testing.assert_array_equal(traced[r, : len(want)], want)
        assert (traced[r, len(want) :] == -1).all()


def test_verified_tree_path_commits_through_kvcache_gather():
    """Tree entries written at slots length + i; the greedy-accepted path is moved into place by
    KVCache.gather(cache, path, accepted_len + 1) and committed."""
    t = trees.tree_from_paths([(0,), (1,), (0, 0), (1, 0), (1, 1), (1, 1, 0)])
    n, vocab, b, cap = t.num_nodes, 7, 3, 16
    length = np.array([2, 5, 0])
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(b, n, vocab)).astype(np.float32)
    greedy = logits.argmax(-1)
    tokens = rng.integers(0, vocab, (b, n))
    # nodes: 1=(0,) 2=(1,) 3=(0,0) 4=(1,0) 5=(1,1) 6=(1,1,0)
    # row 0: accept node 2 then 5 then 6; row 1: accept node 1 then 3; row 2: reject everything
    for node in (2, 5, 6):
        tokens[0, node] = greedy[0, t.parents[node]]
    for node in (1, 3):
        tokens[1, node] = greedy[1, t.parents[node]]
    tokens[0, 1] = (greedy[0, 0] + 1) % vocab  # siblings that must be rejected
    tokens[0, 4] = (greedy[0, 2] + 1) % vocab
    tokens[1, 2] = (greedy[1, 0] + 1) % vocab
    tokens[2, 1:3] = (greedy[2, 0] + 1) % vocab
    res = verify_tree_greedy(tokens, t.parents, logits)
    np.testing.assert_array_equal(res.accepted_len, [3, 2, 0])
    np.testing.assert_array_equal(np.asarray(res.path)[0], [0, 2, 5, 6])
    np.testing.assert_array_equal(np.asarray(res.path)[1], [0, 1, 3, -1])
    np.testing.assert_array_equal(np.asarray(res.path)[2], [0, -1, -1, -1])
    # a cache whose value at (row, slot) records what was written there: 100 + node for tree entries
    kv = np.zeros((1, b, 1, cap, 1), np.float32)  # [layers, B, kv_heads, S, head_dim]
    for r in range(b):
        kv[0, r, 0, : length[r], 0] = np.arange(length[r])  # committed context
        kv[0, r, 0, length[r] : length[r] + n, 0] = 100 + np.arange(n)  # the tree (root first)
    cache = KVCache(k=jnp.asarray(kv), v=jnp.asarray(kv), length=jnp.asarray(length, jnp.int32))
    out = gather(cache, res.path, res.accepted_len + 1)
    np.testing.assert_array_equal(out.length, length + np.asarray(res.accepted_len) + 1)
    for r in range(b):
        committed = np.asarray(out.k)[0, r, 0, : int(out.length[r]), 0]
        want_path = 100 + np.asarray(res.path)[r, : int(res.accepted_len[r]) + 1]
        np.testing.assert_array_equal(committed, np.concatenate([np.arange(length[r]), want_path]))
