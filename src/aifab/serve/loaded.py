"""A registered model loaded for serving: its weights on a device, its tokenizer, and how it generates (the
names a request may use for it, its stop tokens, the prefix before every prompt, its chat template)."""

from dataclasses import dataclass, field
from typing import Any

from aifab.errors import ServeError
from aifab.store import Store
from aifab.tokens import end_of_text_id


@dataclass
class LoadedModel:
    id: str  # "name:version", what /v1/models lists
    names: frozenset[str]  # every model string a request may use to mean this model
    model: Any
    tokenizer: Any
    eot_id: int | None  # the end-of-text token found by name, if the vocabulary has one
    context_len: int
    created_at: int
    stop_ids: frozenset[int] = frozenset()  # generation ends at any of these (the model's EOS tokens)
    # put before every prompt: aifab-trained models start documents with EOT; an imported model's tokenizer
    # adds its own BOS (or none), exactly as `transformers` encodes it
    prefix_ids: tuple[int, ...] = ()
    chat_template: str | None = None  # Jinja, from the imported tokenizer_config.json
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token / eos_token, for the template
    version_id: int | None = None  # the registry row, which the ledger charges serving to

    @classmethod
    def load(cls, store: Store, ref: str, device: str | None = None) -> "LoadedModel":
        """Load a registered model onto `device` (default: CUDA in bf16 when torch sees one, else CPU fp32)."""
        import torch
        from tokenizers import Tokenizer

        from aifab.nn.weights import from_bytes
        from aifab.registry.models import aliases_of, resolve

        mv = resolve(store, ref)
        mid = f"{mv.name}:{mv.version}"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = from_bytes(store.artifacts.get_bytes(mv.weights_digest)).to(device=device, dtype=dtype).eval()
        tok = Tokenizer.from_str(store.artifacts.get_bytes(mv.tokenizer_digest).decode())
        # the bare name too: this server holds one version of it, so "demo" can only mean that one
        names = {mid, ref, mv.name, *(f"{mv.name}@{a}" for a in aliases_of(store, mv.id))}
        generation: dict[str, Any] = dict(getattr(mv, "generation", None) or {})
        try:
            eot: int | None = end_of_text_id(tok)
        except ValueError as e:
            if not generation.get("eos_token_ids"):
                raise ServeError(f"{mid}: {e}") from None
            eot = None
        stops = {int(i) for i in generation.get("eos_token_ids") or []} or ({eot} if eot is not None else set())
        imported = bool(generation)
        specials = {k: str(generation[k]) for k in ("bos_token", "eos_token") if generation.get(k)}
        return cls(
            mid,
            frozenset(names),
            model,
            tok,
            eot,
            model.config.context_len,
            int(mv.created_at.timestamp()),
            stop_ids=frozenset(stops),
            prefix_ids=() if imported or eot is None else (eot,),
            chat_template=generation.get("chat_template"),
            special_tokens=specials,
            version_id=mv.id,
        )

    def encode(self, text: str) -> list[int]:
        """The prompt's tokens as the tokenizer makes them (an imported tokenizer may add its BOS)."""
        ids: list[int] = self.tokenizer.encode(text).ids
        return ids

    @property
    def vocab_size(self) -> int:
        """Token ids a request may send are below this: the model embeds them and the tokenizer can write them
        (a model's embedding may have padding rows past the tokenizer's last token)."""
        size: int = min(self.model.config.vocab_size, self.tokenizer.get_vocab_size(with_added_tokens=True))
        return size

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device
