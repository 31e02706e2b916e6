"""Hugging Face checkpoint directories to and from our Transformer: Llama, Mistral, Qwen2 and GPT-2, safetensors
only. `hf.config` maps config.json, `hf.names` the tensors, `hf.generation` the tokenizer and generation settings.

Nothing is ever unpickled: a directory holding only `pytorch_model.bin` is refused. Every failure is a
ValueError whose message names the file, key or tensor at fault. `transformers` is not needed.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aifab.nn.config import ModelConfig
from aifab.nn.hf.config import config_from_hf, family_of, hf_config, read_config
from aifab.nn.hf.generation import generation_files
from aifab.nn.hf.names import to_hf, to_ours
from aifab.nn.transformer import Transformer

PICKLED = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")


def _read_tensors(root: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        pickled = sorted({p.name for pattern in PICKLED for p in root.glob(pattern)})
        if pickled:
            raise ValueError(
                f"{root} holds only pickled weights ({', '.join(pickled)}); aifab never unpickles: "
                "save the checkpoint with safe_serialization=True (model.safetensors)"
            )
        raise ValueError(f"{root} has no *.safetensors weights")
    tensors: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path} is named by {index.name} but does not exist")
        try:
            tensors.update(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    return tensors


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and weights (our names, as stored dtypes) of the HF checkpoint in directory `path`.

    The weights are checked against the shapes the config implies; a wrong one raises ValueError naming it.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    raw = read_config(root)
    tensors = _read_tensors(root)  # before the config's details: a pickle-only directory is the first thing to say
    try:
        config = config_from_hf(raw)
    except TypeError as e:
        raise ValueError(f"{root / 'config.json'}: {e}") from None
    state = to_ours(raw["model_type"], config, tensors)
    with torch.device("meta"):  # shapes only, no memory
        expected = Transformer(config).state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    for name, ref in expected.items():
        if name not in state:
            raise ValueError(f"checkpoint is missing tensor for {name!r}")
        if state[name].shape != ref.shape:
            raise ValueError(f"tensor {name!r} is {list(state[name].shape)}, config.json implies {list(ref.shape)}")
    return config, state


def save_hf(
    model: Transformer,
    path: str | Path,
    tokenizer_json: bytes | None = None,
    generation: Mapping[str, Any] | None = None,
) -> None:
    """Write config.json, model.safetensors and (if given) tokenizer.json into directory `path`, plus
    generation_config.json and tokenizer_config.json when `generation` holds something for them.

    The directory is created if needed; files in it with the same names are replaced.
    """
    from safetensors.torch import save_file

    config = hf_config(model.config)  # raises before anything is written
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file(to_hf(family_of(model.config), model), str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_json is not None:
        (root / "tokenizer.json").write_bytes(tokenizer_json)
    for name, data in generation_files(generation or {}).items():
        (root / name).write_text(json.dumps(data, indent=2) + "\n")
