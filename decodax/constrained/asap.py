"""Grammar-aligned decoding with ASAp (Park et al. 2024, "Grammar-Aligned Decoding", NeurIPS).

The problem (grammar-aligned decoding, GAD). A language model ``P`` defines a
law over token strings ``y`` (ended by EOS). Constrained decoding usually wants
``P(y | y in L)`` for a language ``L`` (here: a regex / JSON-schema token
automaton of :mod:`decodax.constrained.automaton`). Plain masking, what the
paper calls grammar-constrained decoding (GCD) and what
:func:`decodax.constrained.constrained` does, renormalises the model over the
*allowed* tokens at every step::

    Q_gcd(y) = prod_i P(y_i | y_<i) 1[y_<=i viable] / sum_{t viable} P(t | y_<i)

which ignores how much of the model's mass below each allowed token later
falls out of ``L``: a token whose continuations are mostly ungrammatical is
sampled as often as one whose continuations are all grammatical. The law is
grammatical but biased (the paper's Fig. 1 / Ex. 2).

Exact GAD. With the *expected future grammaticality* (EFG) of a prefix,
``c(w) = sum_{y extends w} P(y | w) 1[y in L]`` (the probability that the
model, continued from ``w``, ends up in ``L``), sampling each token from
``P(t | w) c(w t) / c(w)`` gives exactly ``P(y | y in L)`` (the ``c`` ratios
telescope to ``1 / c(empty)`` = ``1 / P(L)``). ``c`` is an intractable sum
over all continuations.

ASAp (Adaptive Sampling with Approximate expected futures), as I read the
paper's algorithm: keep an *over-approximation* ``c~`` of ``c`` on a trie of
the prefixes sampled so far, sample with ``c~`` in place of ``c``, and tighten
``c~`` with what each sample revealed:

1. Initially ``c~(w) = 1`` for every viable prefix ``w`` (one that can still
   be completed in ``L``: the GCD mask) and ``0`` otherwise, so the very first
   sample is exactly a GCD sample. A complete grammatical string (the EOS
   child of a final prefix) has exact EFG 1.
2. Sample ``y`` token by token with ``P(t | w) c~(w t)`` renormalised over
   ``t``; a child of the trie not visited yet still has its initial value.
3. After the sample, walk its path back from the leaf and set, for every
   prefix ``w`` on it, ``c~(w) = sum_t P(t | w) c~(w t)``. The model's mass on
   non-viable tokens (dead ends: no continuation completes) contributes 0, so
   it is subtracted from the estimate for good; the other children contribute
   their current estimates. By induction every ``c~`` stays an upper bound of
   ``c`` and only decreases.
4. Repeat. Once a sample has passed through every viable prefix of positive
   probability (and backed its value up), ``c~ = c`` and the samples are exact GAD samples; the
   paper proves the sampling law converges to ``P(y | y in L)`` (earlier
   samples are biased, towards GCD's law at the start). Note the empirical
   law of *all* samples is a mixture that includes the early biased ones.

Because ``c~`` is an upper bound and ``c~(root) >= P(L)`` with equality iff
every prefix reachable with positive probability is exact, the root estimate
(:attr:`ASApResult.root_efg`) certifies convergence: when it equals ``P(L)``,
the sampler's law *is* ``P(y | y in L)``.

Design here. ASAp is an across-samples iterative algorithm: sample ``n``
depends on the estimates left by samples ``1..n-1``. So the trie of EFG
estimates lives on the host (:class:`EFGTrie`, a dict trie storing per visited
prefix the model's probabilities of its viable tokens and the children's
``c~``) and samples are drawn one after the other; ``logprob_fn(prefix)`` is
called once per *new* prefix (the trie caches the model's next-token law),
so a small jitted model forward is the only device work. Viability uses the
token automaton's tables and the length budget: a prefix of length ``d`` in
state ``s`` is viable iff ``s`` reaches a final state within ``max_len - d``
tokens (a host DP over ``[max_len, S]``), so the conditioning event is
``y in L and len(y) <= max_len``, ``L`` being the automaton's language (with
outlines-core's quirk, see :mod:`decodax.constrained.automaton`, it can be a
subset of the regex's). :func:`masked_sample` is the same sampler
with step 3 turned off: plain GCD masking, the baseline ASAp corrects.
Randomness comes from a NumPy generator seeded from the JAX key
(deterministic given the key).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Int, PRNGKeyArray

from decodax.constrained.automaton import TokenAutomaton, compile_json_schema, compile_regex
from decodax.constrained.vocabulary import TokenVocabulary

__all__ = ["ASApResult", "EFGTrie", "asap_sample", "masked_sample", "viable_states"]

LogprobFn = Callable[[Int[np.ndarray, " T"]], Float[ArrayLike, " V"]]


def viable_states(automaton: TokenAutomaton, max_len: int) -> Bool[np.ndarray, "R S"]:
    """``viable[r, s]``: state ``s`` reaches a final state within ``r`` more tokens
    (``r`` in ``[0, max_len]``). Bool ``[max_len + 1, S]``; a host DP over the class table."""
    nxt = automaton.next_class  # [S, C], -1 = not allowed
    has = nxt >= 0
    nxt0 = np.maximum(nxt, 0)
    viable = np.zeros((max_len + 1, nxt.shape[0]), bool)
    viable[0] = automaton.final
    for r in range(1, max_len + 1):
        viable[r] = automaton.final | np.any(has & viable[r - 1][nxt0], axis=1)
    return viable


class _Node:
    """One visited prefix: its viable next tokens, the model's probabilities for them and
    the children's EFG estimates (EOS children: exact 1)."""

    __slots__ = ("state", "depth", "tokens", "probs", "efg", "is_eos", "children")

    def __init__(self, state: int, depth: int, tokens: np.ndarray, probs: np.ndarray, is_eos: np.ndarray):
        self.state, self.depth = state, depth
        self.tokens, self.probs, self.is_eos = tokens, probs, is_eos
        self.efg = np.ones(tokens.shape[0], np.float64)  # c~ of each child: 1 until expanded
        self.children: dict[int, _Node] = {}

    def value(self) -> float:
        """``c~`` of this prefix: sum over viable tokens of P(t | w) c~(w t)."""
        return float(self.probs @ self.efg)


