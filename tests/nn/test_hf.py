"""load_hf / save_hf on bad input, read_generation, and `aifab import-hf` / `aifab export-hf` through the real CLI."""

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from aifab.nn.config import ModelConfig
from aifab.nn.hf import generation_files, load_hf, read_generation, save_hf
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


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def bos_tokenizer_json() -> bytes:
    """A tiny BPE tokenizer whose post-processor puts <s> (id 1) before every text, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["hello world, hello you\n"] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
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


# --- read_generation and generation_files -----------------------------------------------------------------------


def test_read_generation_of_a_bare_directory_is_all_unknown(tmp_path: Path) -> None:
    assert read_generation(tmp_path) == {
        "bos_token_id": None,
        "eos_token_ids": [],
        "add_bos": False,
        "bos_token": None,
        "eos_token": None,
        "chat_template": None,
    }
    assert generation_files(read_generation(tmp_path)) == {}


def test_read_generation_prefers_generation_config_and_normalises_ids(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": 6}))
    assert read_generation(tmp_path)["eos_token_ids"] == [6]
    assert read_generation(tmp_path)["bos_token_id"] == 5
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8], "bos_token_id": None}))
    got = read_generation(tmp_path)
    assert got["eos_token_ids"] == [7, 8]
    assert got["bos_token_id"] == 5  # null in generation_config.json: config.json's
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id 'two' is not a token id"):
        read_generation(tmp_path)


def test_read_generation_takes_tokens_and_the_chat_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "special": True},
                "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            }
        )
    )
    got = read_generation(tmp_path)
    assert (got["bos_token"], got["eos_token"], got["chat_template"]) == ("<s>", "</s>", "D")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "a", "template": "A"}]}))
    assert read_generation(tmp_path)["chat_template"] == "A"  # no "default": the first
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert read_generation(tmp_path)["chat_template"] == CHAT_TEMPLATE  # the newer file wins
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template is neither"):
        read_generation(tmp_path)


def test_read_generation_sees_whether_the_tokenizer_adds_bos(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json())
    assert read_generation(tmp_path)["add_bos"] is False
    (tmp_path / "tokenizer.json").write_bytes(bos_tokenizer_json())
    assert read_generation(tmp_path)["add_bos"] is True


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"])
def test_read_generation_names_a_malformed_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text('{"eos_token_id": 2,')
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))} is not (a )?valid"):
        read_generation(tmp_path)
    (tmp_path / name).write_text("[1, 2]")  # JSON, but not an object
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))} is not (a )?valid"):
        read_generation(tmp_path)


def test_save_hf_writes_generation_back(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    hf_llama(src)
    (src / "tokenizer.json").write_bytes(bos_tokenizer_json())
    (src / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    generation = read_generation(src)
    assert generation == {
        "bos_token_id": 1,  # LlamaConfig's defaults, written to generation_config.json by save_pretrained
        "eos_token_ids": [2],
        "add_bos": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
    }
    config, state = load_hf(src)
    model = Transformer(config)
    model.load_state_dict(state)
    save_hf(model, out, (src / "tokenizer.json").read_bytes(), generation=generation)
    assert read_generation(out) == generation
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    # transformers reads the tokenizer back as stored (BOS added by its post-processor) and applies the template
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello").input_ids == [1, *tok("hello", add_special_tokens=False).input_ids]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>hi</s><|assistant|>"


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


def test_import_export_keeps_generation_settings(tmp_path: Path) -> None:
    from aifab.registry.models import list_versions, resolve
    from aifab.store import Store

    home, src, out = tmp_path / "home", tmp_path / "src", tmp_path / "out"
    hf_llama(src)
    (src / "tokenizer.json").write_bytes(bos_tokenizer_json())
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}",')
    one_line_error(aifab("import-hf", str(src), "--name", "chat", home=home), f"{src / 'tokenizer_config.json'}")
    store = Store(home)
    try:
        assert list_versions(store) == []
        assert [p for p in store.artifacts.root.rglob("*") if p.is_file()] == []  # no weights stored either
    finally:
        store.close()

    (src / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE})
    )
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    proc = aifab("import-hf", str(src), "--name", "chat", home=home)
    assert proc.returncode == 0, proc.stderr
    store = Store(home)
    try:
        first = resolve(store, "chat:1").generation
    finally:
        store.close()
    assert first == {
        "bos_token_id": 1,
        "eos_token_ids": [2, 0],
        "add_bos": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
    }

    proc = aifab("export-hf", "chat:1", str(out), home=home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": [2, 0]}
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    proc = aifab("import-hf", str(out), "--name", "chat", home=home)
    assert proc.returncode == 0, proc.stderr
    store = Store(home)
    try:
        assert resolve(store, "chat:2").generation == first
    finally:
        store.close()
