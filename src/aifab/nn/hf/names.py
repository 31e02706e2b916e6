"""Tensor names and layouts between Hugging Face checkpoints and our Transformer, declared once per family and
read in both directions: `to_ours` on import, `to_hf` on export.

Layouts: Llama's q, k and v weights are stored for the half-split rotary layout that `apply_rope` uses, so they
are concatenated into our fused `wqkv` as they are (and split back on export). GPT-2 stores Conv1D weights as
(in, out); they are transposed both ways.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from aifab.nn.config import ModelConfig
from aifab.nn.transformer import Transformer

# buffers some checkpoints carry that are not weights: causal masks and rotary frequencies
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def qkv_sizes(config: ModelConfig) -> list[int]:
    """Rows of q, k and v in our fused wqkv: grouped-query attention has fewer key/value heads."""
    kv = config.kv_heads * config.head_dim
    return [config.d_model, kv, kv]


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensor(s) that hold it. `{i}` in a name is the layer index."""

    ours: str
    theirs: tuple[str, ...]  # several: concatenated along dim 0 into ours, split back by `split`
    split: Callable[[ModelConfig], list[int]] | None = None  # the rows of each of `theirs`
    transpose: bool = False  # stored (in, out) by HF (GPT-2's Conv1D)
    needs: str | None = None  # a ModelConfig flag; the tensor exists only when it is true


@dataclass(frozen=True)
class Names:
    """A family's naming: the tensors before the blocks, those of each block, those after. lm_head is not here:
    whether it exists depends on tied embeddings, the same for every family."""

    before: tuple[Rule, ...]
    block: tuple[Rule, ...]
    after: tuple[Rule, ...]
    strip: str = ""  # a prefix some checkpoints of the family put before every name

    def rules(self, config: ModelConfig) -> Iterator[tuple[Rule, str, tuple[str, ...]]]:
        """Each rule that applies to `config`, with its names filled in, in checkpoint order."""
        expanded: list[tuple[Rule, dict[str, int]]] = [(rule, {}) for rule in self.before]
        expanded += [(rule, {"i": i}) for i in range(config.n_layer) for rule in self.block]
        expanded += [(rule, {}) for rule in self.after]
        for rule, fill in expanded:
            if rule.needs is None or getattr(config, rule.needs):
                yield rule, rule.ours.format(**fill), tuple(t.format(**fill) for t in rule.theirs)


def _llama() -> Names:
    layer = "model.layers.{i}."

    def proj(kind: str) -> tuple[str, ...]:
        return tuple(f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv")

    return Names(
        before=(Rule("tok_emb.weight", ("model.embed_tokens.weight",)),),
        block=(
            Rule("blocks.{i}.attn_norm.weight", (f"{layer}input_layernorm.weight",)),
            Rule("blocks.{i}.attn.wqkv.weight", proj("weight"), split=qkv_sizes),
            Rule("blocks.{i}.attn.wqkv.bias", proj("bias"), split=qkv_sizes, needs="qkv_bias"),
            Rule("blocks.{i}.attn.wo.weight", (f"{layer}self_attn.o_proj.weight",)),
            Rule("blocks.{i}.mlp_norm.weight", (f"{layer}post_attention_layernorm.weight",)),
            *(Rule(f"blocks.{{i}}.mlp.{p}.weight", (f"{layer}mlp.{p}_proj.weight",)) for p in ("gate", "up", "down")),
        ),
        after=(Rule("norm.weight", ("model.norm.weight",)),),
    )


def _gpt2() -> Names:
    # (HF module, our module, a Conv1D): every one has a weight and a bias; a Conv1D's weight is (in, out)
    modules = (
        ("ln_1", "attn_norm", False),
        ("attn.c_attn", "attn.wqkv", True),
        ("attn.c_proj", "attn.wo", True),
        ("ln_2", "mlp_norm", False),
        ("mlp.c_fc", "mlp.up", True),
        ("mlp.c_proj", "mlp.down", True),
    )
    return Names(
        before=(Rule("tok_emb.weight", ("wte.weight",)), Rule("pos_emb.weight", ("wpe.weight",))),
        block=tuple(
            Rule(f"blocks.{{i}}.{mine}.{kind}", (f"h.{{i}}.{theirs}.{kind}",), transpose=conv and kind == "weight")
            for theirs, mine, conv in modules
            for kind in ("weight", "bias")
        ),
        after=(Rule("norm.weight", ("ln_f.weight",)), Rule("norm.bias", ("ln_f.bias",))),
        strip="transformer.",
    )


LLAMA = _llama()
NAMES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt2": _gpt2()}


def to_ours(family: str, config: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF tensor names and layouts -> ours. A missing HF tensor, or one left over, raises ValueError naming it."""
    names = NAMES[family]
    hf = {k.removeprefix(names.strip): v for k, v in hf.items()}

    def take(name: str) -> Tensor:
        if name not in hf:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return hf.pop(name)

    ours: dict[str, Tensor] = {}
    for rule, mine, theirs in names.rules(config):
        parts = [take(name) for name in theirs]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        ours[mine] = tensor.t().contiguous() if rule.transpose else tensor
    head = hf.pop("lm_head.weight", None)
    if not config.tie_embeddings:
        if head is None:
            raise ValueError("checkpoint is missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
        ours["lm_head.weight"] = head
    unexpected = sorted(k for k in hf if not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensors: {', '.join(unexpected[:3])}")
    return ours


def to_hf(family: str, model: Transformer) -> dict[str, Tensor]:
    """The model's weights under the family's HF names and layouts, contiguous and on the CPU."""
    config = model.config
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    for rule, mine, theirs in NAMES[family].rules(config):
        tensor = sd[mine].t() if rule.transpose else sd[mine]
        parts = tensor.split(rule.split(config)) if rule.split is not None else (tensor,)
        out.update(zip(theirs, parts, strict=True))
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}
