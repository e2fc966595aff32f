"""Tree speculative decoding end to end (tiny random models only).

* greedy: token-identical to ``autoregressive`` greedy on a ragged batch, with a
  chain drafter on a chain template (also equal to ``speculative``), a random
  stochastic tree drafter, Token Recycling with a repetition penalty;
* sampling: the law of the first three emitted tokens of a vocab-8 model equals
  the exact target law (chi-square over 1e5 rows) for a stochastic tree drafter
  (draft probabilities); an accept-the-first-branch verifier must fail;
* ValueErrors for bad drafters / templates / capacity.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decodax import sampling
from decodax.decoding import autoregressive, generate
from decodax.model import cache as kv
from decodax.model.config import tiny_config
from decodax.model.transformer import Model
from decodax.speculative import trees
from decodax.speculative.decoder import speculative
from decodax.speculative.drafters import Drafter, Proposal, prompt_lookup
from decodax.speculative.token_recycling import token_recycling, tr_template
from decodax.speculative.tree_decoder import tree_speculative
from decodax.speculative.verify import TreeVerifyResult

PROMPTS = [[5, 17, 3, 88, 41, 5, 17], [9, 8, 7, 6, 5, 4, 3, 2, 9, 8, 7], [42, 42]]
TREE = trees.full_tree([3, 2, 2])  # 1 + 3 + 6 + 12 = 22 nodes


@pytest.fixture(scope="module")
def tiny():
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=()))
    return model, model.init(jax.random.key(3))


@pytest.fixture(scope="module")
def untied():
    """Untied LM head: greedy outputs that are not a single repeated token."""
    model = Model(tiny_config(vocab_size=97, n_layers=2, eos_ids=(), tie_embeddings=False))
    return model, model.init(jax.random.key(3))


def random_tree_drafter(template: trees.TreeTemplate, vocab: int, seed: int = 0) -> Drafter:
    """Test drafter: node ``i`` is drawn from a fixed law ``q_depth(i)`` (independent of
    its siblings' draws), probabilities returned, as MSS (SpecInfer) requires."""
    n, d = template.num_nodes, template.max_depth
    qs = jax.nn.softmax(1.5 * jax.random.normal(jax.random.key(seed), (d + 1, vocab)), -1)
    node_q = qs[np.asarray(template.depth[1:])]  # [N - 1, V]

    def propose(params, state, dstate, key, *, k, sampler=None):
        b = state.last_token.shape[0]
        q = jnp.broadcast_to(node_q, (b, n - 1, vocab))
        tok = jax.random.categorical(key, jnp.log(q), axis=-1).astype(jnp.int32)
        return Proposal(tok, q, jnp.full((b,), n - 1, jnp.int32), dstate)

    return Drafter(init=lambda params, state: None, propose=propose, update=lambda d, s, a: d,
                   name="random_tree", may_be_empty=False, template=template.paths)


_REF: dict = {}


def _ar(model, params, prompts, n, sampler=None):
    """Autoregressive reference, computed once per (model, params, sampler)."""
    key = (model, id(params), sampler, n)
    if key not in _REF:
        _REF[key] = generate(autoregressive(model, sampler), params, prompts, max_new_tokens=n)
    return _REF[key]


def test_chain_template_equals_chain_speculative(tiny):
    model, params = tiny
    drafter = prompt_lookup(ngram=3)
    dec = tree_speculative(model, drafter, template=trees.chain_tree(4))
    out = generate(dec, params, PROMPTS, max_new_tokens=16)  # (speculative == autoregressive: test_decoder)
    chain = generate(speculative(model, drafter, k=4, skip_empty=False), params, PROMPTS, max_new_tokens=16)
    assert out.rows() == chain.rows() and np.array_equal(out.calls, chain.calls)


def test_greedy_random_tree_equals_autoregressive(untied):
    model, params = untied
    dec = tree_speculative(model, random_tree_drafter(TREE, 97), template=TREE)
    out = generate(dec, params, PROMPTS, max_new_tokens=16)
    assert out.rows() == _ar(model, params, PROMPTS, 16).rows()
    assert out.tokens.max() < 97 and np.all(out.tau >= 1.0)


def test_greedy_with_repetition_penalty(untied):
    """Penalties see the drafts on each node's path as context."""
    model, params = untied
    pen = sampling.make_sampler(temperature=0.0, repetition_penalty=1.3)
    dec = tree_speculative(model, token_recycling(97, template=tr_template(24, width=4)), sampler=pen)
    out = generate(dec, params, PROMPTS, max_new_tokens=16)
    assert out.rows() == _ar(model, params, PROMPTS, 16, pen).rows()


def test_bad_arguments(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="Drafter"):
        tree_speculative(model, object(), template=TREE)
    with pytest.raises(ValueError, match="TreeTemplate"):
        tree_speculative(model, random_tree_drafter(TREE, 97), template=[-1, 0, 0])
    with pytest.raises(ValueError, match="differs"):
        tree_speculative(model, random_tree_drafter(TREE, 97), template=trees.full_tree(2, 2))
    with pytest.raises(ValueError, match="chain drafter"):
        tree_speculative(model, prompt_lookup(), template=TREE)
    with pytest.raises(ValueError, match="needs a template"):
        tree_speculative(model, prompt_lookup())
    bad = TREE._replace(parents=np.array([-1, 0, 5] + [0] * (TREE.num_nodes - 3), np.int32))
    with pytest.raises(ValueError, match="topological|parent"):
        tree_speculative(model, prompt_lookup(), template=bad)
    with pytest.raises(ValueError, match="tree drafter"):
        speculative(model, random_tree_drafter(TREE, 97), k=4)
    dec = tree_speculative(model, random_tree_drafter(TREE, 97), template=TREE)
    with pytest.raises(ValueError, match="capacity"):  # the driver reserves N slots per step
        generate(dec, model.init(jax.random.key(0)), PROMPTS, max_new_tokens=8, capacity=24)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="cache slots"):  # init's own check (direct use)
        dec.init(params, jnp.zeros((1, 4), jnp.int32), jnp.array([4]), jax.random.key(0),
                 max_new_tokens=8, capacity=16)