class EFGTrie:
    """Host trie of ASAp's expected-future-grammaticality estimates (see the module docstring).

    ``logprob_fn`` is called once per expanded prefix. :meth:`next_law` and
    :meth:`sequence_prob` give the sampler's *current* law exactly (useful to
    measure convergence without sampling noise).
    """

    def __init__(self, logprob_fn: LogprobFn, automaton: TokenAutomaton, max_len: int):
        self.logprob_fn = logprob_fn
        self.automaton = automaton
        self.max_len = int(max_len)
        self.viable = viable_states(automaton, self.max_len)
        self.eos_ids = np.asarray(automaton.vocabulary.eos_ids, np.int64)
        self.n_expanded = 0
        self.root = self._expand((), 0)

    def _expand(self, prefix: tuple[int, ...], state: int) -> _Node:
        a, depth = self.automaton, len(prefix)
        remaining = self.max_len - depth
        if remaining > 0:
            nxt = a.next_class[state]
            ok_class = (nxt >= 0) & self.viable[remaining - 1][np.maximum(nxt, 0)]
            text = np.nonzero(ok_class[a.token_class])[0]
            text = text[~np.isin(text, self.eos_ids)]
        else:
            text = np.zeros(0, np.int64)
        eos = self.eos_ids if a.final[state] else np.zeros(0, np.int64)
        tokens = np.concatenate([text, eos]).astype(np.int64)
        lp = np.asarray(self.logprob_fn(np.asarray(prefix, np.int32)), np.float64).reshape(-1)
        if lp.shape[0] != a.vocab_size:
            raise ValueError(f"logprob_fn returned {lp.shape[0]} log-probs, the automaton's vocabulary has "
                             f"{a.vocab_size} tokens")
        lp = np.where(np.isnan(lp), -np.inf, lp)
        top = np.max(lp)
        if not np.isfinite(top):
            raise ValueError(f"logprob_fn gave no finite log-prob after prefix {list(prefix)}")
        p = np.exp(lp - top)
        p /= p.sum()  # normalised over the whole vocabulary: masked-out mass is lost mass
        self.n_expanded += 1
        return _Node(state, depth, tokens, p[tokens],
                     np.concatenate([np.zeros(text.shape[0], bool), np.ones(eos.shape[0], bool)]))

    def child(self, node: _Node, i: int, prefix: tuple[int, ...]) -> _Node:
        """The child of ``node`` through its ``i``-th viable token (expanded on first visit)."""
        t = int(node.tokens[i])
        c = node.children.get(t)
        if c is None:
            c = self._expand(prefix + (t,), int(self.automaton.next_state(node.state, t)))
            node.children[t] = c
        return c

    @property
    def root_efg(self) -> float:
        """``c~(empty)``: an upper bound of P(L), equal to it once the estimates are exact."""
        return self.root.value()

    def next_law(self, node: _Node, *, adaptive: bool = True) -> Float[np.ndarray, " K"]:
        """The sampler's next-token law over ``node.tokens`` (zeros when the prefix is dead)."""
        w = node.probs * node.efg if adaptive else node.probs.copy()
        s = w.sum()
        return w / s if s > 0 else w

    def sequence_prob(self, seq: Sequence[int], *, adaptive: bool = True) -> float:
        """Probability that the next sample is ``seq`` (text tokens, EOS excluded) under the
        current estimates (``adaptive=False``: under plain masking). Expands missing nodes."""
        node, prefix, prob = self.root, (), 1.0
        for t in list(seq) + [None]:
            if t is None:
                hit = np.nonzero(node.is_eos)[0]
            else:
                hit = np.nonzero((node.tokens == int(t)) & ~node.is_eos)[0]
            if hit.size == 0:
                return 0.0
            law = self.next_law(node, adaptive=adaptive)
            if t is None:
                return prob * float(law[hit].sum())
            prob *= float(law[hit[0]])
            node = self.child(node, int(hit[0]), prefix)
            prefix = prefix + (int(t),)
        return prob


