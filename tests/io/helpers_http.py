"""A real HTTP file server on 127.0.0.1 for tests, with scriptable faults.

Usage::

    with FileServer({"/a.bin": data}, drop_after=1000) as server:
        download(server.url("/a.bin"), dest)
        server.requests  # [(path, range_header, status), ...]

Faults: ``drop_after`` (close the connection after that many body bytes, on the first
``drops`` requests for a file), ``honour_range=False`` (always answer 200 with the whole file),
``send_length=False`` (no Content-Length: the body ends when the connection closes),
``stall`` (after ``drop_after`` bytes, hang that many seconds before closing),
``fail_first`` (answer the first N requests with ``fail_status``) and ``redirects``
(``{path: target_path}`` answered with 302). Every socket has a 5 s timeout.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SOCKET_TIMEOUT = 5.0


@dataclass
class ServerConfig:
    """What the server serves and how it misbehaves."""

    files: dict[str, bytes]
    drop_after: int | None = None
    drops: int = 1
    honour_range: bool = True
    send_length: bool = True
    fail_first: int = 0
    fail_status: int = 503
    stall: float = 0.0
    redirects: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    timeout = SOCKET_TIMEOUT  # applied to the accepted socket
    protocol_version = "HTTP/1.0"  # one request per connection: the close ends the body

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    @property
    def config(self) -> ServerConfig:
        return self.server.config  # type: ignore[attr-defined]

    def _record(self, status: int) -> int:
        """Log this request; return how many earlier requests asked for the same path."""
        with self.config.lock:
            earlier = sum(1 for p, _, _ in self.config.requests if p == self.path)
            self.config.requests.append((self.path, self.headers.get("Range"), status))
        return earlier

    def do_GET(self):  # noqa: N802 - http.server naming
        config = self.config
        if self.path in config.redirects:
            self._record(302)
            self.send_response(302)
            self.send_header("Location", config.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in config.files:
            self._empty(404)
            return
        if len(config.requests) < config.fail_first:
            self._empty(config.fail_status)
            return
        self._serve(config.files[self.path])

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self._record(status)
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, data: bytes) -> None:
        start = self._range_start()
        if start is not None and start >= len(data):
            self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
            return
        status = 206 if start is not None else 200
        start = start or 0
        earlier = self._record(status)
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.config.send_length:
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        dropping = self.config.drop_after is not None and earlier < self.config.drops
        self.wfile.write(data[start:start + self.config.drop_after] if dropping else data[start:])
        self.wfile.flush()
        if dropping and self.config.stall:
            time.sleep(self.config.stall)  # hang instead of closing: the client must time out

    def _range_start(self) -> int | None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        return int(match.group(1)) if match and self.config.honour_range else None


class FileServer:
    """Context manager running :class:`_Handler` in a thread on an ephemeral local port."""

    def __init__(self, files: dict[str, bytes], **faults):
        self.config = ServerConfig(files=dict(files), **faults)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.config = self.config  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def requests(self) -> list[tuple[str, str | None, int]]:
        return list(self.config.requests)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=SOCKET_TIMEOUT)


def closed_port_url(path: str = "/") -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
