"""ModelConfig: the shape of a decoder-only Transformer, validated before any weights exist.

Presets are functions of the vocabulary size, which is known only once the tokenizer is trained.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    context_len: int = 256
    ffn_hidden: int = 0  # 0: SwiGLU about 8/3 * d_model rounded up to a multiple of 64 (FLOPs of a 4x MLP); GELU 4x
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # The family knobs. The defaults are the Llama layout; GPT-2 is norm="layer", mlp="gelu", pos="learned", bias=True.
    norm: str = "rms"  # "rms" (RMSNorm) | "layer" (LayerNorm)
    mlp: str = "swiglu"  # "swiglu" | "gelu" (tanh approximation, GPT-2's "gelu_new")
    pos: str = "rope"  # "rope" (rotary, Llama half-split layout) | "learned" (absolute position embeddings)
    n_kv_heads: int | None = None  # grouped-query attention: heads of keys and values; None: n_head
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2)
    bias: bool = False  # biases on every linear layer and norm (GPT-2)
    sliding_window: int | None = None  # Mistral's attention window; recorded, and longer sequences are refused

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "context_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        for name, allowed in (("norm", ("rms", "layer")), ("mlp", ("swiglu", "gelu")), ("pos", ("rope", "learned"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"head size d_model/n_head = {self.head_dim} must be even for rotary embeddings")
        if self.ffn_hidden < 0:
            raise ValueError(f"model.ffn_hidden must be >= 0, got {self.ffn_hidden}")
        for name in ("n_kv_heads", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"model.{name} must be a positive integer or null, got {value!r}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 4 * self.d_model if self.mlp == "gelu" else -(-(8 * self.d_model // 3) // 64) * 64

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


TARGETS = ("wqkv", "wo", "gate", "up", "down")  # the Linear layers of Attention and MLP; lm_head is never adapted


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("wqkv", "wo")  # module names (last component) to adapt
    dropout: float = 0.0  # on the adapter's input only

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not self.targets:
            raise ValueError(f"lora.targets must name at least one of {', '.join(TARGETS)}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: unknown {', '.join(map(repr, unknown))}; known: {', '.join(TARGETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