@dataclasses.dataclass
class ASApResult:
    """``samples[i]``: the i-th sample's text tokens (EOS stripped), in sampling order.
    ``root_efg[i]``: ``c~(empty)`` just before sample i (non-increasing; an upper bound of
    P(L) that reaches it when the sampler's law is exact). ``attempts``: samples drawn,
    including the ones that hit a prefix the model gives no grammatical mass (retried)."""

    samples: list[tuple[int, ...]]
    root_efg: np.ndarray
    attempts: int
    trie: EFGTrie


def _as_automaton(grammar: TokenAutomaton | str | Mapping[str, Any],
                  vocabulary: TokenVocabulary | None) -> TokenAutomaton:
    if isinstance(grammar, TokenAutomaton):
        return grammar
    if vocabulary is None:
        raise ValueError("a regex or JSON schema needs vocabulary= (a TokenVocabulary) to compile")
    if isinstance(grammar, str):
        return compile_regex(grammar, vocabulary)
    if isinstance(grammar, Mapping):
        return compile_json_schema(grammar, vocabulary)
    raise ValueError(f"grammar must be a TokenAutomaton, a regex str or a JSON-schema dict, "
                     f"got {type(grammar).__name__}")


def _rng(key: PRNGKeyArray) -> np.random.Generator:
    k = jnp.asarray(key)
    if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
        k = jax.random.key_data(k)
    return np.random.default_rng([int(x) for x in np.asarray(k, np.uint32).reshape(-1)])


