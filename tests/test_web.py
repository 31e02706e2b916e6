import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from aifab.errors import AifabError, ServeError
from aifab.web import BackgroundServer, bind


@pytest.fixture
def occupied() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    yield holder.getsockname()[1]
    holder.close()


def ping_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return app


def test_bind_port_zero_picks_a_free_port_and_listens() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
        with socket.create_connection((host, port), timeout=5):
            pass  # accepted into the backlog: the socket is listening
    finally:
        sock.close()


def test_bind_on_an_occupied_port_is_a_clear_error(occupied: int) -> None:
    with pytest.raises(ServeError) as exc:
        bind("127.0.0.1", occupied)
    message = str(exc.value)
    assert str(occupied) in message and "already in use" in message
    assert "\n" not in message
    assert isinstance(exc.value, AifabError)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("bad host!", "cannot bind to host 'bad host!'"),  # does not resolve
        ("192.0.2.1", "cannot bind to 192.0.2.1:0"),  # TEST-NET: resolves, but is no address of this machine
    ],
)
def test_bind_to_an_invalid_host_is_a_clear_error(host: str, message: str) -> None:
    with pytest.raises(ServeError, match=message):
        bind(host, 0)


def test_background_server_binds_loopback_by_default_and_stops() -> None:
    srv = BackgroundServer(ping_app())
    assert srv.host == "127.0.0.1" and srv.port > 0
    assert srv.url == f"http://127.0.0.1:{srv.port}"
    assert srv.sock.getsockname()[0] == "127.0.0.1"
    with srv:
        r = httpx.get(srv.url + "/ping", timeout=10)
        assert r.status_code == 200 and r.json() == {"pong": "yes"}
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/ping", timeout=10)


def test_two_background_servers_get_different_ports() -> None:
    with BackgroundServer(ping_app()) as a, BackgroundServer(ping_app()) as b:
        assert a.port != b.port
        assert httpx.get(a.url + "/ping", timeout=10).status_code == 200
        assert httpx.get(b.url + "/ping", timeout=10).status_code == 200


def test_background_server_on_an_occupied_port_fails_before_starting(occupied: int) -> None:
    with pytest.raises(ServeError, match="already in use"):
        BackgroundServer(ping_app(), port=occupied)
