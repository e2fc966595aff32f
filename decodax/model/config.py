"""Model configuration for LLaMA-family decoders."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a LLaMA-family decoder (Touvron et al., 2023).

    Frozen and hashable so that a ``Model`` holding it can be a static argument
    of ``jax.jit``.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    name: str = "llama"

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads


def tiny_config(**overrides) -> ModelConfig:
    """A small random-weight configuration for unit tests and notebooks."""
    base = dict(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
        rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=512,
        bos_id=1, eos_ids=(2,), name="tiny",
    )
    base.update(overrides)
    return ModelConfig(**base)
