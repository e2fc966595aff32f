"""Regex / JSON-schema constraints as token automata packed into device arrays.

The construction is outlines' (Willard & Louf 2023, "Efficient Guided Generation
for Large Language Models"): a regex's byte DFA is walked with every token of
the vocabulary, giving a *token-level* automaton whose state after a prefix
says which tokens may come next. outlines-core builds it (``Index``); JSON
schemas are first turned into a regex (``json_schema.build_regex_from_schema``).
Here the index is packed once, on the host, into arrays that live on the
device, so masking and advancing the automaton are two gathers inside the
jitted decode loop (no host round trip per token, unlike outlines' and
llguidance's host-side matchers that write a bitmask per step):

* ``mask``        uint32 ``[S, ceil(V / 32)]``: bit ``t % 32`` of word ``t // 32``
  says token ``t`` is allowed in state ``s``; in a final state the EOS ids are
  allowed too (the layout of outlines-core's / llguidance's token bitmasks).
* ``next_class``  int32 ``[S, C]`` and ``token_class`` int32 ``[V]``: the next
  state is ``next_class[s, token_class[t]]``, ``-1`` = not allowed. Tokens that
  behave the same in every state share a class (the DFA alphabet compression
  of regex engines, applied to tokens), which is exact and usually shrinks the
  transition table by orders of magnitude: a JSON string state allows tens of
  thousands of tokens, but they fall in few classes. ``C = V`` is the plain
  dense ``[S, V]`` table.
* ``final``       bool ``[S]``.

State 0 is the initial state; ``-1`` is the dead state (nothing allowed).
Device memory is ``4 * S * (ceil(V / 32) + C) + 4 * V + S`` bytes
(:attr:`TokenAutomaton.nbytes`); the dense alternative would be ``4 * S * V``
(~190 KiB per state for SmolLM2's 49152 tokens). ``S`` and ``C`` are padded
up to multiples of ``state_bucket`` / ``class_bucket`` (padding states are
dead, padding classes unused) so that different constraints of similar size
share one compilation of ``generate``.

Known limitation of outlines-core 0.2.x (kept, since it only removes
continuations, never admits a wrong one): a token whose last byte extends an
already complete match into a non-complete one is dropped (e.g. for ``(ab)+``
after ``"ab"`` the token ``"a"`` is not offered, ``"ab"`` is). Outputs that end
with EOS always match the regex.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, UInt32

from decodax.constrained.vocabulary import TokenVocabulary

__all__ = [
    "UnsupportedConstraintError",
    "AutomatonTables",
    "TokenAutomaton",
    "compile_regex",
    "compile_json_schema",
    "json_schema_regex",
    "allowed_tokens",
    "advance",
]


class UnsupportedConstraintError(ValueError):
    """The constraint is valid but cannot be expressed as a token automaton (e.g. a JSON
    schema feature outlines-core does not support). Never decoded unconstrained."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AutomatonTables:
    """Device arrays of a :class:`TokenAutomaton` (a pytree: travels in ``params``)."""

    mask: UInt32[Array, "S W"]
    next_class: Int[Array, "S C"]
    token_class: Int[Array, " V"]
    final: Bool[Array, " S"]


