"""Medusa / Hydra heads: identity at init, lossless tree decoding (greedy and sampling), training,
checkpoints (tiny random models)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from speculative.test_tree_decoder import (PROMPTS, SAMPLER, _ar, accept_first_branch, chi2_p, counts_of,
                                          exact_law, tiny8, untied)

from decodax.decoding import autoregressive, generate
from decodax.heads import (DraftHeads, draft_heads_drafter, head_batches, head_logits, head_loss,
                           head_optimizer, load_heads, save_heads, with_head_params)
from decodax.model import cache as kv
from decodax.speculative import trees
from decodax.speculative.token_recycling import tr_template
from decodax.speculative.tree_decoder import tree_speculative
from decodax.train import create_state, fit, make_train_step

__all__ = ["tiny8", "untied"]  # fixtures used below
TEMPLATE = tr_template(num_nodes=10, width=3, max_depth=3)


def random_heads(heads: DraftHeads, seed: int, scale: float = 0.5):
    keys = jax.random.split(jax.random.key(seed), heads.num_heads)
    return [{"w": scale * jax.random.normal(k, p["w"].shape) / np.sqrt(p["w"].shape[1]), "b": p["b"]}
            for k, p in zip(keys, heads.init())]


def hidden_of(model, params, tokens):
    t = tokens.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), tokens.shape)
    out = model.apply(params, tokens, pos, kv.init_cache(model.config, tokens.shape[0], t), empty_cache=True)
    return out.hidden, out.logits


@pytest.mark.parametrize("hydra", [False, True])
def test_zero_init_heads_are_the_lm_head(untied, hydra):
    model, params = untied
    heads = DraftHeads(model.config.dim, num_heads=3, hydra=hydra)
    tokens = jnp.asarray([PROMPTS[1]])
    hidden, logits = hidden_of(model, params, tokens)
    for k in range(3):
        path = jnp.broadcast_to(tokens[:, : k + 1], (1, tokens.shape[1], k + 1)) if hydra else None
        got = head_logits(model, params, heads, heads.init(), k, hidden, path)
        np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hydra", [False, True])
def test_greedy_equals_autoregressive(untied, hydra):
    model, params = untied
    heads = DraftHeads(model.config.dim, num_heads=3, hydra=hydra)
    p = with_head_params(params, random_heads(heads, 1))
    dec = tree_speculative(model, draft_heads_drafter(model, heads, TEMPLATE))
    out = generate(dec, p, PROMPTS, max_new_tokens=16)
    assert out.rows() == _ar(model, params, PROMPTS, 16).rows()
    assert out.tokens.max() < model.config.vocab_size


def test_sampling_law_and_negative_control(tiny8):
    model, params = tiny8
    heads = DraftHeads(model.config.dim, num_heads=2, hydra=True)
    template = trees.full_tree([2, 2])
    p = with_head_params(params, random_heads(heads, 2, scale=2.0))
    law = exact_law(model, params)
    dec = tree_speculative(model, draft_heads_drafter(model, heads, template), sampler=SAMPLER)
    pv = chi2_p(counts_of(dec, p), law)
    print(f"hydra tree sampling: chi-square p = {pv:.3g}")
    assert pv > 1e-3, pv
    bad = tree_speculative(model, draft_heads_drafter(model, heads, template), sampler=SAMPLER,
                           verifier=accept_first_branch(template))
    p_bad = chi2_p(counts_of(bad, p, runs=1, rows=5000), law)
    assert p_bad < 1e-3, p_bad


def test_training_learns_the_targets_continuations(untied, tmp_path):
    """Self-distillation on the target's greedy continuations: head accuracy rises; the heads
    round-trip through a checkpoint; missing / corrupt checkpoints name the file."""
    model, params = untied
    out = generate(autoregressive(model), params, PROMPTS, max_new_tokens=24)
    seqs = [list(pr) + row for pr, row in zip(PROMPTS, out.rows())]
    t = max(map(len, seqs))
    tokens = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.float32)
    for i, (pr, s) in enumerate(zip(PROMPTS, seqs)):
        tokens[i, : len(s)] = s
        mask[i, len(pr) : len(s)] = 1.0
    hidden, _ = hidden_of(model, params, jnp.asarray(tokens))
    data = {"hidden": np.asarray(hidden), "tokens": tokens, "mask": mask}
    heads = DraftHeads(model.config.dim, num_heads=2, hydra=True)
    base = {"embed": params["embed"], "final_norm": params["final_norm"], "lm_head": params["lm_head"]}
    state = create_state({"heads": heads.init(), "base": base}, head_optimizer(3e-2, 60), jax.random.key(0))
    step = make_train_step(head_loss(model, heads))
    state, hist = fit(state, step, head_batches(data, 3), 60, progress=False)
    assert hist[-1]["acc1"] > hist[0]["acc1"] + 0.3 and hist[-1]["loss"] < hist[0]["loss"]
    np.testing.assert_array_equal(np.asarray(state.params["base"]["embed"]), np.asarray(params["embed"]))
    save_heads(tmp_path / "h", heads, state.params["heads"])
    heads2, hp = load_heads(tmp_path / "h")
    assert heads2 == heads
    jax.tree.map(np.testing.assert_array_equal, hp, state.params["heads"])
    with pytest.raises(FileNotFoundError, match="heads.json"):
        load_heads(tmp_path / "nothing")
    (tmp_path / "h" / "heads.json").write_text("{not json")
    with pytest.raises(ValueError, match="heads.json"):
        load_heads(tmp_path / "h")


def test_bad_arguments(untied):
    model, _ = untied
    with pytest.raises(ValueError, match="num_heads"):
        DraftHeads(model.config.dim, num_heads=0)
    with pytest.raises(ValueError, match="only 2 heads"):
        draft_heads_drafter(model, DraftHeads(model.config.dim, 2), trees.chain_tree(3))
    with pytest.raises(ValueError, match="TreeTemplate"):
        draft_heads_drafter(model, DraftHeads(model.config.dim, 2), [(0,)])
