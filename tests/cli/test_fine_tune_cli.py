"""Fine-tuning an imported Hugging Face model through the real CLI: import-hf, ingest --tokenizer-from,
train --from (full and LoRA), export-hf; and the one-line errors for fine-tuning asked for wrongly."""

import json
import math
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from aifab.store import Store
from aifab.store.schema import DatasetVersion
from helpers import aifab, write_corpus

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320  # padded past the tokenizer's vocabulary, as real checkpoints often are
MODEL_CONTEXT = 64
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"

# val_fraction 0.2: the tiny corpus needs a validation split longer than one window
CONFIG = """\
data:
  val_fraction: 0.2
training:
  batch_size: 8
  eval_every: 10
  eval_batches: 4
  warmup_steps: 5
"""


@dataclass(frozen=True)
class Imported:
    home: Path
    root: Path
    hf_dir: Path
    config: Path
    hf_model: Any


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    body: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return body


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TOKENIZER_VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Imported]:
    """A random Llama checkpoint whose tokenizer is a byte-level BPE trained on the corpus, imported as `base:1`,
    and the corpus ingested with that tokenizer as dataset `ft`."""
    from aifab.data.tokenize import train_tokenizer

    root = tmp_path_factory.mktemp("fine_tune")
    home, hf_dir, config = root / "home", root / "hf", root / "factory.yaml"
    corpus = write_corpus(root / "corpus")
    config.write_text(CONFIG)
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    tok = train_tokenizer(texts, vocab_size=TOKENIZER_VOCAB, min_frequency=2)
    assert tok.get_vocab_size() <= TOKENIZER_VOCAB

    hf_config = transformers.LlamaConfig(
        vocab_size=MODEL_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_CONTEXT,
    )
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    (hf_dir / "tokenizer.json").write_text(tok.to_str())
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE})
    )

    proc = aifab("import-hf", str(hf_dir), "--name", "base", home=home)
    assert proc.returncode == 0, proc.stderr
    assert "base:1" in proc.stdout
    ingested = last_json(
        aifab(
            "ingest", str(corpus), "--name", "ft", "--config", str(config), "--tokenizer-from", "base", "--json",
            home=home,
        )
    )  # fmt: skip
    assert ingested["version"] == 1 and ingested["tokens"] > 0
    yield Imported(home=home, root=root, hf_dir=hf_dir, config=config, hf_model=hf_model)


