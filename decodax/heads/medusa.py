"""Medusa and Hydra draft heads on a decodax ``Model`` and their tree drafter.

Medusa (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework
with Multiple Decoding Heads"): head ``k`` (``k = 0 .. K-1``) maps the target's
last hidden state ``h_t`` (after the final norm) through a residual block
``z = h + SiLU(W_k h + b_k)`` (``W_k = 0`` at init, so every head starts as
the LM head) and the target's LM head to the token ``k + 2`` steps ahead
(``x_{t+2+k}``; the LM head itself predicts ``x_{t+1}``). The draft tree takes
the top-``r`` tokens of head ``d - 1`` for a node of rank ``r`` at depth ``d``.

Hydra (Ankner et al. 2024, "Hydra: Sequentially-Dependent Draft Heads for
Medusa Decoding"): head ``k`` also sees the embeddings of the tokens between
``t`` and its prediction (``x_{t+1} .. x_{t+1+k}``, i.e. the tree path), so the
candidates of a node depend on its own path: ``z = h + SiLU(W_k [h; e_1; ..;
e_{k+1}] + b_k)``. This is the MLP Hydra head; Hydra++'s extra decoder layer
and teacher-distillation loss are not included.

Here the heads share the target's (frozen) LM head instead of each owning a
copy -- on SmolLM2 a copy is 28M parameters per head. Drafts are deterministic
candidates, verified by :func:`decodax.speculative.tree_speculative` with the
lossless tree verifiers (no typical acceptance).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from decodax.kernels import linear, take_rows
from decodax.model.transformer import Model, rms_norm
from decodax.speculative import trees
from decodax.speculative.drafters import Drafter, Proposal

__all__ = ["PARAMS_KEY", "DraftHeads", "draft_heads_drafter", "head_logits", "head_state", "lm_head",
           "with_head_params"]

PARAMS_KEY = "draft_heads"  # where the head params travel inside the decoder's params pytree


@dataclasses.dataclass(frozen=True)
class DraftHeads:
    """``num_heads`` Medusa heads (``hydra=False``) or Hydra heads over a model of width ``dim``."""

    dim: int
    num_heads: int = 4
    hydra: bool = False

    def __post_init__(self):
        if self.num_heads < 1 or self.dim < 1:
            raise ValueError(f"DraftHeads: need num_heads >= 1 and dim >= 1, got {self.num_heads}, {self.dim}")

    @property
    def name(self) -> str:
        return "hydra" if self.hydra else "medusa"

    def in_dim(self, k: int) -> int:
        """Input width of head ``k``: ``h`` (Medusa) or ``h`` and ``k + 1`` token embeddings (Hydra)."""
        return self.dim * (k + 2) if self.hydra else self.dim

    def init(self, key: PRNGKeyArray | None = None) -> list[dict[str, Array]]:
        """Zero residual blocks: every head starts out predicting what the LM head predicts."""
        del key
        return [{"w": jnp.zeros((self.dim, self.in_dim(k))), "b": jnp.zeros((self.dim,))}
                for k in range(self.num_heads)]


def head_state(model: Model, params: dict, heads: DraftHeads, head_params: list, k: int,
               hidden: Float[Array, "*B D"], path: Int[Array, "*B P"] | None = None) -> Float[Array, "*B D"]:
    """Head ``k``'s residual block output ``z`` (fed to the LM head) from the pre-norm hidden
    state at position ``t``; ``path`` (Hydra only): tokens ``x_{t+1} .. x_{t+1+k}``."""
    h = rms_norm(hidden, params["final_norm"], model.config.norm_eps)
    x = h
    if heads.hydra:
        if path is None or path.shape[-1] != k + 1:
            raise ValueError(f"hydra head {k} needs the {k + 1} path tokens, got "
                             f"{None if path is None else path.shape}")
        emb = take_rows(params["embed"], path)  # [..., k + 1, D]
        x = jnp.concatenate([h, emb.reshape(*emb.shape[:-2], -1)], axis=-1)
    hp = head_params[k]
    return h + jax.nn.silu(linear(x, hp["w"]) + hp["b"])


def lm_head(model: Model, params: dict, z: Float[Array, "*B D"]) -> Float[Array, "*B V"]:
    """The target's (shared, frozen) LM head."""
    return linear(z, params["lm_head"] if "lm_head" in params else params["embed"])


