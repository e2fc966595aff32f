"""The Decoder protocol, the jitted driver and plain autoregressive decoding."""

from decodax.decoding.autoregressive import autoregressive
from decodax.decoding.driver import GenerateOutput, generate
from decodax.decoding.state import Decoder, DecodeState

__all__ = ["Decoder", "DecodeState", "GenerateOutput", "autoregressive", "generate"]
