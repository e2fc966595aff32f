"""Exactness tests of the speculative verifiers.

Every sampling verifier is checked two ways against a *context-dependent* target
(a random next-token table ``P[prefix]`` over every prefix of a tiny vocabulary;
the drafter is another random table ``Q[prefix]``):

1. exact law: an independent numpy re-implementation of the algorithm computes
   the law of the emitted sequence by enumerating every draft outcome and every
   accept / reject branch analytically; it must equal the target law (1e-9);
2. Monte Carlo of the JAX verifier itself: 1e5 rows (SpecTr 2e5) in one jitted
   batch (drafting and completion are numpy, so only the verifier is compiled);
   the law of the first ``T = 3`` emitted tokens (completed by plain target
   sampling when a round emits fewer) and the
   per-position conditional laws (token ``t`` given the prefix, on the rows whose
   round itself emitted position ``t``) pass chi-square tests at p > 1e-3.

Each test has a negative control: the same harness with a deliberately wrong
verifier (residual without subtraction, unnormalised residual, a K-SEQ with
the single-draft residual, RSD drafts verified with the i.i.d. rule) must be
rejected (p < 1e-3, and the exact law must be off by > 1e-3).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

from decodax.speculative import trees
from decodax.speculative import verify as vf
from decodax.speculative import (
    sample_without_replacement,
    spectr_rho,
    verify_greedy,
    verify_multi_draft,
    verify_recursive,
    verify_sampling,
    verify_tree_greedy,
    verify_tree_sampling,
)

VOCAB = 4
T = 3  # compare the law of the first T emitted tokens
N_MC = 100_000  # rows per Monte Carlo test (SpecTr: twice that, its negative control is subtler)
ALPHA = 1e-3

CHAIN_K = 3
TREE = trees.tree_from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)])
RSD_TREE = trees.tree_from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0)])
SPECTR_M, SPECTR_K, SPECTR_V = 3, 2, 3


# =============================================================================== tiny LMs


class PrefixTable:
    """Next-token distributions for every prefix of length <= max_len over a tiny vocabulary."""

    def __init__(self, probs: np.ndarray, vocab: int, max_len: int):
        self.probs = probs
        self.vocab = vocab
        self.offsets = np.array([sum(vocab**j for j in range(n)) for n in range(max_len + 2)])

    def code(self, prefix) -> int:
        c = 0
        for tok in prefix:
            c = c * self.vocab + int(tok)
        return int(self.offsets[len(prefix)] + c)

    def __call__(self, prefix) -> np.ndarray:
        return self.probs[self.code(prefix)]


def random_table(seed: int, vocab: int, max_len: int, alpha: float, zero_frac: float) -> PrefixTable:
    rng = np.random.default_rng(seed)
    n = sum(vocab**j for j in range(max_len + 1))
    probs = rng.dirichlet(np.full(vocab, alpha), size=n)
    zero = rng.random((n, vocab)) < zero_frac
    zero[np.arange(n), probs.argmax(1)] = False
    probs = np.where(zero, 0.0, probs).astype(np.float32).astype(np.float64)
    probs /= probs.sum(1, keepdims=True)
    return PrefixTable(probs, vocab, max_len)


MAX_LEN = 4
# "rbg" keys: XLA's RngBitGenerator compiles ~4x faster than threefry on CPU
KEY0 = jax.random.key(0, impl="rbg")
KEY1 = jax.random.key(1, impl="rbg")
P_TAB = random_table(1, VOCAB, MAX_LEN, alpha=1.0, zero_frac=0.15)  # target: some zero entries
Q_TAB = random_table(2, VOCAB, MAX_LEN, alpha=0.7, zero_frac=0.1)  # drafter
Q_FULL = random_table(3, VOCAB, MAX_LEN, alpha=0.8, zero_frac=0.0)  # full support (RSD)
P_S = random_table(4, SPECTR_V, MAX_LEN, alpha=1.0, zero_frac=0.1)
Q_S = random_table(5, SPECTR_V, MAX_LEN, alpha=1.0, zero_frac=0.0)


def target_law(p: PrefixTable) -> np.ndarray:
    """Law of the first T tokens of autoregressive sampling, indexed base-V (first token major)."""
    law = np.zeros(p.vocab**T)
    for seq in itertools.product(range(p.vocab), repeat=T):
        law[np.ravel_multi_index(seq, (p.vocab,) * T)] = np.prod([p(seq[:t])[seq[t]] for t in range(T)])
    return law


# =========================================================== exact numpy reference algorithms


def _onehot(x, v):
    e = np.zeros(v)
    e[x] = 1.0
    return e


def _residual_np(p, q, bug=None):
    if bug == "no_subtract":
        return p
    r = np.maximum(p - q, 0.0)
    if bug == "no_renorm":
        return r
    s = r.sum()
    return r / s if s > 0 else p


class Completion:
    """Law of the first T tokens given an emitted prefix, completed by target sampling."""

    def __init__(self, p: PrefixTable):
        self.p = p

    @functools.lru_cache(maxsize=None)  # noqa: B019 (test-local tables)
    def __call__(self, seq: tuple) -> np.ndarray:
        v = self.p.vocab
        if len(seq) >= T:
            return _onehot(np.ravel_multi_index(seq[:T], (v,) * T), v**T)
        dist = self.p(seq)
        return sum(dist[y] * self(seq + (y,)) for y in range(v) if dist[y] > 0)

    def emit(self, prefix: tuple, dist: np.ndarray) -> np.ndarray:
        if dist.sum() == 0:  # only reachable by the buggy (unnormalised) residuals
            dist = self.p(prefix)
        dist = dist / dist.sum()
        return sum(dist[y] * self(prefix + (y,)) for y in range(len(dist)) if dist[y] > 0)


def ref_tree_law(p: PrefixTable, q: PrefixTable, parents, mode: str, bug=None) -> np.ndarray:
    """Exact law of (accepted path tokens, next token) completed to T tokens.

    Draft tokens are enumerated lazily: a node's token is drawn from q(.|path)
    independently of the verifier's coins ('iid'), as a draw without replacement
    excluding its earlier (rejected) siblings ('wor', RSD), or from q but verified
    as a deterministic point mass ('det'). Multi-candidate recursive rejection.
    """
    n = len(parents)
    children = {i: [j for j in range(n) if parents[j] == i] for i in range(n)}
    comp = Completion(p)
    v = p.vocab

    def walk(prefix, node, dist, todo, excluded):
        if not todo:
            return comp.emit(prefix, dist)
        j, rest = todo[0], todo[1:]
        qd = q(prefix).copy()  # the law this node's token is drawn from
        if mode in ("wor", "wor_as_iid"):
            qd[list(excluded)] = 0.0
            qd = qd / qd.sum()
        out = np.zeros(v**T)
        for x in range(v):
            if qd[x] == 0:
                continue
            # the law the verifier assumes the token was drawn from
            qv = {"det": _onehot(x, v), "wor_as_iid": q(prefix)}.get(mode, qd)
            a = min(1.0, dist[x] / qv[x])
            if a > 0:
                out += qd[x] * a * walk(prefix + (x,), j, p(prefix + (x,)), children[j], frozenset())
            if a < 1:
                out += qd[x] * (1 - a) * walk(prefix, node, _residual_np(dist, qv, bug), rest, excluded | {x})
        return out

    return walk((), 0, p(()), children[0], frozenset())


def ref_rho(p, q, k) -> float:
    """SpecTr rho*: root of rho * beta(rho) = 1 - (1 - beta(rho))^k on [1, k] (float64 brentq)."""
    if k == 1:
        return 1.0

    def f(rho):
        beta = np.minimum(q, p / rho).sum()
        return rho * beta - (1 - (1 - beta) ** k)

    if f(1.0) >= 0:
        return 1.0
    return optimize.brentq(f, 1.0, float(k), xtol=1e-14)


def ref_kseq(p, q, k, bug=None):
    """(rho, acceptance weights function, residual) of the SpecTr K-SEQ selection."""
    rho = ref_rho(p, q, k)
    beta = np.minimum(q, p / rho).sum()
    if bug == "naive":
        res = _residual_np(p, q)
    else:
        res = p - np.minimum(q, p / rho) * (1 - (1 - beta) ** k) / beta
        assert res.min() > -1e-12, res
        res = np.maximum(res, 0) / np.maximum(res, 0).sum()
    return rho, res


def ref_spectr_law(p: PrefixTable, q: PrefixTable, m: int, k: int, bug=None) -> np.ndarray:
    """Exact law of SpecTr (K-SEQ per position over the surviving i.i.d. drafts)."""
    v = p.vocab
    comp = Completion(p)

    def run(prefix, drafts, t):
        if t == k:
            return comp.emit(prefix, p(prefix))
        pd, qd = p(prefix), q(prefix)
        rho, res = ref_kseq(pd, qd, len(drafts), bug)
        out = np.zeros(v**T)
        reach = 1.0

        def go(y):
            surv = [d for d in drafts if d[t] == y]
            return comp(prefix + (y,)) if not surv else run(prefix + (y,), surv, t + 1)

        for d in drafts:
            a = min(1.0, pd[d[t]] / (rho * qd[d[t]]))
            out += reach * a * go(d[t])
            reach *= 1 - a
        for y in range(v):
            if res[y] > 0:
                out += reach * res[y] * go(y)
        return out

    seqs = list(itertools.product(range(v), repeat=k))
    seq_prob = np.array([np.prod([q(s[:t])[s[t]] for t in range(k)]) for s in seqs])
    total = np.zeros(v**T)
    for combo in itertools.product(range(len(seqs)), repeat=m):
        w = np.prod(seq_prob[list(combo)])
        if w > 0:
            total += w * run((), [seqs[c] for c in combo], 0)
    return total


CHAIN_PARENTS = trees.chain_tree(CHAIN_K).parents


@pytest.mark.parametrize(
    "name,parents,mode,q",
    [
        ("chain_q", CHAIN_PARENTS, "iid", Q_TAB),
        ("chain_det", CHAIN_PARENTS, "det", Q_TAB),
        ("tree_q", TREE.parents, "iid", Q_TAB),
        ("tree_det", TREE.parents, "det", Q_TAB),
        ("rsd", RSD_TREE.parents, "wor", Q_FULL),
    ],
)
def test_exact_law_tree_and_chain(name, parents, mode, q):
    want = target_law(P_TAB)
    got = ref_tree_law(P_TAB, q, parents, mode)
    np.testing.assert_allclose(got, want, atol=1e-9)
    # negative controls of the exact test
    bad = ref_tree_law(P_TAB, q, parents, mode, bug="no_subtract")
    assert np.abs(bad - want).max() > 1e-3
    if not name.startswith("chain"):  # siblings: the next one sees an unnormalised residual
        bad = ref_tree_law(P_TAB, q, parents, mode, bug="no_renorm")
        assert np.abs(bad - want).max() > 1e-3
    if mode == "wor":  # RSD drafts verified with the i.i.d. rule
        bad = ref_tree_law(P_TAB, q, parents, "wor_as_iid")
        assert np.abs(bad - want).max() > 1e-3


def test_exact_law_spectr():
    want = target_law(P_S)
    got = ref_spectr_law(P_S, Q_S, SPECTR_M, SPECTR_K)
    np.testing.assert_allclose(got, want, atol=1e-9)
    bad = ref_spectr_law(P_S, Q_S, SPECTR_M, SPECTR_K, bug="naive")
    assert np.abs(bad - want).max() > 1e-3


# ============================================================ Monte Carlo of the JAX code


def _np_logp(p):
    with np.errstate(divide="ignore"):
        return np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf)


def _levels(parents):
    """Static per-node (depth, rank among its siblings) of a tree."""
    parents = np.asarray(parents)
    depth = np.zeros(len(parents), int)
    rank = np.zeros(len(parents), int)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
        rank[i] = int(np.sum(parents[1:i] == parents[i]))
    return depth, rank


def draft_tree(rng, parents, p: PrefixTable, q: PrefixTable, batch: int, mode: str):
    """Draft a static tree from the table drafter (numpy, one depth level at a time).

    'iid': every node drawn independently from q(. | path to its parent) (Gumbel-max);
    'wor': the children of a node are successive draws without replacement, in draw order
    (Gumbel-top-k with the parent's noise). Returns tokens [B, N], draft probs [B, N, V]
    (the law each node was drawn from, before exclusions) and target probs [B, N, V]."""
    parents = np.asarray(parents)
    n, v = len(parents), p.vocab
    depth, rank = _levels(parents)
    gumbel = rng.gumbel(size=(batch, n, v))
    tokens = np.zeros((batch, n), int)
    codes = np.zeros((batch, n), int)
    for d in range(1, depth.max() + 1):
        nodes = np.flatnonzero(depth == d)
        par = parents[nodes]
        logq = _np_logp(q.probs[codes[:, par]])  # [B, n_d, V]
        if mode == "wor":
            order = np.argsort(-(logq + gumbel[:, par]), axis=-1, kind="stable")
            toks = np.take_along_axis(order, rank[nodes][None, :, None], axis=-1)[..., 0]
        else:
            toks = np.argmax(logq + gumbel[:, nodes], axis=-1)
        tokens[:, nodes] = toks
        codes[:, nodes] = p.offsets[d] + (codes[:, par] - p.offsets[d - 1]) * v + toks
    draft = q.probs[codes[:, np.maximum(parents, 0)]]
    return (
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(draft, jnp.float32),
        jnp.asarray(p.probs[codes], jnp.float32),
    )


def complete(rng, emitted: np.ndarray, n_emit: np.ndarray, p: PrefixTable) -> np.ndarray:
    """First T tokens: the round's emitted tokens, then plain target sampling (numpy)."""
    batch, width = emitted.shape
    gumbel = rng.gumbel(size=(batch, T, p.vocab))
    code = np.zeros(batch, int)
    y = np.zeros((batch, T), int)
    for t in range(T):
        sampled = np.argmax(_np_logp(p.probs[code]) + gumbel[:, t], axis=-1)
        y[:, t] = np.where(t < n_emit, emitted[:, min(t, width - 1)], sampled)
        code = p.offsets[t + 1] + (code - p.offsets[t]) * p.vocab + y[:, t]
    return y


def _emitted(prefix_tokens, accepted_len, next_token):
    """[B, W + 1]: accepted tokens, then the next token, then zeros."""
    width = prefix_tokens.shape[1] + 1
    i = jnp.arange(width)[None, :]
    acc = accepted_len[:, None]
    padded = jnp.pad(prefix_tokens, ((0, 0), (0, 1)))
    return jnp.where(i < acc, padded, jnp.where(i == acc, next_token[:, None], 0))


def _buggy(bug, flag):
    """Residual update: correct when ``flag`` is False, the named bug when True (traced, so the
    positive test and its negative control share one compiled program)."""
    wrong = {
        "no_subtract": lambda p, q: p,  # residual = p: the rejected mass is not removed
        "no_renorm": lambda p, q: jnp.maximum(p - q, 0.0),  # next sibling sees an unnormalised residual
    }[bug]
    return lambda p, q: jnp.where(flag, wrong(p, q), vf._residual(p, q))


@functools.partial(jax.jit, static_argnames=("kind", "mode", "bug"))
def _verify_round(key, flag, tokens, draft, target, *, kind, mode, bug):
    """The verifier under test (only this is compiled; drafting and completion are numpy).

    ``mode``: 'iid' (drafts with their probabilities), 'det' (same drafts verified as
    deterministic), 'wor' (RSD drafts + verify_recursive), 'wor_as_iid' (RSD drafts verified
    with the i.i.d. rule: a negative control). ``flag`` switches ``bug`` on.
    Returns (emitted tokens [B, W], number emitted [B])."""
    q = None if mode == "det" else draft
    if kind == "chain":
        q_chain = None if q is None else q[:, 1:]
        acc, nxt = vf._verify_chain(tokens[:, 1:], q_chain, target, key, residual_fn=_buggy(bug, flag))
        return _emitted(tokens[:, 1:], acc, nxt), acc + 1
    parents = {"tree": TREE.parents, "rsd": RSD_TREE.parents}[kind]
    if mode == "wor":
        res = verify_recursive(tokens, parents, q, target, key)
    elif mode == "wor_as_iid":
        res = verify_tree_sampling(tokens, parents, q, target, key)
    else:
        res = vf._verify_tree(
            tokens, parents, q, target, key, without_replacement=False,
            residual_fn=_buggy(bug, flag), max_depth=trees.max_tree_depth(parents),
        )  # fmt: skip
    path_tok = jnp.take_along_axis(tokens, jnp.maximum(res.path[:, 1:], 0), axis=1)
    return _emitted(path_tok, res.accepted_len, res.next_token), res.accepted_len + 1


@jax.jit
def _verify_spectr(key, flag, drafts, draft_p, target):
    """SpecTr verification; ``flag`` switches on the single-draft residual (negative control)."""

    def rule(p, q, rho, n):
        return jnp.where(flag, vf._residual(p, q), vf._kseq_residual(p, q, rho, n))

    res = vf._verify_multi_draft(drafts, draft_p, target, key, rho=None, residual_rule=rule)
    followed = jnp.take_along_axis(drafts, res.draft_index[:, None, None], axis=1)[:, 0]  # [B, K]
    return _emitted(followed, res.accepted_len, res.next_token), res.accepted_len + 1


def draft_multi(rng, p: PrefixTable, q: PrefixTable, batch: int, m: int, k: int):
    """M i.i.d. drafts of length K from the table drafter, with per-draft target/draft laws."""
    v = p.vocab
    codes = np.zeros((batch, m, k + 1), int)
    drafts = np.zeros((batch, m, k), int)
    gumbel = rng.gumbel(size=(batch, m, k, v))
    for t in range(k):
        drafts[:, :, t] = np.argmax(_np_logp(q.probs[codes[:, :, t]]) + gumbel[:, :, t], axis=-1)
        codes[:, :, t + 1] = p.offsets[t + 1] + (codes[:, :, t] - p.offsets[t]) * v + drafts[:, :, t]
    return (
        jnp.asarray(drafts, jnp.int32),
        jnp.asarray(q.probs[codes[:, :, :k]], jnp.float32),
        jnp.asarray(p.probs[codes], jnp.float32),
    )


def _chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> tuple[float, float, int]:
    """(statistic, p-value, df) of a chi-square goodness of fit; cells with expected < 5 pooled.
    Any count in a zero-probability cell is an outright failure (p = 0)."""
    if observed[expected == 0].sum() > 0:
        return np.inf, 0.0, 1
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return stat, float(stats.chi2.sf(stat, df)), df


def law_pvalues(y: np.ndarray, n_emit: np.ndarray, p: PrefixTable) -> tuple[float, float]:
    """p-values of (joint law of the first T tokens, per-position conditional laws).

    Conditional: for every position t and prefix y_<t, the token at t on the rows whose round
    itself emitted position t (n_emit > t) must follow p(. | y_<t); the chi-square statistics of
    all (t, prefix) groups with >= 50 rows are pooled."""
    v = p.vocab
    cells = np.ravel_multi_index(tuple(y.T), (v,) * T)
    observed = np.bincount(cells, minlength=v**T).astype(float)
    _, p_joint, _ = _chi2_pvalue(observed, len(y) * target_law(p))
    stat_sum, df_sum = 0.0, 0
    for t in range(T):
        rows = n_emit > t
        groups = np.ravel_multi_index(tuple(y[rows, :t].T), (v,) * t) if t else np.zeros(rows.sum(), int)
        toks = y[rows, t]
        for g in np.unique(groups):
            sel = toks[groups == g]
            prefix = np.unravel_index(g, (v,) * t) if t else ()
            stat, pv, df = _chi2_pvalue(np.bincount(sel, minlength=v).astype(float), len(sel) * p(prefix))
            if np.isinf(stat):
                return p_joint, 0.0
            if len(sel) >= 50:
                stat_sum, df_sum = stat_sum + stat, df_sum + df
    return p_joint, float(stats.chi2.sf(stat_sum, df_sum))


MC_CASES = [
    # (kind, mode, drafter table, negative control)
    ("chain", "iid", Q_TAB, "no_subtract"),
    ("chain", "det", Q_TAB, "no_subtract"),
    ("tree", "iid", Q_TAB, "no_renorm"),
    ("tree", "det", Q_TAB, "no_subtract"),
    ("rsd", "wor", Q_FULL, "wor_as_iid"),
]


@functools.lru_cache(maxsize=None)
def _drafted(kind: str, draft_mode: str, q_seed: int):
    """Drafts shared by the cases that verify the same drafts (e.g. 'iid' and 'det')."""
    q = {2: Q_TAB, 3: Q_FULL}[q_seed]
    parents = {"chain": CHAIN_PARENTS, "tree": TREE.parents, "rsd": RSD_TREE.parents}[kind]
    return draft_tree(np.random.default_rng(10), parents, P_TAB, q, N_MC, draft_mode)


@pytest.mark.parametrize("kind,mode,q,bug", MC_CASES, ids=[f"{c[0]}-{c[1]}" for c in MC_CASES])
def test_monte_carlo_law_and_negative_control(kind, mode, q, bug):
    drafted = _drafted(kind, "wor" if mode == "wor" else "iid", 2 if q is Q_TAB else 3)
    static = dict(kind=kind, mode=mode, bug="no_subtract" if bug == "wor_as_iid" else bug)
    emitted, n_emit = map(np.asarray, _verify_round(KEY0, False, *drafted, **static))
    y = complete(np.random.default_rng(11), emitted, n_emit, P_TAB)
    assert emitted.min() >= 0 and emitted.max() < VOCAB
    assert (n_emit > 1).mean() > 0.2  # drafts do get accepted
    p_joint, p_cond = law_pvalues(y, n_emit, P_TAB)
    assert p_joint > ALPHA and p_cond > ALPHA, (p_joint, p_cond)
    # negative control: the same test rejects a deliberately wrong verifier
    if bug == "wor_as_iid":  # RSD drafts verified with the i.i.d. rule (without the exclusion)
        emitted, n_emit = _verify_round(KEY0, False, *drafted, **{**static, "mode": "wor_as_iid"})
    else:
        emitted, n_emit = _verify_round(KEY0, True, *drafted, **static)
    n_emit = np.asarray(n_emit)
    y_bad = complete(np.random.default_rng(11), np.asarray(emitted), n_emit, P_TAB)
    p_joint_bad, p_cond_bad = law_pvalues(y_bad, n_emit, P_TAB)
    assert p_joint_bad < ALPHA, (p_joint_bad, p_cond_bad)


def test_monte_carlo_spectr_and_negative_control():
    drafted = draft_multi(np.random.default_rng(12), P_S, Q_S, 2 * N_MC, SPECTR_M, SPECTR_K)
    emitted, n_emit = map(np.asarray, _verify_spectr(KEY1, False, *drafted))
    y = complete(np.random.default_rng(13), emitted, n_emit, P_S)
    assert emitted.min() >= 0 and emitted.max() < SPECTR_V
    assert (n_emit == SPECTR_K + 1).mean() > 0.2
    p_joint, p_cond = law_pvalues(y, n_emit, P_S)
    assert p_joint > ALPHA and p_cond > ALPHA, (p_joint, p_cond)
    emitted, n_emit = map(np.asarray, _verify_spectr(KEY1, True, *drafted))
    p_joint_bad, p_cond_bad = law_pvalues(complete(np.random.default_rng(13), emitted, n_emit, P_S), n_emit, P_S)
    assert p_joint_bad < ALPHA, (p_joint_bad, p_cond_bad)


# ====================================================================== greedy vs numpy


def np_verify_greedy(draft, logits):
    b, k = draft.shape
    acc, nxt = np.zeros(b, int), np.zeros(b, int)
    for r in range(b):
        n = 0
        while n < k and draft[r, n] == np.argmax(logits[r, n]):
            n += 1
        acc[r], nxt[r] = n, np.argmax(logits[r, n])
    return acc, nxt


def np_verify_tree_greedy(tokens, parents, logits):
    """Independent reference: walk every node, keep the deepest accepted (lowest index on ties)."""
    b, n = tokens.shape
    parents = np.broadcast_to(parents, (b, n))
    paths, accs, nxts = [], [], []
    for r in range(b):
        ok, depth = [True] + [False] * (n - 1), [0] * n
        for i in range(1, n):
            par = parents[r, i]
            depth[i] = depth[par] + 1
            ok[i] = ok[par] and tokens[r, i] == np.argmax(logits[r, par])
        best = max((i for i in range(n) if ok[i]), key=lambda i: (depth[i], -i))
        path = [best]
        while path[-1] != 0:
            path.append(parents[r, path[-1]])
        paths.append(path[::-1])
        accs.append(depth[best])
        nxts.append(np.argmax(logits[r, best]))
    return paths, np.array(accs), np.array(nxts)


_greedy_jit = jax.jit(verify_greedy)
_tree_greedy_traced = jax.jit(verify_tree_greedy)  # parents traced: path width N


@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([1, 4]), match=st.floats(0.3, 1.0))
def test_verify_greedy_matches_numpy(seed, k, match):
    rng = np.random.default_rng(seed)
    b, v = 16, 3
    logits = rng.integers(0, 3, (b, k + 1, v)).astype(np.float32)  # many argmax ties
    drafts = np.where(rng.random((b, k)) < match, logits.argmax(-1)[:, :k], rng.integers(0, v, (b, k)))
    acc, nxt = _greedy_jit(drafts, logits)
    want_acc, want_nxt = np_verify_greedy(drafts, logits)
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_array_equal(nxt, want_nxt)


