"""Superposed Decoding (Shen et al. 2024, "Superposed Decoding: Multiple Generations from a
Single Autoregressive Inference Pass", NeurIPS) as a Decoder.

``k`` drafts are kept per prompt, all sharing ONE KV-cache row (one forward per token for the
``k`` drafts together). The steps of the paper's algorithm:

1. *Initial drafts* (``init``): the prompt's forward gives the next-token distribution; its
   top-``m`` tokens (``m = k`` by default), scored with the n-gram interpolation of step 4,
   give the ``k`` best one-token drafts with their scores ``s_i`` (log-probabilities).
2. *Superposition*: the next forward is fed, instead of a token, the weighted sum of the
   ``k`` drafts' last-token embeddings ``x~ = sum_i gamma_i E[x_i]`` with
   ``gamma_i = p_i / sum_j p_j``, ``p_i = exp(s_i)`` the draft's probability (a softmax of the
   scores). Its key/value are committed to the shared cache row.
3. *Expansion*: the one output distribution ``p_LM`` (softmax of the logits / ``temperature``,
   restricted to its top-``m`` tokens and renormalised) extends every draft with each of its
   top-``m`` tokens: ``k * m`` candidates (``k^2`` by default).
4. *N-gram interpolation* (scoring): candidate token ``v`` after draft ``i`` scores
   ``s_i + (1 - alpha) log p_LM(v) + alpha log p_ng(v | draft i)`` with
   ``p_ng(v | ctx) = sum_n lambda_n c(ctx_{n-1} v) / c(ctx_{n-1})`` over the n-gram orders
   ``n`` (``weights[n-1] = lambda_n``), ``ctx_{n-1}`` the last ``n - 1`` tokens of the draft's
   own context (prompt + draft) and ``c`` counts in a corpus; an order whose context is
   unseen (or longer than the draft's context) adds 0. A candidate with ``p_ng = 0`` scores
   ``-inf``, unless no candidate of its draft has n-gram support: then all of them score
   ``s_i + (1 - alpha) log p_LM(v) - penalty`` (the authors' released code: drafts the
   n-grams cannot judge rank below those they can).
5. *Selection*: the ``k`` best candidates are the next drafts (best first). Steps 2-5 repeat.

EOS (the model's ids): a candidate ending in EOS is kept only when it is the best of the
step; the row then ends (the decoder marks it done) with that draft first and the ``k - 1``
best other candidates beside it, so all drafts of a row always have the same length. Other
EOS candidates are dropped (the authors' code moves them to a separate pool of finished
drafts and keeps ``k`` live ones to the maximum length; here a row ends as greedy decoding
does, which makes ``k = 1`` greedy). A draft scored ``-inf`` is padding: fewer than ``k``
candidates had a finite score (it has weight 0 in the superposition). The driver's
``tokens`` show the top-ranked draft (rewritten every step: its earlier tokens may change);
the driver also ends a row at ``max_new_tokens`` or a stop sequence. :func:`generate_drafts`
runs the decoder like ``decodax.generate`` and also returns all ``k`` drafts
(``SuperposedState`` in ``DecodeState.extra``). ``state.calls`` counts target forwards as the other decoders do: the
prefill plus one per step, so ``k`` drafts of ``n`` tokens cost ``n`` forwards, against
``k * n`` for ``k`` separate greedy / sampling runs.

Defaults are the authors' released configuration for ``k = 3`` (RAIVNLab/SuperposedDecoding,
``params/p15_d3_mixed.json``): ``alpha = 0.54``, ``temperature = 0.06``, lambda = 0.01, 0.04,
0.15, 0.18, 0.12 for the 2- to 6-grams (no unigram), ``m = k`` here (their config takes the
top 9 tokens: ``n_candidates=9``). With ``k = 1`` and ``alpha = 0`` it is greedy decoding.
Deterministic: the ``key`` is unused and no ``Sampler`` applies.

The n-gram model (:class:`NgramTable`) lives on device: for every n-gram (``n <= order``)
of the corpus and every context (its first ``n - 1`` tokens, counted where a token follows)
two independent 32-bit hashes (``key``, ``check``) and a count, sorted by (key, check). A
lookup is a ``searchsorted`` on ``key`` and a few probes comparing ``check``, inside jit (no
host round trip). It travels in the params (:func:`with_ngram`, key ``"superposed_ngram"``):
closed over, a multi-megabyte table would be a jit constant. Build it from token arrays
(:func:`build_ngram_table`) or a text file (:func:`ngram_table_from_text`; WikiText-2 valid
with the default tokenizer: :func:`wikitext_ngram_table`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt32

from decodax.decoding.autoregressive import initial_state, run_prompt
from decodax.decoding.state import Decoder, DecodeState
from decodax.kernels import take_rows
from decodax.model import cache as kv

__all__ = [
    "ALPHA",
    "NGRAM_KEY",
    "NGRAM_WEIGHTS",
    "DraftsOutput",
    "NgramTable",
    "SuperposedState",
    "build_ngram_table",
    "generate_drafts",
    "ngram_count",
    "ngram_probs",
    "ngram_table_from_text",
    "superposed",
    "superposed_drafts",
    "superposed_scores",
    "wikitext_ngram_table",
    "with_ngram",
]

NGRAM_KEY = "superposed_ngram"  # where with_ngram puts the table in the params
ALPHA, TEMPERATURE, PENALTY = 0.54, 0.06, 200.0  # the authors' p15_d3 config; their default penalty
NGRAM_WEIGHTS = (0.0, 0.01, 0.04, 0.15, 0.18, 0.12)  # lambda_1 (unigram) .. lambda_6
PROBES = 4  # entries compared after the searchsorted (equal primary hashes are adjacent)
DEFAULT_WIKITEXT = Path("../shared/data/wikitext-2")

_MASK = 0xFFFFFFFF
_M1, _M2, _GOLD = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B1
_CTX, _GRAM = 0, 1  # hash domains: a context (counted where a token follows) / an n-gram


# ---------------------------------------------------------------------------------- n-gram table


@functools.partial(jax.tree_util.register_dataclass, data_fields=["keys", "check", "counts"],
                   meta_fields=["order"])
@dataclasses.dataclass(frozen=True)
class NgramTable:
    """The corpus n-gram counts on device, for ``n = 1 .. order`` (module docstring).

    ``keys`` / ``check``: two 32-bit hashes of each entry (an n-gram, or a context = the first
    ``n - 1`` tokens of an n-gram), sorted by (key, check), padded to a multiple of 1024 with
    count-0 entries; ``counts``: occurrences of the n-gram, or of the context followed by a
    token. ``order`` is static (part of the pytree's structure)."""

    keys: UInt32[Array, " M"]
    check: UInt32[Array, " M"]
    counts: Int[Array, " M"]
    order: int


def _fmix_int(h: int) -> int:
    h &= _MASK
    h ^= h >> 16
    h = (h * _M1) & _MASK
    h ^= h >> 13
    h = (h * _M2) & _MASK
    return h ^ (h >> 16)


def _fmix(h, xp):
    """MurmurHash3's 32-bit finaliser on uint32 arrays (numpy or jax.numpy: both wrap)."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(_M1)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(_M2)
    return h ^ (h >> xp.uint32(16))


def _hashes(tokens, domain: int, xp):
    """Two 32-bit hashes of each sequence ``tokens[..., :L]`` (its length and domain mixed in
    the seed); the same values from numpy (table build) and jax.numpy (lookups)."""
    tokens = tokens.astype(xp.uint32)
    length = tokens.shape[-1]
    out = []
    for which in (1, 2):
        seed = _fmix_int(which * 0x27D4EB2F + length * _GOLD + domain * 0x165667B1 + 0x2545F491)
        h = xp.full(tokens.shape[:-1], seed, xp.uint32)
        for i in range(length):
            h = _fmix((h ^ tokens[..., i]) * xp.uint32(_GOLD), xp)
        out.append(h)
    return out


def _check_order(order, who: str) -> int:
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
        raise ValueError(f"{who}: the n-gram order must be an int >= 1, got {order!r}")
    return int(order)


def _documents(corpus, vocab_size: int | None) -> list[np.ndarray]:
    """The corpus as a list of 1-D int64 token arrays; ValueError for anything else."""
    if isinstance(corpus, (str, bytes)):
        raise ValueError("build_ngram_table: the corpus must be token ids, not text "
                         "(use ngram_table_from_text for a text file)")
    arr = None
    try:
        arr = np.asarray(corpus)
    except (ValueError, TypeError):  # ragged documents
        pass
    if arr is not None and arr.dtype != object and arr.ndim == 1:
        docs = [arr]
    else:
        try:
            docs = [np.asarray(d) for d in corpus]
        except TypeError as e:
            raise ValueError(f"build_ngram_table: the corpus must be a 1-D token array or a sequence "
                             f"of them, got {type(corpus).__name__}") from e
    out = []
    for i, d in enumerate(docs):
        if d.ndim != 1 or (d.size and not np.issubdtype(d.dtype, np.integer)):
            raise ValueError(f"build_ngram_table: document {i} must be a 1-D array of integer token ids, "
                             f"got shape {d.shape} dtype {d.dtype}")
        d = d.astype(np.int64)
        if d.size and (d.min() < 0 or (vocab_size is not None and d.max() >= vocab_size)):
            raise ValueError(f"build_ngram_table: token ids must be in [0, {vocab_size or '2**31'}), "
                             f"document {i} has {int(d.min())} .. {int(d.max())}")
        if d.size:
            out.append(d)
    if not out:
        raise ValueError("build_ngram_table: the corpus has no tokens")
    return out


def build_ngram_table(corpus, order: int, *, vocab_size: int | None = None) -> NgramTable:
    """Count every n-gram (``n = 1 .. order``) of ``corpus`` and its context into an
    :class:`NgramTable` (the n-gram model of Superposed Decoding's interpolation, step 4).

    ``corpus``: a 1-D array of token ids or a sequence of them (documents: n-grams never cross
    a document boundary). Built on the host with numpy, returned as device arrays. Raises
    ``ValueError`` for an order < 1, or a corpus that is not integer token ids (in
    ``[0, vocab_size)`` when given) or has no tokens."""
    order = _check_order(order, "build_ngram_table")
    docs = _documents(corpus, vocab_size)
    packed = []
    for n in range(1, order + 1):
        for d in docs:
            if len(d) < n:
                continue
            win = np.lib.stride_tricks.sliding_window_view(d, n)
            for domain, seq in ((_GRAM, win), (_CTX, win[:, : n - 1])):
                h1, h2 = _hashes(np.ascontiguousarray(seq), domain, np)
                packed.append((h1.astype(np.uint64) << np.uint64(32)) | h2.astype(np.uint64))
    uniq, counts = np.unique(np.concatenate(packed), return_counts=True)
    m = -(-len(uniq) // 1024) * 1024
    pad = m - len(uniq)
    uniq = np.concatenate([uniq, np.full(pad, np.iinfo(np.uint64).max, np.uint64)])
    counts = np.concatenate([counts, np.zeros(pad, counts.dtype)])
    if counts.max() > np.iinfo(np.int32).max:
        raise ValueError("build_ngram_table: a count overflows int32")
    return NgramTable(keys=jnp.asarray((uniq >> np.uint64(32)).astype(np.uint32)),
                      check=jnp.asarray((uniq & np.uint64(_MASK)).astype(np.uint32)),
                      counts=jnp.asarray(counts.astype(np.int32)), order=order)


def _lookup(table: NgramTable, h1: Array, h2: Array) -> Array:
    lo = jnp.searchsorted(table.keys, h1, side="left")
    m = table.keys.shape[0]
    total = jnp.zeros(h1.shape, jnp.int32)
    for j in range(PROBES):
        idx = jnp.minimum(lo + j, m - 1)
        hit = (lo + j < m) & (table.keys[idx] == h1) & (table.check[idx] == h2)
        total = total + jnp.where(hit, table.counts[idx], 0)
    return total


def ngram_count(table: NgramTable, seq: Int[Array, "... L"], *, context: bool = False) -> Int[Array, "..."]:
    """Corpus count of each ``L``-gram ``seq[..., :]`` (``1 <= L <= table.order``), or with
    ``context=True`` the number of times it occurs followed by a token (``0 <= L < order``):
    the denominators of step 4's n-gram probabilities. Jit-compatible."""
    length = seq.shape[-1]
    if not (0 <= length < table.order if context else 1 <= length <= table.order):
        raise ValueError(f"ngram_count: a {'context' if context else 'gram'} of {length} tokens is outside "
                         f"this order-{table.order} table")
    h1, h2 = _hashes(seq, _CTX if context else _GRAM, jnp)
    return _lookup(table, h1, h2)


def ngram_probs(table: NgramTable, tail: Int[Array, "B K C"], tail_len: Int[Array, "B K"],
                cand: Int[Array, "B M"], weights: tuple[float, ...]) -> Float[Array, "B K M"]:
    """Step 4's interpolated n-gram probability ``p_ng(cand[b, j] | draft (b, i))``:
    ``sum_n weights[n-1] * c(ctx_{n-1} v) / c(ctx_{n-1})`` over the orders whose context
    (the last ``n - 1`` of the ``tail_len[b, i]`` valid tokens of ``tail[b, i]``, right-aligned)
    fits and occurs in the corpus. ``len(weights) <= table.order`` and ``<= C + 1``."""
    b, k, c = tail.shape
    m = cand.shape[1]
    if len(weights) > table.order:
        raise ValueError(f"ngram_probs: {len(weights)} interpolation weights need an order-{len(weights)} "
                         f"table, got order {table.order}")
    if len(weights) - 1 > c:
        raise ValueError(f"ngram_probs: {len(weights)} interpolation weights need {len(weights) - 1} context "
                         f"tokens, the tail holds {c}")
    # Every order's context and n-gram hashes in one lookup (one searchsorted: less to compile).
    orders, h1s, h2s = [], [], []
    for n, lam in enumerate(weights, start=1):
        if lam == 0.0:
            continue
        ctx = tail[..., c - (n - 1):] if n > 1 else tail[..., :0]
        grams = jnp.concatenate([jnp.broadcast_to(ctx[:, :, None, :], (b, k, m, n - 1)),
                                 jnp.broadcast_to(cand[:, None, :, None], (b, k, m, 1))], axis=-1)
        for seq, domain in ((ctx, _CTX), (grams, _GRAM)):
            h1, h2 = _hashes(seq, domain, jnp)
            h1s.append(h1.reshape(-1))
            h2s.append(h2.reshape(-1))
        orders.append((n, lam))
    p = jnp.zeros((b, k, m), jnp.float32)
    if not orders:
        return p
    counts = _lookup(table, jnp.concatenate(h1s), jnp.concatenate(h2s))
    at = 0
    for n, lam in orders:
        denom = counts[at: at + b * k].reshape(b, k)
        num = counts[at + b * k: at + b * k * (m + 1)].reshape(b, k, m)
        at += b * k * (m + 1)
        ok = (tail_len >= n - 1) & (denom > 0)
        p = p + jnp.where(ok[..., None], lam * num / jnp.maximum(denom, 1)[..., None], 0.0)
    return p


def superposed_scores(lm_logp: Float[Array, "B M"], cand: Int[Array, "B M"], tail: Int[Array, "B K C"],
                      tail_len: Int[Array, "B K"], table: NgramTable | None, *, alpha: float,
                      weights: tuple[float, ...], penalty: float) -> Float[Array, "B K M"]:
    """Step 4: the score increment of extending draft ``i`` with ``cand[b, j]``:
    ``(1 - alpha) log p_LM + alpha log p_ng`` (``-inf`` where ``p_ng = 0``), or
    ``(1 - alpha) log p_LM - penalty`` for every candidate of a draft none of whose candidates
    has n-gram support. ``table`` None, ``alpha = 0`` or all-zero weights: ``log p_LM``."""
    b, k = tail_len.shape
    lm = jnp.broadcast_to(lm_logp[:, None, :], (b, k, lm_logp.shape[1]))
    if table is None or alpha == 0.0 or not any(weights):
        return lm
    png = ngram_probs(table, tail, tail_len, cand, weights)
    seen = png > 0.0
    interp = (1.0 - alpha) * lm + alpha * jnp.log(jnp.where(seen, png, 1.0))
    fallback = (1.0 - alpha) * lm - penalty
    return jnp.where(jnp.any(seen, axis=-1, keepdims=True), jnp.where(seen, interp, -jnp.inf), fallback)


def with_ngram(params: dict, table: NgramTable) -> dict:
    """``params`` plus the n-gram table under ``"superposed_ngram"`` (traced, not a jit constant)."""
    if not isinstance(table, NgramTable):
        raise ValueError(f"with_ngram expects an NgramTable, got {type(table).__name__}")
    return {**params, NGRAM_KEY: table}


@functools.lru_cache(maxsize=1)
def _default_tokenizer():
    from decodax.model.default import default_model_path
    from decodax.model.gguf import read_gguf
    from decodax.model.tokenizer import Tokenizer

    f = read_gguf(default_model_path())
    return Tokenizer.from_gguf_metadata(f.metadata, path=f.path)


def ngram_table_from_text(path: str | os.PathLike, order: int = len(NGRAM_WEIGHTS), *, tokenizer=None,
                          max_chars: int | None = None) -> NgramTable:
    """The n-gram table of a text file: each non-empty line tokenized (no special tokens) with
    ``tokenizer`` (default: the default model's, SmolLM2) as one document. ``max_chars``
    reads only the file's beginning. FileNotFoundError when the file is absent."""
    order = _check_order(order, "ngram_table_from_text")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ngram_table_from_text: {path} is not a file")
    text = path.read_text(encoding="utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    tok = tokenizer if tokenizer is not None else _default_tokenizer()
    docs = [np.asarray(ids, np.int64) for ids in tok.encode_batch(lines, add_special_tokens=False) if ids]
    return build_ngram_table(docs, order, vocab_size=tok.vocab_size)


@functools.lru_cache(maxsize=4)
def wikitext_ngram_table(split: str = "valid", order: int = len(NGRAM_WEIGHTS),
                         root: str | None = None) -> NgramTable:
    """WikiText-2 ``split`` (``{root}/{split}.txt``, default ``../shared/data/wikitext-2``)
    tokenized with the default tokenizer: the table the registered ``superposed`` method uses.
    Memoised."""
    return ngram_table_from_text(Path(root or DEFAULT_WIKITEXT) / f"{split}.txt", order)


# ---------------------------------------------------------------------------------- decoder


class SuperposedState(NamedTuple):
    """The ``k`` drafts of every row, best first: ``drafts[b, i, :length[b]]`` with score
    ``scores[b, i]`` (summed step-4 increments: a log-probability), and ``tail[b, i]`` the last
    ``C`` tokens of the draft's context (prompt + draft, right-aligned; ``min(C, prompt_len +
    length)`` of them valid) for the n-gram lookups."""

    drafts: Int[Array, "B K N"]
    length: Int[Array, " B"]
    scores: Float[Array, "B K"]
    tail: Int[Array, "B K C"]


def superposed_drafts(state: DecodeState) -> tuple[Int[Array, "B K N"], Int[Array, " B"], Float[Array, "B K"]]:
    """``(drafts, lengths, scores)`` of a superposed ``DecodeState``: all ``k`` drafts,
    ``drafts[b, i, :lengths[b]]``, best first (draft 0 is the driver's ``tokens``)."""
    ex = state.extra
    if not isinstance(ex, SuperposedState):
        raise ValueError("superposed_drafts expects the state of a superposed() decoder")
    return ex.drafts, ex.length, ex.scores


def _check(k, alpha, weights, temperature, n_candidates, penalty, vocab):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
        raise ValueError(f"superposed: k must be an int in [1, {vocab}], got {k!r}")
    k = int(k)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"superposed: the interpolation weight alpha must be in [0, 1], got {alpha!r}")
    try:
        weights = tuple(float(w) for w in weights)
    except (TypeError, ValueError) as e:
        raise ValueError(f"superposed: weights must be a sequence of floats (lambda_1 .. lambda_N), "
                         f"got {weights!r}") from e
    if len(weights) < 1:
        raise ValueError("superposed: the n-gram order (len(weights)) must be >= 1, got 0 weights")
    if any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"superposed: n-gram interpolation weights must be in [0, 1], got {weights!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not 0.0 < temperature < math.inf):
        raise ValueError(f"superposed: temperature must be a float > 0, got {temperature!r}")
    m = k if n_candidates is None else n_candidates
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not k <= m <= vocab:
        raise ValueError(f"superposed: n_candidates must be an int in [k, {vocab}], got {n_candidates!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not 0.0 <= penalty < math.inf:
        raise ValueError(f"superposed: penalty must be a finite float >= 0, got {penalty!r}")
    return k, float(alpha), weights, float(temperature), int(m), float(penalty)


def superposed(model, *, k: int = 3, alpha: float = ALPHA, weights: Sequence[float] = NGRAM_WEIGHTS,
               temperature: float = TEMPERATURE, n_candidates: int | None = None,
               penalty: float = PENALTY) -> Decoder:
    """Superposed Decoding (module docstring): ``k`` drafts from one forward per token.

    ``alpha`` in [0, 1] weighs the n-gram model against the LM (step 4); ``weights`` =
    ``lambda_1 .. lambda_N`` (each in [0, 1]) are the n-gram orders' interpolation weights
    (``N = len(weights)`` >= 1 is the order the table needs); ``temperature`` > 0 scales the
    logits; ``n_candidates`` (>= k, default k) tokens extend each draft; ``penalty`` >= 0 is
    subtracted from drafts without n-gram support. Unless ``alpha = 0`` or all weights are 0,
    the params must hold an :class:`NgramTable` of order >= N (:func:`with_ngram`). Memoised.
    Raises ``ValueError`` on bad arguments."""
    args = _check(k, alpha, weights, temperature, n_candidates, penalty, model.config.vocab_size)
    return _superposed(model, *args)


@functools.lru_cache(maxsize=32)
def _superposed(model, k: int, alpha: float, weights: tuple[float, ...], temperature: float, m: int,
                penalty: float) -> Decoder:
    eos = tuple(int(e) for e in model.config.eos_ids)
    c = max(len(weights) - 1, 1)  # context tokens kept per draft
    uses_ngram = alpha > 0.0 and any(weights)

    def table_of(params) -> NgramTable | None:
        if not uses_ngram:
            return None
        table = params.get(NGRAM_KEY) if isinstance(params, dict) else None
        if not isinstance(table, NgramTable):
            raise ValueError("superposed: the params hold no n-gram table; add one with "
                             "with_ngram(params, build_ngram_table(corpus, order)) (or use alpha=0)")
        if table.order < len(weights):
            raise ValueError(f"superposed: {len(weights)} interpolation weights need an n-gram table of order "
                             f">= {len(weights)}, got {table.order}")
        return table

    def is_eos(tok):
        return jnp.isin(tok, jnp.asarray(eos, jnp.int32)) if eos else jnp.zeros(tok.shape, bool)

    def candidates(logits):
        """Step 3: the top-m tokens of the one distribution and their renormalised log p_LM."""
        logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
        top, cand = jax.lax.top_k(logp, m)
        return top - jax.nn.logsumexp(top, axis=-1, keepdims=True), cand.astype(jnp.int32)

    def shift_in(tail, tok):
        return jnp.concatenate([tail[..., 1:], tok[..., None]], axis=-1)

    def select(total, tok):
        """Steps 5 and 1: the ``k`` best of ``total[B, X]`` (candidate tokens ``tok[B, X]``); an
        EOS candidate survives only as the best of all. Returns (scores, flat indices)."""
        best = jnp.argmax(total, axis=-1)[:, None]
        drop = is_eos(tok) & (jnp.arange(total.shape[1])[None, :] != best)
        return jax.lax.top_k(jnp.where(drop, -jnp.inf, total), k)

    def show(state: DecodeState, ex: SuperposedState, active) -> DecodeState:
        """The driver's view: the top-ranked draft; the row ends when it ends with EOS."""
        best, n = ex.drafts[:, 0], ex.length
        last = jnp.take_along_axis(best, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        return dataclasses.replace(
            state, extra=ex,
            tokens=jnp.where(active[:, None], best[:, : state.tokens.shape[1]], state.tokens),
            num_generated=jnp.where(active, n, state.num_generated),
            last_token=jnp.where(active, last, state.last_token),
            done=state.done | (active & is_eos(last)))

    def init(params, prompt, prompt_len, key, *, max_new_tokens, capacity):
        table = table_of(params)
        b, p = prompt.shape
        width = max_new_tokens + 1
        out, cache = run_prompt(model, params, prompt, prompt_len, capacity)
        idx = prompt_len[:, None] - c + jnp.arange(c)[None, :]
        tail0 = jnp.where(idx >= 0, jnp.take_along_axis(prompt, jnp.clip(idx, 0, p - 1), axis=1), 0)
        # Step 1: the k best of the prompt distribution's top-m tokens (one shared context).
        lm, cand = candidates(out.logits[:, 0])
        s = superposed_scores(lm, cand, tail0[:, None], jnp.minimum(prompt_len, c)[:, None], table,
                              alpha=alpha, weights=weights, penalty=penalty)[:, 0]
        scores, j = select(s, cand)
        tok = jnp.take_along_axis(cand, j, axis=1)
        ex = SuperposedState(drafts=jnp.zeros((b, k, width), jnp.int32).at[:, :, 0].set(tok),
                             length=jnp.ones((b,), jnp.int32), scores=scores,
                             tail=shift_in(jnp.broadcast_to(tail0[:, None], (b, k, c)), tok))
        state = initial_state(prompt, prompt_len, cache, key, width=width)
        return show(state, ex, jnp.ones((b,), bool))

    def step(params, state: DecodeState) -> DecodeState:
        table = table_of(params)
        ex: SuperposedState = state.extra
        active = ~state.done
        b, _, width = ex.drafts.shape
        # Step 2: one forward of the superposition of the drafts' last-token embeddings,
        # gamma = softmax(scores) = p_i / sum_j p_j.
        gamma = jax.nn.softmax(ex.scores, axis=-1)
        last = jnp.take_along_axis(ex.drafts, jnp.maximum(ex.length - 1, 0)[:, None, None], axis=2)[..., 0]
        embeds = jnp.sum(gamma[..., None] * take_rows(params["embed"], last), axis=1)[:, None, :]
        out = model.apply(params, None, state.cache.length[:, None], state.cache, embeds=embeds)
        # Steps 3-4: k * m candidates scored with the n-gram interpolation over each draft's context.
        lm, cand = candidates(out.logits[:, 0])
        s = superposed_scores(lm, cand, ex.tail, jnp.minimum(state.prompt_len + ex.length, c)[:, None], table,
                              alpha=alpha, weights=weights, penalty=penalty)
        total = (ex.scores[..., None] + s).reshape(b, k * m)
        # Step 5: the k best candidates become the drafts.
        scores, flat = select(total, jnp.tile(cand, (1, k)))
        parent, j = flat // m, flat % m
        tok = jnp.take_along_axis(cand, j, axis=1)
        drafts = jnp.take_along_axis(ex.drafts, parent[..., None], axis=1)
        drafts = jnp.where(jnp.arange(width)[None, None, :] == ex.length[:, None, None], tok[..., None], drafts)
        tail = shift_in(jnp.take_along_axis(ex.tail, parent[..., None], axis=1), tok)
        new = SuperposedState(drafts=drafts, length=ex.length + 1, scores=scores, tail=tail)
        new = jax.tree.map(lambda n_, o: jnp.where(active.reshape((b,) + (1,) * (n_.ndim - 1)), n_, o), new, ex)
        state = dataclasses.replace(state, cache=kv.commit(out.cache, active.astype(jnp.int32)),
                                    calls=state.calls + active)
        return show(state, new, active)

    name = f"superposed(k={k}, alpha={alpha:g}, n={len(weights)}, T={temperature:g}, m={m})"
    return Decoder(init=init, step=step, model=model, max_step_tokens=1, name=name)


# ---------------------------------------------------------------------------------- runner


class DraftsOutput(NamedTuple):
    """``generate_drafts``' result: the driver's view (the top-ranked draft per row: tokens,
    lengths, calls, steps as ``decodax.generate`` gives them) and all ``k`` drafts."""

    tokens: np.ndarray  # int32[B, max_new_tokens]
    lengths: np.ndarray  # int32[B]
    calls: np.ndarray  # int32[B] target forwards (prefill included)
    steps: int
    drafts: np.ndarray  # int32[B, k, max_new_tokens + 1], row b's valid up to draft_lengths[b]
    draft_lengths: np.ndarray  # int32[B] (a row's drafts have one length)
    scores: np.ndarray  # float32[B, k], best first

    def rows(self) -> list[list[int]]:
        return [self.tokens[b, : self.lengths[b]].tolist() for b in range(len(self.lengths))]

    def all_drafts(self) -> list[list[list[int]]]:
        """Per row, its ``k`` drafts as token lists (best first)."""
        return [[self.drafts[b, i, : self.draft_lengths[b]].tolist() for i in range(self.drafts.shape[1])]
                for b in range(self.drafts.shape[0])]


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "capacity"))
def _run_drafts(decoder: Decoder, params, prompt, prompt_len, key, eos, stops, budget, *, max_new_tokens, capacity):
    from decodax.decoding.driver import _finish  # the driver's own EOS / stop / length rule

    n_max = jnp.minimum(budget, max_new_tokens)
    state0 = decoder.init(params, prompt, prompt_len, key, max_new_tokens=max_new_tokens, capacity=capacity)
    empty = dataclasses.replace(state0, num_generated=jnp.zeros_like(state0.num_generated),
                                done=jnp.zeros_like(state0.done))
    state = _finish(state0, empty, eos, stops, n_max, decoder.max_step_tokens)

    def body(s):
        nxt = dataclasses.replace(decoder.step(params, s), steps=s.steps + 1)
        return _finish(nxt, s, eos, stops, n_max, decoder.max_step_tokens)

    state = jax.lax.while_loop(lambda s: jnp.any(~s.done) & (s.steps < max_new_tokens), body, state)
    ex = state.extra
    return (state.tokens[:, :max_new_tokens], state.num_generated, state.calls, state.steps, ex.drafts,
            ex.length, ex.scores)


def generate_drafts(decoder: Decoder, params, prompts, *, max_new_tokens: int, key: PRNGKeyArray | None = None,
                    eos_ids: Sequence[int] | None = None, stop_sequences: Sequence[Sequence[int]] = (),
                    capacity: int | None = None, pad_to: int = 32, budget: int | None = None) -> DraftsOutput:
    """``decodax.generate`` for a :func:`superposed` decoder that also returns all ``k`` drafts
    (same prompt padding, capacity bucketing and EOS / stop / length rules, one jitted call)."""
    from decodax.decoding.driver import _stop_table, pad_prompts, round_up

    if not decoder.name.startswith("superposed("):
        raise ValueError(f"generate_drafts expects a superposed() decoder, got {decoder.name!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    prompt, lengths = pad_prompts(prompts, pad_to=pad_to)
    config = decoder.model.config
    if prompt.size and (prompt.min() < 0 or prompt.max() >= config.vocab_size):
        raise ValueError(f"token ids must be in [0, {config.vocab_size}) for this model's vocabulary")
    eos_ids = config.eos_ids if eos_ids is None else eos_ids
    needed = int(lengths.max()) + max_new_tokens + decoder.max_step_tokens
    if needed > config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens exceeds the model's context length {config.max_seq_len}")
    if capacity is None:
        capacity = round_up(max(needed, prompt.shape[1]), 128)
    elif needed > capacity:
        raise ValueError(f"cache capacity {capacity} is too small: {needed} slots needed")
    res = _run_drafts(decoder, params, jnp.asarray(prompt), jnp.asarray(lengths),
                      jax.random.key(0) if key is None else key, jnp.asarray(np.array(list(eos_ids), np.int32)),
                      jnp.asarray(_stop_table(stop_sequences)),
                      jnp.int32(max_new_tokens if budget is None else budget),
                      max_new_tokens=max_new_tokens, capacity=capacity)
    tokens, n, calls, steps, drafts, dlen, scores = (np.asarray(x) for x in res)
    return DraftsOutput(tokens=tokens, lengths=n, calls=calls, steps=int(steps), drafts=drafts,
                        draft_lengths=dlen, scores=scores)
