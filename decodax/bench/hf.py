"""HF transformers (PyTorch CPU) baselines on the same GGUF file, for `bench --compare-hf`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def load_hf(gguf_path: str | Path):
    """Load the HF transformers model of a GGUF file in float32 (needs torch, transformers)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "--compare-hf needs the dev extra: pip install -e '.[dev]' (torch, transformers, accelerate)"
        ) from e
    path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    return model


def hf_generator(model, max_new_tokens: int, eos_ids, prompt_lookup: int | None = None
                 ) -> Callable[[list[int]], tuple[list[int], int]]:
    """``fn(ids) -> (new token ids, model forwards)``: HF greedy or prompt-lookup decoding."""
    import torch

    calls = {"n": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    def fn(ids):
        calls["n"] = 0
        x = torch.tensor([ids])
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos_ids),
                      pad_token_id=list(eos_ids)[0], attention_mask=torch.ones_like(x))
        if prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = prompt_lookup
        with torch.inference_mode():
            out = model.generate(x, **kwargs)
        return out[0, len(ids):].tolist(), calls["n"]

    return fn
