"""Constrained decoding on tiny random-weight models: regex, JSON schema, ban lists, errors.

Compilations are few on purpose (CI time): every regex of the property test is
padded to the same table shape, so the whole test compiles `generate` once.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrained.common import EOS, tiny_model, toy_vocab
from decodax import sampling
from decodax.constrained import (
    AutomatonTables,
    BanList,
    TokenVocabulary,
    UnsupportedConstraintError,
    allowed_tokens,
    ban_mask,
    choose_token,
    compile_json_schema,
    compile_regex,
    constrained,
    json_schema_regex,
    with_constraint,
)
from decodax.decoding import generate
from decodax.model.config import tiny_config
from decodax.model.transformer import Model

@pytest.fixture(scope="module")
def vocab():
    return toy_vocab()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def real_vocab(default_gguf_path):
    from decodax.model.gguf import read_gguf
    from decodax.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(read_gguf(default_gguf_path).metadata)
    return tok, TokenVocabulary.from_tokenizer(tok)


SAMPLER = sampling.make_sampler(temperature=1.0)

# A safe class of regexes: the same meaning in Rust's `regex` (outlines-core) and Python's `re`.
ATOMS = ["a", "b", "c", "[ab]", "[bc]", "[a-c]"]
REPEATS = ["?", "{2}", "{1,2}", "{0,3}", "+"]


def regexes(max_leaves: int = 6):
    def extend(children):
        return st.one_of(
            st.lists(children, min_size=2, max_size=3).map("".join),
            st.tuples(children, children).map(lambda t: f"({t[0]}|{t[1]})"),
            st.tuples(children, st.sampled_from(REPEATS)).map(lambda t: f"({t[0]}){t[1]}"),
        )

    return st.recursive(st.sampled_from(ATOMS), extend, max_leaves=max_leaves)


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rx=regexes())
def test_outputs_always_match_the_regex(tiny, vocab, rx):
    model, params = tiny
    c = compile_regex(rx, vocab, state_bucket=64, class_bucket=16)  # one table shape: one compile
    dec = constrained(model, c, sampler=SAMPLER)
    out = generate(dec, with_constraint(params, c), [[1, 2, 3]] * 6, max_new_tokens=16,
                   key=jax.random.key(len(rx)))
    finished = 0
    for row in out.rows():
        if row and row[-1] == EOS:
            finished += 1
            text = vocab.decode(row[:-1]).decode("utf-8")
            assert re.fullmatch(rx, text), (rx, row, text)
            assert c.accepts(row)
        else:  # cut by max_new_tokens: a valid prefix, every token allowed
            assert len(row) == 16 and EOS not in row
    assert finished > 0 or "+" in rx


def test_json_schema_output_validates(real_vocab):
    jsonschema = pytest.importorskip("jsonschema")
    tok, vocab = real_vocab
    # every ordinary token's bytes reproduce the tokenizer's decoding (byte-level BPE spelling)
    rng = np.random.default_rng(0)
    text_ids = [i for i, b in enumerate(vocab.token_bytes) if b]
    for _ in range(50):
        ids = rng.choice(text_ids, size=rng.integers(1, 8)).tolist()
        assert vocab.decode(ids).decode("utf-8", errors="replace") == tok.decode(ids)
    assert vocab.token_bytes[tok.encode(" the")[0]] == b" the"
    assert all(vocab.token_bytes[e] is None for e in tok.eos_ids)

    schema = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "ok"],
              "properties": {"name": {"type": "string", "maxLength": 4}, "kind": {"enum": ["cat", "dog"]},
                             "ok": {"type": "boolean"}}}
    c = compile_json_schema(schema, vocab)
    assert c.nbytes < 4 * c.n_states * vocab.vocab_size / 8  # class compression vs a dense table
    model = Model(tiny_config(vocab_size=vocab.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                              hidden_dim=32, eos_ids=tok.eos_ids))
    params = model.init(jax.random.key(1))
    out = generate(constrained(model, c, sampler=SAMPLER), with_constraint(params, c), [[1, 2, 3]] * 4,
                   max_new_tokens=64, key=jax.random.key(2))
    finished = [r for r in out.rows() if r[-1] in tok.eos_ids]
    assert finished
    for row in finished:
        value = json.loads(tok.decode(row[:-1]))
        jsonschema.validate(value, schema)


def test_banned_tokens_and_sequences_never_appear(tiny):
    model, params = tiny
    ban = BanList(tokens=(3, 7), sequences=((1, 2), (4, 4, 5), (9,)))
    prompts = [[6, 1], [5, 4, 4], [2, 2, 2], [8]] * 2
    out = generate(constrained(model, banned=ban, sampler=SAMPLER), params, prompts, max_new_tokens=24,
                   key=jax.random.key(3))
    for prompt, row in zip(prompts, out.rows()):
        assert not {3, 7, 9} & set(row)
        ctx = prompt + row
        for seq in ban.sequences:
            for end in range(len(prompt), len(ctx)):  # windows ending in the generated part
                assert tuple(ctx[end - len(seq) + 1 : end + 1]) != seq, (prompt, row, seq)


def test_ban_mask_matches_reference():
    ban = BanList(tokens=(5,), sequences=((1, 2), (3, 1, 2), (4, 4, 0)))
    prompt = jnp.array([[7, 3, 1, 0], [4, 4, 0, 0], [1, 0, 0, 0]])
    plen = jnp.array([3, 2, 1])
    tokens = jnp.array([[0, 0], [6, 0], [0, 0]])
    n = jnp.array([0, 0, 0])
    mask_of = jax.jit(lambda *a: ban_mask(ban, 8, *a))  # one compilation, not op by op
    m = np.asarray(mask_of(prompt, plen, tokens, n))
    assert m[:, 5].all() and m[0, 2] and not m[1, 2] and m[2, 2]  # context ends with 1 -> ban 2
    assert m[1, 0] and not m[0, 0]  # 4 4 -> ban 0
    assert m.sum() == 3 + 2 + 1
    m = np.asarray(mask_of(prompt, plen, tokens, jnp.array([0, 1, 0])))
    assert not m[1, 0]  # row 1's context now ends 4 4 6


def test_dead_state_forces_eos_and_final_state_allows_it():
    # 3 states over 6 tokens: 0 --t1--> 1 (final), 1 --t2--> 2 (non-final, dead end)
    mask = np.zeros((3, 1), np.uint32)
    mask[0, 0] = 1 << 1
    mask[1, 0] = (1 << 2) | (1 << 5)  # token 2 and EOS (5)
    tables = AutomatonTables(mask=jnp.asarray(mask), next_class=jnp.array([[-1, 1, -1], [-1, -1, 2], [-1] * 3]),
                             token_class=jnp.array([0, 1, 2, 0, 0, 0]), final=jnp.array([False, True, False]))
    state = jnp.array([0, 1, 2, -1])
    ok = np.asarray(jax.jit(allowed_tokens)(tables, state))
    assert ok.tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1], [0] * 6, [0] * 6]
    logits = np.zeros((4, 6), np.float32)
    logits[:, 3] = 10.0  # the model wants a forbidden token
    greedy = sampling.make_sampler(temperature=0.0)
    tok = jax.jit(lambda lg, a: choose_token(lg, a, 5, greedy, None))(logits, jnp.asarray(ok))
    assert np.asarray(tok).tolist() == [1, 2, 5, 5]  # row 1: 2 or EOS (tie: the first), dead: EOS


def test_bad_input_raises_value_error(tiny, vocab):
    model, params = tiny
    for bad in ["(ab", "a{2,1}", "[c-a]"]:
        with pytest.raises(ValueError, match="invalid.*outlines-core"):
            compile_regex(bad, vocab)
    with pytest.raises(ValueError, match="not valid JSON"):
        json_schema_regex("{bad")
    with pytest.raises(ValueError, match="invalid JSON schema"):
        json_schema_regex({"type": "foo"})
    with pytest.raises(UnsupportedConstraintError, match="not supported"):
        json_schema_regex({"not": {"type": "string"}})
    with pytest.raises(UnsupportedConstraintError, match="ipv4"):
        json_schema_regex({"type": "string", "format": "ipv4"})
    # required but undeclared properties: outlines-core would silently drop them (JSONSchemaBench's
    # Github_trivial/o2058 and, inside a oneOf, o19070 were decoded to outputs the schema rejects)
    undeclared = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["text"]}
    with pytest.raises(UnsupportedConstraintError, match=r"\['text'\] not declared"):
        json_schema_regex(undeclared)
    with pytest.raises(UnsupportedConstraintError, match=r"\['win'\] not declared"):
        json_schema_regex({"oneOf": [{"type": "object", "required": ["id", "win"], "properties": {"id": {}}}]})
    json_schema_regex({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
    c = compile_regex("ab", vocab)
    with pytest.raises(ValueError, match="vocabulary has 16 tokens but the model has 17"):
        constrained(Model(tiny_config(vocab_size=17, eos_ids=(0,))), c)
    with pytest.raises(ValueError, match="with_constraint"):
        generate(constrained(model, c), params, [[1]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"banned token ids must be in \[0, 16\)"):
        constrained(model, banned=BanList(tokens=(16,)))
    with pytest.raises(ValueError, match="non-empty"):
        BanList(sequences=((),))