@settings(max_examples=15, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), per_row=st.booleans(), match=st.floats(0.3, 1.0))
def test_verify_tree_greedy_matches_numpy(seed, per_row, match):
    rng = np.random.default_rng(seed)
    b, n, v = 16, 7, 3

    def random_parents():
        return np.array([-1] + [rng.integers(0, i) for i in range(1, n)], np.int32)

    parents = np.stack([random_parents() for _ in range(b)]) if per_row else random_parents()
    logits = rng.integers(0, 3, (b, n, v)).astype(np.float32)
    par_b = np.broadcast_to(parents, (b, n))
    parent_argmax = np.take_along_axis(logits.argmax(-1), np.maximum(par_b, 0), 1)
    tokens = np.where(rng.random((b, n)) < match, parent_argmax, rng.integers(0, v, (b, n)))
    want_paths, want_acc, want_nxt = np_verify_tree_greedy(tokens, parents, logits)
    for res in (verify_tree_greedy(tokens, parents, logits), _tree_greedy_traced(tokens, parents, logits)):
        np.testing.assert_array_equal(res.accepted_len, want_acc)
        np.testing.assert_array_equal(res.next_token, want_nxt)
        path = np.asarray(res.path)
        for r in range(b):
            np.testing.assert_array_equal(path[r, : want_acc[r] + 1], want_paths[r])
            assert (path[r, want_acc[r] + 1 :] == -1).all()


