"""Tokenizer built from GGUF metadata vs transformers' tokenizer loaded from the same GGUF."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from decodax.model.gguf import read_gguf
from decodax.model.tokenizer import CHATML_TEMPLATE, Tokenizer

QUESTIONS = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data", "spec_bench", "questions.jsonl"
)

TRICKY = [
    "",
    " ",
    "Hello world",
    " Hello  world ",
    "123 4567 12345678 3.14159 1,000,000 2024-06-01",
    "a  1 b   22\t3\n\n4",
    "x=1;y=22;z=333",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\nand \u00a0nbsp",
    "\n\n\n    \n",
    "héllo wörld naïve café Ünïcödé",
    "日本語のテキストと中文字符 한국어",
    "emoji 🤖🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "Ελληνικά и русский текст",
    "math: ∑_{i=1}^{n} x² ≤ ∞ ½ ⅔ ٣",
    "def f(x):\n    return x**2  # comment\n\nclass A:\n\tpass\n",
    "if (a && b || !c) { return arr[i] >> 2; }",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>text <|im_start|> spaced",
    "<|im_start",
    "<repo_name>decodax<file_sep>main.py<filename>x",
    "I'm you're it's we'll they'd I've DON'T",
    "https://example.com/path?q=1&r=two#frag",
    "\x00\x01\x7f control chars",
    "a" * 300,
]


@pytest.fixture(scope="module")
def metadata(default_gguf_path):
    return read_gguf(default_gguf_path).metadata


@pytest.fixture(scope="module")
def tokenizer(metadata):
    return Tokenizer.from_gguf_metadata(metadata)


def _questions():
    if not os.path.isfile(QUESTIONS):
        pytest.skip(f"spec_bench data not found at {os.path.normpath(QUESTIONS)}")
    with open(QUESTIONS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_properties(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2 and tokenizer.eos_ids == (2,)
    assert tokenizer.pad_id == 2 and tokenizer.unk_id == 0
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert not tokenizer.add_bos  # SmolLM2 GGUF: tokenizer.ggml.add_bos_token = False


def test_spec_bench_identical_to_transformers(tokenizer, hf_tokenizer):
    questions = _questions()
    assert len(questions) == 240
    turns = [t for q in questions for t in q["turns"]]
    mine = tokenizer.encode_batch(turns)
    ref = hf_tokenizer(turns)["input_ids"]
    bad = [i for i, (a, b) in enumerate(zip(mine, ref)) if a != b]
    assert not bad, f"{len(bad)}/{len(turns)} turns differ, first: {turns[bad[0]]!r}"
    # Each question as a chat prompt (special tokens inside the text) and as a 2-turn conversation.
    chats = []
    for q in questions:
        msgs = [{"role": "user", "content": q["turns"][0]}]
        chats.append(msgs)
        if len(q["turns"]) > 1:
            chats.append(msgs + [{"role": "assistant", "content": "OK."}, {"role": "user", "content": q["turns"][1]}])
    rendered = [tokenizer.apply_chat_template(m) for m in chats]
    ref_rendered = [hf_tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
    assert rendered == ref_rendered
    mine = tokenizer.encode_batch(rendered)
    ref = hf_tokenizer(rendered)["input_ids"]
    bad = [i for i, (a, b) in enumerate(zip(mine, ref)) if a != b]
    assert not bad, f"{len(bad)}/{len(rendered)} chat prompts differ, first: {rendered[bad[0]]!r}"


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tricky_strings_identical_to_transformers(tokenizer, hf_tokenizer, text):
    for special in (True, False):
        ids = tokenizer.encode(text, add_special_tokens=special)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=special), (text, special)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        ), (text, skip)


def test_special_tokens_whole(tokenizer):
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tokenizer.decode([1, 4093, 198, 6004, 2]) == "user\nhi"
    assert tokenizer.decode(np.array([[1, 4093]])) == "user"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another, with ünïcode 🤖?"},
        ],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_identical_to_transformers(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    mine = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert mine == ref
    if messages[0]["role"] != "system":  # SmolLM2's template injects its default system prompt
        assert mine.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chatml_fallback_and_errors(metadata):
    meta = dict(metadata)
    meta.pop("tokenizer.chat_template")
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="expected messages"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match=r"token ids in \[0, 49152\), got \[49152\]"):
        tok.decode([5, 49152])
    with pytest.raises(ValueError, match="expected tokenizer.ggml.model 'gpt2'.*got 'llama'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="missing required key 'tokenizer.ggml.merges'"):
        Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})


def test_split_digits_variant(metadata, tokenizer):
    """llama.cpp's 'smollm' pre-tokenizer (and SmolLM2's tokenizer.json) split digits first.

    The ids then differ from transformers' GGUF tokenizer only where a run of
    spaces precedes a digit; both decode to the same text.
    """
    llama_cpp = Tokenizer.from_gguf_metadata(metadata, split_digits=True)
    text = "a  1"
    assert tokenizer.encode(text) != llama_cpp.encode(text)
    assert llama_cpp.decode(llama_cpp.encode(text)) == text
    assert tokenizer.encode("x 12 y") == llama_cpp.encode("x 12 y")


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "qwen35", "gpt-4o", "tekken", "smollm"])
def test_pre_tokenizer_families_match_transformers(metadata, pre):
    """Each tokenizer.ggml.pre split regex gives transformers' GGUF ids (SmolLM2 vocab, swapped pre)."""
    pytest.importorskip("transformers", reason="HF transformers oracle not installed (optional backend; pip install -e '.[dev]')")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers version has no integrations.gguf.gguf_tokenizer_mapping")
    meta = metadata
    tokenizer_dict = {
        "tokenizer_type": "gpt2",
        "pre_tokenizer_type": pre,
        "tokens": list(meta["tokenizer.ggml.tokens"]),
        "token_type": meta["tokenizer.ggml.token_type"].tolist(),
        "merges": list(meta["tokenizer.ggml.merges"]),
    }
    ref, _ = convert_gguf_tokenizer("llama", tokenizer_dict)
    mine = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": pre})
    for text in TRICKY:
        assert mine.encode(text) == ref.encode(text, add_special_tokens=False).ids, (pre, text)
