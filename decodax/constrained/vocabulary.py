"""The model's token vocabulary as byte strings, the alphabet a token-level automaton reads.

Regex / JSON-schema automata (outlines-core, Willard & Louf 2023, "Efficient
Guided Generation for Large Language Models") run over *bytes*, so every token
id needs the exact bytes it contributes to the decoded text. For a byte-level
BPE tokenizer (GPT-2 / SmolLM2) a vocabulary entry is spelled in GPT-2's
printable byte alphabet (``"Ġthe"`` is ``b" the"``), so the bytes are the
inverse of :func:`decodax.model.tokenizer.bytes_to_unicode`, never
``token.encode("utf-8")``. A token may hold an incomplete UTF-8 sequence
(``"Ã"`` alone is ``b"\\xc3"``); the automaton handles that byte by byte.
Special (control) tokens have no text and are left out: they can never be
part of constrained text; EOS is handled by the decoder, not the automaton.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from decodax.model.tokenizer import Tokenizer, bytes_to_unicode

__all__ = ["TokenVocabulary"]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenVocabulary:
    """``token_bytes[i]``: the bytes token id ``i`` appends to the text, or None (special/unused).

    ``eos_ids`` are the ids that end a constrained row (the first one is forced
    when a row can go nowhere else). Compared by identity (it is large).
    """

    token_bytes: tuple[bytes | None, ...]
    eos_ids: tuple[int, ...]

    def __post_init__(self):
        if not self.eos_ids:
            raise ValueError("a constrained vocabulary needs at least one EOS id, got none")
        bad = [e for e in self.eos_ids if not 0 <= e < len(self.token_bytes)]
        if bad:
            raise ValueError(f"EOS ids must be in [0, {len(self.token_bytes)}), got {bad}")

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    @classmethod
    def from_strings(
        cls, tokens: Sequence[str | bytes | None], eos_ids: Sequence[int]
    ) -> TokenVocabulary:
        """A synthetic vocabulary: ``tokens[i]`` is token i's text (str: UTF-8) or None."""
        out = tuple(None if t is None else (t.encode("utf-8") if isinstance(t, str) else bytes(t))
                    for t in tokens)
        eos = tuple(int(e) for e in eos_ids)
        return cls(tuple(None if i in eos else b for i, b in enumerate(out)), eos)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, *, vocab_size: int | None = None, eos_ids: Sequence[int] | None = None
    ) -> TokenVocabulary:
        """Bytes of every id of a byte-level BPE :class:`Tokenizer` (decodax.model.tokenizer).

        Special added tokens (``<|im_end|>``) map to None; a non-special added
        token contributes its content's UTF-8. ``vocab_size`` (the model's,
        when larger than the tokenizer's) pads with None. ``eos_ids`` default to
        the tokenizer's.
        """
        n = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
        if n < tokenizer.vocab_size:
            raise ValueError(f"vocab_size {n} is smaller than the tokenizer's {tokenizer.vocab_size}")
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        added = tokenizer.backend.get_added_tokens_decoder()
        out: list[bytes | None] = [None] * n
        for i in range(tokenizer.vocab_size):
            a = added.get(i)
            if a is not None:
                out[i] = None if a.special else a.content.encode("utf-8")
                continue
            tok = tokenizer.backend.id_to_token(i)
            if tok is None:
                continue
            if all(ch in inverse for ch in tok):
                out[i] = bytes(inverse[ch] for ch in tok)
            else:  # not spelled in the byte alphabet: the ByteLevel decoder keeps it as UTF-8
                out[i] = tok.encode("utf-8")
        eos = tuple(int(e) for e in (tokenizer.eos_ids if eos_ids is None else eos_ids))
        for e in eos:
            if 0 <= e < n:
                out[e] = None
        return cls(tuple(out), eos)

    def to_outlines(self):
        """An ``outlines_core.Vocabulary`` of the text tokens; its EOS id is ``vocab_size``
        (a placeholder outside the vocabulary: EOS transitions are ours)."""
        from outlines_core import Vocabulary

        groups: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.token_bytes):
            if b:  # None and b"" never advance the automaton
                groups.setdefault(b, []).append(i)
        if not groups:
            raise ValueError("the vocabulary has no text tokens to constrain")
        return Vocabulary(self.vocab_size, groups)

    def decode(self, ids: Sequence[int]) -> bytes:
        """The bytes of ``ids`` (special / EOS ids contribute nothing)."""
        return b"".join(self.token_bytes[int(i)] or b"" for i in ids)
