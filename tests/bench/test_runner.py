"""The bench harness on a tiny model: batch 1 and ragged batches give the same tokens."""

from __future__ import annotations

import jax
import pytest

from decodax.bench.prompts import Prompt
from decodax.bench.runner import bench_decoders, summarize, to_markdown
from decodax.decoding import autoregressive
from decodax.model.config import tiny_config
from decodax.model.transformer import Model


def test_bench_batches_and_summary():
    model = Model(tiny_config(vocab_size=61, n_layers=1, eos_ids=()))
    params = model.init(jax.random.key(0))
    prompts = [Prompt(str(i), "cat-a" if i % 2 else "cat-b", "") for i in range(3)]
    encoded = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    dec = {"ar": autoregressive(model)}
    one = bench_decoders(dec, params, prompts, encoded, max_new_tokens=5, pad_to=8)
    two = bench_decoders(dec, params, prompts, encoded, max_new_tokens=5, pad_to=8, batch=2)
    assert [r.output for r in one] == [r.output for r in two]
    assert all(r.tokens == 5 and r.calls == 5 for r in two)  # prefill + 4 steps
    summary = summarize(two)
    assert {s.category for s in summary} == {"cat-a", "cat-b", "all"}
    assert all(s.speedup == pytest.approx(1.0) and s.tau == pytest.approx(1.0) for s in summary)
    assert "| all | ar |" in to_markdown(summary)
    with pytest.raises(ValueError, match="batch"):
        bench_decoders(dec, params, prompts, encoded, max_new_tokens=5, batch=0)