@jax.jit
def _chain_as_tree(drafts, logits):
    tokens = jnp.pad(drafts, ((0, 0), (1, 0)))
    return verify_tree_greedy(tokens, trees.chain_tree(drafts.shape[1]).parents, logits), verify_greedy(drafts, logits)


def test_tree_greedy_on_a_chain_equals_chain_greedy():
    rng = np.random.default_rng(0)
    b, k, v = 32, 5, 3
    logits = rng.integers(0, 2, (b, k + 1, v)).astype(np.float32)
    drafts = np.where(rng.random((b, k)) < 0.8, logits.argmax(-1)[:, :k], rng.integers(0, v, (b, k)))
    res, (acc, nxt) = _chain_as_tree(drafts, logits)
    np.testing.assert_array_equal(res.accepted_len, acc)
    np.testing.assert_array_equal(res.next_token, nxt)
    np.testing.assert_array_equal(res.accepted_len, np_verify_greedy(drafts, logits)[0])
    assert res.path.shape == (b, k + 1)


# ============================================================ edge cases and bad input


def test_bad_input_raises_value_error():
    key = jax.random.key(0)
    p3, q3 = jnp.ones((2, 3, 5)) / 5, jnp.ones((2, 2, 5)) / 5
    with pytest.raises(ValueError, match="draft length must be >= 1"):
        verify_greedy(jnp.zeros((2, 0), jnp.int32), jnp.zeros((2, 1, 5)))
    with pytest.raises(ValueError, match="draft length must be >= 1"):
        verify_sampling(jnp.zeros((2, 0), jnp.int32), None, jnp.ones((2, 1, 5)) / 5, key)
    with pytest.raises(ValueError, match="vocabulary size 6 differs from target vocabulary size 5"):
        verify_sampling(jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2, 6)) / 6, p3, key)
    with pytest.raises(ValueError, match=r"K \+ 1"):
        verify_sampling(jnp.zeros((2, 2), jnp.int32), q3, p3[:, :2], key)
    tokens = jnp.zeros((2, 4), jnp.int32)
    logits = jnp.zeros((2, 4, 5))
    with pytest.raises(ValueError, match="cyclic"):
        verify_tree_greedy(tokens, np.array([-1, 2, 3, 1]), logits)
    with pytest.raises(ValueError, match="expected an index in"):
        verify_tree_sampling(tokens, np.array([-1, 0, 9, 1]), None, logits, key)
    with pytest.raises(ValueError, match="topological order"):
        verify_tree_sampling(tokens, np.array([-1, 2, 0, 1]), None, logits, key)
    with pytest.raises(ValueError, match="root"):
        verify_tree_greedy(tokens, np.array([0, 0, 1, 2]), logits)
    with pytest.raises(ValueError, match="root and >= 1 draft node"):
        verify_tree_greedy(tokens[:, :1], np.array([-1]), logits[:, :1])
    with pytest.raises(ValueError, match="vocabulary size"):
        verify_recursive(tokens, np.array([-1, 0, 0, 1]), jnp.ones((2, 4, 6)) / 6, logits, key)
    with pytest.raises(ValueError, match="needs the draft distributions"):
        verify_recursive(tokens, np.array([-1, 0, 0, 1]), None, logits, key)
    with pytest.raises(ValueError, match="vocabulary size"):
        verify_multi_draft(jnp.zeros((2, 3, 2), jnp.int32), jnp.ones((2, 3, 2, 4)) / 4, jnp.ones((2, 3, 3, 5)) / 5, key)
    with pytest.raises(ValueError, match="length >= 1"):
        verify_multi_draft(jnp.zeros((2, 3, 0), jnp.int32), jnp.ones((2, 3, 0, 5)), jnp.ones((2, 3, 1, 5)) / 5, key)
    with pytest.raises(ValueError, match="1 <= k <= V"):
        sample_without_replacement(jnp.zeros((5,)), key, 6)


