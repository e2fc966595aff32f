"""Speculative sampling on the default model's own distributions keeps the target law.

One speculative step after a chat prompt and its first token ``x``: the early-exit
draft (first 8 of 30 layers + LM head) samples ``d1, d2`` and the full model
verifies them with :func:`verify_sampling`. Both distributions come from real
forwards of SmolLM2 (the draft tree of every reachable ``d1, d2`` is fed with
its ancestor mask), processed by the same sampler (temperature 1, top-k 3) as
plain sampling. Over 1e5 simulated steps the first emitted token must follow
the target's ``p(. | prompt, x)`` (chi-square, p > 1e-3), and a verifier that
accepts every draft (its first token follows the draft's law) must fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from decodax import sampling
from decodax.model import cache as kv
from decodax.speculative import ancestor_mask, tree_positions, verify_sampling

EXIT, TOP_K, ROWS = 8, 3, 100_000


def _tree_probs(model, params, sampler, context, parents, tokens, exit_layer=None):
    """Processed probabilities at every node of a tree fed after ``context``."""
    c = kv.init_cache(model.config, 1, len(context) + len(tokens) + 8)
    ctx = jnp.asarray([context], jnp.int32)
    pre = model.apply(params, ctx, jnp.arange(len(context))[None], c, empty_cache=True, compute_logits=False)
    cache = kv.commit(pre.cache, jnp.array([len(context)]))
    parents = np.asarray(parents, np.int32)
    out = model.apply(params, jnp.asarray([tokens], jnp.int32), tree_positions(parents, cache.length), cache,
                      attn_mask=ancestor_mask(parents)[None], exit_layer=exit_layer)
    return np.asarray(sampling.probs(sampler, out.logits[0]), np.float64)  # [N, V]


def _support(p):
    return [int(t) for t in np.nonzero(p > 0)[0]]


def test_first_speculative_token_follows_the_target(default_model):
    from decodax.bench.runner import encode_prompt

    model, config, params, tok = default_model
    sampler = sampling.make_sampler(temperature=1.0, top_k=TOP_K)
    prompt = encode_prompt(tok, "Name one colour of the rainbow.")
    x = int(np.argmax(_tree_probs(model, params, sampler, prompt[:-1], [-1], [prompt[-1]])[0]))
    # Draft tree: root x, its draft children d1, their draft children d2.
    q_root = _tree_probs(model, params, sampler, prompt, [-1], [x], EXIT)[0]
    d1s = _support(q_root)
    parents, tokens = [-1] + [0] * len(d1s), [x] + d1s
    q1 = _tree_probs(model, params, sampler, prompt, parents, tokens, EXIT)
    for i, d1 in enumerate(d1s, start=1):
        for d2 in _support(q1[i]):
            parents.append(i)
            tokens.append(d2)
    p = _tree_probs(model, params, sampler, prompt, parents, tokens)  # target at every node
    node = {(): 0}
    for i in range(1, len(tokens)):
        path = (tokens[i],) if parents[i] == 0 else (tokens[parents[i]], tokens[i])
        node[path] = i

    # Compact vocabulary: every token with mass somewhere in the tree.
    vocab = sorted(set(np.nonzero(p.sum(0) + q1.sum(0))[0].tolist()))
    pc, qc = p[:, vocab], q1[:, vocab]
    assert np.allclose(pc.sum(1), 1.0, atol=1e-5) and np.allclose(qc.sum(1), 1.0, atol=1e-5)
    pc, qc = pc / pc.sum(1, keepdims=True), qc / qc.sum(1, keepdims=True)

    rng = np.random.default_rng(0)
    d1 = rng.choice(len(vocab), size=ROWS, p=qc[0])
    n1 = np.array([node[(vocab[j],)] for j in d1])
    cdf = np.cumsum(qc[n1], axis=1)
    d2 = np.minimum((rng.random(ROWS)[:, None] > cdf).sum(1), len(vocab) - 1)  # inverse-CDF draws
    n2 = np.array([node[(vocab[a], vocab[b])] for a, b in zip(d1, d2)])
    drafts = np.stack([d1, d2], 1)
    draft_probs = np.stack([qc[np.zeros(ROWS, int)], qc[n1]], 1).astype(np.float32)
    target_probs = np.stack([pc[np.zeros(ROWS, int)], pc[n1], pc[n2]], 1).astype(np.float32)

    def first_tokens(verifier):
        accepted, nxt = jax.jit(verifier)(drafts, draft_probs, target_probs, jax.random.key(1))
        accepted, nxt = np.asarray(accepted), np.asarray(nxt)
        return np.where(accepted > 0, d1, nxt)

    want = pc[0]
    live = want > 0
    for name, verifier, should_pass in (
        ("verify_sampling", verify_sampling, True),
        ("accept every draft", lambda d, q, p, k: (jnp.full(d.shape[:1], 2), d[:, 0]), False),
    ):
        y = first_tokens(verifier)
        counts = np.bincount(y, minlength=len(vocab))
        if np.any(counts[~live]):
            pval = 0.0  # a token the target never emits
        else:
            pval = stats.chisquare(counts[live], want[live] * ROWS).pvalue
        print(f"{name}: first-token chi-square p = {pval:.3g} over {len(vocab)} tokens "
              f"(target support {int(live.sum())})")
        assert (pval > 1e-3) == should_pass, (name, pval)
