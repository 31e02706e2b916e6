"""Fixtures for the serving tests: the tiny trained model loaded, an engine, and a server in front of it
(one of each per test module); and a random model with a longer context over the same tokenizer."""

from collections.abc import Iterator

import httpx
import pytest
import torch

from aifab.nn.config import ModelConfig
from aifab.nn.transformer import Transformer
from aifab.serve.api import create_app
from aifab.serve.engine import Engine
from aifab.serve.loaded import LoadedModel
from aifab.store import Store
from aifab.web import BackgroundServer
from serving import WAIT_S


@pytest.fixture(scope="module")
def loaded(trained: tuple[Store, str]) -> LoadedModel:
    store, ref = trained
    return LoadedModel.load(store, ref)


@pytest.fixture(scope="module")
def lm(trained: tuple[Store, str]) -> LoadedModel:
    """A random 2-layer GQA model with a 128-token context over the tiny tokenizer: long prompts fit, and
    random weights spread the logits so the comparison is about the engine, not about near-ties."""
    store, ref = trained
    tiny = LoadedModel.load(store, ref)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tiny.model.config.vocab_size, n_layer=2, n_head=4, n_kv_heads=2, d_model=64)
    config = ModelConfig.from_dict({**config.to_dict(), "context_len": 128})
    model = Transformer(config).eval()
    return LoadedModel(
        "rand:1", frozenset({"rand:1"}), model, tiny.tokenizer, tiny.eot_id, 128, 0,
        stop_ids=tiny.stop_ids, prefix_ids=tiny.prefix_ids,
    )  # fmt: skip


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    e = Engine(loaded)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(engine)) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
        yield c