def test_factory_is_memoised(tiny):
    model, _ = tiny
    d = token_recycling(97)
    assert tree_speculative(model, d) is tree_speculative(model, d, template=tr_template())


# --------------------------------------------------------------------------- sampling law

V = 8
PROMPT = [1, 5, 3, 1, 5]
SAMPLER = sampling.make_sampler(temperature=0.9, top_k=6)
ROWS, RUNS = 20000, 5
SMALL = trees.full_tree([2, 2, 1])  # 1 + 2 + 4 + 4 = 11 nodes


@pytest.fixture(scope="module")
def tiny8():
    model = Model(tiny_config(vocab_size=V, n_layers=2, n_kv_heads=1, eos_ids=(), tie_embeddings=False))
    params = model.init(jax.random.key(11))
    params["lm_head"] = params["lm_head"] * 15.0  # peaked, context-dependent laws
    return model, params


def exact_law(model, params, sampler=SAMPLER, prompt=PROMPT, tokens=3):
    """Law of the first ``tokens`` tokens, by full (cache-free) forwards of every prefix."""
    prefixes = np.array(list(itertools.product(range(V), repeat=tokens - 1)), np.int32)
    seqs = np.concatenate([np.tile(prompt, (len(prefixes), 1)), prefixes], axis=1)
    n, t = seqs.shape
    out = model.apply(params, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), (n, t)),
                      kv.init_cache(model.config, n, t), empty_cache=True)
    p = np.asarray(sampling.probs(sampler, out.logits), np.float64)
    p = p / p.sum(-1, keepdims=True)
    law = p[:, t - 1, :]
    for j in range(tokens - 1):
        law = law * p[np.arange(n), t - tokens + j, prefixes[:, j]][:, None]
    return law.reshape((V,) * tokens)


def counts_of(dec, params, runs=RUNS, prompt=PROMPT, rows=ROWS):
    counts = np.zeros((V, V, V), np.int64)
    for r in range(runs):
        out = generate(dec, params, [prompt] * rows, max_new_tokens=3, key=jax.random.key(r),
                       capacity=32, pad_to=8)
        assert np.all(out.lengths == 3) and out.tokens.max() < V
        np.add.at(counts, tuple(out.tokens[:, :3].T), 1)
    return counts


def chi2_p(counts, law):
    """Chi-square p-value of the counts against the law (p = 0 if a zero-probability triple appears)."""
    if counts[law == 0].sum():
        return 0.0
    n = counts.sum()
    exp, obs = (law * n).ravel(), counts.ravel().astype(np.float64)
    big = exp >= 5
    e, o = np.append(exp[big], exp[~big].sum()), np.append(obs[big], obs[~big].sum())
    keep = e > 0
    return stats.chisquare(o[keep], e[keep] * o[keep].sum() / e[keep].sum()).pvalue


def accept_first_branch(template):
    """Negative control: a 'verifier' accepting the rank-0 branch to the leaf, whatever the target says."""
    node = max(i for i, p in enumerate(template.paths) if all(r == 0 for r in p))

    def verify(tokens, parents, draft_probs, target_probs, key):
        b = tokens.shape[0]
        path = trees.accepted_path(template.parents, jnp.full((b,), node, jnp.int32))
        nxt = jax.random.categorical(key, jnp.log(target_probs[:, node]), axis=-1).astype(jnp.int32)
        return TreeVerifyResult(path, jnp.full((b,), template.depth[node], jnp.int32), nxt)

    return verify


def test_sampling_law_stochastic_tree(tiny8):
    model, params = tiny8
    law = exact_law(model, params)
    assert law.max() > 0.05 and np.count_nonzero(law) > 50
    drafter = random_tree_drafter(SMALL, V, seed=1)
    dec = tree_speculative(model, drafter, sampler=SAMPLER)
    counts = counts_of(dec, params)
    p = chi2_p(counts, law)
    print(f"stochastic tree: chi-square p = {p:.3g}")
    assert p > 1e-3, p
    bad = tree_speculative(model, drafter, sampler=SAMPLER, verifier=accept_first_branch(SMALL))
    p_bad = chi2_p(counts_of(bad, params, runs=1, rows=5000), law)
    print(f"accept-first-branch control: chi-square p = {p_bad:.3g}")
    assert p_bad < 1e-3, p_bad
