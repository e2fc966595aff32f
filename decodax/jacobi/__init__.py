"""Jacobi decoding family: fixed-point iteration over a window of guesses, Speculative
Jacobi Decoding (sampling), window initialisers, lookahead decoding, CEED-VLA early exit, Lexical Unit Decoding."""

from decodax.jacobi.decoder import JacobiState, jacobi, jacobi_drafter
from decodax.jacobi.early_exit import EarlyExit
from decodax.jacobi.init import NgramInit, PadInit, RandomInit, RepeatLast, SpatialInit, WindowInit
from decodax.jacobi.lexical_units import lexical_unit_decoding
from decodax.jacobi.lookahead import LookaheadState, lookahead

__all__ = [
    "EarlyExit",
    "JacobiState",
    "LookaheadState",
    "NgramInit",
    "PadInit",
    "RandomInit",
    "RepeatLast",
    "SpatialInit",
    "WindowInit",
    "jacobi",
    "jacobi_drafter",
    "lexical_unit_decoding",
    "lookahead",
]
