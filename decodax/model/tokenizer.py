"""Byte-level BPE tokenizer built from GGUF metadata with HF ``tokenizers``, plus chat templates.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` metadata the way HF
transformers' GGUF loader does (``integrations/gguf/gguf_tokenizer_mapping``),
so token ids are identical to ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``:

* vocabulary and merges from ``tokenizer.ggml.tokens`` / ``merges``; a token
  not spelled in the GPT-2 byte alphabet is re-spelled from its UTF-8 bytes;
* tokens of type CONTROL (3) become special added tokens, USER_DEFINED (4)
  plain added tokens (matched whole, never split);
* the pre-tokenizer split regex is chosen from ``tokenizer.ggml.pre``
  (llama3, qwen2, gpt-4o families); every other name, including ``"gpt2"`` and
  ``"smollm"``, gets the GPT-2 ``ByteLevel`` regex.

``split_digits=True`` additionally splits every digit (``\\p{N}``) into its own
pre-token first, which is what llama.cpp does for ``smollm``/``starcoder`` and
what SmolLM2's original ``tokenizer.json`` does (``Digits(individual_digits)``).
It differs from transformers' GGUF tokenizer only around runs of spaces before
a digit (``"a  1"``), so it is off by default (transformers is the oracle).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _BackendTokenizer

__all__ = ["Tokenizer", "CHATML_TEMPLATE", "bytes_to_unicode"]

# Token types of llama.cpp's vocabulary (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex (names as in llama.cpp / transformers' GGUF mapping).
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
# Pre-tokenizers for which llama.cpp splits every digit first (\p{N} then the GPT-2 regex).
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _as_list(x: Any) -> list:
    return x.tolist() if isinstance(x, np.ndarray) else list(x)


class Tokenizer:
    """A byte-level BPE tokenizer (HF ``tokenizers`` backend) with special ids and a chat template."""

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        vocab_size: int | None = None,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        ids = [int(e) for e in eos_ids]
        if eos_id is not None and eos_id not in ids:
            ids.insert(0, int(eos_id))
        self.eos_ids: tuple[int, ...] = tuple(ids)
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template if chat_template else CHATML_TEMPLATE
        self._vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, split_digits: bool = False, path: str = "<gguf>"
    ) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's ``tokenizer.*`` metadata.

        Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are
        supported; anything else raises ValueError naming the model found.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{path}: unsupported tokenizer: expected tokenizer.ggml.model 'gpt2' (byte-level BPE), got {model!r}"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in metadata:
                raise ValueError(f"{path}: GGUF metadata is missing required key {key!r}")
        tokens: list[str] = _as_list(metadata["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ")) for m in _as_list(metadata["tokenizer.ggml.merges"])]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise ValueError(f"{path}: corrupt merges: expected 'left right', got {' '.join(bad)!r}")
        token_type = _as_list(metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
        if len(token_type) != len(tokens):
            raise ValueError(
                f"{path}: expected one token_type per token ({len(tokens)}), got {len(token_type)}"
            )

        spelling = bytes_to_unicode()
        alphabet = frozenset(spelling.values())
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab[key] = i
        try:
            bpe = models.BPE(
                vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                end_of_word_suffix="", fuse_unk=False,
            )
        except Exception as e:  # tokenizers raises its own Exception type on a bad merge
            raise ValueError(f"{path}: corrupt tokenizer vocabulary/merges: {e}") from None
        backend = _BackendTokenizer(bpe)

        pre = metadata.get("tokenizer.ggml.pre")
        split = _PRE_TOKENIZER_SPLITS.get(pre)
        if split is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        elif split_digits and pre in _DIGIT_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()

        control = [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, token_type)
            if ty == _CONTROL and set(t) <= alphabet
        ]
        if control:
            backend.add_special_tokens(control)
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, token_type)
            if ty == _USER_DEFINED and t in vocab
        ]
        if user:
            backend.add_tokens(user)

        def tid(key: str) -> int | None:
            v = metadata.get(f"tokenizer.ggml.{key}")
            if v is None:
                return None
            v = int(v)
            if not 0 <= v < len(tokens):
                raise ValueError(f"{path}: tokenizer.ggml.{key} must be in [0, {len(tokens)}), got {v}")
            return v

        eos = tid("eos_token_id")
        extra_eos = [e for e in (tid("eot_token_id"), tid("eom_token_id")) if e is not None]
        return cls(
            backend,
            bos_id=tid("bos_token_id"),
            eos_id=eos,
            eos_ids=([eos] if eos is not None else []) + extra_eos,
            pad_id=tid("padding_token_id"),
            unk_id=tid("unknown_token_id"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
            vocab_size=len(tokens),
        )

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids (the GGUF vocabulary, special tokens included)."""
        return self._vocab_size

    def _token(self, tid: int | None) -> str | None:
        return None if tid is None else self.backend.id_to_token(tid)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_id)

    @property
    def pad_token(self) -> str | None:
        return self._token(self.pad_id)

    @property
    def unk_token(self) -> str | None:
        return self._token(self.unk_id)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (as spelled in the vocabulary), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        """Vocabulary spelling of a token id, or None."""
        return self.backend.id_to_token(int(tid))

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings (``<|im_start|>``) map to their ids.

        ``add_special_tokens`` adds BOS/EOS only where the GGUF asks for them
        (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``), as transformers does.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id, *ids]
            if self.add_eos and self.eos_id is not None:
                ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` over many strings (parallel in the Rust backend)."""
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_special_tokens and (self.add_bos or self.add_eos):
            out = [self.encode(t, True) for t in texts]
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of token ids; ids outside ``[0, vocab_size)`` raise ValueError."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode expects token ids in [0, {self.vocab_size}), got {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the GGUF's ``tokenizer.chat_template`` (jinja2, sandboxed).

        Falls back to ChatML when the file has no template. Extra keyword
        arguments are passed to the template, as in transformers.
        """
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"expected messages as {{'role': ..., 'content': ...}} dicts, got {m!r}")
        context = dict(
            bos_token=self.bos_token, eos_token=self.eos_token,
            pad_token=self.pad_token, unk_token=self.unk_token,
        )
        context.update(kwargs)
        return _compile_template(self.chat_template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
            f"pad_id={self.pad_id})"
        )