def _round_up(n: int, m: int) -> int:
    return -(-n // max(int(m), 1)) * max(int(m), 1)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """A token-level automaton (host numpy arrays, see the module docstring) and its
    device copy :attr:`tables`. Build with :func:`compile_regex` / :func:`compile_json_schema`."""

    regex: str
    vocabulary: TokenVocabulary
    n_states: int  # real states (before padding)
    mask: np.ndarray
    next_class: np.ndarray
    token_class: np.ndarray
    final: np.ndarray

    @functools.cached_property
    def tables(self) -> AutomatonTables:
        return AutomatonTables(mask=jnp.asarray(self.mask), next_class=jnp.asarray(self.next_class),
                               token_class=jnp.asarray(self.token_class), final=jnp.asarray(self.final))

    @property
    def vocab_size(self) -> int:
        return int(self.token_class.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.next_class.shape[1])

    @property
    def nbytes(self) -> int:
        """Device memory of :attr:`tables` in bytes."""
        return int(self.mask.nbytes + self.next_class.nbytes + self.token_class.nbytes + self.final.nbytes)

    def next_state(self, state: int, token: int) -> int:
        """Host-side transition (``-1``: not allowed / dead)."""
        if state < 0:
            return -1
        return int(self.next_class[state, self.token_class[int(token)]])

    def accepts(self, ids: Sequence[int]) -> bool:
        """True when ``ids`` (optionally ending with an EOS id) is a complete match."""
        ids = [int(i) for i in ids]
        if ids and ids[-1] in self.vocabulary.eos_ids:
            ids = ids[:-1]
        s = 0
        for t in ids:
            s = self.next_state(s, t)
            if s < 0:
                return False
        return bool(self.final[s])


def _outlines_error(what: str, text: str, e: Exception) -> ValueError:
    msg = str(e)
    if what == "regex":  # outlines-core's DFA errors are terse: add Python's diagnosis if any
        try:
            re.compile(text)
        except re.error as pe:
            msg = f"{msg}; Python's re: {pe}"
    unsupported = "not supported" in msg or "Unsupported" in msg
    cls = UnsupportedConstraintError if unsupported else ValueError
    return cls(f"{what} {text!r} {'is not supported' if unsupported else 'is invalid'} "
               f"(outlines-core: {msg})")


def _pack(index, vocab: TokenVocabulary, regex: str, state_bucket: int,
          class_bucket: int) -> TokenAutomaton:
    v = vocab.vocab_size
    trans = index.get_transitions()  # {state: {token: next}}, EOS (= v) included in finals
    initial = index.get_initial_state()
    finals = set(index.get_final_states())
    raw = set(trans) | finals | {initial}
    for d in trans.values():
        raw.update(d.values())
    order = [initial] + sorted(raw - {initial})
    ids = {s: i for i, s in enumerate(order)}
    n = len(order)
    s_pad = _round_up(n, state_bucket)

    # Per state: the (token, next) pairs, then refine token classes state by state:
    # two tokens share a class iff they lead to the same next state from every state.
    per_state: list[tuple[np.ndarray, np.ndarray]] = []
    cls = np.zeros(v, np.int64)
    for s in order:
        d = trans.get(s, {})
        toks = np.fromiter(d.keys(), np.int64, len(d))
        nxt = np.fromiter((ids[x] for x in d.values()), np.int64, len(d))
        keep = toks < v  # drop outlines' EOS placeholder
        toks, nxt = toks[keep], nxt[keep]
        per_state.append((toks, nxt))
        if toks.size:
            col = np.zeros(v, np.int64)  # 0 = not allowed, k + 1 = next state k
            col[toks] = nxt + 1
            _, cls = np.unique(cls * (n + 1) + col, return_inverse=True)
            cls = cls.reshape(-1)
    n_cls = int(cls.max()) + 1 if v else 1
    c_pad = _round_up(n_cls, class_bucket)
    next_class = np.full((s_pad, c_pad), -1, np.int32)
    allowed = np.zeros((s_pad, _round_up(v, 32)), bool)
    final = np.zeros(s_pad, bool)
    for i, (s, (toks, nxt)) in enumerate(zip(order, per_state)):
        next_class[i, cls[toks]] = nxt
        allowed[i, toks] = True
        if s in finals:
            final[i] = True
            allowed[i, list(vocab.eos_ids)] = True
    words = allowed.reshape(s_pad, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    mask = words.sum(axis=-1).astype(np.uint32)
    return TokenAutomaton(regex=regex, vocabulary=vocab, n_states=n, mask=mask, next_class=next_class,
                          token_class=cls.astype(np.int32), final=final)


def compile_regex(regex: str, vocabulary: TokenVocabulary, *, state_bucket: int = 16,
                  class_bucket: int = 16) -> TokenAutomaton:
    """Compile ``regex`` (Rust ``regex`` syntax, anchored at both ends) over ``vocabulary``.

    Raises ValueError carrying outlines-core's message for an invalid regex or
    one the vocabulary cannot spell.
    """
    if not isinstance(regex, str):
        raise ValueError(f"regex must be a str, got {type(regex).__name__}")
    if not isinstance(vocabulary, TokenVocabulary):
        raise ValueError(f"vocabulary must be a TokenVocabulary, got {type(vocabulary).__name__}")
    from outlines_core import Index

    try:
        index = Index(regex, vocabulary.to_outlines())
    except (ValueError, TypeError, RuntimeError) as e:
        raise _outlines_error("regex", regex, e) from None
    return _pack(index, vocabulary, regex, state_bucket, class_bucket)


def json_schema_regex(schema: str | Mapping[str, Any], *, whitespace: str | None = None) -> str:
    """The regex of a JSON schema (outlines-core's ``build_regex_from_schema``).

    ValueError for invalid JSON or a schema that is invalid under its
    metaschema (checked with ``jsonschema`` when installed);
    :class:`UnsupportedConstraintError` for valid schemas outlines-core
    cannot express.
    """
    from outlines_core.json_schema import build_regex_from_schema

    if isinstance(schema, Mapping):
        obj, text = dict(schema), json.dumps(schema)
    elif isinstance(schema, str):
        try:
            obj = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"JSON schema is not valid JSON: {e}") from None
        text = schema
    else:
        raise ValueError(f"schema must be a JSON string or a dict, got {type(schema).__name__}")
    if not isinstance(obj, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object or a boolean, got {type(obj).__name__}")
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(obj).check_schema(obj)
        except jsonschema.exceptions.SchemaError as e:
            raise ValueError(f"invalid JSON schema (jsonschema: {e.message})") from None
    missing = _undeclared_required(obj)
    if missing:
        raise UnsupportedConstraintError(
            f"JSON schema is not supported: required propert{'y' if len(missing) == 1 else 'ies'} "
            f"{sorted(missing)} not declared under 'properties' (outlines-core's regex only emits declared "
            "properties, so the constraint would admit outputs the schema rejects)")
    try:
        return build_regex_from_schema(text, whitespace)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _outlines_error("JSON schema", text, e) from None


def _undeclared_required(node) -> set[str]:
    """Names that some object schema inside ``node`` requires but does not declare under its
    ``properties``: outlines-core drops them silently (e.g. ``{"properties": {"a": ...},
    "required": ["b"]}`` compiles to objects without ``b``, which the schema rejects)."""
    found: set[str] = set()
    if isinstance(node, dict):
        required = node.get("required")
        if isinstance(required, list):
            declared = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            found |= {r for r in required if isinstance(r, str) and r not in declared}
        for value in node.values():
            found |= _undeclared_required(value)
    elif isinstance(node, list):
        for value in node:
            found |= _undeclared_required(value)
    return found


def compile_json_schema(schema: str | Mapping[str, Any], vocabulary: TokenVocabulary, *,
                        whitespace: str | None = None, state_bucket: int = 16,
                        class_bucket: int = 16) -> TokenAutomaton:
    """Compile a JSON schema (dict or JSON text) to a token automaton via its regex."""
    return compile_regex(json_schema_regex(schema, whitespace=whitespace), vocabulary,
                         state_bucket=state_bucket, class_bucket=class_bucket)


# --------------------------------------------------------------------------- #
# Device side (pure, jit-compatible)
# --------------------------------------------------------------------------- #


def allowed_tokens(tables: AutomatonTables, state: Int[Array, " B"]) -> Bool[Array, "B V"]:
    """Unpack the bitmask rows of ``state`` (``-1`` = dead: nothing allowed)."""
    v = tables.token_class.shape[0]
    words = tables.mask[jnp.maximum(state, 0)]  # [B, W]
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    ok = bits.reshape(state.shape[0], -1)[:, :v].astype(bool)
    return ok & (state >= 0)[:, None]


def advance(tables: AutomatonTables, state: Int[Array, " B"], token: Int[Array, " B"]) -> Int[Array, " B"]:
    """Next state after ``token`` (``-1`` when not allowed or already dead)."""
    nxt = tables.next_class[jnp.maximum(state, 0), tables.token_class[token]]
    return jnp.where(state >= 0, nxt, -1).astype(jnp.int32)