def _run(logprob_fn: LogprobFn, grammar, key: PRNGKeyArray, n_samples: int, max_len: int,
         vocabulary: TokenVocabulary | None, adaptive: bool, max_attempts: int | None,
         trie: EFGTrie | None = None) -> ASApResult:
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
        raise ValueError(f"n_samples must be an int >= 0, got {n_samples!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 0:
        raise ValueError(f"max_len must be an int >= 0, got {max_len!r}")
    if trie is None:
        trie = EFGTrie(logprob_fn, _as_automaton(grammar, vocabulary), int(max_len))
    elif not isinstance(trie, EFGTrie):
        raise ValueError(f"trie must be an EFGTrie (ASApResult.trie), got {type(trie).__name__}")
    elif trie.max_len != int(max_len) or (isinstance(grammar, TokenAutomaton) and trie.automaton is not grammar):
        raise ValueError("trie was built for another grammar or max_len: its estimates do not apply")
    if not trie.viable[int(max_len), 0]:
        raise ValueError(f"the grammar has no string of at most {max_len} tokens")
    rng = _rng(key)
    limit = max_attempts if max_attempts is not None else 10 * n_samples + 1000
    samples: list[tuple[int, ...]] = []
    root_efg = np.zeros(n_samples, np.float64)
    attempts = 0
    while len(samples) < n_samples:
        if attempts >= limit:
            raise RuntimeError(f"ASAp drew {attempts} samples without finishing {n_samples}")
        attempts += 1
        root_efg[len(samples)] = trie.root_efg
        node, prefix, path = trie.root, (), []
        done = False
        while True:
            law = trie.next_law(node, adaptive=adaptive)
            if not law.any():  # no viable token with model mass: a dead end (c = 0 here)
                if not adaptive:
                    raise ValueError(f"the model gives no probability to any allowed token after "
                                     f"prefix {list(prefix)}: masking cannot continue")
                break
            i = min(int(np.searchsorted(np.cumsum(law), rng.random() * law.sum(), side="right")),
                    law.shape[0] - 1)
            while law[i] <= 0:  # float edge of searchsorted: step back to a token with mass
                i -= 1
            path.append((node, i))
            if node.is_eos[i]:
                done = True
                break
            t = int(node.tokens[i])
            node = trie.child(node, i, prefix)
            prefix = prefix + (t,)
        if adaptive:  # step 3: back the path up with each prefix's tightened estimate
            for parent, i in reversed(path):
                if not parent.is_eos[i]:
                    parent.efg[i] = parent.children[int(parent.tokens[i])].value()
            if trie.root_efg <= 0.0:
                raise ValueError("the model gives the grammar zero probability within max_len: "
                                 "nothing to condition on")
        if done:
            samples.append(prefix)
    return ASApResult(samples=samples, root_efg=root_efg, attempts=attempts, trie=trie)


def asap_sample(
    logprob_fn: LogprobFn,
    grammar: TokenAutomaton | str | Mapping[str, Any],
    key: PRNGKeyArray,
    n_samples: int,
    max_len: int,
    *,
    vocabulary: TokenVocabulary | None = None,
    trie: EFGTrie | None = None,
    max_attempts: int | None = None,
) -> ASApResult:
    """Draw ``n_samples`` grammatical strings with ASAp (Park et al. 2024, "Grammar-Aligned
    Decoding"): adaptive sampling with approximate expected futures, whose law converges to
    ``P(y | y in L, len(y) <= max_len)``, unlike plain masking (:func:`masked_sample`).

    ``logprob_fn(prefix)`` maps an int32 ``[T]`` prefix (``T`` may be 0) to the model's
    next-token log-probs ``[V]`` over the automaton's vocabulary, EOS ids included
    (unnormalised logits are normalised here). ``grammar`` is a :class:`TokenAutomaton`,
    or a regex / JSON schema compiled over ``vocabulary``. Samples are sequential (each
    depends on the estimates the previous ones left, see the module docstring); the key
    seeds a host generator, so the result is deterministic given the key. ``trie``: the
    :attr:`ASApResult.trie` of an earlier call with the same model, grammar and ``max_len``,
    to go on from its estimates (ASAp's law keeps converging across calls).
    """
    return _run(logprob_fn, grammar, key, n_samples, max_len, vocabulary, True, max_attempts, trie)


def masked_sample(
    logprob_fn: LogprobFn,
    grammar: TokenAutomaton | str | Mapping[str, Any],
    key: PRNGKeyArray,
    n_samples: int,
    max_len: int,
    *,
    vocabulary: TokenVocabulary | None = None,
) -> ASApResult:
    """Plain masking (GCD): each token from the model renormalised over the viable tokens.

    Same interface and trie as :func:`asap_sample` with the EFG update turned off (every
    estimate stays 1), i.e. the law of :func:`decodax.constrained.constrained` plus the
    length-budget viability; grammatical, but biased away from ``P(y | y in L)``.
    """
    return _run(logprob_fn, grammar, key, n_samples, max_len, vocabulary, False, None)
