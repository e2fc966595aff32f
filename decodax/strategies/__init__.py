"""Quality-oriented decoding strategies, each a ``Decoder`` run by the one driver:
beam search (length penalty, per-row EOS), contrastive search (degeneration penalty),
contrastive decoding (expert minus amateur; USCD's uncertainty-selective variant) and momentum
decoding (resistance to revisiting the context's n-grams), cautious next-token prediction (CNTP),
AdaDec (entropy-gated pause-then-rerank) and entropy-adaptive decoding (EAD: early exit vs full model)."""

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

__all__ = [
    "BeamState",
    "ContrastiveState",
    "adadec",
    "beam_search",
    "cautious",
    "contrastive_decoding",
    "contrastive_scores",
    "contrastive_search",
    "degeneration_penalty",
    "entropy_adaptive",
    "entropy_labels",
    "expert_uncertain",
    "fit_threshold",
    "large_fraction",
    "momentum",
    "repetition_length",
    "uscd",
    "with_lame_prompts",
]
