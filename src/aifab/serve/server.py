"""Run the API on uvicorn in a background thread (`aifab serve` keeps its main thread for the engine).

The listening socket is bound here, before uvicorn starts, so an occupied port is one clear error and
port 0 picks a free port.
"""

import errno
import socket
import threading
import time
from typing import Any

from aifab.errors import ServeError


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
