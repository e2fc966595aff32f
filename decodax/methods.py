"""Registry of decoding methods by name, for the CLI and the benchmark."""

from __future__ import annotations

from typing import Callable

from decodax import sampling
from decodax.decoding import Decoder, autoregressive

# name -> factory(model, params, sampler) -> Decoder
METHODS: dict[str, Callable[..., Decoder]] = {
    "ar": lambda model, params, sampler: autoregressive(model, sampler),
}


def register(name: str, factory: Callable[..., Decoder]) -> None:
    """Add a method factory ``(model, params, sampler) -> Decoder`` under ``name``."""
    METHODS[name] = factory


def make_decoder(name: str, model, params, sampler: sampling.Sampler | None = None) -> Decoder:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](model, params, sampler or sampling.make_sampler(temperature=0.0))


def _speculative_factory(make_drafter, k: int, widths: tuple[int, ...] | None = None):
    def factory(model, params, sampler):
        from decodax.speculative.decoder import speculative

        return speculative(model, make_drafter(model), k=k, sampler=sampler, widths=widths)

    return factory


def _pld(model):
    from decodax.speculative.drafters import prompt_lookup

    return prompt_lookup(ngram=3)


def _ee(model):
    from decodax.speculative.drafters import early_exit_drafter

    return early_exit_drafter(model, min(8, model.config.n_layers))


# Chain speculative decoding: prompt lookup (Saxena 2023) and a self-speculative
# early-exit draft (the target's first 8 layers + LM head).
register("pld", _speculative_factory(_pld, k=4))
register("ee-draft", _speculative_factory(_ee, k=4))


def _del(model):
    from decodax.speculative.dynamic_exit import dynamic_exit_drafter

    layers = tuple(l for l in (4, 6, 8, 10, 12) if l < model.config.n_layers) or (1,)
    return dynamic_exit_drafter(model, layers, k=4)


# DEL (Zarch et al. 2025): the exit layer (4..12) and draft length (0..4) chosen every step
# from shadow-token acceptance rates; "ee-draft" (exit 8, k = 4) is its static baseline.
register("del", _speculative_factory(_del, k=4, widths=(1, 2, 3, 4)))


def _draft(model):
    from decodax.speculative.draft_model import FirstLayers, draft_model_drafter, first_layers_model

    n = min(4, model.config.n_layers)
    return draft_model_drafter(model, first_layers_model(model, n), draft_params=FirstLayers(n))


# Draft-model speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a
# separate draft = the target's first 4 layers + final norm + LM head, with its
# own KV cache (unlike "ee-draft", which drafts into a copy of the target's).
register("draft", _speculative_factory(_draft, k=4))


def _tree_factory(make_drafter):
    def factory(model, params, sampler):
        from decodax.speculative.tree_decoder import tree_speculative

        return tree_speculative(model, make_drafter(model), sampler=sampler)

    return factory


# Tree size for the registered tree methods. The papers use ~40-80 nodes on GPUs,
# where a forward of 80 tokens costs about one of 1; on a 2-core CPU the verify
# forward is compute-bound beyond ~8 tokens (cost(16)/cost(1) ~ 3), so the
# registry uses 8-node trees. Build larger ones with ``tr_template(num_nodes=...)``.
CPU_TREE_NODES = 8


def _tr(model):
    from decodax.speculative.token_recycling import token_recycling, tr_template

    return token_recycling(model.config.vocab_size, template=tr_template(num_nodes=CPU_TREE_NODES))


def _aded(model):
    from decodax.speculative.aded import aded, aded_template

    return aded(template=aded_template(num_nodes=CPU_TREE_NODES))


# Tree speculative decoding with training-free tree drafters: Token Recycling
# (Luo et al. 2024; adjacency matrix of recycled top-8 candidates) and ADED
# (Liu et al. 2024; adaptive tri-gram table, PUCT-ranked children).
register("tr", _tree_factory(_tr))
register("aded", _tree_factory(_aded))


# Trained draft heads: Medusa (Cai et al. 2024) and Hydra (Ankner et al. 2024), loaded from
# ``$DECODAX_HEADS_DIR/<name>`` (default ``experiments/checkpoints/<name>``, written by
# ``experiments/train_draft_heads.py``). Their params join the target's under "draft_heads".
HEADS_DIR_ENV = "DECODAX_HEADS_DIR"

# name -> hook(model, params) -> params: what a method needs added to the target params
PARAMS_HOOKS: dict[str, Callable] = {}


