"""Hugging Face checkpoints to and from our Transformer: Llama, Mistral, Qwen2 and GPT-2, safetensors only.

- `load_hf(dir)` reads `config.json` and one or several `*.safetensors` files (sharded with
  `model.safetensors.index.json` or not) and returns our ModelConfig plus a state dict under our names;
  `save_hf(model, dir)` writes `config.json` and `model.safetensors` in the format of the model's family
  (`family_of`). Both in `checkpoint`, over `config` (config.json) and `names` (the tensor name table).
- `read_generation(dir)` reads what generation needs (BOS/EOS ids and strings, whether the tokenizer adds BOS,
  the chat template); `save_hf(..., generation=...)` writes it back through `generation_files`. In `generation`.
"""

from aifab.nn.hf.checkpoint import load_hf, save_hf
from aifab.nn.hf.config import family_of
from aifab.nn.hf.generation import Generation, generation_files, read_generation

__all__ = ["Generation", "family_of", "generation_files", "load_hf", "read_generation", "save_hf"]
