"""An HTTP proxy in front of the test S3 server that can hold one request: the test learns that
an upload is inside its write window (a part in flight) and kills the writer right there.

Everything else passes through unchanged (the Host header too, which SigV4 signs).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Hop-by-hop headers, and the ones the proxy sets itself.
_DROP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "proxy-connection"}

Match = Callable[[str, str], bool]  # (method, path with query) -> hold this request?


def upload_part(number: int) -> Match:
    """Matches UploadPart of part ``number`` (parts before it pass: they are in the upload)."""

    def match(method: str, path: str) -> bool:
        query = parse_qs(urlsplit(path).query)
        return method == "PUT" and "uploadId" in query and query.get("partNumber") == [str(number)]

    return match


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that was SIGKILLed resets its connections: expected here


class S3Gate:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.held = threading.Event()  # set when the matching request arrived and is held
        self._release = threading.Event()
        self._match: Match | None = None
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def hold(self, match: Match) -> None:
        """Hold the next request that matches, until ``release``; it then fails (no answer)."""
        self.held.clear()
        self._release.clear()
        self._match = match

    def release(self) -> None:
        self._match = None
        self._release.set()

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self._read_body()
                match = gate._match
                if match is not None and match(self.command, self.path):
                    gate._match = None
                    gate.held.set()
                    gate._release.wait(120)
                    self.close_connection = True  # the writer is dead by now: no answer
                    return
                conn = http.client.HTTPConnection(*gate.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _DROP:
                            self.send_header(name, value)
                    if self.command == "HEAD":  # no body, but the object's length
                        self.send_header("Content-Length", response.getheader("Content-Length", "0"))
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