def method_params(name: str, model, params):
    """The params to decode ``name`` with: the target's, plus whatever the method loads."""
    return PARAMS_HOOKS[name](model, params) if name in PARAMS_HOOKS else params


def heads_dir(name: str) -> str:
    import os

    return os.path.join(os.environ.get(HEADS_DIR_ENV, os.path.join("experiments", "checkpoints")), name)


def _load_heads(name: str):
    from decodax.heads import load_heads

    return load_heads(heads_dir(name))


def _heads_method(name: str):
    def factory(model, params, sampler):
        from decodax.heads import draft_heads_drafter
        from decodax.speculative.token_recycling import tr_template
        from decodax.speculative.tree_decoder import tree_speculative

        heads, _ = _load_heads(name)
        template = tr_template(num_nodes=CPU_TREE_NODES, width=3, max_depth=heads.num_heads)
        return tree_speculative(model, draft_heads_drafter(model, heads, template), sampler=sampler)

    def hook(model, params):
        from decodax.heads import with_head_params

        return with_head_params(params, _load_heads(name)[1])

    register(name, factory)
    PARAMS_HOOKS[name] = hook


_heads_method("medusa")
_heads_method("hydra")


# A distilled draft (the target's first layers fine-tuned by KD) and SpecDec++ (its acceptance
# head stops drafting), loaded from ``$DECODAX_HEADS_DIR/distilled`` (written by
# ``experiments/train_draft_model.py``). The draft joins the target params under "draft".
def _load_draft(model, params):
    from decodax.speculative.distill import load_draft

    return load_draft(heads_dir("distilled"), model, params, packed=True)


def _draft_config():
    import json
    import os

    path = os.path.join(heads_dir("distilled"), "draft.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"draft model checkpoint incomplete: {path} does not exist "
                                f"(train it with experiments/train_draft_model.py)")
    with open(path) as f:
        return json.load(f)


def _distilled_method(name: str, specdecpp: bool):
    def factory(model, params, sampler):
        from decodax.speculative.decoder import speculative
        from decodax.speculative.draft_model import draft_model_drafter, first_layers_model

        cfg = _draft_config()
        draft = first_layers_model(model, int(cfg["n_layers"]))
        if not specdecpp:
            return speculative(model, draft_model_drafter(model, draft), k=4, sampler=sampler)
        k = int(cfg.get("k", 6))
        drafter = draft_model_drafter(model, draft, stop_threshold=float(cfg["stop_threshold"]))
        return speculative(model, drafter, k=k, sampler=sampler, widths=tuple(range(1, k + 1)))

    def hook(model, params):
        from decodax.speculative.draft_model import with_draft_params

        _, dparams, _ = _load_draft(model, params)
        return with_draft_params(params, dparams)

    register(name, factory)
    PARAMS_HOOKS[name] = hook


_distilled_method("distilled", specdecpp=False)
_distilled_method("specdec++", specdecpp=True)


def _pearl_factory(model, params, sampler):
    from decodax.speculative.draft_model import first_layers_model
    from decodax.speculative.pearl import pearl

    draft = first_layers_model(model, int(_draft_config()["n_layers"]))
    return pearl(model, draft, k=4, sampler=sampler)


# PEARL (Liu et al. 2025): the distilled draft with pre-verify / post-verify; "distilled" (the
# same draft, vanilla draft-then-verify, k = 4) is its baseline.
register("pearl", _pearl_factory)
PARAMS_HOOKS["pearl"] = PARAMS_HOOKS["distilled"]


# Jacobi decoding (Santilli et al. 2023; with a sampling sampler it is Speculative Jacobi
# Decoding, Teng et al. 2024) and lookahead decoding (Fu et al. 2024). Small sizes for the
# 2-core CPU, where a forward of T = 4 / 8 / 16 tokens measured 1.28x / 2.3x / 4.2x one of T = 1.
JACOBI_WINDOW = 4
LOOKAHEAD_WNG = (4, 3, 2)  # W, N, G: 1 + G (N - 1) + (W - 1) + (N - 2) W = 12 tokens per step


def _jacobi_factory(model, params, sampler):
    from decodax.jacobi import NgramInit, jacobi

    return jacobi(model, window=JACOBI_WINDOW, init=NgramInit(2), sampler=sampler)


def _lookahead_factory(model, params, sampler):
    from decodax.jacobi.lookahead import lookahead

    w, n, g = LOOKAHEAD_WNG
    return lookahead(model, window=w, ngram=n, guesses=g, sampler=sampler)


register("jacobi", _jacobi_factory)
register("lookahead", _lookahead_factory)
