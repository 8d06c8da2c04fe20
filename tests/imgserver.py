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


# ----------------------------------------------------------------------------- raw HTTP client
def http(method: str, url: str, body: bytes | dict | None = None, timeout: float = 60.0,
         headers: dict | None = None) -> tuple[int, bytes]:
    """One request with the standard library (status, body); no retries, no client magic."""
    import http.client
    import json
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def stream_lines(url: str, body: dict, max_lines: int, timeout: float = 60.0,
                 before_close=None) -> list[str]:
    """POST a streaming request, read `max_lines` SSE data lines, call `before_close()` (still
    connected), then drop the connection."""
    import http.client
    import json
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    lines: list[str] = []
    try:
        conn.request("POST", u.path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        while len(lines) < max_lines:
            line = r.fp.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                lines.append(line.decode().strip())
        if before_close is not None:
            before_close()
    finally:
        conn.sock and conn.sock.close()
        conn.close()
    return lines
