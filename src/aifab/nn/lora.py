"""LoRA: low-rank adapters applied to a built model, then optionally merged back into it.

`apply_lora(model, cfg)` freezes every parameter and swaps the targeted `nn.Linear` modules for `LoraLinear`,
whose output is base(x) + dropout(x) @ A.T @ B.T * alpha/rank. B starts at zero, so a fresh adapter leaves the
logits unchanged. `merge_lora` folds B @ A * scaling into each base weight and puts the plain Linear back, so the
export paths (nn.weights, nn.hf) see an ordinary model. Adapter tensors are named `<module>.lora_a` / `.lora_b`.
"""

import math
from collections.abc import Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aifab.nn.config import TARGETS, LoraConfig

__all__ = [  # LoraConfig and TARGETS live in nn.config (no torch) and are re-exported here
    "TARGETS",
    "LoraConfig",
    "LoraLinear",
    "apply_lora",
    "count_trainable",
    "load_lora_state",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
]

SUFFIXES = (".lora_a", ".lora_b")
M = TypeVar("M", bound=nn.Module)


class LoraLinear(nn.Module):
    """A frozen `base` Linear (in -> out) plus a trainable rank-r update: A (r, in), B (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = scaling
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # (..., r) -> (..., out)
        out: Tensor = self.base(x) + update * self.scaling
        return out

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with B @ A * scaling added to its weight (computed in fp32)."""
        w = self.base.weight
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling  # (out, in)
        w.copy_((w.float() + delta).to(w.dtype))
        return self.base


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: M, cfg: LoraConfig) -> M:
    """Freeze every parameter of `model` and wrap each targeted Linear in a LoraLinear, in place.

    Raises ValueError if the model already has adapters or no module matches `cfg.targets`
    (GPT-2 layouts have no `gate`, for example; unmatched targets are fine as long as one matches).
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters; merge_lora it first")
    chosen = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in cfg.targets
    ]
    if not chosen:
        raise ValueError(f"lora.targets {list(cfg.targets)} match no Linear module of the model")
    model.requires_grad_(False)
    for name, m in chosen:
        _replace(model, name, LoraLinear(m, cfg.rank, cfg.scaling, cfg.dropout))
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The adapters' A and B parameters: what the optimizer should see."""
    for name, p in model.named_parameters():
        if name.endswith(SUFFIXES):
            yield p


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the A and B tensors, named `<module path>.lora_a|lora_b`, detached, contiguous, on the CPU."""
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if name.endswith(SUFFIXES)}


def load_lora_state(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy adapter tensors into a model that `apply_lora` has wrapped with the same config.

    Raises ValueError naming the tensor when one is missing, unexpected, or of the wrong shape.
    """
    params = {name: p for name, p in model.named_parameters() if name.endswith(SUFFIXES)}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise ValueError(
                f"LoRA tensors do not match the model: {name} is {list(tensors[name].shape)}, expected {list(p.shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def merge_lora(model: M) -> M:
    """Fold every adapter into its base weight and put the plain Linear back, in place.

    The result has the module tree and state-dict names of the original model (base parameters stay frozen).
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLinear):
            _replace(model, name, m.merged())
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The state dict `merge_lora(model)` would have, without touching `model`: each adapted Linear's weight
    is base + B @ A * scaling (in fp32, cast back) under the plain module's names; no adapter tensors.
    `state` (default `model.state_dict()`) supplies the tensors, e.g. a full state gathered from FSDP shards."""
    sd = dict(model.state_dict() if state is None else state)
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            for key in ("weight", "bias"):
                value = sd.pop(f"{name}.base.{key}", None)
                if value is not None:
                    sd[f"{name}.{key}"] = value
            w = sd[f"{name}.weight"]
            delta = (sd[f"{name}.lora_b"].float() @ sd[f"{name}.lora_a"].float()) * m.scaling
            sd[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
            del sd[f"{name}.lora_a"], sd[f"{name}.lora_b"]
    return sd


def count_trainable(model: nn.Module) -> int:
    """Parameters with requires_grad, counted once even when tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
