"""Constrained decoding: regex / JSON-schema token automata and ban lists, on device.

    vocab = TokenVocabulary.from_tokenizer(tokenizer)
    c = compile_json_schema(schema, vocab)            # or compile_regex(r"...", vocab)
    dec = constrained(model, c, banned=BanList(tokens=(13,)), sampler=make_sampler(0.7))
    out = generate(dec, with_constraint(params, c), prompts, max_new_tokens=128)
"""

from decodax.constrained.automaton import (
    AutomatonTables,
    TokenAutomaton,
    UnsupportedConstraintError,
    advance,
    allowed_tokens,
    compile_json_schema,
    compile_regex,
    json_schema_regex,
)
from decodax.constrained.asap import EFGTrie, asap_sample, masked_sample
from decodax.constrained.banned import BanList, ban_mask
from decodax.constrained.decoder import choose_token, constrained, with_constraint
from decodax.constrained.speculative import constrained_speculative
from decodax.constrained.vocabulary import TokenVocabulary

__all__ = [
    "AutomatonTables",
    "BanList",
    "EFGTrie",
    "TokenAutomaton",
    "TokenVocabulary",
    "UnsupportedConstraintError",
    "advance",
    "allowed_tokens",
    "asap_sample",
    "ban_mask",
    "choose_token",
    "compile_json_schema",
    "compile_regex",
    "constrained",
    "constrained_speculative",
    "json_schema_regex",
    "masked_sample",
    "with_constraint",
]
