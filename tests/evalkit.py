"""Helpers for the evaluation tests: a character tokenizer, a model whose every answer is known in advance, a
registered model and dataset in a store, and three code problems whose outcome that model decides."""

import json
import textwrap
from pathlib import Path
from typing import Any

from aifab.store import Store
from aifab.store.schema import DatasetVersion

EOT = "<|endoftext|>"
CHARS = list("abcdefghijklmnopqrstuvwxyz") + list(" \n.:()=\"'[],+-_#0123456789")


def char_tokenizer() -> Any:
    """One token per character (EOT is id 0, then CHARS in order); unknown characters read as '.'."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="."))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), "isolated")
    tok.decoder = decoders.Fuse()
    return tok


def tid(c: str) -> int:
    return CHARS.index(c) + 1


def successor(token: int) -> int:
    """What the counting model predicts after `token`: the next letter (z -> a); after '(' comes '1', after '1'
    comes ')', after ')' a newline, after a newline '#' (where a generated function body ends); after anything
    else, 'a'."""
    letters = range(tid("a"), tid("z") + 1)
    if token in letters:
        return tid("a") + (token - tid("a") + 1) % 26
    chain = {tid("("): tid("1"), tid("1"): tid(")"), tid(")"): tid("\n"), tid("\n"): tid("#")}
    return chain.get(token, tid("a"))


LOGIT = 10.0  # lm_head weight of the predicted token; the normalised embedding is sqrt(d_model) long


def counting_model(context_len: int = 16) -> Any:
    """A Transformer whose blocks add nothing and whose head maps each token to its `successor` with a logit of
    LOGIT * sqrt(d_model) (80 at d_model 64): the successor's probability is 1 to within e-33."""
    import torch

    from aifab.nn.config import ModelConfig
    from aifab.nn.transformer import Transformer

    V = len(CHARS) + 1
    config = ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=64, context_len=context_len, tie_embeddings=False)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wo.weight", "down.weight")):
                p.zero_()  # the blocks write nothing into the residual stream
        model.tok_emb.weight.zero_()
        model.tok_emb.weight[:, :V] = torch.eye(V)
        model.lm_head.weight.zero_()
        for i in range(V):
            model.lm_head.weight[successor(i), i] = LOGIT
    return model


def random_model(context_len: int = 16, seed: int = 0) -> Any:
    """A random-weights Transformer over the character vocabulary (attention and MLP at work)."""
    import torch

    from aifab.nn.config import ModelConfig
    from aifab.nn.transformer import Transformer

    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(CHARS) + 1, n_layer=2, n_head=2, d_model=32, context_len=context_len)
    return Transformer(config).eval()


def register_model(store: Store, model: Any, name: str, dataset_version_id: int | None = None) -> str:
    """Store the weights and the character tokenizer, register the next version of `name`; its reference."""
    from aifab.nn.transformer import num_params
    from aifab.nn.weights import to_bytes
    from aifab.registry.models import register

    weights = store.artifacts.put_bytes(to_bytes(model))
    tok = store.artifacts.put_bytes(char_tokenizer().to_str().encode())
    mv = register(
        store, name, weights_digest=weights, tokenizer_digest=tok, config=model.config.to_dict(),
        params_count=num_params(model), metrics={}, dataset_version_id=dataset_version_id,
    )  # fmt: skip
    return f"{mv.name}:{mv.version}"


def curated_dataset(store: Store, texts: list[str], val_fraction: float = 0.5, name: str = "docs") -> DatasetVersion:
    """A dataset version whose curated file holds `texts` (no shards: evaluation reads only the curated text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = store.home / "curated.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    digest = store.artifacts.put_file(path)
    with store.db.session() as s:
        row = DatasetVersion(
            name=name, version=1, manifest_digest="a" * 64, tokenizer_digest="b" * 64, files=1, bytes=0,
            documents=len(texts), tokens=0, train_tokens=0, val_tokens=0, params={"val_fraction": val_fraction},
            curated_digest=digest,
        )  # fmt: skip
        s.add(row)
        s.flush()
        s.expunge(row)
    return row


def write_task(directory: Path, body: str, rows: list[dict[str, Any]] | None = None, name: str = "task") -> Path:
    """A task file (dedented) and, when `rows` are given, its data.jsonl beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        (directory / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


# Three problems in the python-code format: the counting model completes "x = (" with "1)" and then a newline.
STAND_IN_PROBLEMS = [
    {
        "task_id": "stand-in/0",
        "prompt": "def one():\n    return 1\n\n\nx = (",
        "canonical": "1)",
        "test": "def check(candidate):\n    assert candidate() == 1\n",
        "entry_point": "one",
    },
    {
        "task_id": "stand-in/1",
        "prompt": "def two():\n    return 1\n\n\nx = (",
        "canonical": "2)",
        "test": "def check(candidate):\n    assert candidate() == 2\n",
        "entry_point": "two",
    },
    {
        "task_id": "stand-in/2",
        "prompt": "def three():\n    return 3\n\n\nx = [",
        "canonical": "3]",
        "test": "def check(candidate):\n    assert candidate() == 3\n",
        "entry_point": "three",
    },
]


def write_problems(path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in STAND_IN_PROBLEMS))
    return path
