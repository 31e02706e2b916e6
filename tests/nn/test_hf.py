"""load_hf / save_hf on bad input, and `aifab import-hf` / `aifab export-hf` through the real CLI."""

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from aifab.nn.config import ModelConfig
from aifab.nn.hf import load_hf, save_hf
from aifab.nn.transformer import Transformer
from helpers import aifab

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

VOCAB = 128


def tokenizer_json() -> bytes:
    """A tiny BPE tokenizer with the <|endoftext|> token the server needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainer=trainer)
    return tok.to_str().encode()


def hf_llama(path: Path, tied: bool = False) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def one_line_error(proc: Any, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- load_hf and save_hf on bad input ---------------------------------------------------------------------------


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config.json not found"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        load_hf(tmp_path / "nope")


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        load_hf(tmp_path)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model.bin\); aifab never unpickles"):
        load_hf(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_llama(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    k_proj = tensors.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_hf(tmp_path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = k_proj[:16]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'blocks.1.attn.wqkv.weight' is \[112, 64\]"):
        load_hf(tmp_path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = k_proj
    tensors["model.layers.9.extra.weight"] = k_proj.clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors: model.layers.9.extra.weight"):
        load_hf(tmp_path)


def test_unsupported_features_are_named(tmp_path: Path) -> None:
    hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        load_hf(tmp_path)


def test_save_hf_refuses_a_shape_no_family_has(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=32, norm="layer")  # LayerNorm + SwiGLU
    with pytest.raises(ValueError, match="no Hugging Face family"):
        save_hf(Transformer(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_native_default_model_exports_as_llama(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, context_len=16)).eval()
    save_hf(model, tmp_path, tokenizer_json=b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.model_type == "llama" and hf.config.tie_word_embeddings
    with torch.no_grad():
        assert float((hf(ids()).logits - model(ids())[0]).abs().max()) < 1e-4


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_import_then_export_through_the_cli(tmp_path: Path) -> None:
    home, src, out = tmp_path / "home", tmp_path / "src", tmp_path / "out"
    hf = hf_llama(src)
    tok = tokenizer_json()
    proc = aifab("import-hf", str(src), "--name", "imp", home=home)
    one_line_error(proc, "tokenizer.json not found")
    (src / "tokenizer.json").write_bytes(tok)
    proc = aifab("import-hf", str(src), "--name", "imp", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "imp:1" in proc.stdout

    from aifab.registry.models import resolve
    from aifab.store import Store

    mv = resolve(Store(home), "imp@latest")
    assert mv.run_id is None and mv.config["n_kv_heads"] == 2 and mv.params_count == hf.num_parameters()

    proc = aifab("export-hf", "imp@latest", str(out), home=home)
    assert proc.returncode == 0, proc.stderr
    assert (out / "tokenizer.json").read_bytes() == tok
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert float((back(ids()).logits - hf(ids()).logits).abs().max()) < 1e-4

    one_line_error(aifab("export-hf", "imp:1", str(out), home=home), "exists and is not an empty directory")
    one_line_error(aifab("export-hf", "nope", str(tmp_path / "o2"), home=home), "unknown model 'nope'")


def test_cli_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    one_line_error(aifab("import-hf", str(tmp_path / "missing"), "--name", "m", home=home), "is not a directory")
    bert = tmp_path / "bert"  # config.json missing: see test_missing_config_json (each CLI call imports torch)
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    one_line_error(aifab("import-hf", str(bert), "--name", "m", home=home), "model_type 'bert' is not supported")
    (bert / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (bert / "pytorch_model.bin").write_bytes(b"\x80\x04")
    one_line_error(aifab("import-hf", str(bert), "--name", "m", home=home), "pytorch_model.bin", "never unpickles")