def test_degenerate_residual_is_guarded():
    p = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(vf._residual(p, p), p)  # p == q: all-zero residual -> p
    np.testing.assert_allclose(vf._residual(p, jnp.array([[1.0, 0, 0, 0]] * 2)), [[0, 1, 0, 0], [0, 1, 0, 0]])


@jax.jit
def _padded_round(key, tokens, q, p):
    """Every sampling verifier on a padded vocabulary (real 5 of 8), in one compiled program."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    b, n = tokens.shape
    parents = TREE.parents
    m_tokens = jnp.stack([tokens[:, 1:4], tokens[:, 4:7]], 1)  # [B, 2, 3]
    m_q = jnp.stack([q[:, 1:4], q[:, 4:7]], 1)
    m_p = jnp.stack([p[:, :4], p[:, 3:7]], 1)
    return (
        verify_sampling(tokens[:, 1:4], q[:, 1:4], p[:, :4], k1),
        verify_sampling(tokens[:, 1:4], None, p[:, :4], k2),
        # draft_probs=None is exactly the point-mass q: same key, identical outputs
        verify_sampling(tokens[:, 1:4], jax.nn.one_hot(tokens[:, 1:4], p.shape[-1]), p[:, :4], k2),
        verify_tree_sampling(tokens[:, : len(parents)], parents, q[:, : len(parents)], p[:, : len(parents)], k3),
        verify_recursive(tokens[:, : len(parents)], parents, q[:, : len(parents)], p[:, : len(parents)], k4),
        verify_multi_draft(m_tokens, m_q, m_p, k5),
    )


def _padded_case(rng, b, n, v_real, v_pad, kind):
    """Target p and draft q per node (real vocabulary ``v_real`` padded with zeros to ``v_pad``)."""
    p = rng.dirichlet(np.ones(v_real), (b, n)) * (rng.random((b, n, v_real)) > 0.3)
    p[..., 0] += 1e-3
    p /= p.sum(-1, keepdims=True)
    q = rng.dirichlet(np.ones(v_real), (b, n))
    if kind == "equal":  # p == q exactly (one law per row): residual all zero, rejection prob. 0
        p = np.broadcast_to(p[:, :1], p.shape)
        q = p
    if kind == "onehot":  # point masses: accept surely or reject surely
        p = np.eye(v_real)[rng.integers(0, v_real, (b, n))]
        q = np.eye(v_real)[rng.integers(0, v_real, (b, n))]
    tokens = (rng.random((b, n, 1)) < q.cumsum(-1)).argmax(-1)  # node i's token drawn from q[:, i]
    pad = ((0, 0), (0, 0), (0, v_pad - v_real))
    return (
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(np.pad(q, pad), jnp.float32),
        jnp.asarray(np.pad(p, pad), jnp.float32),
    )


@pytest.mark.parametrize("kind", ["random", "equal", "onehot"])
def test_padded_vocabulary_never_emits_padding(kind):
    rng = np.random.default_rng(7)
    v_real, v_pad, b = 5, 8, 4096
    n = max(8, TREE.num_nodes)
    tokens, q, p = _padded_case(rng, b, n, v_real, v_pad, kind)
    chain_q, chain_det, chain_onehot, tree_res, rsd_res, multi = _padded_round(KEY0, tokens, q, p)
    np.testing.assert_array_equal(chain_det[0], chain_onehot[0])
    np.testing.assert_array_equal(chain_det[1], chain_onehot[1])
    for out in (chain_q[1], chain_det[1], tree_res.next_token, rsd_res.next_token, multi.next_token):
        out = np.asarray(out)
        assert out.min() >= 0 and out.max() < v_real
    if kind == "equal":  # p == q: every draft is accepted
        assert (np.asarray(chain_q[0]) == 3).all()
        assert (np.asarray(tree_res.accepted_len) == TREE.max_depth).all()
        assert (np.asarray(rsd_res.accepted_len) >= 1).all()
        assert (np.asarray(multi.accepted_len) == 3).all()
    if kind == "onehot":  # deterministic outcome: accepted iff the draft is the target's token
        match = np.asarray(tokens[:, 1:4] == jnp.argmax(p[:, :3], -1))
        np.testing.assert_array_equal(chain_det[0], np.cumprod(match, 1).sum(1))
        np.testing.assert_array_equal(chain_q[0], np.cumprod(match, 1).sum(1))
        acc = np.asarray(chain_det[0])
        np.testing.assert_array_equal(chain_det[1], np.asarray(jnp.argmax(p, -1))[np.arange(b), acc])


# ==================================================================== RSD and SpecTr parts


def test_sample_without_replacement_law():
    """Gumbel-top-2 = sequential draws without replacement: P(x1, x2) = q1 q2 / (1 - q1)."""
    q = np.array([0.1, 0.2, 0.3, 0.4])
    n = 100_000
    draws = np.asarray(
        jax.jit(lambda k: sample_without_replacement(jnp.broadcast_to(jnp.log(q), (n, 4)), k, 2))(KEY0)
    )
    assert (draws[:, 0] != draws[:, 1]).all()
    want = np.array([[q[a] * q[c] / (1 - q[a]) if a != c else 0.0 for c in range(4)] for a in range(4)])
    counts = np.bincount(draws[:, 0] * 4 + draws[:, 1], minlength=16).astype(float)
    _, pv, _ = _chi2_pvalue(counts, n * want.ravel())
    assert pv > ALPHA, pv
    # negative control: two i.i.d. draws (with replacement) are rejected by the same test
    iid = np.random.default_rng(0).choice(4, size=(n, 2), p=q)
    _, pv_bad, _ = _chi2_pvalue(np.bincount(iid[:, 0] * 4 + iid[:, 1], minlength=16).astype(float), n * want.ravel())
    assert pv_bad < ALPHA


def test_spectr_rho_matches_reference_and_is_valid():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), 20)
    q = rng.dirichlet(np.ones(6), 20)
    ks = np.tile([1, 2, 3, 5], 5)
    rho = np.asarray(spectr_rho(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), jnp.asarray(ks)))
    for i in range(20):
        want = ref_rho(p[i], q[i], ks[i])
        assert abs(rho[i] - want) < 1e-4 * ks[i], (rho[i], want)
        beta = np.minimum(q[i], p[i] / rho[i]).sum()
        assert 1 - (1 - beta) ** ks[i] <= rho[i] * beta + 1e-5  # validity condition
    assert (rho[ks == 1] == 1).all()
