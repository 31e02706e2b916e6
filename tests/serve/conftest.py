"""Fixtures for the serving tests: the tiny trained model loaded, an engine, and a server in front of it
(one of each per test module)."""

from collections.abc import Iterator

import httpx
import pytest

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
