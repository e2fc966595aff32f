"""RSD-S: stochastic beam search draft trees verified by recursive rejection sampling are exact."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from speculative.test_verify import (ALPHA, KEY0, MAX_LEN, N_MC, P_TAB, Q_FULL, VOCAB, _emitted, complete,
                                     law_pvalues, random_table)

from decodax.speculative import verify_recursive, verify_tree_sampling
from decodax.speculative.stochastic_beam import stochastic_beam_tree

WIDTH, DEPTH = 3, 2


def _codes(tokens, parents, table):
    """Prefix-table code of the path root..node for every node (parents precede children)."""
    n = tokens.shape[1]
    codes = jnp.zeros(tokens.shape, jnp.int32)
    depth = jnp.zeros(tokens.shape, jnp.int32)
    offsets = jnp.asarray(table.offsets, jnp.int32)
    for j in range(1, n):
        par = parents[:, j]
        d = jnp.take_along_axis(depth, par[:, None], 1)[:, 0] + 1
        pc = jnp.take_along_axis(codes, par[:, None], 1)[:, 0]
        codes = codes.at[:, j].set(offsets[d] + (pc - offsets[d - 1]) * table.vocab + tokens[:, j])
        depth = depth.at[:, j].set(d)
    return codes


def table_logits(table):
    probs = jnp.asarray(table.probs, jnp.float32)

    def fn(tokens, parents, nodes):
        codes = jnp.take_along_axis(_codes(tokens, parents, table), nodes, axis=1)
        return jnp.log(probs[codes])

    return fn


# "sparse": 30% zero entries, 3 tokens of positive mass at the root: a width-4 level gets a filler node
DRAFTS = {"full": Q_FULL, "sparse": random_table(6, VOCAB, MAX_LEN, alpha=0.8, zero_frac=0.4)}


@functools.partial(jax.jit, static_argnames=("draft", "width"))
def _draft(key, root, draft="full", width=WIDTH):
    tree = stochastic_beam_tree(table_logits(DRAFTS[draft]), root, key, width=width, depth=DEPTH)
    return tree, _codes(tree.tokens, tree.parents, P_TAB)


@jax.jit
def _verify(key, tree, target, recursive):
    res = jax.lax.cond(
        recursive,
        lambda: verify_recursive(tree.tokens, tree.parents, tree.draft_probs, target, key, max_depth=DEPTH),
        lambda: verify_tree_sampling(tree.tokens, tree.parents, tree.draft_probs, target, key, max_depth=DEPTH),
    )
    path_tok = jnp.take_along_axis(tree.tokens, jnp.maximum(res.path[:, 1:], 0), axis=1)
    return _emitted(path_tok, res.accepted_len, res.next_token), res.accepted_len + 1


def test_tree_shape_and_sibling_order():
    tree, _ = _draft(jax.random.key(3), jnp.zeros((64,), jnp.int32))
    par = np.asarray(tree.parents)
    assert (par[:, 0] == -1).all() and (par[:, 1 : 1 + WIDTH] == 0).all()
    assert all((par[:, j] < j).all() for j in range(1, par.shape[1]))
    score = np.asarray(tree.scores)
    for lvl in range(DEPTH):  # each level sorted by perturbed score; children below their parent
        s = score[:, 1 + lvl * WIDTH : 1 + (lvl + 1) * WIDTH]
        assert (np.diff(s, axis=1) <= 0).all()
        assert (s <= np.take_along_axis(score, par[:, 1 + lvl * WIDTH : 1 + (lvl + 1) * WIDTH], 1) + 1e-5).all()
    tok = np.asarray(tree.tokens)
    for j in range(1, par.shape[1]):  # siblings are distinct tokens (without replacement)
        for i in range(1, j):
            assert not ((par[:, i] == par[:, j]) & (tok[:, i] == tok[:, j])).any()
    # the tree shape is random: level-2 nodes spread over several level-1 parents
    assert len(np.unique(par[:, 1 + WIDTH :], axis=0)) > 3


@pytest.mark.parametrize("draft,width", [("full", WIDTH), ("sparse", VOCAB)])
def test_rsd_s_law_and_negative_control(draft, width):
    """Full-support draft, and a draft with zeros at width = vocabulary (filler nodes, verified
    as deterministic candidates, must not bias the law)."""
    tree, codes = _draft(jax.random.key(7), jnp.zeros((N_MC,), jnp.int32), draft=draft, width=width)
    if draft == "sparse":
        filler = ~np.isfinite(np.asarray(tree.scores))
        assert filler.mean() > 0.01 and np.all(np.asarray(tree.draft_probs)[filler] == 0)
    target = jnp.asarray(P_TAB.probs[np.asarray(codes)], jnp.float32)
    emitted, n_emit = map(np.asarray, _verify(KEY0, tree, target, True))
    assert emitted.min() >= 0 and emitted.max() < VOCAB and (n_emit > 1).mean() > 0.2
    y = complete(np.random.default_rng(21), emitted, n_emit, P_TAB)
    p_joint, p_cond = law_pvalues(y, n_emit, P_TAB)
    assert p_joint > ALPHA and p_cond > ALPHA, (p_joint, p_cond)
    # negative control: the same drafts verified as if siblings were i.i.d. draws
    emitted, n_emit = map(np.asarray, _verify(KEY0, tree, target, False))
    y_bad = complete(np.random.default_rng(21), emitted, n_emit, P_TAB)
    p_joint_bad, p_cond_bad = law_pvalues(y_bad, n_emit, P_TAB)
    assert min(p_joint_bad, p_cond_bad) < ALPHA, (p_joint_bad, p_cond_bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="width and depth"):
        stochastic_beam_tree(table_logits(Q_FULL), jnp.zeros((2,), jnp.int32), KEY0, width=0, depth=2)
