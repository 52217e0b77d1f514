# SPDX-License-Identifier: Apache-2.0
"""The scaffolding the tests' fake HTTP servers share: a quiet request handler that answers JSON (or text), and a
server on a free local port, served from a daemon thread.

Each fake subclasses :class:`QuietHandler` for its routes and mixes :class:`LocalServer` into its state dataclass
(which declares the ``server`` field); imported by name like the fakes themselves.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Type


class QuietHandler(BaseHTTPRequestHandler):
    """No access log; :meth:`_send` answers ``bytes`` as they are, ``str`` encoded (as ``text_content_type``) and
    anything else as JSON."""

    text_content_type = "application/json"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: Any) -> None:
        if isinstance(body, bytes):
            data, ctype = body, "application/json"
        elif isinstance(body, str):
            data, ctype = body.encode(), self.text_content_type
        else:
            data, ctype = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalServer:
    """A threaded HTTP server on 127.0.0.1, kept in ``self.server``."""

    server: Optional[ThreadingHTTPServer]

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError(f"server: expected a started {type(self).__name__}, got one not entered")
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _serve(self, handler: Type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