def head_logits(model: Model, params: dict, heads: DraftHeads, head_params: list, k: int,
                hidden: Float[Array, "*B D"], path: Int[Array, "*B P"] | None = None) -> Float[Array, "*B V"]:
    """Logits of head ``k`` (predicting ``x_{t+2+k}``); see :func:`head_state`."""
    return lm_head(model, params, head_state(model, params, heads, head_params, k, hidden, path))


def _levels(template: trees.TreeTemplate) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per depth d >= 1: (parent nodes at depth d-1, child nodes at depth d, slot of each
    child's parent among those parents)."""
    out = []
    for d in range(1, template.max_depth + 1):
        children = np.flatnonzero(template.depth == d)
        parents = np.unique(template.parents[children])
        slot = np.searchsorted(parents, template.parents[children])
        out.append((parents, children, slot))
    return out


def draft_heads_drafter(model: Model, heads: DraftHeads, template: trees.TreeTemplate) -> Drafter:
    """A tree :class:`Drafter` proposing Medusa/Hydra candidates on ``template``.

    The node of rank ``r`` at depth ``d`` gets the ``r``-th best token of head
    ``d - 1`` (Hydra: of head ``d - 1`` evaluated on the node's own path). The
    head params are read from ``params["draft_heads"]`` (see
    :func:`with_head_params`). The drafter keeps the target's hidden state at
    the position that predicted the last emitted token (``wants_hidden``).
    """
    if not isinstance(template, trees.TreeTemplate):
        raise ValueError(f"draft_heads_drafter: template must be a TreeTemplate, got {type(template).__name__}")
    if template.max_depth > heads.num_heads:
        raise ValueError(f"draft_heads_drafter: the template is {template.max_depth} deep but there are only "
                         f"{heads.num_heads} heads")
    return _drafter(model, heads, template.paths)


@functools.lru_cache(maxsize=32)
def _drafter(model: Model, heads: DraftHeads, paths: tuple) -> Drafter:
    template = trees.tree_from_paths(paths)
    levels = _levels(template)
    n = template.num_nodes
    ranks = template.rank

    def init(params, state, *, hidden):
        last = jnp.clip(state.prompt_len - 1, 0, hidden.shape[1] - 1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]

    def propose(params, state, dstate, key, *, k, sampler=None):
        hp = params[PARAMS_KEY]
        b = dstate.shape[0]
        tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(state.last_token)
        path_of = jnp.zeros((b, n, template.max_depth + 1), jnp.int32).at[:, 0, 0].set(state.last_token)
        if not heads.hydra:  # Medusa: candidates do not depend on the path; one LM-head pass for all heads
            z = jnp.stack([head_state(model, params, heads, hp, d, dstate) for d in range(len(levels))], axis=1)
            medusa_logits = lm_head(model, params, z)  # [B, depth, V]
        for d, (par, children, slot) in enumerate(levels):
            width = int(ranks[children].max()) + 1
            if heads.hydra:  # one evaluation per parent node, on its own path
                path = path_of[:, par, : d + 1]  # [B, n_par, d + 1]
                h = jnp.broadcast_to(dstate[:, None], (b, len(par), dstate.shape[-1]))
                logits = head_logits(model, params, heads, hp, d, h, path)  # [B, n_par, V]
            else:  # the same candidates below every parent
                logits = medusa_logits[:, d : d + 1]
                slot = np.zeros_like(slot)
            top = jax.lax.top_k(logits, width)[1].astype(jnp.int32)  # [B, n_par, width]
            child_tok = top[:, slot, ranks[children]]  # [B, n_children]
            tokens = tokens.at[:, children].set(child_tok)
            path_of = path_of.at[:, children, : d + 1].set(path_of[:, template.parents[children], : d + 1])
            path_of = path_of.at[:, children, d + 1].set(child_tok)
        return Proposal(tokens=tokens[:, 1:], probs=None, length=jnp.full((b,), n - 1, jnp.int32),
                        dstate=dstate)

    def update(dstate, state, accepted, *, hidden, path, **_):
        last = jnp.take_along_axis(path, accepted[:, None], axis=1)  # node that predicted next_token
        return jnp.take_along_axis(hidden, last[:, :, None], axis=1)[:, 0]

    return Drafter(init=init, propose=propose, update=update, name=f"{heads.name}[{heads.num_heads}]",
                   may_be_empty=False, template=paths, wants_hidden=True)


def with_head_params(params: dict, head_params: Any) -> dict:
    """The target params with the head params added under ``"draft_heads"``."""
    return {**params, PARAMS_KEY: head_params}
