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


# Quality-oriented strategies (decodax.strategies); both deterministic, the sampler is not used.
# Beam search: width 4, HF's defaults (length_penalty 1.0, early_stopping False), the model's EOS.
# Contrastive search (Su et al. 2022): HF's example values top_k = 4, penalty_alpha = 0.6.
BEAM_WIDTH = 4
CONTRASTIVE_K, CONTRASTIVE_ALPHA = 4, 0.6


def _beam_factory(model, params, sampler):
    from decodax.strategies import beam_search

    return beam_search(model, BEAM_WIDTH)


def _contrastive_factory(model, params, sampler):
    from decodax.strategies import contrastive_search

    return contrastive_search(model, k=CONTRASTIVE_K, alpha=CONTRASTIVE_ALPHA)


register("beam", _beam_factory)
register("contrastive", _contrastive_factory)


# Contrastive decoding (Li et al. 2023): alpha = 0.1 (the paper's), greedy over the score (a
# sampling sampler samples from it); the amateur is the target's own first 8 of 30 layers + final
# norm + LM head (an early exit read off the expert's forward: one forward per token). Layer 8
# (~1/4 of the depth, as "ee-draft") is a guess, not tuned. USCD needs the caller's lame prompts
# (decodax.strategies.with_lame_prompts), so it is not registered.
# Momentum decoding (Lan et al. 2022): the authors' k = 5, alpha = 0.2 and resistance table.
CD_EXIT_LAYER, CD_ALPHA = 8, 0.1


def _contrastive_decoding_factory(model, params, sampler):
    from decodax.strategies import contrastive_decoding

    return contrastive_decoding(model, exit_layer=min(CD_EXIT_LAYER, model.config.n_layers - 1), alpha=CD_ALPHA,
                                sampler=sampler)


def _momentum_factory(model, params, sampler):
    from decodax.strategies import momentum

    return momentum(model)


register("contrastive-decoding", _contrastive_decoding_factory)
register("momentum", _momentum_factory)


# Entropy-gated strategies (decodax.strategies.cautious / adadec / entropy_adaptive).
# CNTP (Wang et al. 2025): the authors' H_low = 0.01, H_high = 1.5, N_max = 10 and punctuation set
# (SmolLM2's ids; none for another vocabulary); trials capped at 16 tokens (ours). CNTP samples: a
# greedy sampler (the CLI default) is replaced by temperature 0.8 / top-p 0.95 (the authors' scripts).
# AdaDec (He et al. 2025): threshold 2.20 nats is SmolLM2-135M's, learned by adadec.fit_threshold from
# 509 teacher-forced positions of Spec-Bench translation items 1-20 (experiments/strategy_table.py; the
# authors learned 0.62 .. 1.32 for their larger code models); refit for another model or task.
# k = 3 candidates and a 5-token lookahead are guesses, not tuned.
# EAD: the target's first 20 of 30 layers as the small model; the large model takes a token when the mean
# entropy of the last 4 small-model distributions is >= 0.5 nats. Measured here (CPU, SmolLM2, two
# prompts, teacher-forced text of 96 tokens): the raw early exits agree with the full model's argmax on
# only 5% (layer 8) .. 20% (layer 20) of positions and their entropies sit low (median ~1.1 nats), so at
# exit 8 / threshold 2.0 the large model never ran and the text degenerated; at exit 20 the thresholds
# 0 / 0.5 / 1.0 / 1.5 gave 100% / ~85% / ~60% / ~5% large-model tokens, with coherent text only near
# the top. A trained small model would do better; these values are not tuned beyond that.
CNTP_ENTROPY, CNTP_TRIALS, CNTP_TRIAL_LEN = (0.01, 1.5), 10, 16
ADADEC_THRESHOLD, ADADEC_K, ADADEC_LOOKAHEAD = 2.2, 3, 5
EAD_EXIT_LAYER, EAD_THRESHOLD, EAD_WINDOW = 20, 0.5, 4


def _cntp_factory(model, params, sampler):
    from decodax.strategies.cautious import CNTP_PUNCTUATION_SMOLLM2, cautious

    if sampler.is_greedy:
        sampler = sampling.make_sampler(temperature=0.8, top_p=0.95)
    punct = CNTP_PUNCTUATION_SMOLLM2 if model.config.vocab_size == 49152 else ()
    low, high = CNTP_ENTROPY
    return cautious(model, entropy_low=low, entropy_high=high, max_trials=CNTP_TRIALS,
                    max_trial_len=CNTP_TRIAL_LEN, punctuation=punct, sampler=sampler)


def _adadec_factory(model, params, sampler):
    from decodax.strategies.adadec import adadec

    return adadec(model, ADADEC_THRESHOLD, k=ADADEC_K, lookahead=ADADEC_LOOKAHEAD)


def _ead_factory(model, params, sampler):
    from decodax.strategies.entropy_adaptive import entropy_adaptive

    return entropy_adaptive(model, exit_layer=max(1, min(EAD_EXIT_LAYER, model.config.n_layers - 1)),
                            threshold=EAD_THRESHOLD, window=EAD_WINDOW, sampler=sampler)


register("cntp", _cntp_factory)
register("adadec", _adadec_factory)
register("ead", _ead_factory)


# Superposed Decoding (Shen et al. 2024): k = 3 drafts for one forward per token, the authors'
# released k = 3 configuration (alpha 0.54, temperature 0.06, 2- to 6-gram weights); the n-gram
# table is WikiText-2 valid tokenized with the default tokenizer (decodax.strategies.superposed.
# wikitext_ngram_table), added to the params under "superposed_ngram" by its params hook. The
# driver's output is the top-ranked draft; superposed.generate_drafts returns all k.
SUPERPOSED_K = 3


def _superposed_factory(model, params, sampler):
    from decodax.strategies import superposed

    return superposed(model, k=SUPERPOSED_K)


def _superposed_params(model, params):
    from decodax.strategies.superposed import wikitext_ngram_table, with_ngram

    if model.config.vocab_size != 49152:  # the table's ids are the default (SmolLM2) tokenizer's
        raise ValueError("superposed: the registered method's n-gram table is tokenized for the default "
                         "model; build one for this vocabulary with build_ngram_table / with_ngram")
    table = wikitext_ngram_table()
    return with_ngram(params, table)


register("superposed", _superposed_factory)
PARAMS_HOOKS["superposed"] = _superposed_params
