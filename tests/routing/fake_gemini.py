"""A fake Gemini on 127.0.0.1 speaking the `generateContent` wire format, for tests that run the
real engine end to end."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeGemini:
    """`POST /v1beta/models/{model}:generateContent`, recording what it receives. Call k (from 1)
    is answered with the PNG `image_for(k)` and `usage`; past `answered` calls (None: never), with
    a 400 INVALID_ARGUMENT, after `release` is set when `hold` is (with `held_made`, as the calls
    before it are, made)."""

    PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:]+):generateContent$")

    def __init__(self, image_for: Callable[[int], bytes], usage: dict[str, Any], *,
                 answered: int | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.hold = False
        self.held_made = False
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                fake.received.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                call = len(fake.received)
                match = fake.PATH.match(self.path)
                if match is None:
                    self._send(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
                    return
                if answered is not None and call > answered:
                    if fake.hold:
                        fake.release.wait(30)
                    if not (fake.hold and fake.held_made):
                        self._send(400, {"error": {"code": 400, "message": "Request contains an invalid argument.",
                                                   "status": "INVALID_ARGUMENT"}})
                        return
                self._send(200, {
                    "candidates": [{"content": {"role": "model", "parts": [
                        {"text": "Here is the render."},
                        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image_for(call)).decode()}},
                    ]}, "finishReason": "STOP", "index": 0}],
                    "usageMetadata": usage, "modelVersion": match["model"], "responseId": f"resp-{call}",
                })

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-gemini", daemon=True)

    @property
    def calls(self) -> int:
        return len(self.received)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeGemini:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