@pytest.mark.slow
def test_fine_tune_full_and_lora_then_export(imported: Imported) -> None:
    from aifab.nn.weights import from_bytes
    from aifab.registry.models import resolve

    home, cfg = imported.home, str(imported.config)
    store = Store(home)
    try:  # the dataset was tokenized with the imported model's own tokenizer, not one trained on the corpus
        base = resolve(store, "base@latest")
        with store.db.session() as s:
            ft = s.scalars(select(DatasetVersion).where(DatasetVersion.name == "ft")).one()
            assert ft.tokenizer_digest == base.tokenizer_digest
        # LlamaConfig's default ids, in the generation_config.json that save_pretrained wrote
        assert base.generation is not None and base.generation["eos_token_ids"] == [2]
        assert base.generation["chat_template"] == CHAT_TEMPLATE
    finally:
        store.close()

    common = ("train", "--dataset", "ft", "--from", "base", "--context-len", "32", "--steps", "30", "--config", cfg)
    full = last_json(aifab(*common, "--name", "full", "--lr", "3e-3", "--json", home=home))
    # an untrained model is close to uniform over its (padded) vocabulary
    assert abs(full["val_loss_initial"] - math.log(MODEL_VOCAB)) < 0.5, full
    assert full["val_loss_final"] < full["val_loss_initial"] - 0.5, full
    assert full["steps"] == 30 and full["lora_digest"] is None
    assert full["model_config"]["vocab_size"] == MODEL_VOCAB and full["model_config"]["n_kv_heads"] == 2

    lora = last_json(aifab(*common, "--name", "adapted", "--lora-rank", "4", "--lr", "1e-2", "--json", home=home))
    assert lora["val_loss_final"] < lora["val_loss_initial"] - 0.1, lora
    assert lora["lora_digest"] is not None and lora["lora_digest"] != lora["checkpoint_digest"]
    # LoRA starts as the base model exactly (B = 0), on the same validation batches as the full fine-tune
    assert lora["val_loss_initial"] == pytest.approx(full["val_loss_initial"], rel=1e-4)
    assert lora["params"] == full["params"]  # merged at the end: the registered model has the base's shape

    out = imported.root / "exported"
    proc = aifab("export-hf", "adapted@latest", str(out), home=home)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (out / "tokenizer.json").read_bytes() == (imported.hf_dir / "tokenizer.json").read_bytes()
    # the fine-tune kept its base's generation settings, and export-hf wrote them back
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.vocab_size == MODEL_VOCAB and exported.dtype == torch.float32

    store = Store(home)
    try:
        mv = resolve(store, "adapted@latest")
        assert mv.weights_digest == lora["checkpoint_digest"]
        assert mv.generation == resolve(store, "full@latest").generation == resolve(store, "base:1").generation
        ours = from_bytes(store.artifacts.get_bytes(mv.weights_digest)).eval()
    finally:
        store.close()
    with torch.no_grad():
        exported_logits = exported(ids()).logits
        assert float((exported_logits - ours(ids())[0]).abs().max()) < 1e-4
        original_logits = imported.hf_model(ids()).logits
        assert float((exported_logits - original_logits).abs().max()) > 1e-2  # the adapters changed something
    # the base was frozen: only the adapted projections (wqkv, wo by default) differ from the original checkpoint
    original = imported.hf_model.state_dict()
    exported_state = exported.state_dict()
    assert exported_state.keys() == original.keys()
    changed = {k for k, v in exported_state.items() if not torch.equal(v, original[k])}
    adapted = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
    assert changed == {k for k in original if k.endswith(adapted)}, sorted(changed)


def test_fine_tune_bad_inputs_are_one_line_errors(imported: Imported) -> None:
    home, cfg = imported.home, str(imported.config)
    corpus = imported.root / "corpus"

    # a dataset with its own trained tokenizer: its ids mean nothing to the base model
    own = aifab("ingest", str(corpus), "--name", "own", "--config", cfg, home=home)
    assert own.returncode == 0, own.stderr
    one_line_error(
        aifab("train", "--dataset", "own", "--from", "base", "--name", "x", "--steps", "2", home=home),
        "--tokenizer-from",
        "base:1",
    )
    one_line_error(
        aifab("train", "--dataset", "ft", "--model", "tiny", "--lora-rank", "4", "--name", "x", home=home),
        "--lora-rank",
        "--from",
    )
    one_line_error(
        aifab("train", "--dataset", "ft", "--from", "base", "--model", "tiny", "--name", "x", home=home),
        "--from",
        "--model",
    )
    one_line_error(
        aifab(
            "train", "--dataset", "ft", "--from", "base", "--context-len", "128", "--steps", "2", "--name", "x",
            home=home,
        ),
        "128",
        str(MODEL_CONTEXT),
    )  # fmt: skip
    one_line_error(
        aifab("ingest", str(corpus), "--name", "y", "--tokenizer-from", "nosuch", home=home),
        "unknown model 'nosuch'",
    )
    one_line_error(
        aifab("train", "--resume", "somerun", "--from", "base", "--name", "x", home=home),
        "--resume",
        "--from",
    )
    # none of the refusals registered a model or a dataset
    from aifab.errors import NotFound
    from aifab.registry.models import resolve

    store = Store(home)
    try:
        with pytest.raises(NotFound, match="unknown model 'x'"):
            resolve(store, "x")
        with store.db.session() as s:
            assert sorted(s.scalars(select(DatasetVersion.name))) == ["ft", "own"]
    finally:
        store.close()
