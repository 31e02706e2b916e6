"""A registered model as evaluation sees it: weights on a device, its tokenizer, the tokens before every text,
and the tokens that end a generation. Text goes in, token spans come out, fitted to the context.

How a (context, continuation) pair is tokenized: the context alone and the two joined are encoded, and the
continuation is what the joined encoding has after the context's tokens, so the continuation's tokens are the
ones the model saw in training (a byte-level BPE may merge across the boundary otherwise). When the joined
encoding does not start with the context's tokens, the continuation is encoded on its own.

What does not fit the context (docs/evaluate.md): the context is cut on the left, keeping its end and the
whole continuation; a continuation that alone leaves no room is skipped. Both are counted, and reported.
"""

from dataclasses import dataclass
from typing import Any

from aifab.evaluate.scoring import Span
from aifab.store import Store
from aifab.store.schema import ModelVersion
from aifab.tokens import end_of_text_id


@dataclass
class EvalModel:
    model: Any  # aifab.nn.transformer.Transformer, in eval mode
    tokenizer: Any  # tokenizers.Tokenizer
    prefix: tuple[int, ...]  # put before every text: aifab-trained models start each document after EOT
    stop_ids: frozenset[int]  # a generation ends at any of these

    @property
    def context_len(self) -> int:
        n: int = self.model.config.context_len
        return n

    @classmethod
    def load(cls, store: Store, mv: ModelVersion, device: str | None = None) -> "EvalModel":
        """The version's weights (digest verified) on `device` (default: CUDA in bf16 when present, else CPU in
        fp32) and its tokenizer."""
        import torch
        from tokenizers import Tokenizer

        from aifab.nn.weights import from_bytes

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = from_bytes(store.artifacts.get_bytes(mv.weights_digest)).to(device=device, dtype=dtype).eval()
        tok = Tokenizer.from_str(store.artifacts.get_bytes(mv.tokenizer_digest).decode())
        return cls.of(model, tok, dict(mv.generation or {}))

    @classmethod
    def of(cls, model: Any, tokenizer: Any, generation: dict[str, Any] | None = None) -> "EvalModel":
        """Wrap a built model. `generation` is the registry's generation settings: empty for a model trained
        here (prefix EOT), else an imported model's BOS and EOS (its tokenizer may add BOS itself)."""
        generation = generation or {}
        try:
            eot: int | None = end_of_text_id(tokenizer)
        except ValueError:
            eot = None
        stops = {int(i) for i in generation.get("eos_token_ids") or []} or ({eot} if eot is not None else set())
        if not generation:
            prefix: tuple[int, ...] = (eot,) if eot is not None else ()
        elif generation.get("add_bos"):
            prefix = ()  # the tokenizer puts BOS before the text itself
        else:
            bos = generation.get("bos_token_id")
            prefix = (int(bos),) if bos is not None else (eot,) if eot is not None else ()
        return cls(model, tokenizer, prefix, frozenset(stops))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text).ids
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids)
        return text

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prefix + context tokens, continuation tokens), split as the joined text tokenizes."""
        ctx = self.encode(context) if context else []
        whole = self.encode(context + continuation)
        split = whole[: len(ctx)] == ctx and len(whole) > len(ctx)
        return [*self.prefix, *ctx], whole[len(ctx) :] if split else self.encode(continuation)

    def span(self, context: list[int], continuation: list[int]) -> tuple[Span | None, bool]:
        """The span scoring `continuation` after `context`, cut on the left to fit: (span, truncated), or
        (None, False) when the continuation is empty or cannot fit with one token before it."""
        room = self.context_len + 1  # a span's last token is only a target
        if not continuation or len(continuation) >= room:
            return None, False
        tokens = [*context, *continuation]
        if not context:  # nothing to predict the first token from: score the rest
            return (Span(tuple(tokens), len(tokens) - 1), False) if len(tokens) > 1 else (None, False)
        return Span(tuple(tokens[-room:]), len(continuation)), len(tokens) > room
