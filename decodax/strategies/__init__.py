"""Quality-oriented decoding strategies, each a ``Decoder`` run by the one driver:
beam search (length penalty, per-row EOS), contrastive search (degeneration penalty),
contrastive decoding (expert minus amateur; USCD's uncertainty-selective variant) and momentum
decoding (resistance to revisiting the context's n-grams), cautious next-token prediction (CNTP),
AdaDec (entropy-gated pause-then-rerank), entropy-adaptive decoding (EAD: early exit vs full model) and
Superposed Decoding (k drafts from one forward per token on superposed embeddings, n-gram interpolation)."""

from decodax.strategies.adadec import adadec, entropy_labels, fit_threshold
from decodax.strategies.beam_search import BeamState, beam_search
from decodax.strategies.cautious import cautious
from decodax.strategies.contrastive_decoding import (
    contrastive_decoding,
    contrastive_scores,
    expert_uncertain,
    uscd,
    with_lame_prompts,
)
from decodax.strategies.contrastive_search import ContrastiveState, contrastive_search, degeneration_penalty
from decodax.strategies.entropy_adaptive import entropy_adaptive, large_fraction
from decodax.strategies.momentum import momentum, repetition_length
from decodax.strategies.superposed import (
    NgramTable,
    SuperposedState,
    build_ngram_table,
    generate_drafts,
    ngram_table_from_text,
    superposed,
    superposed_drafts,
    with_ngram,
)

__all__ = [
    "BeamState",
    "ContrastiveState",
    "NgramTable",
    "SuperposedState",
    "adadec",
    "beam_search",
    "build_ngram_table",
    "cautious",
    "contrastive_decoding",
    "contrastive_scores",
    "contrastive_search",
    "degeneration_penalty",
    "entropy_adaptive",
    "entropy_labels",
    "expert_uncertain",
    "fit_threshold",
    "generate_drafts",
    "large_fraction",
    "momentum",
    "ngram_table_from_text",
    "repetition_length",
    "superposed",
    "superposed_drafts",
    "uscd",
    "with_lame_prompts",
    "with_ngram",
]
