"""Speculative decoding: lossless verifiers (chain, tree, multi-draft, recursive) and token trees.

See :mod:`decodax.speculative.verify` for the verifiers' shapes and
:mod:`decodax.speculative.trees` for the token-tree convention (node 0 is the
root = the last emitted token, ``parents[i] < i``).
"""

from decodax.speculative.aded import aded
from decodax.speculative.decoder import speculative
from decodax.speculative.pearl import PearlState, pearl
from decodax.speculative.stochastic_beam import BeamTree, stochastic_beam_tree
from decodax.speculative.token_recycling import token_recycling, tr_template
from decodax.speculative.tree_decoder import tree_speculative
from decodax.speculative.drafters import Drafter, Proposal, early_exit_drafter, prompt_lookup
from decodax.speculative.trees import (
    TreeTemplate,
    accepted_path,
    ancestor_mask,
    chain_tree,
    full_tree,
    tree_depths,
    tree_from_paths,
    tree_positions,
    validate_parents,
)
from decodax.speculative.verify import (
    MultiDraftResult,
    TreeVerifyResult,
    sample_without_replacement,
    spectr_rho,
    verify_greedy,
    verify_multi_draft,
    verify_recursive,
    verify_sampling,
    verify_tree_greedy,
    verify_tree_sampling,
)
from decodax.speculative.draft_model import (
    DraftState,
    FirstLayers,
    draft_model_drafter,
    first_layers_model,
    with_draft_params,
)

__all__ = [
    "aded",
    "BeamTree",
    "stochastic_beam_tree",
    "token_recycling",
    "tr_template",
    "tree_speculative",
    "Drafter",
    "Proposal",
    "early_exit_drafter",
    "prompt_lookup",
    "speculative",
    "pearl",
    "PearlState",
    "MultiDraftResult",
    "TreeTemplate",
    "TreeVerifyResult",
    "accepted_path",
    "ancestor_mask",
    "chain_tree",
    "full_tree",
    "sample_without_replacement",
    "spectr_rho",
    "tree_depths",
    "tree_from_paths",
    "tree_positions",
    "validate_parents",
    "verify_greedy",
    "verify_multi_draft",
    "verify_recursive",
    "verify_sampling",
    "verify_tree_greedy",
    "verify_tree_sampling",
    "DraftState",
    "FirstLayers",
    "draft_model_drafter",
    "first_layers_model",
    "with_draft_params",
]
