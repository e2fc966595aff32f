"""Token Recycling (Luo et al. 2024) on tiny random models.

* the default static tree (~80 nodes, wide near the root, narrower deeper);
* the adjacency update ``adj[t] := top-k(logits at t)`` and its prompt initialisation;
* greedy: token-identical to ``autoregressive`` on a ragged batch (tied and
  untied tiny models), with accepted multi-token paths (tau > 1);
* sampling: the law of the first three tokens of a vocab-8 model equals the
  exact target law (chi-square over 1e5 rows); an accept-the-first-branch
  verifier must fail; ValueErrors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decodax.decoding import autoregressive, generate
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative import trees
from decodax.speculative.token_recycling import recycle, token_recycling, tr_template
from decodax.speculative.tree_decoder import tree_speculative

PROMPTS = [[5, 17, 3, 88, 41, 5, 17], [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7], [42, 42]]


@pytest.fixture(scope="module")
def untied():
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=(), tie_embeddings=False))
    return model, model.init(jax.random.key(3))


def test_default_template_shape():
    t = tr_template()
    counts = np.bincount(t.depth)
    assert t.num_nodes == 80 and counts[1] == 8 and t.max_depth == 6
    assert all(counts[d] >= counts[d + 1] for d in range(3, t.max_depth))  # narrower deeper
    assert int(t.rank.max()) < 8
    trees.validate_parents(t.parents)


def test_recycle_sets_rows_to_top_k():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 11))
    tokens = jnp.array([[4, 7, 1], [0, 0, 9]])
    adj = recycle(jnp.zeros((2, 11, 3), jnp.int32), tokens, logits,
                  valid=jnp.array([[True, True, False], [True, True, True]]))
    top = np.asarray(jax.lax.top_k(logits, 3)[1])
    assert np.array_equal(adj[0, 4], top[0, 0]) and np.array_equal(adj[0, 7], top[0, 1])
    assert np.all(adj[0, 1] == 0)  # invalid position: untouched
    assert np.array_equal(adj[1, 9], top[1, 2])


def test_greedy_equals_autoregressive(untied):
    """Untied LM head: varied greedy outputs (a tied random tiny model repeats its last token)."""
    model, params = untied
    dec = tree_speculative(model, token_recycling(97))
    out = generate(dec, params, PROMPTS, max_new_tokens=24)
    ref = generate(autoregressive(model), params, PROMPTS, max_new_tokens=24)
    assert out.rows() == ref.rows()
    assert out.tokens.max() < 97 and np.all(out.tau >= 1.0)
    print(f"tau {out.tau.tolist()}")
    assert out.tau.mean() > 1.5  # recycled candidates are accepted (random models loop)


def test_init_from_prompt_logits(untied):
    model, params = untied
    dr = token_recycling(97, template=tr_template(16, width=4), width=4)
    dec = tree_speculative(model, dr)
    prompt, plen = jnp.array([[5, 17, 3, 88]], jnp.int32), jnp.array([4])
    state = dec.init(params, prompt, plen, jax.random.key(0), max_new_tokens=8, capacity=64)
    out = model.apply(params, prompt, jnp.arange(4)[None], state.cache, empty_cache=True)
    top = np.asarray(jax.lax.top_k(out.logits, 4)[1])[0]
    for j, t in enumerate([5, 17, 3, 88]):
        assert np.array_equal(np.asarray(state.extra.adj[0, t]), top[j])


def test_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        token_recycling(8, width=9)
    with pytest.raises(ValueError, match="ranks"):
        token_recycling(97, width=2, template=tr_template(20, width=4))
    with pytest.raises(ValueError, match="vocab_size"):
        token_recycling(0)
    with pytest.raises(ValueError, match="TreeTemplate"):
        token_recycling(97, template=[-1, 0])
    with pytest.raises(ValueError, match="num_nodes"):
        tr_template(1)


# --------------------------------------------------------------------------- sampling law

def _base():
    """The law / chi-square helpers of test_tree_decoder.py (loaded by path: importlib mode)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_tree_law", Path(__file__).with_name("test_tree_decoder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sampling_law_is_the_target_law():
    base = _base()
    model = Model(tiny_config(vocab_size=base.V, n_layers=2, n_kv_heads=1, eos_ids=(), tie_embeddings=False))
    params = model.init(jax.random.key(11))
    params["lm_head"] = params["lm_head"] * 15.0
    law = base.exact_law(model, params)
    template = tr_template(12, width=4, max_depth=3)
    dec = tree_speculative(model, token_recycling(base.V, template=template, width=4), sampler=base.SAMPLER)
    p = base.chi2_p(base.counts_of(dec, params), law)
    print(f"token recycling: chi-square p = {p:.3g}")
    assert p > 1e-3, p
