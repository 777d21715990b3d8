"""A local HTTP server for input-URL tests: serves an image, errors, a slow drip, a huge body,
a stall, redirects; and collects webhooks the Cog server sends."""

from __future__ import annotations

import http.server
import json
import queue
import threading
import time
import urllib.parse

PNG_PATH = "/image.png"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        self.server.requested.append(path)
        if path in self.server.files:
            body, mime = self.server.files[path]
            self.send_response(200)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/drip.png":  # one byte every 0.2 s, forever
            self._stream(lambda: (time.sleep(0.2), b"\x89")[1])
        elif path == "/huge.png":  # no Content-Length, then megabytes until the client gives up
            self._stream(lambda: b"\0" * (1 << 20))
        elif path == "/huge-declared.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif path == "/redirect":  # 302 to the URL in ?to=, else to itself (a loop)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            self.send_response(302)
            self.send_header("Location", query.get("to", ["/redirect"])[0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/stall.png":  # headers, then silence
            self.send_response(200)
            self.end_headers()
            self.wfile.flush()
            time.sleep(30)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _stream(self, chunk) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for _ in range(100_000):
                self.wfile.write(chunk())
                self.wfile.flush()
        except OSError:
            pass  # the client hung up, as it should

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.webhooks.put((time.monotonic(), json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, tuple[bytes, str]]
    webhooks: queue.Queue
    requested: list[str]


class LocalHTTP:
    """Serves `files` ({path: (bytes, mime)}) and the slow/huge/stalled endpoints on 127.0.0.1."""

    def __init__(self, files: dict[str, tuple[bytes, str]] | None = None):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.files = dict(files or {})
        self._server.webhooks = queue.Queue()
        self._server.requested = []
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def files(self) -> dict[str, tuple[bytes, str]]:
        return self._server.files

    @property
    def requested(self) -> list[str]:
        """The path of every GET received, in order."""
        return self._server.requested

    @property
    def webhooks(self) -> queue.Queue:
        """(arrival time.monotonic(), payload) for every POST received."""
        return self._server.webhooks

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
