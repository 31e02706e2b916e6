"""ModelConfig: the shape of a decoder-only Transformer, validated before any weights exist.

Presets are functions of the vocabulary size, which is known only once the tokenizer is trained.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    context_len: int = 256
    ffn_hidden: int = 0  # 0: about 8/3 * d_model rounded up to a multiple of 64 (SwiGLU keeps FLOPs of a 4x MLP)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "context_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"head size d_model/n_head = {self.head_dim} must be even for rotary embeddings")
        if self.ffn_hidden < 0:
            raise ValueError(f"model.ffn_hidden must be >= 0, got {self.ffn_hidden}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or -(-(8 * self.d_model // 3) // 64) * 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


def tiny(vocab_size: int) -> ModelConfig:
    """About 1.2M parameters at a 4k vocabulary, sized for two minutes on a 2-core CPU. On the stdlib corpus
    it beat 2-layer, 4-layer and d_model-192 variants on validation loss after 90 s (docs/nn.md)."""
    return ModelConfig(vocab_size=vocab_size, n_layer=3, n_head=4, d_model=128, context_len=256)


def small(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, n_layer=8, n_head=8, d_model=512, context_len=512)


def base(vocab_size: int) -> ModelConfig:
    """The GPT-2 124M shape with Llama-style blocks."""
    return ModelConfig(vocab_size=vocab_size, n_layer=12, n_head=12, d_model=768, context_len=1024)


PRESETS = {"tiny": tiny, "small": small, "base": base}
