"""A loopback HTTP server for weight-archive tests: serves byte strings whole, slowly, cut short with an
honest or a lying Content-Length, and counts the requests per path."""

from __future__ import annotations

import collections
import http.server
import threading
import time
from dataclasses import dataclass


@dataclass
class Body:
    data: bytes
    declared: int | None = None  # Content-Length sent (default: len(data)); larger than data = a cut connection
    delay_per_chunk: float = 0.0  # seconds between 64 KiB chunks: a slow server
    chunk: int = 1 << 16


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        self.server.requests[path] += 1
        body = self.server.bodies.get(path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(body.data) if body.declared is None else body.declared))
        self.end_headers()
        try:
            for start in range(0, len(body.data), body.chunk):
                self.wfile.write(body.data[start : start + body.chunk])
                self.wfile.flush()
                if body.delay_per_chunk:
                    time.sleep(body.delay_per_chunk)
        except OSError:
            return  # the client went away
        if body.declared is not None and body.declared > len(body.data):
            self.close_connection = True  # hang up before the declared length: a cut connection

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    bodies: dict[str, Body]
    requests: collections.Counter


class ArchiveServer:
    """Serves `bodies` ({path: Body or bytes}) on 127.0.0.1; `requests` counts GETs per path."""

    def __init__(self, bodies: dict[str, Body | bytes] | None = None):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.bodies = {}
        self._server.requests = collections.Counter()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        for path, body in (bodies or {}).items():
            self.put(path, body)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def put(self, path: str, body: Body | bytes) -> str:
        """Serve `body` at `path`; returns its URL."""
        self._server.bodies[path] = body if isinstance(body, Body) else Body(body)
        return self.url + path

    @property
    def requests(self) -> collections.Counter:
        return self._server.requests

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ArchiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
