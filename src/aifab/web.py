"""HTTP plumbing shared by aifab's services (the serving API in serve/, the control plane in jobs/), free of
torch; neither service imports the other's package for it:
- `bind` + `BackgroundServer`: uvicorn in a background thread (`aifab serve` keeps its main thread for the
  engine). The listening socket is bound before uvicorn starts, so an occupied port is one clear error and
  port 0 picks a free port.
- `error`: the OpenAI-style error body every endpoint answers with.
- `require_bearer`: refuse requests without `Authorization: Bearer <secret>` when a secret is configured.
"""

import errno
import hmac
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from aifab.errors import ServeError


def error(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error response: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def require_bearer(app: FastAPI, secret: str | None, message: str) -> None:
    """With `secret`, every request to `app` needs `Authorization: Bearer <secret>` (compared in constant
    time), else gets 401 with `message`. Without one, the app is open."""
    if secret is None:
        return
    expected = f"Bearer {secret}".encode()

    @app.middleware("http")
    async def check(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return error(401, message, kind="authentication_error")
        return await call_next(request)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or ServeError naming what is wrong."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot bind to host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:  # 98 on Linux, 48 on macOS
            raise ServeError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise ServeError(f"cannot bind to {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server(app: Any, sock: socket.socket) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    return uvicorn.Server(config)


class BackgroundServer:
    """`with BackgroundServer(app) as srv:` serves on srv.url from a daemon thread until the block ends."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = _server(app, self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
