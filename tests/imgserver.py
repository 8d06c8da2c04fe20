"""A tiny HTTP server on 127.0.0.1 serving fixed responses (images, redirects, junk) to tests.

    srv = ImageServer().start()
    srv.add("/cat.png", png_bytes, content_type="image/png")
    srv.add("/hop", status=302, headers={"Location": "http://169.254.169.254/"})
    url = srv.url("/cat.png")
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict, bytes, float]] = {}
        self.hits: dict[str, int] = {}
        self._httpd: ThreadingHTTPServer | None = None

    def add(self, path: str, body: bytes = b"", status: int = 200, headers: dict | None = None,
            content_type: str = "application/octet-stream", delay_s: float = 0.0,
            send_length: bool = True) -> str:
        """send_length=False: no Content-Length (the body ends when the connection closes)."""
        hdrs = {"Content-Type": content_type, **(headers or {})}
        if send_length:
            hdrs.setdefault("Content-Length", str(len(body)))
        self.routes[path] = (status, hdrs, body, delay_s)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> "ImageServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, headers, body, delay = server.routes.get(
                    self.path, (404, {"Content-Type": "text/plain"}, b"not found", 0.0))
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
