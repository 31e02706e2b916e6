"""Weights to and from safetensors bytes. Nothing is ever unpickled.

The model config travels in the safetensors metadata, so a weights file is self-describing; the store
also keeps the config beside the digest.
"""

import json
from typing import Any

import torch
from torch import Tensor

from aifab.nn.config import ModelConfig
from aifab.nn.transformer import Transformer

CONFIG_KEY = "aifab.model_config"


def state_for_save(model: Transformer, sd: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Weights (`model.state_dict()`, or `sd` when given) without the tied lm_head duplicate, contiguous
    and on the CPU."""
    sd = dict(model.state_dict() if sd is None else sd)
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def to_bytes(model: Transformer) -> bytes:
    from safetensors.torch import save

    data: bytes = save(state_for_save(model), metadata={CONFIG_KEY: json.dumps(model.config.to_dict())})
    return data


def config_from_bytes(data: bytes) -> ModelConfig:

    header_len = int.from_bytes(data[:8], "little")
    if len(data) < 8 or header_len > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header: dict[str, Any] = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__") or {}
    if CONFIG_KEY not in meta:
        raise ValueError("weights carry no aifab model config")
    return ModelConfig.from_dict(json.loads(meta[CONFIG_KEY]))


def from_bytes(data: bytes, config: ModelConfig | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Build a model and load weights written by `to_bytes`. Any missing or unexpected tensor is an error."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        config = config or config_from_bytes(data)
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"not a valid safetensors weights file: {e}") from None
    model = Transformer(config)
    expected = {k: v.shape for k, v in state_for_save(model).items()}
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    for k, shape in expected.items():
        if tensors[k].shape != shape:
            raise ValueError(f"weights do not match the model: {k} is {list(tensors[k].shape)}, expected {list(shape)}")
    model.load_state_dict(tensors, strict=False)
    return model.to(device)
